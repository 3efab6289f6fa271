#!/usr/bin/env python
"""The learned MultiMax modulators σ(x) of a checkpoint: one panel per attention layer and one
for the output layer, with the identity for reference. Several checkpoints of one run are
overlaid (ordered and labelled by their stored epoch) to show how σ evolves during training.

    python scripts/plot_modulators.py --checkpoints runs/x/best.pth --out modulators.png
    python scripts/plot_modulators.py --checkpoints runs/x/checkpoint-epoch*.pth --x-range -20 20 --pdf

Reads our checkpoints and those trained with the paper's code (``blocks.{i}.attn.ranges``,
top-level ``ranges``/``ts``), ``.pth`` or ``.safetensors``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402
from engine.plots import modulator_evolution_figure  # noqa: E402
from scripts._figures import (  # noqa: E402
    check_figure_output, check_finite, checkpoint_modulators, figure_script_main, save_figure,
)
from models.multimax import ModulatorParams  # noqa: E402


def read_modulators(path: str, use_ema: bool = False) -> Tuple[Optional[int], Dict[str, ModulatorParams]]:
    """(stored epoch or None, modulators by name ``blocks.{i}`` / ``out``) of one checkpoint."""
    ckpt, found = checkpoint_modulators(path, use_ema)
    epoch = ckpt.get("epoch")
    return (int(epoch) if isinstance(epoch, int) else None), found


def label_runs(paths: Sequence[str], use_ema: bool = False) -> Dict[str, Dict[str, ModulatorParams]]:
    """label → modulators for each checkpoint; ordered by epoch when every one stores it
    (else as given), labelled 'epoch E' (plus the file name when two share an epoch)."""
    loaded = [(path, *read_modulators(path, use_ema)) for path in paths]
    if all(epoch is not None for _, epoch, _ in loaded):
        loaded.sort(key=lambda item: item[1])
    epochs = [epoch for _, epoch, _ in loaded]
    runs = {}
    for path, epoch, mods in loaded:
        name = os.path.basename(path)
        label = name if epoch is None else f"epoch {epoch}" + (f" ({name})" if epochs.count(epoch) > 1 else "")
        runs[label if label not in runs else path] = mods
    return runs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="one or more checkpoints of one run")
    p.add_argument("--use-ema", action="store_true", help="read the checkpoints' EMA weights")
    p.add_argument("--x-range", type=float, nargs=2, default=[-10.0, 10.0], metavar=("LOW", "HIGH"),
                   help="x interval of the curves (default: %(default)s)")
    p.add_argument("--out", default="modulators.png", help="output file; its extension picks the format: .png, "
                   ".pdf, .svg, ... (default: %(default)s)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to it")
    p.add_argument("--dpi", type=float, default=150, help="resolution of raster formats (default: %(default)s)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> List[str]:
    check_figure_output(args.out, args.dpi)
    check_finite("--x-range", args.x_range)
    low, high = args.x_range
    if not low < high:
        raise UserError(f"--x-range needs LOW < HIGH, got {low:g} {high:g}")
    fig = modulator_evolution_figure(label_runs(args.checkpoints, args.use_ema), (low, high))
    return save_figure(fig, args.out, args.pdf, args.dpi)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return figure_script_main("plot_modulators.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
