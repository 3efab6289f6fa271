#!/usr/bin/env python
"""Peak memory of one attention layer, forward + backward: softmax-SDPA, MultiMax explicit and
MultiMax chunked (and flex on CUDA), eager and compiled, at the token counts of the given image
sizes (default: DeiT-S's layer at 224 and 512 px, 196 and 1024 tokens).

    # the memory table of docs/PERFORMANCE.md
    python scripts/benchmark_memory.py --out-json mem.json --out-md mem.md
    python scripts/benchmark_memory.py --device cuda --img-size 224 384 512

(scripts/benchmark.py times whole train steps and inference.)

"peak MB", the compared quantity (× explicit: against MultiMax explicit with the same tokens and
compile flag), is
- CUDA: the allocator's peak above what was allocated before the step;
- CPU: the peak RSS increase of a fresh subprocess per layer (``--no-rss`` skips it), whose
  glibc is told to mmap every allocation of 64 KiB or more so that freed memory leaves the RSS;
  its high-water mark is reset after warm-up and compilation. It sees everything the process
  touched, compiled code included.
Next to it, for eager layers on CPU: the peak of live tensor bytes and what autograd holds after
the forward pass for the backward (``_benchmarking.ExtraMemory``); and the fwd+bwd time,
the layers of one token count timed round-robin (``_benchmarking.time_rounds``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import models  # noqa: E402,F401  (registers the models with timm)
from scripts._benchmarking import (  # noqa: E402
    ExtraMemory, add_common_args, autocast, fmt, markdown_table, meta_model, parse_cli_args, run_cli, setup,
    time_rounds, write_report,
)
from models.attention import MultiMaxAttention  # noqa: E402


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer to measure: the width/heads of ``model``, at ``tokens`` tokens."""

    model: str
    normalizer: str
    backend: str
    compile: bool
    batch_size: int
    tokens: int
    dtype: str


@dataclass
class MemoryResult:
    """Memory of one layer's forward + backward. ``peak_mb`` is the compared quantity: CUDA
    allocator peak, or on CPU the peak RSS increase (falling back to ``tensor_peak_mb``)."""

    spec: LayerSpec
    kernel: str
    peak_mb: Optional[float] = None
    tensor_peak_mb: Optional[float] = None  # CPU dispatch counter / CUDA allocator; eager only on CPU
    held_after_forward_mb: Optional[float] = None
    rss_peak_mb: Optional[float] = None
    times: List[float] = field(default_factory=list)
    faults: List[float] = field(default_factory=list)
    ratio: Optional[float] = None  # peak_mb / that of explicit MultiMax, same tokens and compile flag

    def to_json(self) -> Dict[str, object]:
        return {**asdict(self), "median_s": statistics.median(self.times)}


def build_layer(spec: LayerSpec, device: torch.device) -> Tuple[Callable[..., None], str]:
    """A closure running forward + backward of a fresh attention layer (gradients for the input
    and the layer's parameters; ``after_forward`` is called between them), and its kernel."""
    model = meta_model(spec.model)
    attn = MultiMaxAttention(model.embed_dim, model.blocks[0].attn.num_heads, normalizer=spec.normalizer,
                             backend=spec.backend).to(device)
    net = torch.compile(attn) if spec.compile else attn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch_size, spec.tokens, model.embed_dim, generator=gen).to(device).requires_grad_()

    def step(after_forward: Optional[Callable[[], None]] = None) -> None:
        attn.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(device, spec.dtype):
            out = net(x)
        if after_forward is not None:
            after_forward()
        out.backward(torch.ones_like(out))
    return step, attn.kernel(device)


def tokens_at(model_name: str, img_size: int) -> int:
    return (img_size // meta_model(model_name).patch_embed.patch_size[0]) ** 2


def measure_attention_memory(
    specs: Sequence[LayerSpec], device: torch.device, warmup: int, repeats: int, rss: bool, clock: str = "wall",
) -> List[MemoryResult]:
    """Memory (see ``MemoryResult``) and fwd+bwd time of each layer in ``specs``; the layers
    with the same token count are timed round-robin."""
    results: List[MemoryResult] = []
    for tokens in sorted({s.tokens for s in specs}):
        layers = []
        for spec in (s for s in specs if s.tokens == tokens):
            step, kernel = build_layer(spec, device)
            for _ in range(max(warmup, 1)):
                step()
            res = MemoryResult(spec, kernel)
            if device.type == "cuda" or not spec.compile:  # the CPU counter cannot see Inductor's buffers
                held: List[float] = []
                with ExtraMemory(device) as mem:
                    step(after_forward=lambda: held.append(mem.current_mb()))
                res.tensor_peak_mb, res.held_after_forward_mb = mem.peak_mb, held[0]
            if rss and device.type == "cpu":
                res.rss_peak_mb = rss_probe(spec)
            res.peak_mb = res.rss_peak_mb if res.rss_peak_mb is not None else res.tensor_peak_mb
            layers.append((step, res))
            print(f"[memory] {_label(res)}: peak {fmt(res.peak_mb, '.1f')} MB "
                  f"(tensors {fmt(res.tensor_peak_mb, '.1f')}, RSS {fmt(res.rss_peak_mb, '.1f')})")
        time_rounds(layers, device, repeats, 1, clock)
        for _, res in layers:
            ref = next((r for _, r in layers if r.spec.normalizer == "multimax" and r.kernel == "explicit"
                        and r.spec.compile == res.spec.compile), None)
            if ref is not None and ref.peak_mb and res.peak_mb is not None:
                res.ratio = res.peak_mb / ref.peak_mb
            results.append(res)
        del layers
        gc.collect()
    return results


def _label(r: MemoryResult) -> str:
    s = r.spec
    return f"{s.normalizer}/{s.backend}({r.kernel}) compile={'on' if s.compile else 'off'} {s.tokens} tokens"


# ----------------------------------------------------------------------------- the RSS probe

def rss_probe(spec: LayerSpec) -> Optional[float]:
    """Peak RSS increase (MB) of one layer forward+backward, in a fresh subprocess whose glibc
    maps every allocation of 64 KiB or more with mmap, so that freed memory leaves the RSS."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()),
           "--rss-probe", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS probe of {spec} failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss_probe_main(spec_json: str) -> None:
    """Child side of ``rss_probe``: build, warm up (compiles), reset the RSS high-water mark,
    run one step, print the peak RSS increase in MB."""
    step, _ = build_layer(LayerSpec(**json.loads(spec_json)), torch.device("cpu"))
    for _ in range(2):
        step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = _status_kb("VmRSS")
    step()
    print((_status_kb("VmHWM") - start) / 1024.0)


# ----------------------------------------------------------------------------- output and CLI

def memory_table(results: List[MemoryResult]) -> str:
    head = ("| layer of | normalizer | backend (kernel) | compile | dtype | batch | tokens | peak MB | × explicit "
            "| tensor peak MB | held after forward MB | fwd+bwd ms |")
    return markdown_table(head, [
        f"| {r.spec.model} | {r.spec.normalizer} | {r.spec.backend} ({r.kernel}) | {'on' if r.spec.compile else 'off'} "
        f"| {r.spec.dtype} | {r.spec.batch_size} | {r.spec.tokens} | {fmt(r.peak_mb, '.1f')} | {fmt(r.ratio, '.3f')} "
        f"| {fmt(r.tensor_peak_mb, '.1f')} | {fmt(r.held_after_forward_mb, '.1f')} "
        f"| {statistics.median(r.times) * 1e3:.0f} |"
        for r in results
    ])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_multimax_patch16_224",
                   help="the timm model whose attention layer (width, heads, patch size) is measured")
    p.add_argument("--img-size", nargs="+", type=int, default=[224, 512], help="image sizes; tokens = (img/patch)^2")
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS subprocess check (CPU)")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    add_common_args(p, warmup=3, repeats=5)
    return parse_cli_args(p, argv, {"warmup": 0, "repeats": 1, "batch_size": 1, "threads": 1})


def run(args: argparse.Namespace) -> None:
    if args.rss_probe:
        rss_probe_main(args.rss_probe)
        return
    device, info = setup(args)
    batch = args.batch_size or (32 if device.type == "cuda" else 4)
    kernels = [("softmax", "sdpa"), ("multimax", "explicit"), ("multimax", "chunked")]
    if device.type == "cuda":
        kernels.append(("multimax", "flex"))
    specs = [LayerSpec(args.model, norm, backend, comp == "on", batch, tokens_at(args.model, img), dtype)
             for img in args.img_size for comp in args.compile for dtype in args.dtype for norm, backend in kernels]
    results = measure_attention_memory(specs, device, args.warmup, args.repeats, rss=not args.no_rss, clock=args.clock)
    write_report(args, info, {"attention_memory": results}, [memory_table(results)], exclude=("rss_probe",))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli("benchmark_memory.py", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
