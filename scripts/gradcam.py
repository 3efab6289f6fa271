#!/usr/bin/env python
"""Grad-CAM of one checkpoint, or two side by side (e.g. softmax vs MultiMax), on the same images:
where in the image the evidence for a class sits, overlaid on the image.

    python scripts/gradcam.py --checkpoint runs/quickstart/last.pth --dataset-index 0 3 --out cam.png
    python scripts/gradcam.py --checkpoint mm/last.pth --compare gap/last.pth --dataset-index 0 1 2 --target label --pdf
    python scripts/gradcam.py --checkpoint paper_ckpt.pth --model deit_small_multimax_patch16_224 \\
        --compare deit_small_patch16_224-cd65a155.pth --compare-model deit_small_patch16_224 --image cat.jpg dog.jpg

Grad-CAM (Selvaraju et al., 2017) through the ``grad-cam`` package (``pytorch_grad_cam.GradCAM``):
the activations A of a layer, weighted per channel by the mean over the patch grid of the
target class score's gradient, summed over channels, ReLU, resized to the image and scaled to
[0, 1] per map. For a ViT the layer is the input of a block's attention (``blocks[N].norm1``, the
last block by default): its tokens, less the class/distillation tokens, reshaped to the patch grid.
That layer serves both kinds of model: in a class-token ViT the patch tokens reach the head only
through that last attention (their gradient after the last block is zero), and in our GAP models
(no class token) every token reaches the pooled head.

Checkpoints are read as eval.py reads them (ours carry their config; foreign ones need
``--model``/``--compare-model``), each image goes through each checkpoint's eval transform and
is shown de-normalised. ``--target``: ``predicted`` (each model's top class), ``label`` (the
dataset label, with ``--dataset-index``) or a class index. The target's class is a score of the
model's output: for a MultiMax model the modulated logits σ(logits). Trailing ``key=value``
arguments override every checkpoint's config (e.g. ``data.root=...`` for ``--dataset-index``).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from engine.errors import UserError  # noqa: E402
from scripts._figure_inputs import (  # noqa: E402
    attention_kind, dataset_images, load_model, preprocess, read_image, short_path,
)
from scripts._figures import check_figure_output, figure_script_main, save_figure  # noqa: E402

# ---------------------------------------------------------------- Grad-CAM


def cam_layer(model: nn.Module, block: int) -> Tuple[nn.Module, str]:
    """The layer Grad-CAM reads: the input of block ``block``'s attention (``blocks[block].norm1``),
    and its name; a model without such blocks or an index outside them is a UserError."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not all(hasattr(b, "norm1") for b in blocks):
        raise UserError(f"{type(model).__name__} has no ViT blocks (blocks[i].norm1) for Grad-CAM")
    if not -len(blocks) <= block < len(blocks):
        raise UserError(f"--block {block} is outside the model's {len(blocks)} blocks "
                        f"({-len(blocks)}..{len(blocks) - 1})")
    index = block % len(blocks)
    return blocks[index].norm1, f"blocks.{index}.norm1"


def tokens_to_grid(tokens: torch.Tensor, grid: Tuple[int, int], prefix_tokens: int) -> torch.Tensor:
    """(B, N, C) tokens → (B, C, gh, gw): the patch tokens (the first ``prefix_tokens`` left out) on
    the patch grid, channels first, as Grad-CAM takes a CNN's feature maps."""
    patches = tokens[:, prefix_tokens:]
    return patches.reshape(patches.shape[0], *grid, patches.shape[-1]).permute(0, 3, 1, 2)


def gradcam(model: nn.Module, x: torch.Tensor, targets: Sequence[int], block: int = -1) -> np.ndarray:
    """Grad-CAM maps of ``x`` (B, C, H, W) for class ``targets[i]`` of image i: (B, H, W) in [0, 1]."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise UserError(f"Grad-CAM needs the grad-cam package (pip install -r requirements.txt): {e}") from None
    layer, _ = cam_layer(model, block)
    grid, prefix = tuple(model.patch_embed.grid_size), int(getattr(model, "num_prefix_tokens", 0))
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=lambda t: tokens_to_grid(t, grid, prefix))
    try:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(k)) for k in targets])
    finally:
        cam.activations_and_grads.release()  # its forward hooks off the model


# ---------------------------------------------------------------- one checkpoint on the images


@dataclass
class Panel:
    """One checkpoint's Grad-CAM on one image, ready to draw."""

    image: torch.Tensor          # (S, S) grey or (S, S, 3), in [0, 1]
    cam: np.ndarray              # (S, S) in [0, 1]
    target: int
    predicted: int
    probability: float           # of the target class, softmax of the model's output


def target_class(target: str, logits: torch.Tensor, label: Optional[int], path: str) -> int:
    """``--target`` for one image and model: the top class, the dataset label, or a class index."""
    if target == "predicted":
        return int(logits.argmax())
    if target == "label":
        if label is None:
            raise UserError("--target label needs --dataset-index (image files carry no label)")
        k = label
    else:
        k = int(target)
    if not 0 <= k < logits.shape[-1]:
        raise UserError(f"--target {k} is outside the {logits.shape[-1]} classes of {path}")
    return k


def checkpoint_panels(model: nn.Module, cfg, images, labels: Sequence[Optional[int]], target: str, block: int,
                      path: str) -> List[Panel]:
    """Grad-CAM of every image for one model (each image in the model's eval preprocessing)."""
    in_chans = model.patch_embed.proj.weight.shape[1]
    panels = []
    for image, label in zip(images, labels):
        x, shown = preprocess(image, cfg, in_chans)
        with torch.no_grad():
            logits = model(x)[0].float()
        k = target_class(target, logits, label, path)
        cam = gradcam(model, x, [k], block)[0]
        panels.append(Panel(shown, cam, k, int(logits.argmax()), float(torch.softmax(logits, -1)[k])))
    return panels


# ---------------------------------------------------------------- figure


def _class_name(k: int, classes: Optional[Sequence[str]]) -> str:
    return f"{k} ({classes[k]})" if classes and 0 <= k < len(classes) else str(k)


def gradcam_figure(columns: Sequence[Tuple[str, List[Panel], Optional[Sequence[str]]]], captions: Sequence[str],
                   title: str = "") -> Figure:
    """One row per image: the input, then one Grad-CAM overlay per checkpoint (``columns``:
    header, its panels by image, its class names)."""
    rows, cols = len(captions), 1 + len(columns)
    fig = Figure(figsize=(2.9 * cols + 0.3, 2.9 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, caption in enumerate(captions):
        first = columns[0][1][r]
        _show(axes[r, 0], first.image)
        axes[r, 0].set_title(caption, fontsize=7, wrap=True)
        for c, (header, panels, classes) in enumerate(columns, start=1):
            p = panels[r]
            ax = axes[r, c]
            _show(ax, p.image)
            shown = ax.imshow(p.cam, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            predicted = "" if p.predicted == p.target else f"\npredicts {_class_name(p.predicted, classes)}"
            text = f"target {_class_name(p.target, classes)}, p={p.probability:.2f}{predicted}"
            ax.set_title(f"{header}\n{text}" if r == 0 else text, fontsize=7)
    fig.colorbar(shown, ax=axes[:, -1].tolist(), shrink=0.8 / rows, aspect=20,
                 label="Grad-CAM (each map scaled to 0–1)")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _show(ax, image: torch.Tensor) -> None:
    ax.imshow(image.numpy(), cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------- CLI


def _target(text: str) -> str:
    if text in ("predicted", "label") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected 'predicted', 'label' or a class index >= 0, got {text!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint (ours, the paper's code's, timm/DeiT)")
    p.add_argument("--model", help="registered model name, for a foreign --checkpoint")
    p.add_argument("--compare", help="a second checkpoint, drawn beside the first on the same images")
    p.add_argument("--compare-model", help="registered model name, for a foreign --compare checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", metavar="PATH", help="image files (PNG, JPEG, ...)")
    src.add_argument("--dataset-index", type=int, nargs="+", metavar="N",
                     help="images N of the first checkpoint's val split")
    p.add_argument("--target", type=_target, default="predicted",
                   help="the class explained: predicted (each model's top class, the default), label (the dataset "
                        "label), or a class index")
    p.add_argument("--block", type=int, default=-1,
                   help="Grad-CAM at the input of this block's attention (default: -1, the last block)")
    p.add_argument("--use-ema", action="store_true", help="the checkpoints' EMA weights")
    p.add_argument("--out", default="gradcam.png", help="output PNG (default: %(default)s)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to the PNG")
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every checkpoint, e.g. data.root=...")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> List[str]:
    """Draw the figure the arguments ask for; returns the written paths."""
    check_figure_output(args.out, args.dpi)  # before minutes of loading and backward passes
    checkpoints = [(args.checkpoint, args.model)] + ([(args.compare, args.compare_model)] if args.compare else [])
    images, captions, labels, data_classes = [], [], [], None
    if args.image:
        images = [read_image(path) for path in args.image]
        captions, labels = [os.path.basename(path) for path in args.image], [None] * len(images)
    columns = []
    for path, name in checkpoints:
        model, cfg, classes = load_model(path, name, args.use_ema, args.overrides)
        if not images:  # the first checkpoint's val split; a compared model sees the same raw images
            samples = dataset_images(cfg, args.dataset_index)
            images, captions = [s.image for s in samples], [s.caption for s in samples]
            labels, data_classes = [s.label for s in samples], samples[0].classes
        output = ", MultiMax output" if getattr(model, "out_modulator", None) is not None else ""
        header = (f"{short_path(path)}{' (EMA)' if args.use_ema else ''}\n{cfg.model.name}\n"
                  f"{attention_kind(model)} attention{output}")
        panels = checkpoint_panels(model, cfg, images, labels, args.target, args.block, path)
        columns.append((header, panels, classes or data_classes))
    title = f"Grad-CAM at blocks[{args.block}].norm1 (the input of that block's attention), target: {args.target}"
    return save_figure(gradcam_figure(columns, captions, title), args.out, args.pdf, args.dpi)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return figure_script_main("gradcam.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
