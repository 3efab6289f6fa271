"""What the figure scripts share (plot_modulators.py, plot_simplex.py, attention_maps.py, gradcam.py,
report.py): a checkpoint's modulators, the paper's simplex / sparsity–multi-modality figure, and the
checks and writing of an output file. Figures are built on an Agg canvas (``engine.plots.new_figure``),
never through pyplot.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.checkpoint import load_checkpoint
from engine.errors import UserError
from engine.plots import new_figure
from models.multimax import ModulatorParams, modulators_from_state_dict
from models.weights import CheckpointMismatchError, extract_state_dict


def checkpoint_modulators(path: str, use_ema: bool = False) -> Tuple[Dict[str, Any], Dict[str, ModulatorParams]]:
    """The checkpoint file at ``path`` and its modulators (``modulators_from_state_dict``); a file
    without weights or without modulators (a softmax model) is a UserError naming it."""
    ckpt = load_checkpoint(path, mmap=True)
    try:
        found = modulators_from_state_dict(extract_state_dict(ckpt, use_ema))
    except CheckpointMismatchError as e:
        raise UserError(f"{path}: {e}") from None
    if not found:
        raise UserError(f"{path} has no MultiMax modulators (a softmax model?)")
    return ckpt, found


# ---------------------------------------------------------------- simplex

# Vertices of the 2-simplex drawn as an equilateral triangle, as in the paper's Figure 1:
# e1 = (1, 0, 0) bottom right, e2 = (0, 1, 0) top, e3 = (0, 0, 1) bottom left.
SIMPLEX_VERTICES = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0], [0.0, 0.0]], dtype=torch.float64)


def barycentric_xy(p: torch.Tensor) -> torch.Tensor:
    """Project distributions over 3 entries onto the triangle: (..., 3) → (..., 2) = p @ vertices."""
    if p.shape[-1] != 3:
        raise ValueError(f"barycentric_xy needs distributions over 3 entries, got shape {tuple(p.shape)}")
    return p.to(torch.float64) @ SIMPLEX_VERTICES


@dataclass
class SimplexSeries:
    """One normalizer on P inputs: ``probs`` (P, 3) with ``multimodality``/``sparsity`` (P,),
    drawn as markers; or a sweep (P, G, 3) / (P, G), e.g. softmax over
    G temperatures, drawn as one thin line per input. ``annotate`` labels the points with the
    input labels. ``color``/``marker`` default to the next of a cycle."""

    label: str
    probs: torch.Tensor
    multimodality: torch.Tensor
    sparsity: torch.Tensor
    annotate: bool = False
    color: Optional[str] = None
    marker: Optional[str] = None


_MARKERS = ("o", "s", "D", "v", "*", "P", "X", "<", ">", "h")


def simplex_figure(series: Sequence[SimplexSeries], input_labels: Sequence[str], title: Optional[str] = None) -> Figure:
    """Left: the distributions on the 2-simplex; right: sparsity S against multi-modality M."""
    fig = new_figure(11.0, 5.2)
    left, right = fig.subplots(1, 2, width_ratios=(1.2, 1.0))
    corners = torch.cat([SIMPLEX_VERTICES, SIMPLEX_VERTICES[:1]])
    left.plot(corners[:, 0], corners[:, 1], color="black", linewidth=1.0)
    for (vx, vy), text, va in zip(SIMPLEX_VERTICES.tolist(), ("(1, 0, 0)", "(0, 1, 0)", "(0, 0, 1)"),
                                  ("top", "bottom", "top")):
        left.annotate(text, (vx, vy), xytext=(0, -6 if va == "top" else 6), textcoords="offset points",
                      ha="center", va=va, fontsize=9)
    left.set_aspect("equal")
    left.set_xlim(-0.08, 1.08)
    left.set_ylim(-0.1, 0.95)
    left.axis("off")
    right.set_xlabel("multi-modality M")
    right.set_ylabel("sparsity S")
    right.set_xlim(-0.04, 1.1)
    right.set_ylim(-0.04, 1.08)
    right.grid(alpha=0.3)

    colors = colormaps["tab10"].colors
    points = 0  # marker series drawn so far: picks colour and marker
    for s in series:
        xy = barycentric_xy(s.probs)
        ms = torch.stack([s.multimodality, s.sparsity], dim=-1).to(torch.float64)
        if s.probs.dim() == 3:  # a sweep: one line per input
            for i in range(xy.shape[0]):
                kw = dict(color="0.55", linewidth=0.8, alpha=0.8, label=s.label if i == 0 else None)
                left.plot(xy[i, :, 0], xy[i, :, 1], **kw)
                right.plot(ms[i, :, 0], ms[i, :, 1], **kw)
            continue
        color = s.color or colors[points % len(colors)]
        # hollow markers, so that normalizers giving the same point stay visible
        kw = dict(color=color, marker=s.marker or _MARKERS[points % len(_MARKERS)], markersize=9, linestyle="none",
                  markerfacecolor="none", markeredgewidth=1.6, label=s.label)
        points += 1
        left.plot(xy[:, 0], xy[:, 1], **kw)
        right.plot(ms[:, 0], ms[:, 1], **kw)
        if s.annotate:
            for i, text in enumerate(input_labels):
                for ax, point in ((left, xy[i]), (right, ms[i])):
                    ax.annotate(text, point.tolist(), xytext=(5, 5), textcoords="offset points", fontsize=8,
                                color=color)
    left.legend(fontsize=8, loc="upper left", frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------- output files

def figure_formats() -> List[str]:
    """File extensions matplotlib's Agg canvas writes (png, pdf, svg, jpg, ...)."""
    return sorted(FigureCanvasAgg.get_supported_filetypes())


MAX_DPI = 1200  # the 11 x 5.2-inch simplex figure at 1200 dpi is 13,200 x 6,240 pixels (330 MB as RGBA)


def check_figure_output(out: str, dpi: float) -> None:
    """Refuse an ``--out`` matplotlib cannot write, or a ``--dpi`` outside (0, MAX_DPI], before
    any work is done."""
    ext = os.path.splitext(out)[1][1:].lower()
    if ext not in figure_formats():
        raise UserError(f"--out {out}: {'no file extension' if not ext else f'unsupported format .{ext}'}; "
                        f"use one of {', '.join('.' + f for f in figure_formats())}")
    if not 0 < dpi <= MAX_DPI:  # NaN fails too
        raise UserError(f"--dpi must be a number in (0, {MAX_DPI}], got {dpi:g}")


def check_finite(flag: str, values: Optional[Sequence[float]]) -> None:
    """Refuse NaN/inf in a numeric command-line option (they would draw empty or broken curves)."""
    if values is not None and not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} must be finite numbers, got {' '.join(f'{v:g}' for v in values)}")


def save_figure(fig: Figure, out: str, pdf: bool = False, dpi: int = 150) -> List[str]:
    """Write ``fig`` to ``out`` (its extension picks the format) and, with ``pdf``, next to it as
    .pdf; returns the paths. Bad paths, formats or sizes are one-line UserErrors."""
    check_figure_output(out, dpi)
    paths = list(dict.fromkeys([out] + ([os.path.splitext(out)[0] + ".pdf"] if pdf else [])))
    for path in paths:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path, dpi=dpi)
        except OSError as e:
            raise UserError(f"cannot write figure {path}: {e.strerror or e}") from None
        except (ValueError, MemoryError) as e:  # e.g. an image larger than Agg allows or memory holds
            raise UserError(f"cannot write figure {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    return paths


def figure_script_main(script: str, parse_args, run, argv=None) -> int:
    """The entry of a figure script: parse, run, print written paths; a UserError is one line, exit 2."""
    args = parse_args(argv)
    try:
        paths = run(args)
    except UserError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
