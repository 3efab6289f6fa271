#!/usr/bin/env python
"""Tables and figures from a sweep directory (scripts/sweep.py) or any run directories.

    python scripts/report.py runs/sweeps/fashion_mnist_normalizers
    python scripts/report.py runs/a runs/b runs/c --out reports/abc

Per variant: the number of seeds, mean ± sample standard deviation over its finished runs of the
final and best val top-1 / top-5 / val loss (and their EMA counterparts where the runs have an
EMA), the attention's sparsity S and multi-modality M (overall and per layer, from each run's
``eval.json``, eval.py --attn-stats on the final checkpoint), the patch similarity per block
(eval.py --patch-similarity there: the mean pairwise cosine similarity of the patch tokens, which
grows with depth as the tokens over-smooth), and the training time. Runs that did not finish are
listed with their state and left out of every average. Two more tables: how many runs ended at
their best epoch (per metric), and the pairs of variants whose seeds do not overlap (every seed of
one above every seed of the other) in final top-1 / top-5 / val loss, S, M and each block's patch
similarity: the differences larger than the seed-to-seed spread.

Writes to ``--out`` (default: the one directory given): ``report.md``, ``report.csv`` (one row
per variant), ``runs.csv`` (one row per run), ``val_top1.png`` (val top-1 per epoch: mean and
min–max over the seeds), ``attention_sm.png`` (S against M of every attention layer, as in
the paper's Figure 1, right, on trained attention) and ``patch_similarity.png`` (the patch
similarity against depth, one line per variant: the mean over seeds, band ± their std).

Variants: a sweep directory's ``sweep.json`` names them; other run directories are grouped by
name (``<variant>/seed<N>`` or ``<variant>``). Training time is Σ over epochs of the images
trained / the logged img/s: the training phases alone, without evaluation and start-up.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import EXIT_OK, EXIT_RESUMABLE, EXIT_USER_ERROR, UserError  # noqa: E402
from engine.logger import read_jsonl  # noqa: E402
from scripts._sweep_files import EVAL_JSON, EVAL_LOG, MANIFEST, TRAIN_LOG, eval_is_current, read_call  # noqa: E402

_SEED_DIR = re.compile(r"^seed(\d+)$")
# (column, log.jsonl key, best is the max?) of the accuracy metrics
METRICS = (("top1", "val_top1", True), ("top5", "val_top5", True), ("loss", "val_loss", False))


@dataclass
class RunResult:
    variant: str
    seed: Optional[int]
    run_dir: str
    state: str                     # "finished", "k of N epochs", "failed (...)", "log.jsonl unreadable", "not started"
    epochs: Optional[int] = None
    rows: List[Dict[str, Any]] = field(default_factory=list)
    values: Dict[str, float] = field(default_factory=dict)   # final_/best_ metrics, sparsity, multimodality, train_min
    layers: Dict[str, Tuple[Optional[float], Optional[float]]] = field(default_factory=dict)  # layer → (S, M)
    warnings: List[str] = field(default_factory=list)  # for the console: unreadable logs, why the run failed
    similarity: Dict[str, Optional[float]] = field(default_factory=dict)  # block → patch similarity

    @property
    def finished(self) -> bool:
        return self.state == "finished"


# ---------------------------------------------------------------- finding runs

def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml")) or os.path.isfile(os.path.join(path, "log.jsonl"))


def _name_of(run_dir: str) -> Tuple[str, Optional[int]]:
    """(variant, seed) of a run directory outside a sweep: ``<variant>/seed<N>`` or ``<variant>``."""
    run_dir = os.path.normpath(run_dir)
    m = _SEED_DIR.match(os.path.basename(run_dir))
    if m:
        return os.path.basename(os.path.dirname(os.path.abspath(run_dir))), int(m.group(1))
    return os.path.basename(os.path.abspath(run_dir)), None


def find_runs(paths: Sequence[str]) -> Tuple[List[Tuple[str, Optional[int], str]], List[str]]:
    """(variant, seed, run_dir) of every run under ``paths``, and the variants in order."""
    runs: List[Tuple[str, Optional[int], str]] = []
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"{path}: not a directory (a sweep directory or a run directory)")
        manifest = os.path.join(path, MANIFEST)
        if os.path.isfile(manifest):
            try:
                with open(manifest) as f:
                    entries = json.load(f)["runs"]
                runs += [(e["variant"], e["seed"], os.path.join(path, e["run_dir"])) for e in entries]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{manifest}: not a sweep manifest ({type(e).__name__}: {e})") from None
        elif _is_run_dir(path):
            runs.append((*_name_of(path), path))
        else:
            found = sorted(root for root, _, _ in os.walk(path) if _is_run_dir(root))
            if not found:
                raise UserError(f"{path}: holds no run directory (config.yaml or log.jsonl) and no {MANIFEST}")
            runs += [(*_name_of(d), d) for d in found]
    variants = list(dict.fromkeys(v for v, _, _ in runs))
    return runs, variants


# ---------------------------------------------------------------- one run

def _run_config(run_dir: str) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(train.epochs, train.seed, resolved global batch) from the run's config.yaml, Nones if absent."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None, None, None
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        train = cfg.get("train", {})
        return train.get("epochs"), train.get("seed"), (cfg.get("resolved") or {}).get("global_batch")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise UserError(f"{path}: unreadable run config ({e})") from None


def _finite(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def train_minutes(rows: Sequence[Dict[str, Any]], global_batch: Optional[int]) -> Optional[float]:
    """Σ over epochs of (optimizer steps × global batch) / logged img/s, in minutes."""
    if not global_batch:
        return None
    total, previous_step = 0.0, 0
    for row in rows:
        rate, step = _finite(row.get("train_img_per_s")), row.get("step")
        if not rate or not isinstance(step, int):
            return None
        total += (step - previous_step) * global_batch / rate
        previous_step = step
    return total / 60.0


def _failure(run_dir: str, log_name: str) -> Optional[Tuple[str, str]]:
    """(state, warning) when the last call in the run's sweep log ``log_name`` failed, else None.
    Without an exit line (logs of older sweeps) an error line as its last word counts as failure."""
    log = os.path.join(run_dir, log_name)
    status, why = read_call(log)
    script = log_name.replace(".log", ".py")
    if status in (EXIT_OK, EXIT_RESUMABLE) or (status is None and not why.startswith(f"{script}: error:")):
        return None
    exit_text = f"{script} exit {status}" if status is not None else f"{script} failed"
    return f"failed ({exit_text})", f"{run_dir}: {exit_text}: {why} (log: {log})"


def read_run(variant: str, seed: Optional[int], run_dir: str) -> RunResult:
    epochs, config_seed, global_batch = _run_config(run_dir)
    seed = seed if seed is not None else config_seed
    problems: List[str] = []
    rows = [r for r in read_jsonl(os.path.join(run_dir, "log.jsonl"), problems) if isinstance(r.get("epoch"), int)]
    started = rows or os.path.exists(os.path.join(run_dir, "last.pth"))
    result = RunResult(variant, seed, run_dir, "not started", epochs, rows, warnings=problems)
    done = rows[-1]["epoch"] + 1 if rows else 0
    if epochs is None or done < epochs or _finite(rows[-1].get("val_top1")) is None:
        failure = _failure(run_dir, TRAIN_LOG)
        if failure:
            result.state = failure[0]
            result.warnings.append(failure[1])
        elif problems and not rows:
            result.state = "log.jsonl unreadable"
        elif started:
            result.state = f"{done} of {epochs if epochs is not None else '?'} epochs"
        return result
    result.state = "finished"
    for suffix in ("", "_ema"):
        for name, key, higher in METRICS:
            series = [v for v in (_finite(r.get(key + suffix)) for r in rows) if v is not None]
            if series:
                result.values[f"final_{name}{suffix}"] = series[-1]
                result.values[f"best_{name}{suffix}"] = max(series) if higher else min(series)
    minutes = train_minutes(rows, global_batch)
    if minutes is not None:
        result.values["train_min"] = minutes
    _read_attention(result)
    failure = None if "sparsity" in result.values else _failure(run_dir, EVAL_LOG)
    if failure:
        result.warnings.append(failure[1])
    return result


def _read_attention(result: RunResult) -> None:
    """S and M (overall and per layer) and the patch similarity per block from the run's eval.json, if
    it is there and newer than last.pth."""
    if not eval_is_current(result.run_dir):
        return
    path = os.path.join(result.run_dir, EVAL_JSON)
    try:
        with open(path) as f:
            evaluated = json.load(f)
        stats = evaluated.get("attn_stats") or {}
        for key in ("sparsity", "multimodality"):
            value = _finite((stats.get("mean") or {}).get(key))
            if value is not None:
                result.values[key] = value
        for layer, entry in (stats.get("layers") or {}).items():
            mean = entry.get("mean") or {}
            result.layers[layer] = (_finite(mean.get("sparsity")), _finite(mean.get("multimodality")))
        for block, value in ((evaluated.get("patch_similarity") or {}).get("layers") or {}).items():
            result.similarity[block] = _finite(value)
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: unreadable eval.py result ({e})") from None


# ---------------------------------------------------------------- aggregation

def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _columns(results: Sequence[RunResult]) -> List[str]:
    names = [f"{kind}_{m}{s}" for s in ("", "_ema") for m, _, _ in METRICS for kind in ("final", "best")]
    names += ["sparsity", "multimodality", "train_min"]
    return [n for n in names if any(n in r.values for r in results)]


def _layers(results: Sequence[RunResult]) -> List[str]:
    return list(dict.fromkeys(layer for r in results for layer in r.layers))


def _blocks(results: Sequence[RunResult]) -> List[str]:
    return list(dict.fromkeys(block for r in results for block in r.similarity))


def summarise(variants: Sequence[str], results: Sequence[RunResult]) -> List[Dict[str, Any]]:
    """One dict per variant: seeds, unfinished runs, and (mean, std) of every column over finished runs."""
    columns, layers, blocks = _columns(results), _layers(results), _blocks(results)
    table = []
    for variant in variants:
        runs = [r for r in results if r.variant == variant]
        done = [r for r in runs if r.finished]
        row: Dict[str, Any] = {"variant": variant, "seeds": len(done),
                               "unfinished": [r for r in runs if not r.finished]}
        for c in columns:
            row[c] = mean_std([r.values[c] for r in done if c in r.values])
        for layer in layers:
            for i, stat in enumerate(("sparsity", "multimodality")):
                values = [r.layers[layer][i] for r in done if layer in r.layers and r.layers[layer][i] is not None]
                row[f"{stat}[{layer}]"] = mean_std(values)
        for block in blocks:
            row[f"patch_similarity[{block}]"] = mean_std(
                [r.similarity[block] for r in done if r.similarity.get(block) is not None])
        table.append(row)
    return table


def final_is_best(values: Dict[str, Sequence[Tuple[float, float]]]) -> Dict[str, Tuple[int, int]]:
    """Per metric, from its (final, best) pairs over the finished runs: (runs whose final epoch was
    also the best, runs)."""
    return {name: (sum(final == best for final, best in pairs), len(pairs)) for name, pairs in values.items()}


def separated_pairs(values: Dict[str, Sequence[float]]) -> List[Tuple[str, str]]:
    """(higher, lower) for every two variants whose seeds do not overlap: each value of ``higher``
    above each of ``lower``. Variants with fewer than two values take no part (no spread)."""
    spread = {v: (min(xs), max(xs)) for v, xs in values.items() if len(xs) > 1}
    names = list(spread)
    return [(a, b) if spread[a][0] > spread[b][1] else (b, a)
            for i, a in enumerate(names) for b in names[i + 1:]
            if spread[a][0] > spread[b][1] or spread[b][0] > spread[a][1]]


# the columns compared by separated_pairs: final accuracy and loss, S and M (and the patch similarities)
SEPARATED = ("final_top1", "final_top5", "final_loss", "sparsity", "multimodality")


def _similarity_block(column: str) -> Optional[str]:
    """The block of a ``patch_similarity[<block>]`` column, else None."""
    m = re.fullmatch(r"patch_similarity\[(.+)\]", column)
    return m.group(1) if m else None


def pair_rows(column: str, values: Dict[str, Sequence[float]]) -> List[str]:
    """The report's table rows of ``column``'s separated pairs: metric, higher, its seeds' range, lower, its range."""
    digits, block = _digits(column), _similarity_block(column)
    title = f"patch similarity, {block}" if block else _title(column)
    rows = []
    for hi, lo in separated_pairs(values):
        ranges = [f"{min(values[v]):.{digits}f}–{max(values[v]):.{digits}f}" for v in (hi, lo)]
        rows.append(f"| {title} | {hi} | {ranges[0]} | {lo} | {ranges[1]} |")
    return rows


def _finals_and_bests(variant: str, results: Sequence[RunResult]) -> Dict[str, List[Tuple[float, float]]]:
    done = [r for r in results if r.variant == variant and r.finished]
    return {name: [(r.values[f"final_{name}"], r.values[f"best_{name}"]) for r in done
                   if f"final_{name}" in r.values] for name, _, _ in METRICS}


def _seed_values(results: Sequence[RunResult], column: str) -> Dict[str, List[float]]:
    """Per variant, the values of ``column`` (a ``values`` key or ``patch_similarity[<block>]``) of its
    finished runs."""
    out: Dict[str, List[float]] = {}
    block = _similarity_block(column)
    for r in results:
        value = r.values.get(column) if block is None else r.similarity.get(block)
        if r.finished and value is not None:
            out.setdefault(r.variant, []).append(value)
    return out


# ---------------------------------------------------------------- output

_TITLES = {"top1": "top-1 (%)", "top5": "top-5 (%)", "loss": "val loss"}
_DIGITS = {"top1": 2, "top5": 2, "loss": 4, "sparsity": 4, "multimodality": 4, "train_min": 1}


def _title(column: str) -> str:
    if column in ("sparsity", "multimodality"):
        return {"sparsity": "S", "multimodality": "M"}[column]
    if column == "train_min":
        return "train time (min)"
    kind, rest = column.split("_", 1)
    metric, _, ema = rest.partition("_")
    title = _TITLES[metric]
    return f"{kind} {title.replace(' (%)', ' EMA (%)') if '(%)' in title else title + ' EMA'}" if ema \
        else f"{kind} {title}"


def _digits(column: str) -> int:
    return _DIGITS.get(column, _DIGITS.get(column.split("_")[1] if "_" in column else column, 4))


def fmt(pair: Tuple[Optional[float], Optional[float]], digits: int) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _unfinished_text(row: Dict[str, Any]) -> str:
    return ", ".join(f"seed {r.seed}: {r.state}" for r in row["unfinished"]) or "–"


def _unevaluated_text(row: Dict[str, Any], results: Sequence[RunResult]) -> str:
    """Finished runs of the variant without attention statistics (their S, M are not in the means),
    or, where other runs have it, without the patch similarity."""
    runs = [r for r in results if r.variant == row["variant"] and r.finished]
    text = "".join(f", seed {r.seed}: no eval.json (S, M)" for r in runs if "sparsity" not in r.values)
    if _blocks(results):
        text += "".join(f", seed {r.seed}: no patch similarity" for r in runs
                        if "sparsity" in r.values and not r.similarity)
    return text


def markdown(table: Sequence[Dict[str, Any]], results: Sequence[RunResult], sources: Sequence[str]) -> str:
    columns, layers = _columns(results), _layers(results)
    out = io.StringIO()
    out.write("# Sweep report\n\n")
    out.write("From " + ", ".join(f"`{s}`" for s in sources) + ". Mean ± sample standard deviation over the "
              "finished runs of each variant (seeds); unfinished runs are listed, not averaged. Final: the last "
              "epoch; best: the best epoch of each metric. S and M: the paper's sparsity and multi-modality of "
              "the attention, eval.py --attn-stats on each run's final checkpoint, pooled over layers and heads.\n\n")
    head = ["variant", "seeds", *(_title(c) for c in columns), "not averaged"]
    out.write("| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n")
    for row in table:
        note = (_unfinished_text(row) + _unevaluated_text(row, results)).removeprefix("–, ")
        cells = [row["variant"], str(row["seeds"]), *(fmt(row[c], _digits(c)) for c in columns), note]
        out.write("| " + " | ".join(cells) + " |\n")
    for stat, title in (("sparsity", "Sparsity S"), ("multimodality", "Multi-modality M")):
        if not layers:
            break
        out.write(f"\n### {title} per attention layer\n\n")
        head = ["variant", *layers]
        out.write("| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n")
        for row in table:
            out.write("| " + " | ".join([row["variant"], *(fmt(row[f"{stat}[{l}]"], 4) for l in layers)]) + " |\n")
    out.write("\n### Final epoch against best epoch\n\nFinished runs whose final epoch was also their best one, "
              "per metric (the best val loss is the lowest).\n\n")
    head = ["variant", *(_TITLES[m] for m, _, _ in METRICS)]
    out.write("| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n")
    for row in table:
        counts = final_is_best(_finals_and_bests(row["variant"], results))
        out.write("| " + " | ".join([row["variant"], *(f"{counts[m][0]} of {counts[m][1]}" for m, _, _ in METRICS)])
                  + " |\n")
    out.write("\n### Differences beyond the seed spread\n\nPairs of variants whose finished seeds do not overlap: "
              "every seed of the first above every seed of the second (min–max over seeds).\n\n")
    out.write("| metric | higher | its seeds | lower | its seeds |\n| --- | --- | --- | --- | --- |\n")
    compared = [c for c in SEPARATED if c in _columns(results)] + [f"patch_similarity[{b}]" for b in _blocks(results)]
    for column in compared:
        out.writelines(row + "\n" for row in pair_rows(column, _seed_values(results, column)))
    blocks = _blocks(results)
    if blocks:
        out.write("\n### Patch similarity per block\n\nThe mean pairwise cosine similarity of the patch tokens after "
                  "each block (eval.py --patch-similarity), mean ± std over seeds.\n\n")
        head = ["variant", *blocks]
        out.write("| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n")
        for row in table:
            out.write("| " + " | ".join([row["variant"], *(fmt(row[f"patch_similarity[{b}]"], 4) for b in blocks)])
                      + " |\n")
    return out.getvalue()


def write_csvs(table: Sequence[Dict[str, Any]], results: Sequence[RunResult], out_dir: str) -> List[str]:
    columns, layers, blocks = _columns(results), _layers(results), _blocks(results)
    per_variant = os.path.join(out_dir, "report.csv")
    stats = columns + [f"{s}[{l}]" for l in layers for s in ("sparsity", "multimodality")]
    stats += [f"patch_similarity[{b}]" for b in blocks]
    with open(per_variant, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seeds", "unfinished", *(f"{c}_{k}" for c in stats for k in ("mean", "std"))])
        for row in table:
            w.writerow([row["variant"], row["seeds"], _unfinished_text(row) if row["unfinished"] else "",
                        *("" if v is None else v for c in stats for v in row[c])])
    per_run = os.path.join(out_dir, "runs.csv")
    with open(per_run, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "state", "epochs_done", "epochs", *columns,
                    *(f"{s}[{l}]" for l in layers for s in ("sparsity", "multimodality")),
                    *(f"patch_similarity[{b}]" for b in blocks), "run_dir"])
        for r in results:
            w.writerow([r.variant, r.seed, r.state, len(r.rows), r.epochs, *(r.values.get(c, "") for c in columns),
                        *("" if r.layers.get(l, (None, None))[i] is None else r.layers[l][i]
                          for l in layers for i in (0, 1)),
                        *("" if r.similarity.get(b) is None else r.similarity[b] for b in blocks), r.run_dir])
    return [per_variant, per_run]


def figures(table: Sequence[Dict[str, Any]], results: Sequence[RunResult], out_dir: str) -> List[str]:
    """val_top1.png (mean and min–max per variant), attention_sm.png (S against M per layer) and
    patch_similarity.png (against depth), the last two from the per-layer means and stds of
    ``table``, summarise's rows."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colors = colormaps["tab10"].colors
    written = []
    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, variant in enumerate(row["variant"] for row in table):
        curves = [[(r["epoch"] + 1, r["val_top1"]) for r in run.rows if _finite(r.get("val_top1")) is not None]
                  for run in results if run.variant == variant and run.finished]
        if not curves:
            continue
        epochs = sorted(set.intersection(*(set(e for e, _ in c) for c in curves)))
        by_epoch = [[dict(c)[e] for c in curves] for e in epochs]
        color = colors[i % len(colors)]
        ax.plot(epochs, [statistics.fmean(v) for v in by_epoch], color=color, marker="o", markersize=3,
                label=f"{variant} ({len(curves)})")
        if len(curves) > 1:
            ax.fill_between(epochs, [min(v) for v in by_epoch], [max(v) for v in by_epoch], color=color, alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    written += _finish(ax, "epoch", "val top-1 (%)", "val top-1: mean over the finished seeds (their number), "
                       "band: min–max", os.path.join(out_dir, "val_top1.png"))

    layers = _layers(results)
    if layers:
        fig = Figure(figsize=(6.4, 5.2))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for i, row in enumerate(table):
            variant, points = row["variant"], []
            for layer in layers:
                (s, s_std), (m, m_std) = row[f"sparsity[{layer}]"], row[f"multimodality[{layer}]"]
                if s is not None and m is not None:
                    points.append((layer, m, s, m_std or 0.0, s_std or 0.0))
            if not points:
                continue
            color = colors[i % len(colors)]
            xs, ys = [p[1] for p in points], [p[2] for p in points]
            ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.6)
            ax.errorbar(xs, ys, xerr=[p[3] for p in points], yerr=[p[4] for p in points], color=color,
                        marker="o", markerfacecolor="none", linestyle="none", capsize=2, label=variant)
            for layer, x, y, _, _ in points:
                ax.annotate(_layer_label(layer), (x, y), xytext=(3, 3), textcoords="offset points",
                            fontsize=7, color=color)
        written += _finish(ax, "multi-modality M", "sparsity S", "trained attention per layer (mean ± std over "
                           "seeds; labels: layer)", os.path.join(out_dir, "attention_sm.png"))

    blocks = _blocks(results)
    if blocks:
        fig = Figure(figsize=(6.4, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for i, row in enumerate(table):
            points = [(depth, *row[f"patch_similarity[{b}]"]) for depth, b in enumerate(blocks, start=1)]
            points = [(d, m, s or 0.0) for d, m, s in points if m is not None]
            if not points:
                continue
            color = colors[i % len(colors)]
            depths, means = [p[0] for p in points], [p[1] for p in points]
            ax.plot(depths, means, color=color, marker="o", markersize=3, label=f"{row['variant']} ({row['seeds']})")
            if row["seeds"] > 1:
                ax.fill_between(depths, [m - s for _, m, s in points], [m + s for _, m, s in points], color=color,
                                alpha=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        written += _finish(ax, "block (depth)", "patch similarity (mean pairwise cosine)", "patch tokens after each "
                           "block: mean over seeds (their number), band: ± std",
                           os.path.join(out_dir, "patch_similarity.png"))
    return written


def _finish(ax, xlabel: str, ylabel: str, title: str, path: str) -> List[str]:
    """Label, grid and legend ``ax``, then save its figure to ``path``; returns the written paths."""
    from scripts._figures import save_figure

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return save_figure(ax.figure, path)


def _layer_label(layer: str) -> str:
    m = re.search(r"blocks\.(\d+)", layer)
    return m.group(1) if m else layer


def report(paths: Sequence[str], out_dir: str) -> List[str]:
    runs, variants = find_runs(paths)
    results = [read_run(*r) for r in runs]
    for warning in (w for r in results for w in r.warnings):
        print(f"report.py: warning: {warning}", file=sys.stderr)
    table = summarise(variants, results)
    try:
        os.makedirs(out_dir, exist_ok=True)
        md = os.path.join(out_dir, "report.md")
        text = markdown(table, results, paths)
        written = write_csvs(table, results, out_dir)
        written += figures(table, results, out_dir)
        names = [os.path.basename(p) for p in written if p.endswith(".png")]
        text += "".join(f"\n![{os.path.splitext(n)[0]}]({n})\n" for n in names)
        with open(md, "w") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None
    return [md, *written]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="sweep directories and/or run directories")
    p.add_argument("--out", help="output directory (default: the one directory given)")
    args = p.parse_args(argv)
    if args.out is None and len(args.paths) > 1:
        p.error("--out is needed with more than one directory")
    try:
        written = report(args.paths, args.out or args.paths[0])
    except UserError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    for path in written:
        print(f"wrote {path}")
    with open(written[0]) as f:
        print(f.read())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
