#!/usr/bin/env python
"""Step times of MultiMax ViTs against the softmax-SDPA baseline: train steps and inference.

    # any combination (the cartesian product of the listed values), one round-robin group
    python scripts/benchmark.py --model deit_tiny_multimax_patch16_224 deit_tiny_gap_patch16_224 \\
        --compile off on --mode train infer --batch-size 8 --out-json bench.json --out-md bench.md
    # the DeiT table of docs/PERFORMANCE.md
    python scripts/benchmark.py --preset deit --out-json deit.json --out-md deit.md
    # on a GPU: softmax-SDPA, MultiMax explicit, flex and reference train steps side by side (bf16)
    python scripts/benchmark.py --preset deit --device cuda --sizes small --mode train --compile on

(scripts/benchmark_memory.py measures the peak memory of one attention layer.)

Each variant is built and warmed up (this includes torch.compile), then the variants of a group
are timed round-robin, in A B B A order (``_benchmarking.py``, which also says what the clocks and
the confidence interval are). Reported: the median step time over repeats (→ img/s) and,
against the baseline (the same architecture, mode, compile flag and dtype with
softmax attention), the median of the per-repeat time ratios with its 95% confidence interval,
and the ratio of the fastest repeats (the least disturbed ones on a shared machine); also the
median minor page faults per step. A train step is forward + cross-entropy + backward + AdamW
step, the optimizer built as train.py builds it (``engine.optim.build_optimizer``: DeiT's
parameter groups, fused AdamW on CPU and CUDA); an inference step is a forward under
inference_mode.
"peak extra MB" is the peak of memory allocated during one step above what was allocated before
it (weights, optimizer state, the input batch), as ``_benchmarking.ExtraMemory`` counts it
(not reported for compiled variants on CPU, whose buffers that counter cannot see).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402,F401  (registers the models with timm)
from scripts._benchmarking import (  # noqa: E402
    ExtraMemory, add_common_args, autocast, fmt, markdown_table, median_ci, meta_model, parse_cli_args, run_cli, setup,
    sync, time_rounds, write_report,
)
from engine.config import OptimConfig  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from models.choices import ATTN_BACKENDS, NORMALIZERS, OUT_NORMALIZERS  # noqa: E402

MODES = ("train", "infer")


# ----------------------------------------------------------------------------- what is measured

@dataclass(frozen=True)
class Variant:
    """One configuration to time. ``attn_normalizer``/``out_normalizer`` None = the model's own."""

    model: str
    mode: str = "train"
    backend: str = "auto"
    compile: bool = False
    dtype: str = "fp32"
    batch_size: int = 8
    img_size: Optional[int] = None
    attn_normalizer: Optional[str] = None
    out_normalizer: Optional[str] = None
    fused: bool = True  # False: every attention's fused_attn off, autograd through the reference normalizer

    def model_kwargs(self) -> Dict[str, object]:
        kw: Dict[str, object] = {"attn_backend": self.backend}
        if self.img_size is not None:
            kw["img_size"] = self.img_size
        if self.attn_normalizer is not None:
            kw["attn_normalizer"] = self.attn_normalizer
        if self.out_normalizer is not None:
            kw["out_normalizer"] = self.out_normalizer
        return kw


@dataclass
class Result:
    """Measurements of one variant; times in seconds per step, one per repeat."""

    variant: Variant
    group: str
    arch: str
    attn: str
    out: str
    kernel: str
    tokens: int
    times: List[float] = field(default_factory=list)
    faults: List[float] = field(default_factory=list)  # minor page faults per step, one per repeat
    peak_extra_mb: Optional[float] = None
    baseline: Optional[int] = None  # index into the results list
    ratio: Optional[float] = None  # median over repeats of time / baseline time
    ratio_ci: Optional[Tuple[float, float]] = None  # 95% confidence interval of that median
    ratio_best: Optional[float] = None  # fastest repeat / fastest baseline repeat (least disturbed)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def img_per_s(self) -> float:
        return self.variant.batch_size / self.median_s

    def to_json(self) -> Dict[str, object]:
        return {**asdict(self), "median_s": self.median_s, "img_per_s": self.img_per_s}


# ----------------------------------------------------------------------------- one step

def _arch(model: torch.nn.Module) -> str:
    """Architecture key for baselines: width, depth, heads, tokens."""
    return (f"dim{model.embed_dim}-depth{len(model.blocks)}-heads{model.blocks[0].attn.num_heads}"
            f"-tok{model.patch_embed.num_patches}")


def build_step(v: Variant, device: torch.device, compile_mode: Optional[str]) -> Tuple[Callable[[], None], Result]:
    """The model, data and optimizer of ``v`` and a closure that runs one step."""
    try:
        model = timm.create_model(v.model, **v.model_kwargs()).to(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot build {v.model} with {v.model_kwargs()}: {e}") from None
    attn = model.blocks[0].attn
    model.train(v.mode == "train")
    for block in model.blocks:
        block.attn.fused_attn = v.fused
    with torch.set_grad_enabled(v.mode == "train"):  # auto's choice depends on it
        kernel = attn.kernel(device) if v.fused else "reference"
    result = Result(
        variant=v, group="", arch=_arch(model), attn=model.attn_normalizer, out=model.out_normalizer,
        kernel=kernel, tokens=model.patch_embed.num_patches,
    )
    chans, size = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(v.batch_size, chans, *size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (v.batch_size,), generator=gen).to(device)
    net = torch.compile(model, mode=compile_mode) if v.compile else model
    if v.mode == "infer":
        def step() -> None:
            with torch.inference_mode(), autocast(device, v.dtype):
                net(x)
        return step, result
    opt = build_optimizer(model, OptimConfig(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=v.dtype == "fp16")

    def step() -> None:
        with autocast(device, v.dtype):
            loss = F.cross_entropy(net(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, result


def set_baselines(results: List[Result]) -> None:
    """Baseline of each result: the first softmax-attention result of the same group with the
    same architecture, mode, compile flag, dtype and batch; ratio = median of the per-repeat time
    ratios (paired: both were timed in the same round)."""
    for r in results:
        v = r.variant
        for j, b in enumerate(results):
            w = b.variant
            if b.attn == "softmax" and (b.group, b.arch, w.mode, w.compile, w.dtype, w.batch_size) == (
                r.group, r.arch, v.mode, v.compile, v.dtype, v.batch_size
            ):
                ratios = [t / tb for t, tb in zip(r.times, b.times)]
                r.baseline, r.ratio = j, statistics.median(ratios)
                r.ratio_ci = median_ci(ratios)
                r.ratio_best = min(r.times) / min(b.times)
                break


def run_group(
    name: str, variants: Sequence[Variant], device: torch.device, warmup: int, repeats: int, steps: int,
    compile_mode: Optional[str] = None, memory: bool = True, clock: str = "wall",
) -> List[Result]:
    """Build and warm up every variant, then time them round-robin; then peak memory, one
    step per variant (skipped for compiled CPU variants, which the CPU counter cannot see).

    Each group starts from an empty torch.compile cache: every compiled model instance is another
    guard set on the same timm forward code, and past torch._dynamo's recompile limit (8) dynamo
    would run the later groups' "compiled" variants eagerly."""
    torch._dynamo.reset()
    built = []
    for v in variants:
        t0 = time.perf_counter()
        step, result = build_step(v, device, compile_mode)
        result.group = name
        for _ in range(warmup):
            step()
        sync(device)
        print(f"[{name}] built+warmed {_label(result)} in {time.perf_counter() - t0:.1f}s")
        built.append((step, result))
    time_rounds(built, device, repeats, steps, clock, on_round=lambda r: print(
        f"[{name}] repeat {r + 1}/{repeats}: " + ", ".join(f"{res.times[-1] * 1e3:.0f}" for _, res in built) + " ms"))
    if memory:
        for step, result in built:
            if device.type == "cpu" and result.variant.compile:
                continue
            with ExtraMemory(device) as mem:
                step()
            result.peak_extra_mb = mem.peak_mb
    return [res for _, res in built]


def _label(r: Result) -> str:
    v = r.variant
    return (f"{v.model} {v.mode} attn={r.attn} out={r.out} backend={v.backend}({r.kernel}) "
            f"compile={'on' if v.compile else 'off'} {v.dtype} b{v.batch_size} {r.tokens}tok")


# ----------------------------------------------------------------------------- what to run

# --preset deit's sizes: (architecture, patch/resolution suffix) of the model names
DEIT_SIZES = {"tiny": ("deit_tiny", "patch16_224"), "small": ("deit_small", "patch16_224"),
              "base": ("deit_base", "patch16_224"), "micro": ("vit_micro", "patch7_28")}


def deit_groups(batch: int, dtypes: Sequence[str], compiles: Sequence[bool], modes: Sequence[str],
                sizes: Sequence[str] = ("tiny", "small"),
                device: torch.device = torch.device("cpu")) -> Dict[str, List[Variant]]:
    """MultiMax vs the softmax-SDPA GAP baseline, one group per (size, mode, dtype), eager and
    compiled alternated within the group. On CUDA MultiMax runs with the explicit path and with
    flex (CPU: ``auto``, i.e. explicit, as flex has no CPU backward). Train groups add MultiMax
    through the reference normalizer under autograd (kernel ``reference``: ``fused_attn`` off),
    the simpler path the explicit one's hand-written backward has to beat."""
    multimax = ["explicit", "flex"] if device.type == "cuda" else ["auto"]
    groups = {}
    for size, mode, dtype in itertools.product(sizes, modes, dtypes):
        arch, suffix = DEIT_SIZES[size]
        mm = f"{arch}_multimax_{suffix}"
        groups[f"{arch}-{mode}-{dtype}"] = [
            v for c in compiles for v in [
                Variant(f"{arch}_gap_{suffix}", mode=mode, compile=c, dtype=dtype, batch_size=batch),
                *(Variant(mm, mode=mode, backend=b, compile=c, dtype=dtype, batch_size=batch) for b in multimax),
                *([Variant(mm, mode=mode, backend="explicit", compile=c, dtype=dtype, batch_size=batch, fused=False)]
                  if mode == "train" else []),
            ]
        ]
    return groups


def cli_variants(args: argparse.Namespace, batch: int, device: torch.device) -> List[Variant]:
    """The cartesian product of the CLI lists, without the combinations that cannot run:
    sdpa with non-softmax attention, flex training on a device without flex backward."""
    out = []
    for model, attn, outn, backend, comp, dtype, mode, img in itertools.product(
        args.model or ["vit_micro_multimax_patch7_28"], args.attn_normalizer, args.out_normalizer,
        args.backend, args.compile or ["off"], args.dtype, args.mode, args.img_size or [None],
    ):
        if backend == "sdpa" and (attn or meta_model(model).attn_normalizer) != "softmax":
            print(f"skipping {model} attn={attn}: backend sdpa computes softmax only")
            continue
        if backend == "flex" and mode == "train" and device.type != "cuda":
            print(f"skipping {model} flex train: flex has no backward on {device.type}")
            continue
        out.append(Variant(model, mode, backend, comp == "on", dtype, batch, img, attn, outn))
    if not out:
        raise UserError("no variant left to run (see the 'skipping' lines above)")
    return out


def throughput_table(results: List[Result]) -> str:
    head = ("| group | model | mode | compile | attn/out | backend (kernel) | dtype | batch | tokens "
            "| img/s | ms/step | × baseline | 95% CI of × | × best-of-runs | faults/step | peak extra MB |")
    return markdown_table(head, [
        f"| {r.group} | {r.variant.model} | {r.variant.mode} | {'on' if r.variant.compile else 'off'} "
        f"| {r.attn}/{r.out} | {r.variant.backend} ({r.kernel}) | {r.variant.dtype} | {r.variant.batch_size} "
        f"| {r.tokens} | {r.img_per_s:.1f} | {r.median_s * 1e3:.0f} | {fmt(r.ratio, '.3f')} "
        f"| {'–' if r.ratio_ci is None else f'{r.ratio_ci[0]:.3f}–{r.ratio_ci[1]:.3f}'} "
        f"| {fmt(r.ratio_best, '.3f')} | {statistics.median(r.faults):.0f} | {fmt(r.peak_extra_mb, '.1f')} |"
        for r in results
    ])


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("deit",), help="the DeiT table of docs/PERFORMANCE.md")
    p.add_argument("--model", nargs="+", default=None, help="timm model names (default: vit_micro_multimax_patch7_28)")
    p.add_argument("--attn-normalizer", nargs="+", default=[None], choices=[None, *NORMALIZERS],
                   help="override the models' attention normalizer")
    p.add_argument("--out-normalizer", nargs="+", default=[None], choices=[None, *OUT_NORMALIZERS])
    p.add_argument("--backend", nargs="+", default=["auto"], choices=ATTN_BACKENDS)
    p.add_argument("--compile", nargs="+", default=None, choices=("off", "on"), help="default: off (deit: off on)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(DEIT_SIZES),
                   help="deit preset: model sizes (micro = the 28x28 CPU demo model)")
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    p.add_argument("--img-size", nargs="+", type=int, default=None, help="image size(s) (default: the model's)")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    add_common_args(p, warmup=3, repeats=5)
    return parse_cli_args(p, argv, {"warmup": 0, "repeats": 1, "steps": 1, "batch_size": 1, "threads": 1})


def run(args: argparse.Namespace) -> None:
    device, info = setup(args)
    results = run_groups(args, device)
    write_report(args, info, {"throughput": results}, [throughput_table(results)])


def run_groups(args: argparse.Namespace, device: torch.device) -> List[Result]:
    batch = args.batch_size or (128 if device.type == "cuda" else 8)
    if args.preset == "deit":
        compiles = [c == "on" for c in args.compile or ["off", "on"]]
        groups = deit_groups(batch, args.dtype, compiles, args.mode, args.sizes, device)
    else:
        groups = {"cli": cli_variants(args, batch, device)}
    results: List[Result] = []
    for name, variants in groups.items():
        results += run_group(name, variants, device, args.warmup, args.repeats, args.steps,
                             args.compile_mode, memory=not args.no_memory, clock=args.clock)
        gc.collect()
    set_baselines(results)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli("benchmark.py", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
