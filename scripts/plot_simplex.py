#!/usr/bin/env python
"""The paper's Figure 1: normalizers on inputs (10, x2, −1) on the 2-simplex, and their
sparsity S against multi-modality M (engine.attn_stats, ε = 0 by default).

    python scripts/plot_simplex.py --checkpoint runs/x/best.pth --layer blocks.3 --out simplex.png
    python scripts/plot_simplex.py --ranges 0 2 --ts -10 -0.7 --out simplex.png --pdf

Shown: softmax at each ``--temperatures`` value (and, unless ``--no-sweep``, a thin line per
input over a continuous temperature sweep), sparsemax, entmax-1.5, EvSoftMax (evaluation mode:
entries below the row mean zeroed) and MultiMax, softmax(σ(x)), with the modulator σ of one
layer of a checkpoint (``--layer blocks.<i>`` or ``out``; ours and the paper's key layouts) or
with ``--ranges``/``--ts`` given on the command line.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402

import models  # noqa: E402
from engine.attn_stats import multimodality, sparsity  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.plots import modulator_curve, short_name  # noqa: E402
from scripts._figures import (  # noqa: E402
    SimplexSeries, check_figure_output, check_finite, checkpoint_modulators, figure_script_main, save_figure,
    simplex_figure,
)
from models.multimax import ModulatorParams  # noqa: E402

DEFAULT_X2 = (10.0, 8.0, 6.0, 4.0, 2.0)
DEFAULT_TEMPERATURES = (0.5, 1.0, 2.0, 5.0)
SWEEP = (0.1, 100.0, 200)  # softmax temperature sweep: from, to, points (log-spaced)
# label, colour, marker of the sparse baselines (the paper's Figure 1 styles)
NORMALIZER_STYLES = {"evsoftmax": ("EvSoftMax", "c", "s"), "entmax15": ("entmax-1.5", "g", "v"),
                     "sparsemax": ("sparsemax", "b", "*")}

__all__ = ["simplex_inputs", "normalizer_probs", "canonical_layer", "load_modulator", "build_series", "main"]


def simplex_inputs(x2s: Sequence[float] = DEFAULT_X2) -> torch.Tensor:
    """The paper's inputs (10, x2, −1), one row per x2: (P, 3) float64."""
    return torch.tensor([[10.0, float(x2), -1.0] for x2 in x2s], dtype=torch.float64)


def normalizer_probs(
    name: str, x: torch.Tensor, temperature: float = 1.0, modulator: Optional[Sequence[torch.Tensor]] = None
) -> torch.Tensor:
    """Distributions over the last dim of x: ``softmax`` (at ``temperature``), ``sparsemax``,
    ``entmax15``, ``evsoftmax`` (evaluation mode) or ``multimax`` (softmax(σ(x)) with
    ``modulator`` = (ranges, ts[, scale, shift])). Same shape and dtype as x."""
    if name == "softmax":
        return models.softmax(x, temperature=temperature)
    if name == "sparsemax":
        return models.sparsemax(x)
    if name == "entmax15":
        return models.entmax15(x)
    if name == "evsoftmax":
        return models.evsoftmax(x, training=False)
    if name == "multimax":
        if modulator is None:
            raise ValueError("multimax needs the modulator parameters (ranges, ts)")
        return torch.softmax(modulator_curve(modulator, x), dim=-1)
    raise ValueError(f"unknown normalizer {name!r}")


def canonical_layer(name: str) -> str:
    """'3', 'blocks.3', 'blocks.3.attn[.normalizer.modulator]' → 'blocks.3'; 'out', 'output', 'out_modulator' → 'out'."""
    m = re.fullmatch(r"(?:blocks\.)?(\d+)(?:\.attn(?:\.normalizer\.modulator)?)?", name)
    if m:
        return f"blocks.{int(m.group(1))}"
    return "out" if name in ("out", "output", "out_modulator") else name


def load_modulator(path: str, layer: str, use_ema: bool = False) -> Tuple[ModulatorParams, str]:
    """The modulator of ``layer`` in the checkpoint at ``path`` and its canonical name."""
    found = checkpoint_modulators(path, use_ema)[1]
    name = canonical_layer(layer)
    if name not in found:
        raise UserError(f"{path} has no modulator for layer {layer!r}; available: {', '.join(found)}")
    return found[name], name


def _series(label: str, x: torch.Tensor, p: torch.Tensor, eps: float, annotate: bool = False) -> SimplexSeries:
    return SimplexSeries(label, p, multimodality(x, p, eps), sparsity(x, p, eps), annotate)


def build_series(
    x: torch.Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    modulator: Optional[Tuple[str, Sequence[torch.Tensor]]] = None,
    sweep: bool = True,
    eps: float = 0.0,
) -> List[SimplexSeries]:
    """Every normalizer's points on inputs x (P, 3); ``modulator`` = (label, params) adds MultiMax.
    The MultiMax points (else softmax at the first temperature) are annotated with their input."""
    series = []
    if sweep:
        t = torch.logspace(torch.log10(torch.tensor(SWEEP[0])), torch.log10(torch.tensor(SWEEP[1])), SWEEP[2],
                           dtype=torch.float64)
        p = torch.softmax(x[:, None, :] / t[None, :, None], dim=-1)  # (P, G, 3)
        xs = x[:, None, :].expand_as(p)
        series.append(_series(f"softmax, t from {SWEEP[0]:g} to {SWEEP[1]:g}", xs, p, eps))
    for i, temp in enumerate(temperatures):
        p = normalizer_probs("softmax", x, temperature=temp)
        s = _series(f"softmax t={temp:g}", x, p, eps, annotate=modulator is None and i == 0)
        s.color, s.marker = colormaps["YlOrRd"](0.4 + 0.55 * i / max(1, len(temperatures) - 1)), "o"
        series.append(s)
    for (name, (label, color, marker)) in NORMALIZER_STYLES.items():
        s = _series(label, x, normalizer_probs(name, x), eps)
        s.color, s.marker = color, marker
        series.append(s)
    if modulator is not None:
        label, params = modulator
        s = _series(label, x, normalizer_probs("multimax", x, modulator=params), eps, annotate=True)
        s.color, s.marker = "m", "^"
        series.append(s)
    return series


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint whose modulator MultiMax uses (with --layer)")
    src.add_argument("--ranges", type=float, nargs="+", help="MultiMax modulator b1 d1 [b2 d2 ...] (with --ts)")
    p.add_argument("--layer", help="modulator of the checkpoint: blocks.<i> (attention layer i) or out")
    p.add_argument("--ts", type=float, nargs="+", help="MultiMax modulator t_b1 t_d1 [t_b2 t_d2 ...]")
    p.add_argument("--use-ema", action="store_true", help="read the checkpoint's EMA weights")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES),
                   help="softmax temperatures drawn as points (default: %(default)s)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="omit the continuous softmax sweep")
    p.add_argument("--x2", type=float, nargs="+", default=list(DEFAULT_X2),
                   help="second entries of the inputs (10, x2, -1) (default: %(default)s)")
    p.add_argument("--eps", type=float, default=0.0, help="ε of the S/M definitions (default: 0, the paper's)")
    p.add_argument("--out", default="simplex.png", help="output file; its extension picks the format: .png, .pdf, "
                   ".svg, ... (default: %(default)s)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to it")
    p.add_argument("--dpi", type=float, default=150, help="resolution of raster formats (default: %(default)s)")
    return p.parse_args(argv)


def _modulator_from_args(args: argparse.Namespace) -> Optional[Tuple[str, ModulatorParams]]:
    if args.checkpoint:
        if not args.layer:
            raise UserError("--checkpoint needs --layer (blocks.<i> or out)")
        params, name = load_modulator(args.checkpoint, args.layer, args.use_ema)
        return f"MultiMax ({short_name(name)} of {os.path.basename(args.checkpoint)})", params
    if args.ranges is None and args.ts is None:
        return None
    if args.ranges is None or args.ts is None or len(args.ranges) != len(args.ts) or len(args.ranges) % 2:
        raise UserError("--ranges and --ts need the same even number of values (b1 d1 [b2 d2 ...], "
                        "t_b1 t_d1 [t_b2 t_d2 ...])")
    params = ModulatorParams(torch.tensor(args.ranges, dtype=torch.float64), torch.tensor(args.ts, dtype=torch.float64))
    return "MultiMax (σ from --ranges/--ts)", params


def run(args: argparse.Namespace) -> List[str]:
    check_figure_output(args.out, args.dpi)
    for flag in ("ranges", "ts", "temperatures", "x2"):
        check_finite(f"--{flag}", getattr(args, flag))
    check_finite("--eps", [args.eps])
    if any(t <= 0 for t in args.temperatures):
        raise UserError(f"--temperatures must be > 0, got {args.temperatures}")
    modulator = _modulator_from_args(args)
    x = simplex_inputs(args.x2)
    labels = [f"x₂={b:g}" for b in x[:, 1].tolist()]
    fig = simplex_figure(build_series(x, args.temperatures, modulator, args.sweep, args.eps), labels,
                         title="inputs (10, x₂, −1)" + (f", ε = {args.eps:g}" if args.eps else ""))
    return save_figure(fig, args.out, args.pdf, args.dpi)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return figure_script_main("plot_simplex.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
