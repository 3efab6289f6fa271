#!/usr/bin/env python
"""Attention maps of one image for one checkpoint, or two side by side (e.g. softmax vs MultiMax):
the attention of a query patch in every layer and head, and the attention rollout.

    python scripts/attention_maps.py --checkpoint runs/quickstart/best.pth --dataset-index 0 --out maps.png
    python scripts/attention_maps.py --checkpoint mm/best.pth --compare gap/best.pth --image cat.jpg --query 7 7 --pdf
    python scripts/attention_maps.py --checkpoint paper_ckpt.pth --model deit_small_multimax_patch16_224 \\
        --compare deit_small_gap.pth --compare-model deit_small_gap_patch16_224 --image cat.jpg

Checkpoints are read as eval.py reads them: ours carry their config; foreign ones (the paper's
code, timm/DeiT) need ``--model`` (``--compare-model``) and get that model's timm preprocessing.
The image (a file, or image N of the checkpoint's configured val split) goes through each
checkpoint's eval transform (img_size, crop_pct, interpolation, mean/std) and is shown
de-normalised. Trailing ``key=value`` arguments override every checkpoint's config (e.g.
``data.root=/data/imagenet`` for ``--dataset-index``).

Query panels: row = layer, column = head; the heat map over each patch is the query patch's
attention weight on it (0 = black, the panel's maximum = brightest, printed in its corner); the
query patch is outlined.

Rollout (Abnar & Zuidema, 2020): heads averaged, identity added (the residual path), rows
renormalised, then multiplied over layers. The usual panel is the class token's row; these
models have no class token and pool all tokens, so the panel shows the rollout averaged over
all query tokens: how much each input patch feeds the pooled representation.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.errors import UserError  # noqa: E402
from scripts._figure_inputs import (  # noqa: E402
    attention_kind, dataset_images, load_model, preprocess, read_image, short_path,
)
from scripts._figures import figure_script_main, save_figure  # noqa: E402

# ---------------------------------------------------------------- math


def rollout(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout: ``probs[l]`` is layer l's attention (H, N, N), rows = queries.
    Returns R = Â_L ⋯ Â_1 (N, N) in float64 with Â_l = rownorm(mean_h A_l + I); R[i, j] is how
    much token i after the last layer draws on input token j, each row sums to 1."""
    n = probs[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    out = eye
    for p in probs:
        a = p.double().mean(0) + eye
        out = (a / a.sum(-1, keepdim=True)) @ out
    return out


def rollout_map(probs: Sequence[torch.Tensor], grid: Tuple[int, int], prefix: int = 0) -> torch.Tensor:
    """The rollout averaged over the patch queries, on the patch keys: (gh, gw), sums to 1
    without prefix (class/register) tokens."""
    return rollout(probs)[prefix:, prefix:].mean(0).reshape(grid)


def query_maps(probs: Sequence[torch.Tensor], query: Tuple[int, int], grid: Tuple[int, int],
               prefix: int = 0) -> torch.Tensor:
    """Attention of the query patch (row, col) on every patch: (L, H, gh, gw) from per-layer (H, N, N)."""
    q = prefix + query[0] * grid[1] + query[1]
    return torch.stack([p[:, q, prefix:] for p in probs]).float().reshape(len(probs), -1, *grid)


# ---------------------------------------------------------------- checkpoint, image, attention


def record(model: nn.Module, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """One forward of ``x`` (1, C, S, S): per-layer attention (H, N, N) in layer order, and logits (classes,)."""
    with torch.no_grad(), models.record_attention(model) as rec:
        logits = model(x)
    return [p[0][0].float() for p in rec.probs.values()], logits[0]


@dataclass
class Maps:
    """One checkpoint's maps on one image, ready to draw."""

    label: str
    image: torch.Tensor          # (S, S) grey or (S, S, 3), in [0, 1]
    query: torch.Tensor          # (L, H, gh, gw): attention of the query patch
    rollout: torch.Tensor        # (gh, gw)
    patch: Tuple[int, int]       # patch height/width in image pixels


def patch_query(query: Optional[Sequence[int]], grid: Tuple[int, int], path: str) -> Tuple[int, int]:
    """``--query`` checked against the patch grid of ``path``'s model; None → the centre patch."""
    if query is None:
        return grid[0] // 2, grid[1] // 2
    row, col = query
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise UserError(f"--query {row} {col} is outside the {grid[0]}x{grid[1]} patch grid of {path} "
                        f"(rows 0..{grid[0] - 1}, cols 0..{grid[1] - 1})")
    return row, col


def model_maps(model: nn.Module, cfg: Config, image: Image.Image, query: Tuple[int, int], label: str) -> Maps:
    """Run ``image`` through ``model`` with ``cfg``'s eval preprocessing and collect its maps."""
    embed = model.patch_embed
    x, shown = preprocess(image, cfg, embed.proj.weight.shape[1])
    probs, logits = record(model, x)
    grid, prefix = tuple(embed.grid_size), getattr(model, "num_prefix_tokens", 0)
    label = f"{label}: {cfg.model.name}, {attention_kind(model)} attention, predicts class {int(logits.argmax())}"
    return Maps(label, shown, query_maps(probs, query, grid, prefix), rollout_map(probs, grid, prefix).float(),
                tuple(embed.patch_size))


# ---------------------------------------------------------------- figure


def attention_figure(panels: Sequence[Maps], query: Tuple[int, int], title: str = "") -> Figure:
    """One block per checkpoint, stacked: first column the input (query patch outlined) and the
    rollout below it; then one column per head, one row per layer, the query's attention."""
    depth = max(m.query.shape[0] for m in panels)
    heads = max(m.query.shape[1] for m in panels)
    rows, cols = max(depth, 2), heads + 1
    fig = Figure(figsize=(1.45 * cols + 0.3, (1.45 * rows + 0.45) * len(panels) + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    for sub, maps in zip(fig.subfigures(len(panels), 1, squeeze=False)[:, 0], panels):
        sub.suptitle(maps.label, fontsize=9)
        axes = sub.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        _draw(axes[0, 0], maps, None, query)
        axes[0, 0].set_title(f"input, query {query[0]},{query[1]}", fontsize=8)
        _draw(axes[1, 0], maps, maps.rollout, None)
        axes[1, 0].set_title("rollout (all queries)", fontsize=8)
        for ax in axes[2:, 0]:
            ax.set_visible(False)
        for layer in range(rows):
            for head in range(heads):
                ax = axes[layer, head + 1]
                if layer >= maps.query.shape[0] or head >= maps.query.shape[1]:
                    ax.set_visible(False)
                    continue
                _draw(ax, maps, maps.query[layer, head], query)
                if layer == 0:
                    ax.set_title(f"head {head}", fontsize=8)
                if head == 0:
                    ax.set_ylabel(f"layer {layer}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _draw(ax, maps: Maps, heat: Optional[torch.Tensor], query: Optional[Tuple[int, int]]) -> None:
    """The image, ``heat`` (gh, gw) over it patch by patch (0 black, its maximum brightest; the
    maximum printed in the corner), and the query patch outlined."""
    height, width = maps.image.shape[:2]
    ph, pw = maps.patch
    ax.imshow(maps.image, cmap="gray" if maps.image.ndim == 2 else None, vmin=0, vmax=1,
              extent=(0, width, height, 0))
    if heat is not None:
        top = float(heat.max())
        ax.imshow(heat, cmap="inferno", alpha=0.65, vmin=0, vmax=top if top > 0 else 1, interpolation="nearest",
                  extent=(0, heat.shape[1] * pw, heat.shape[0] * ph, 0))
        ax.text(0.03, 0.97, f"{top:.2f}", transform=ax.transAxes, ha="left", va="top", fontsize=6, color="white")
    if query is not None:
        ax.add_patch(Rectangle((query[1] * pw, query[0] * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=1.2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)


# ---------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint (ours, the paper's code's, timm/DeiT)")
    p.add_argument("--model", help="registered model name, for a foreign --checkpoint")
    p.add_argument("--compare", help="a second checkpoint, drawn below the first on the same image and query")
    p.add_argument("--compare-model", help="registered model name, for a foreign --compare checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an image file (PNG, JPEG, ...)")
    src.add_argument("--dataset-index", type=int, metavar="N", help="image N of the first checkpoint's val split")
    p.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="query patch in patch-grid coordinates (default: the centre patch)")
    p.add_argument("--use-ema", action="store_true", help="the checkpoints' EMA weights")
    p.add_argument("--out", default="attention_maps.png", help="output PNG (default: %(default)s)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to the PNG")
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every checkpoint, e.g. data.root=...")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> List[str]:
    """Draw the figure the arguments ask for; returns the written paths."""
    image = read_image(args.image) if args.image else None
    caption = os.path.basename(args.image) if args.image else ""
    checkpoints = [(args.checkpoint, args.model)] + ([(args.compare, args.compare_model)] if args.compare else [])
    panels, grids = [], []
    for path, name in checkpoints:
        model, cfg, _ = load_model(path, name, args.use_ema, args.overrides)
        if image is None:  # the first checkpoint's val split; a compared model sees the same raw image
            sample = dataset_images(cfg, [args.dataset_index])[0]
            image, caption = sample.image, sample.caption
        grids.append(tuple(model.patch_embed.grid_size))
        query = patch_query(args.query, grids[-1], path)
        if grids[-1] != grids[0]:
            raise UserError(f"--compare: {path} has a {grids[-1][0]}x{grids[-1][1]} patch grid, {args.checkpoint} "
                            f"{grids[0][0]}x{grids[0][1]}: one query needs one grid")
        label = short_path(path) + (" (EMA)" if args.use_ema else "")
        panels.append(model_maps(model, cfg, image, query, label))
    return save_figure(attention_figure(panels, query, caption), args.out, args.pdf, args.dpi)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return figure_script_main("attention_maps.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
