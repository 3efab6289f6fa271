"""Train and eval transforms: PIL image in, normalised float tensor (C, img_size, img_size) out.

The channel count follows ``len(mean)``: 1 → images are converted to 'L', 3 → to 'RGB', so a
stray palette/RGBA/grayscale file cannot produce a tensor of the wrong shape.
"""
from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from engine.config import DataConfig
from engine.errors import UserError

_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST, "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING, "lanczos": InterpolationMode.LANCZOS,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode for ``data.interpolation``. 'random' (a timm training option) has no
    meaning for deterministic resizing and maps to bicubic, DeiT's eval interpolation."""
    if name == "random":
        return InterpolationMode.BICUBIC
    if name not in _INTERPOLATIONS:
        raise UserError(f"data.interpolation: unknown {name!r}; use one of {sorted(_INTERPOLATIONS)} or random")
    return _INTERPOLATIONS[name]


class ToMode:
    """Convert a PIL image to ``mode`` ('L' or 'RGB') unless it already is."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def _mode_for(mean: Sequence[float]) -> str:
    if len(mean) not in (1, 3):
        raise UserError(f"data.mean: need 1 (grayscale) or 3 (RGB) values, got {list(mean)}")
    return "L" if len(mean) == 1 else "RGB"


def eval_transform(img_size: int, crop_pct: float, interpolation: str, mean: Sequence[float],
                   std: Sequence[float]) -> Callable:
    """Resize the shorter side to ``int(img_size / crop_pct)``, centre-crop ``img_size``, to
    tensor, normalise. 224 at 0.875 → 256 then 224; 28 at 1.0 leaves a 28×28 image untouched."""
    return T.Compose([
        ToMode(_mode_for(mean)),
        T.Resize(int(img_size / crop_pct), interpolation=interpolation_mode(interpolation)),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ])


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for ``bits_to_keep <= 0``: RandAugment's magnitude noise
    ('mstd0.5' at m9) sometimes asks PosterizeIncreasing for 0 bits, which Pillow 13 rejects
    (ValueError, ~1 image in 700 — an ImageNet run would crash in its first minute) while
    older Pillow returned the fully posterized, i.e. black, image. Keep that meaning."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_aa.posterize(img, bits_to_keep)


def _fix_posterize(transform: Callable) -> None:
    """Swap ``_posterize_any_bits`` into every timm augment op of ``transform`` that posterizes."""
    for t in getattr(transform, "transforms", ()):
        ops = list(getattr(t, "ops", ()))  # RandAugment, AugMix
        for sub_policy in getattr(t, "policy", ()):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_aa.posterize:
                op.aug_fn = _posterize_any_bits


def deit_train_transform(cfg: DataConfig, img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """DeiT's training pipeline through timm: random resized crop (``scale``, ``ratio``,
    ``interpolation``), flip, RandAugment (``auto_augment``; colour jitter when it is off),
    to tensor, normalise, random erasing (``reprob``/``remode``/``recount``)."""
    try:
        tf = create_transform(
            input_size=img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment or None, interpolation=cfg.interpolation,
            mean=tuple(mean), std=tuple(std), re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise UserError(f"data: cannot build the deit train transform (auto_augment {cfg.auto_augment!r}, "
                        f"interpolation {cfg.interpolation!r}): {e}") from None
    _fix_posterize(tf)
    tf.transforms.insert(0, ToMode(_mode_for(mean)))
    return tf


def light_train_transform(cfg: DataConfig, img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """For small images (Fashion-MNIST, CIFAR): resize the shorter side to ``img_size`` (a no-op
    when it already is), random crop with ``img_size // 8`` zero padding, flip, to tensor, normalise."""
    return T.Compose([
        ToMode(_mode_for(mean)),
        T.Resize(img_size, interpolation=interpolation_mode(cfg.interpolation)),
        T.RandomCrop(img_size, padding=img_size // 8),
        T.RandomHorizontalFlip(cfg.hflip),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ])


def train_transform(cfg: DataConfig, img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The transform named by ``data.train_transform``: deit | light | none (eval geometry at crop 1.0)."""
    if cfg.train_transform == "deit":
        return deit_train_transform(cfg, img_size, mean, std)
    if cfg.train_transform == "light":
        return light_train_transform(cfg, img_size, mean, std)
    if cfg.train_transform == "none":
        return eval_transform(img_size, 1.0, cfg.interpolation, mean, std)
    raise UserError(f"data.train_transform: unknown {cfg.train_transform!r}; use deit, light or none")
