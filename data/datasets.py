"""Datasets: Fashion-MNIST from IDX files, ImageFolder in the ImageNet layout, and timm's factory.

Every dataset here is map-style, returns ``(image, int label)`` and has a settable
``transform`` attribute (None at creation: ``build_loaders`` sets it once the dataset's
channels and normalisation are known). ``create_dataset`` is the single entry point.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import random
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, pil_loader

from engine.config import FASHION_MNIST_NAMES, IMAGEFOLDER_NAMES, DataConfig
from engine.errors import UserError

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# Generic normalisation for 1-channel data from timm's factory (3-channel data gets ImageNet's).
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the transforms need to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Optional[Tuple[str, ...]] = None  # class names by label index, when the dataset has them


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST

# IDX type byte -> element type (big-endian, as the format stores it).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (``.gz`` or uncompressed) into a native-endian array of its shape.

    The header is two zero bytes, a type byte, the number of dimensions, then one big-endian
    uint32 per dimension; the data follow. Anything inconsistent raises a UserError naming ``path``.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read IDX file ({e}); the file is corrupt, re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); re-download it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header; re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(f"{path}: corrupt IDX file: its header promises shape {shape} ({expected} bytes) "
                        f"but {len(raw) - header} bytes follow; re-download it")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,).
    Items are ``(transform(PIL 'L' image), int label)``."""

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].numpy())  # 2-D uint8 -> mode 'L'
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])


_FMNIST_SPLITS = {"train": "train", "val": "t10k", "test": "t10k", "t10k": "t10k"}


def fashion_mnist_cache_dir() -> str:
    """Where Fashion-MNIST is fetched to when ``data.root`` is empty: the user's cache,
    ``$XDG_CACHE_HOME/multimax-vit/fashion-mnist`` (``~/.cache/...`` without that variable)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # unset, empty or relative: the XDG spec says to ignore it
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "multimax-vit", "fashion-mnist")


def fashion_mnist_dirs(root: str) -> List[str]:
    """Where the IDX files are looked for: ``root`` and torchvision's ``root/FashionMNIST/raw``
    when a root is given, else the Debian package's directory, then the user cache (both layouts)."""
    if root:
        return [root, os.path.join(root, "FashionMNIST", "raw")]
    cache = fashion_mnist_cache_dir()
    return [FASHION_MNIST_DEBIAN_DIR, cache, os.path.join(cache, "FashionMNIST", "raw")]


def _find_idx(dirs: Sequence[str], stem: str) -> Optional[str]:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def _download_fashion_mnist(root: str) -> None:
    """Fetch the four IDX files with torchvision into ``root/FashionMNIST/raw``. Processes that
    start together (the ranks of one job) take turns on a lock file: the first downloads, the
    others find the files."""
    import fcntl

    import torchvision

    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, ".download.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            torchvision.datasets.FashionMNIST(root, train=True, download=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        reason = " ".join(str(e).split())
        raise UserError(f"data.download: downloading Fashion-MNIST into {root} failed: {reason}") from None


def load_fashion_mnist(root: str, split: str, download: bool = False) -> FashionMNIST:
    """Fashion-MNIST ``split`` (train → 60k; val/test/t10k → the 10k test set) from IDX files."""
    if split not in _FMNIST_SPLITS:
        raise UserError(f"Fashion-MNIST has no split {split!r}; use one of {sorted(_FMNIST_SPLITS)} "
                        "(data.train_split / data.val_split)")
    prefix = _FMNIST_SPLITS[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    dirs = fashion_mnist_dirs(root)
    paths = [_find_idx(dirs, s) for s in stems]
    if None in paths and download:
        _download_fashion_mnist(root or fashion_mnist_cache_dir())
        paths = [_find_idx(dirs, s) for s in stems]
    if None in paths:
        missing = stems[paths.index(None)]
        raise UserError(
            f"Fashion-MNIST not found: no {missing}[.gz] in {' or '.join(dirs)}. Set data.download=true to fetch "
            f"it (into {root or fashion_mnist_cache_dir()}), install it with `apt-get install dataset-fashion-mnist` "
            f"(files in {FASHION_MNIST_DEBIAN_DIR}, used when data.root is empty), or point data.root at a "
            "directory holding the four IDX files"
        )
    images, labels = (read_idx(p) for p in paths)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise UserError(f"{paths[0]}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{paths[1]}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.max() >= len(FashionMNIST.classes):
        raise UserError(f"{paths[1]}: label {labels.max()} out of range for Fashion-MNIST's 10 classes")
    return FashionMNIST(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


# ----------------------------------------------------------------------------- ImageFolder

# What PIL raises for unreadable files (PNG plugins raise SyntaxError for broken chunks).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class _Unreadable(Exception):
    """An image file PIL cannot decode (raised by the loader, handled by the bad-image policy)."""


def _load_rgb(path: str) -> Image.Image:
    try:
        return pil_loader(path)  # convert("RGB") decodes fully, so a truncated file fails here
    except _DECODE_ERRORS as e:
        raise _Unreadable(e) from None


class ImageFolderDataset(ImageFolder):
    """torchvision's ``ImageFolder`` (``<split_dir>/<class>/**/<image>``, sorted classes, items
    ``(transform(RGB image), label)``) with our bad-image policy and one-line errors.

    Hidden files and folders (``.DS_Store``, ``._x.JPEG``, ``.ipynb_checkpoints``) are ignored.
    Other files ``bad_images`` decides: ``'error'`` raises a UserError naming the first non-image
    file, or an unreadable image when it is read; ``'skip'`` leaves non-image files out (warning
    once) and serves the next readable sample in place of an unreadable image (so batches keep
    their size, which mixup needs), marking it in a flag tensor in shared memory, so every loader
    worker skips it without retrying and ``skipped()`` counts distinct bad files across workers.
    """

    def __init__(self, split_dir: str, bad_images: str = "error", transform: Optional[Callable] = None):
        if not os.path.isdir(split_dir):
            raise UserError(f"data.root: dataset directory {split_dir} does not exist (expected the ImageNet "
                            "layout <data.root>/<split>/<class>/<image>)")
        self.bad_images, self.rejected = bad_images, []
        super().__init__(split_dir, transform=transform, loader=_load_rgb, is_valid_file=self._is_valid_file,
                         allow_empty=True)
        empty = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if empty:
            raise UserError(f"empty class folder {os.path.join(split_dir, empty[0])}: it holds no images; remove "
                            "it or add its images")
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._reported = 0
        if self.rejected:
            warnings.warn(f"data.bad_images=skip: left out {len(self.rejected)} non-image file(s) in {split_dir} "
                          f"(first: {self.rejected[0]})", stacklevel=2)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        # torchvision's counts hidden folders as classes and raises FileNotFoundError without a hint
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            hint = ""
            if any(has_file_allowed_extension(n, IMG_EXTENSIONS) for n in os.listdir(directory)):
                hint = (" It holds images directly: sort a flat ImageNet val folder with "
                        "scripts/prepare_imagenet_val.py.")
            raise UserError(f"data.root: {directory} has no class folders.{hint}")
        return classes, {name: i for i, name in enumerate(classes)}

    def _is_valid_file(self, path: str) -> bool:
        if os.path.basename(path).startswith("."):
            return False
        if has_file_allowed_extension(path, IMG_EXTENSIONS):
            return True
        if self.bad_images == "error":
            raise UserError(f"{path} is not an image file (extensions {', '.join(IMG_EXTENSIONS)}); "
                            "remove it or set data.bad_images=skip")
        self.rejected.append(path)
        return False

    def __getitem__(self, index: int):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")  # ends plain iteration
        index %= n
        for i in (j % n for j in range(index, index + n)):
            if self._bad[i]:
                continue
            try:
                return super().__getitem__(i)
            except _Unreadable as e:
                path = self.samples[i][0]
                if self.bad_images == "error":
                    raise UserError(f"cannot read image {path}: {e}; remove it or set data.bad_images=skip") from None
                first = not bool(self._bad.any())
                self._bad[i] = 1
                if first:
                    warnings.warn(f"data.bad_images=skip: skipping unreadable image {path} ({e}); further ones are "
                                  "counted and reported at the next epoch", stacklevel=2)
        raise UserError(f"no readable image in {self.root}")

    def skipped(self) -> List[str]:
        """Paths of the files skipped so far: unreadable images (all workers) and non-image files."""
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()] + self.rejected

    def report_skipped(self) -> Optional[str]:
        """A one-line summary when more files were skipped since the last call, else None."""
        skipped = self.skipped()
        if len(skipped) <= self._reported:
            return None
        self._reported = len(skipped)
        return f"data.bad_images=skip: {len(skipped)} file(s) skipped so far in {self.root} (first: {skipped[0]})"


def check_same_classes(train: Sequence[str], val: Sequence[str], train_dir: str, val_dir: str) -> None:
    """Train and val must index the same classes, or labels would silently disagree."""
    if list(train) == list(val):
        return
    only_train = sorted(set(train) - set(val))[:5]
    only_val = sorted(set(val) - set(train))[:5]
    raise UserError(f"class folders differ between {train_dir} ({len(train)} classes) and {val_dir} "
                    f"({len(val)} classes): only in train {only_train}, only in val {only_val}")


# ----------------------------------------------------------------------------- timm's factory

def _timm_dataset(cfg: DataConfig, split: str, training: bool) -> Dataset:
    from timm.data import create_dataset as timm_create_dataset

    try:
        ds = timm_create_dataset(cfg.dataset, root=cfg.root or None, split=split, is_training=training,
                                 download=cfg.download, batch_size=cfg.batch_size)
    except (AssertionError, RuntimeError, OSError, ValueError, KeyError, ImportError, TypeError) as e:
        raise UserError(f"data.dataset: cannot create dataset {cfg.dataset!r} (split {split!r}, root "
                        f"{cfg.root or '<none>'}): {e}") from None
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise UserError(f"data.dataset: {cfg.dataset!r} is a streaming (iterable) dataset, which the samplers "
                        "here cannot shard; use an ImageFolder copy (data.dataset=imagefolder) or a map-style dataset")
    if not hasattr(ds, "transform"):
        raise UserError(f"data.dataset: {cfg.dataset!r} has no `transform` attribute to set")
    return ds


def _timm_class_names(ds: Dataset) -> Optional[Tuple[str, ...]]:
    """Class names by label from torchvision's ``classes`` or timm's reader ``class_to_idx``, if known."""
    if getattr(ds, "classes", None):
        return tuple(str(c) for c in ds.classes)
    class_to_idx = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    return tuple(str(c) for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])) if class_to_idx else None


def _channels_of(ds: Dataset, name: str) -> int:
    """1 for grayscale datasets (PIL mode 'L'/'1'/'I;16'...), else 3 (images get converted to RGB)."""
    if len(ds) == 0:
        raise UserError(f"data.dataset: {name!r} is empty")
    img = ds[0][0]
    return 1 if isinstance(img, Image.Image) and img.mode in ("1", "L", "I", "I;16", "F") else 3


# ----------------------------------------------------------------------------- entry point

def split_dir(cfg: DataConfig, split: str) -> str:
    """``<data.root>/<split>`` of an ImageFolder dataset."""
    if not cfg.root:
        raise UserError("data.root is empty: set it to the dataset directory (<root>/<split>/<class>/<image>)")
    return os.path.join(cfg.root, split)


def create_dataset(cfg: DataConfig, split: str, training: bool) -> Tuple[Dataset, DatasetInfo]:
    """The dataset ``split`` named by ``cfg.dataset`` (``transform`` still None) and its info,
    whose mean/std are the dataset's defaults (``data.mean``/``data.std`` are applied by the caller)."""
    name = cfg.dataset  # checked with the config (engine.config.dataset_name_problem)
    if name.lower() in FASHION_MNIST_NAMES:
        ds = load_fashion_mnist(cfg.root, split, cfg.download)
        return ds, DatasetInfo("fashion_mnist", 10, 1, *default_normalization(name, 1), FashionMNIST.classes)
    if name.lower() in IMAGEFOLDER_NAMES:
        ds = ImageFolderDataset(split_dir(cfg, split), cfg.bad_images)
        return ds, DatasetInfo(name, len(ds.classes), 3, *default_normalization(name, 3), tuple(ds.classes))
    ds = _timm_dataset(cfg, split, training)
    in_chans = _channels_of(ds, name)
    classes = _timm_class_names(ds)
    return ds, DatasetInfo(name, len(classes or ()), in_chans, *default_normalization(name, in_chans), classes)


def default_normalization(dataset: str, in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The mean/std a dataset gets unless ``data.mean``/``data.std`` say otherwise: Fashion-MNIST's
    own; ImageNet's for folders and 3-channel data; 0.5 for other 1-channel data."""
    if dataset.lower() in FASHION_MNIST_NAMES:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if dataset.lower() in IMAGEFOLDER_NAMES or in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return GRAY_MEAN, GRAY_STD


def normalization(cfg: DataConfig, in_chans: int) -> Tuple[List[float], List[float]]:
    """mean/std of ``cfg``'s transforms for a model taking ``in_chans`` channels, without reading
    any data: ``data.mean``/``data.std``, else ``default_normalization``."""
    mean, std = default_normalization(cfg.dataset, in_chans)
    return list(cfg.mean or mean), list(cfg.std or std)


def take_subset(ds: Dataset, n: Optional[int]) -> Dataset:
    """A deterministic ``n``-sample subset: evenly spaced indices ``i * len // n`` (which, unlike
    the first ``n``, covers every class of a class-sorted folder). ``None`` or ``n >= len`` → ``ds``."""
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, [i * len(ds) // n for i in range(n)])


class SeededBatches(Dataset):
    """``dataset`` read a batch at a time, as the DataLoader does when a dataset has
    ``__getitems__``: it takes ``(seed, indices)`` from ``data.samplers.SeededBatchSampler`` and
    seeds the python, numpy and torch (CPU) RNGs that the transforms draw from before decoding
    the batch. In the main process (``data.workers=0``) those RNGs' states are put back after it,
    so that the training loop's own draws (mixup, stochastic depth) go on undisturbed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, batch: Tuple[int, List[int]]) -> list:
        seed, indices = batch
        with _rngs_seeded(seed):
            return [self.dataset[i] for i in indices]


@contextlib.contextmanager
def _rngs_seeded(seed: int) -> Iterator[None]:
    saved = None
    if get_worker_info() is None:
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.default_generator.manual_seed(seed)  # the CPU generator only: a GPU's streams are the loop's
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


def base_dataset(ds: Dataset) -> Dataset:
    """The dataset under any ``Subset`` / ``SeededBatches`` wrappers."""
    while isinstance(ds, (Subset, SeededBatches)):
        ds = ds.dataset
    return ds
