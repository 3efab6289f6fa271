"""What the figure scripts that run a checkpoint on images share (attention_maps.py, gradcam.py):
the model as eval.py loads it, an image from a file or from the configured val split, and that
image as the model sees it and as a person does.

    model, cfg, classes = load_model("runs/x/last.pth", None, use_ema=False)
    sample = dataset_images(cfg, [0])[0]             # or read_image("cat.jpg")
    x, shown = preprocess(sample.image, cfg, in_chans=1)
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from data.datasets import create_dataset, normalization, take_subset
from data.transforms import eval_transform
from models.recording import attention_layers

from engine.checkpoint import load_checkpoint
from engine.config import Config
from engine.errors import UserError
from engine.evaluation import EvalSpec, checkpoint_model


def load_model(path: str, model_name: Optional[str], use_ema: bool,
               overrides: Sequence[str] = ()) -> Tuple[nn.Module, Config, Optional[List[str]]]:
    """The model (eval mode, CPU), config and training classes (names by label; None if the
    checkpoint records none) of any checkpoint, resolved and loaded as eval.py does (classes and
    input channels read off the weights, so no dataset is needed)."""
    spec = EvalSpec(model=model_name, use_ema=use_ema, overrides=list(overrides))
    ckpt = load_checkpoint(path)
    model, cfg, _, _ = checkpoint_model(spec, ckpt, path)
    classes = ckpt.get("classes")
    return model.eval(), cfg, list(classes) if isinstance(classes, (list, tuple)) else None


def read_image(path: str) -> Image.Image:
    """A PNG/JPEG/... file as a PIL image; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"--image: {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"--image: cannot read {path}: {e}") from None
    return img


class DatasetImage(NamedTuple):
    image: Image.Image                       # untransformed
    caption: str                             # names the image and its class
    label: int
    classes: Optional[Tuple[str, ...]]       # the split's class names by label, if it has them


def dataset_images(cfg: Config, indices: Sequence[int]) -> List[DatasetImage]:
    """Images ``indices`` of the configured val split (after ``data.max_val_samples``); an index
    outside the split is a UserError."""
    ds, info = create_dataset(cfg.data, cfg.data.val_split, training=False)
    ds = take_subset(ds, cfg.data.max_val_samples)
    out = []
    for index in indices:
        if not 0 <= index < len(ds):
            raise UserError(f"--dataset-index {index} is outside {cfg.data.dataset} {cfg.data.val_split} "
                            f"(0..{len(ds) - 1})")
        img, target = ds[index]
        name = f" ({info.classes[target]})" if info.classes and 0 <= target < len(info.classes) else ""
        out.append(DatasetImage(img, f"{cfg.data.dataset} {cfg.data.val_split} image {index}, class {target}{name}",
                                int(target), info.classes))
    return out


def preprocess(img: Image.Image, cfg: Config, in_chans: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(model input (1, C, S, S), the same image de-normalised in [0, 1]: (S, S) grey or (S, S, 3))."""
    mean, std = normalization(cfg.data, in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"data.mean {mean} / data.std {std}: the model takes {in_chans} channel(s)")
    d = cfg.data
    x = eval_transform(cfg.model.img_size, d.crop_pct, d.interpolation, mean, std)(img)
    shown = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    return x[None], shown[0] if in_chans == 1 else shown.permute(1, 2, 0)


def attention_kind(model: nn.Module) -> str:
    """The normalizer name of the model's attention layers, e.g. 'multimax' or 'softmax' (timm's own)."""
    names = {getattr(getattr(m, "normalizer", None), "name", "softmax") for _, m in attention_layers(model)}
    return "/".join(sorted(names))


def short_path(path: str) -> str:
    """The file and its two parent folders, which name a run: 'runs/quickstart/best.pth',
    'softmax/seed0/last.pth' of '/data/sweeps/x/softmax/seed0/last.pth'."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    return os.path.join(*parts[-3:])


__all__ = ["load_model", "read_image", "DatasetImage", "dataset_images", "preprocess", "attention_kind",
           "short_path"]
