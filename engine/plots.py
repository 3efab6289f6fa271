"""MultiMax modulator curves σ(x) as figures: the training log's TensorBoard figure
(``train.plot_modulators``) and scripts/plot_modulators.py (the other figures, and what the figure
scripts share, are in scripts/_figures.py).

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas (``new_figure``), never through
pyplot, so nothing here opens a window or touches the global backend (safe in training processes
and under ``SummaryWriter.add_figure``).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.multimax import ModulatorParams, seglu


def modulator_curve(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """σ(x) for ``params`` = (ranges, ts) or (ranges, ts, scale, shift); x any shape, float."""
    return seglu(x, *(None if p is None else torch.as_tensor(p, dtype=x.dtype) for p in ModulatorParams(*params)))


def short_name(name: str) -> str:
    """'blocks.3.attn.normalizer.modulator' / 'blocks.3' → 'block 3'; 'out_modulator' / 'out' → 'output'."""
    m = re.match(r"^blocks\.(\d+)\b", name)
    if m:
        return f"block {m.group(1)}"
    return "output" if name in ("out", "out_modulator") else name


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def modulator_figure(
    curves: Mapping[str, Sequence[torch.Tensor]], x_range: Tuple[float, float] = (-10.0, 10.0)
) -> Figure:
    """σ(x) of each modulator (name → (ranges, ts[, scale, shift])), one panel each, identity dashed."""
    return modulator_evolution_figure({"": curves}, x_range)


def modulator_evolution_figure(
    runs: Mapping[str, Mapping[str, Sequence[torch.Tensor]]],
    x_range: Tuple[float, float] = (-10.0, 10.0),
    num_points: int = 401,
) -> Figure:
    """σ(x) per modulator for several checkpoints (label → name → params) overlaid, coloured in
    the given order (e.g. by epoch); one panel per modulator name, identity dashed for reference."""
    names: List[str] = []
    for curves in runs.values():
        names += [n for n in curves if n not in names]
    if not names:
        raise ValueError("no modulators to plot")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = new_figure(3.0 * cols, 2.6 * rows + (0.4 if len(runs) > 1 else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False)
    x = torch.linspace(float(x_range[0]), float(x_range[1]), num_points, dtype=torch.float64)
    colors = _colors(len(runs))
    for ax, name in zip(axes.flat, names):
        ax.plot(x, x, linestyle="--", color="0.6", linewidth=1.0, label="identity")
        for color, (label, curves) in zip(colors, runs.items()):
            if name in curves:
                ax.plot(x, modulator_curve(curves[name], x), color=color, linewidth=1.6, label=label or "σ(x)")
        ax.set_title(short_name(name), fontsize=10)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
        elif i + cols >= len(names):  # the lowest panel of its column
            ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("σ(x)")
    if len(runs) > 1:  # one legend for all panels (a checkpoint may lack some modulators)
        entries: Dict[str, object] = {}
        for ax in axes.flat[:len(names)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=min(len(entries), 6),
                   fontsize=9)
    else:
        axes.flat[0].legend(fontsize=8)
    return fig


def _colors(n: int) -> List[Tuple[float, ...]]:
    """n colours from dark to light (viridis) for an ordered sequence such as epochs."""
    cmap = colormaps["viridis"]
    return [cmap(0.0)] if n == 1 else [cmap(0.9 * i / (n - 1)) for i in range(n)]


__all__ = ["modulator_curve", "short_name", "new_figure", "modulator_figure", "modulator_evolution_figure"]
