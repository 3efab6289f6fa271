"""Data for training and evaluation: datasets, transforms, samplers and mixup, wired into loaders.

    loaders = build_loaders(cfg.data, cfg.model.img_size, rank, world_size, seed)
    for epoch in ...:
        set_epoch(loaders, epoch)            # set_epoch(loaders, epoch, start_batch): resume mid-epoch
        for images, target in loaders.train: ...

Reproducibility: the train sampler's order is a function of (seed, epoch), and each training
batch's augmentation a function of (seed, rank, epoch, batch position) alone: the batch sampler
gives every batch a seed, from which the dataset seeds the RNGs before decoding it
(``SeededBatchSampler``, ``SeededBatches``). So a resumed run replays the uninterrupted one's
augmentations whatever the DataLoader workers did before, a mid-epoch resume starts at its batch
without decoding the ones before, and the train workers persist across epochs as the val ones do.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from engine.config import DataConfig
from engine.errors import UserError

from .datasets import (
    DatasetInfo, ImageFolderDataset, SeededBatches, base_dataset, check_same_classes, create_dataset, take_subset,
)
from .samplers import RepeatAugSampler, SeededBatchSampler, ShardedEvalSampler
from .transforms import eval_transform, train_transform

__all__ = [
    "Loaders", "DatasetInfo", "build_loaders", "build_eval_loader", "build_mixup", "repeated_aug_copies", "set_epoch",
    "eval_transform", "train_transform", "RepeatAugSampler", "ShardedEvalSampler",
]


@dataclass
class Loaders:
    """Everything train.py needs from the data side."""

    train: DataLoader
    val: DataLoader
    train_sampler: Sampler
    val_sampler: ShardedEvalSampler
    mixup_fn: Optional[Mixup]
    info: DatasetInfo


class _Loader(DataLoader):
    """A DataLoader whose workers' UserErrors (a corrupt image with data.bad_images=error)
    reach the caller as the original one-line message instead of torch's wrapped traceback."""

    def __iter__(self):
        batches = super().__iter__()
        try:
            yield from batches
        except Exception as e:
            # torch leaves a failed iterator's workers to the garbage collector, whose shutdown
            # of them stalls ~5 s per worker; stop them now (the next epoch starts new ones).
            stop = getattr(batches, "_shutdown_workers", None)
            if stop is not None:
                stop()
                self._iterator = None
            if isinstance(e, UserError) and "Original Traceback" in str(e):
                raise UserError(str(e).rsplit("UserError: ", 1)[-1].strip()) from None
            raise


def _resolve_info(cfg: DataConfig, info: DatasetInfo, num_classes: Optional[int]) -> DatasetInfo:
    """Apply ``data.mean``/``data.std`` (their length sets the channels: 3 values on a
    grayscale dataset feed it as RGB) and ``model.num_classes`` to the dataset's info."""
    mean = tuple(cfg.mean) if cfg.mean else info.mean
    std = tuple(cfg.std) if cfg.std else info.std
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise UserError(f"data.mean {list(mean)} / data.std {list(std)}: need 1 or 3 values each, the same number "
                        f"(dataset {info.name} has {info.in_chans} channel(s))")
    classes = info.num_classes
    if num_classes is not None:
        if classes and num_classes < classes:
            raise UserError(f"model.num_classes={num_classes} is smaller than the {classes} classes of {info.name}")
        classes = num_classes
    if not classes:
        raise UserError(f"cannot tell how many classes dataset {info.name} has: set model.num_classes")
    return replace(info, num_classes=classes, in_chans=len(mean), mean=mean, std=std)


def build_mixup(cfg: DataConfig, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix (with label smoothing folded into the soft targets) when any of
    ``mixup``, ``cutmix``, ``cutmix_minmax`` is on, else None."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None
    if cfg.batch_size % 2:
        raise UserError(f"data.batch_size={cfg.batch_size}: mixup/cutmix pair images and need an even batch; "
                        "change it or set data.mixup=0 data.cutmix=0")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def _eval_batch_size(cfg: DataConfig) -> int:
    return cfg.eval_batch_size or max(1, int(1.5 * cfg.batch_size))


def _eval_loader(cfg: DataConfig, ds: Dataset, rank: int, world_size: int) -> Tuple[DataLoader, ShardedEvalSampler]:
    sampler = ShardedEvalSampler(ds, world_size, rank)
    loader = _Loader(ds, batch_size=_eval_batch_size(cfg), sampler=sampler, num_workers=cfg.workers,
                     pin_memory=cfg.pin_memory and torch.cuda.is_available(), drop_last=False,
                     persistent_workers=cfg.workers > 0)
    return loader, sampler


def repeated_aug_copies(repeated_aug: int, world_size: int, warn: bool = True) -> int:
    """Copies of each image per epoch for ``data.repeated_aug`` on ``world_size`` processes:
    at most one per process. Repeated augmentation gives each copy its own process (DeiT's
    RASampler); copies sharing a process would mostly share a batch and only shrink the epoch's
    distinct images, so DeiT turns it off on one process, and fewer processes than copies get
    fewer copies here. ``warn`` says so when it happens."""
    copies = min(repeated_aug, world_size)
    if warn and copies < repeated_aug:
        if copies == 1:
            what = ("is off on a single process, as in DeiT (its RASampler runs only when distributed): the copies "
                    f"would share one batch and an epoch would see 1/{repeated_aug} of the images")
        else:
            what = (f"makes {copies} copies per image on {world_size} processes, one per process: copies sharing a "
                    "process would mostly share a batch")
        warnings.warn(f"data.repeated_aug={repeated_aug}: repeated augmentation {what}", stacklevel=2)
    return copies


def build_loaders(data_cfg: DataConfig, img_size: int, rank: int, world_size: int, seed: int,
                  num_classes: Optional[int] = None) -> Loaders:
    """Train loader (``data.train_split``, sharded by a repeated-augmentation sampler when
    ``repeated_aug_copies`` > 1 else a seeded DistributedSampler, in seeded whole batches:
    ``SeededBatchSampler``) and exact val loader (``data.val_split``, ShardedEvalSampler), mixup,
    and the dataset info."""
    cfg = data_cfg
    train_ds, info = create_dataset(cfg, cfg.train_split, training=True)
    val_ds, val_info = create_dataset(cfg, cfg.val_split, training=False)
    if isinstance(train_ds, ImageFolderDataset) and isinstance(val_ds, ImageFolderDataset):
        check_same_classes(train_ds.classes, val_ds.classes, train_ds.root, val_ds.root)
    elif info.num_classes and val_info.num_classes and info.num_classes != val_info.num_classes:
        raise UserError(f"dataset {info.name}: split {cfg.train_split!r} has {info.num_classes} classes but "
                        f"{cfg.val_split!r} has {val_info.num_classes}")
    info = _resolve_info(cfg, info, num_classes)
    train_ds.transform = train_transform(cfg, img_size, info.mean, info.std)
    val_ds.transform = eval_transform(img_size, cfg.crop_pct, cfg.interpolation, info.mean, info.std)
    train_ds = take_subset(train_ds, cfg.max_train_samples)
    val_ds = take_subset(val_ds, cfg.max_val_samples)

    repeats = repeated_aug_copies(cfg.repeated_aug, world_size, warn=rank == 0)
    if repeats > 1:
        train_sampler = RepeatAugSampler(train_ds, world_size, rank, num_repeats=repeats, seed=seed)
    else:
        train_sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                           drop_last=True)
    # a generator of its own: creating an iterator draws the workers' base seed from it, not from
    # the global RNG, whose stream is the training loop's (and which no batch depends on)
    train = _Loader(SeededBatches(train_ds), batch_sampler=SeededBatchSampler(train_sampler, cfg.batch_size, seed, rank),
                    num_workers=cfg.workers, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                    persistent_workers=cfg.workers > 0, generator=torch.Generator())
    val, val_sampler = _eval_loader(cfg, val_ds, rank, world_size)
    return Loaders(train, val, train_sampler, val_sampler, build_mixup(cfg, info.num_classes), info)


def build_eval_loader(data_cfg: DataConfig, img_size: int, rank: int, world_size: int,
                      transform: Optional[Callable] = None,
                      num_classes: Optional[int] = None) -> Tuple[DataLoader, DatasetInfo]:
    """Exact sharded loader over ``data.val_split`` with the eval transform (or ``transform``)."""
    ds, info = create_dataset(data_cfg, data_cfg.val_split, training=False)
    info = _resolve_info(data_cfg, info, num_classes)
    ds.transform = transform or eval_transform(img_size, data_cfg.crop_pct, data_cfg.interpolation, info.mean,
                                               info.std)
    loader, _ = _eval_loader(data_cfg, take_subset(ds, data_cfg.max_val_samples), rank, world_size)
    return loader, info


def set_epoch(loaders: Loaders, epoch: int, start_batch: int = 0) -> None:
    """Deal ``epoch``'s batches, the training ones from ``start_batch`` on (a resumed epoch skips
    those already trained on, without reading them), and report images skipped under
    ``data.bad_images=skip`` since the last epoch."""
    loaders.train.batch_sampler.set_epoch(epoch, start_batch)
    loaders.val_sampler.set_epoch(epoch)
    for loader in (loaders.train, loaders.val):
        report = getattr(base_dataset(loader.dataset), "report_skipped", None)
        message = report() if report is not None else None
        if message:
            warnings.warn(message, stacklevel=2)
