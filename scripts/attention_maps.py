#!/usr/bin/env python
"""Attention maps of one image: the attention of a query patch per layer and head, and the
attention rollout, for one checkpoint or two side by side (e.g. softmax vs MultiMax).

    python scripts/attention_maps.py --checkpoint runs/quickstart/best.pth --dataset-index 0 --out maps.png
    python scripts/attention_maps.py --checkpoint mm.pth --compare gap.pth --image cat.jpg --query 7 7 --pdf

The image goes through the checkpoint's eval preprocessing. Rollout (Abnar & Zuidema, 2020):
heads averaged, identity added, rows renormalised, multiplied over layers. These models have
no class token, so the panel shows the rollout averaged over all query tokens: how much each
patch feeds the pooled representation.
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.plots import save_figure  # noqa: E402
from models.weights import CheckpointMismatchError  # noqa: E402


def rollout(probs: List[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over layers: probs[l] is (H, N, N) → (N, N), rows summing to 1."""
    n = probs[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    out = eye
    for p in probs:
        a = p.double().mean(0) + eye
        a = a / a.sum(-1, keepdim=True)
        out = a @ out
    return out


def load_model(path: str, model_name: Optional[str], use_ema: bool):
    """A model (eval mode) and its config from any checkpoint, as eval.py builds it."""
    from eval import resolve_config

    ckpt = load_checkpoint(path)
    args = SimpleNamespace(config=None, checkpoint=path, model=model_name, use_ema=use_ema, overrides=[],
                           data_root=None, dataset=None, split=None, batch_size=None, workers=None,
                           img_size=None, crop_pct=None, interpolation=None, mean=None, std=None,
                           amp=None, device=None)
    cfg = resolve_config(args, ckpt)
    model = build_model(cfg.model, cfg.model.num_classes or 10, cfg.model.in_chans)
    try:
        models.load_weights(model, ckpt, use_ema=use_ema)
    except CheckpointMismatchError as e:
        # num_classes / in_chans come from the dataset when the config leaves them open
        from models.weights import extract_state_dict

        sd = extract_state_dict(ckpt, use_ema)
        if "head.weight" in sd and "patch_embed.proj.weight" in sd:
            model = build_model(cfg.model, sd["head.weight"].shape[0], sd["patch_embed.proj.weight"].shape[1])
            models.load_weights(model, ckpt, use_ema=use_ema)
        else:
            raise UserError(f"{path}: {e}") from None
    return model.eval(), cfg


def load_image(cfg, model, image: Optional[str], index: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(model input (1, C, H, W), display image (H, W) or (H, W, 3) in [0, 1])."""
    from PIL import Image

    from data import build_eval_loader
    from data.transforms import eval_transform

    d = cfg.data
    if image is not None:
        if not os.path.isfile(image):
            raise UserError(f"--image: {image} does not exist")
        try:
            pil = Image.open(image)
            pil.load()
        except OSError as e:
            raise UserError(f"--image: cannot read {image}: {e}") from None
        chans = model.patch_embed.proj.weight.shape[1]
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        default_mean, default_std = pcfg.get("mean", ()), pcfg.get("std", ())
        if len(default_mean) != chans:
            default_mean, default_std = [0.5] * chans, [0.5] * chans
        mean, std = list(d.mean or default_mean), list(d.std or default_std)
        x = eval_transform(cfg.model.img_size, d.crop_pct, d.interpolation, mean, std)(pil)
    else:
        loader, info = build_eval_loader(d, cfg.model.img_size, 0, 1)
        mean, std = d.mean or info.mean, d.std or info.std
        if not 0 <= index < len(loader.dataset):
            raise UserError(f"--dataset-index {index} is outside the dataset (0..{len(loader.dataset) - 1})")
        x = loader.dataset[index][0]
    shown = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    shown = shown[0] if shown.shape[0] == 1 else shown.permute(1, 2, 0)
    return x[None], shown


def attention_of(model, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad(), models.record_attention(model) as rec:
        model(x)
    return [rec.probs[name][0][0].float() for name in rec.probs]  # per layer (H, N, N)


def upsample(v: torch.Tensor, grid: int, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(v.reshape(1, 1, grid, grid), size=size, mode="bilinear", align_corners=False)[0, 0]


def draw(rows, shown: torch.Tensor, query: Tuple[int, int], grid: int):
    """rows: [(label, probs per layer)] → a figure: per model, layers × heads + rollout column."""
    from matplotlib.figure import Figure

    depth = max(len(p) for _, p in rows)
    heads = max(p[0].shape[0] for _, p in rows)
    cols = heads + 2
    fig = Figure(figsize=(1.6 * cols, 1.6 * depth * len(rows) + 0.4 * len(rows)))
    size = tuple(shown.shape[:2])
    q = query[0] * grid + query[1]
    cmap = "gray" if shown.ndim == 2 else None
    for r, (label, probs) in enumerate(rows):
        for layer, p in enumerate(probs):
            base = (r * depth + layer) * cols
            ax = fig.add_subplot(depth * len(rows), cols, base + 1)
            ax.imshow(shown, cmap=cmap)
            ax.scatter([(query[1] + 0.5) * size[1] / grid], [(query[0] + 0.5) * size[0] / grid], c="red", s=12)
            ax.set_ylabel(f"{label}\nlayer {layer}" if layer == 0 else f"layer {layer}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            for h in range(p.shape[0]):
                ax = fig.add_subplot(depth * len(rows), cols, base + 2 + h)
                ax.imshow(shown, cmap=cmap)
                ax.imshow(upsample(p[h, q], grid, size), alpha=0.6, cmap="inferno")
                ax.set_axis_off()
                if r == 0 and layer == 0:
                    ax.set_title(f"head {h}", fontsize=8)
            if layer == 0:
                ax = fig.add_subplot(depth * len(rows), cols, base + cols)
                ax.imshow(shown, cmap=cmap)
                ax.imshow(upsample(rollout(probs).mean(0).float(), grid, size), alpha=0.6, cmap="inferno")
                ax.set_title("rollout", fontsize=8)
                ax.set_axis_off()
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", help="model name for foreign checkpoints")
    p.add_argument("--compare", help="a second checkpoint shown below the first")
    p.add_argument("--compare-model", help="model name for a foreign --compare checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="an image file")
    src.add_argument("--dataset-index", type=int, default=0, help="image N of the configured val set")
    p.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"), help="query patch (default: centre)")
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("--out", default="attention_maps.png")
    p.add_argument("--pdf", action="store_true")
    args = p.parse_args(argv)
    try:
        model, cfg = load_model(args.checkpoint, args.model, args.use_ema)
        x, shown = load_image(cfg, model, args.image, None if args.image else args.dataset_index)
        grid = model.patch_embed.grid_size[0]
        query = tuple(args.query) if args.query else (grid // 2, grid // 2)
        if not all(0 <= c < grid for c in query):
            raise UserError(f"--query {query[0]} {query[1]} is outside the {grid}x{grid} patch grid")
        rows = [(f"{cfg.model.attn_normalizer}", attention_of(model, x))]
        if args.compare:
            other, ocfg = load_model(args.compare, args.compare_model, args.use_ema)
            rows.append((f"{ocfg.model.attn_normalizer}", attention_of(other, x)))
        save_figure(draw(rows, shown, query, grid), args.out, pdf=args.pdf)
    except UserError as e:
        print(f"attention_maps.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
