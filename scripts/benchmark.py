#!/usr/bin/env python
"""Throughput and peak memory of MultiMax ViTs against the softmax-SDPA baseline.

    # any combination (the cartesian product of the listed values), one round-robin group
    python scripts/benchmark.py --model deit_tiny_multimax_patch16_224 deit_tiny_gap_patch16_224 \\
        --compile off on --mode train infer --batch-size 8 --out-json bench.json --out-md bench.md
    # the tables of docs/PERFORMANCE.md
    python scripts/benchmark.py --preset deit   --out-json deit.json --out-md deit.md
    python scripts/benchmark.py --preset memory --out-json mem.json  --out-md mem.md
    # on a GPU: softmax-SDPA, MultiMax explicit and MultiMax flex train steps side by side (bf16)
    python scripts/benchmark.py --preset deit --device cuda --sizes small --mode train --compile on

Timing: each variant is built and warmed up (this includes torch.compile), then the variants
of a group are timed round-robin: repeat r times {for each variant: `steps` steps}, in
reverse order every other round (A B B A ...), so slow drift of a shared machine hits all
variants alike. Reported: median step time over repeats (→ img/s) and, against the baseline
(same architecture, mode, optimizer, compile flag and dtype, softmax attention), the median of the
per-repeat time ratios with its distribution-free 95% confidence interval (order statistics
of the ratios), and the ratio of the fastest repeats (the least disturbed ones on a shared
machine); also the median minor page faults per step (Linux). ``--clock cpu`` times with the
process CPU time instead of wall time: with ``--threads 1`` that is the work done, and far less
sensitive to other processes on a shared machine. A train step is forward +
cross-entropy + backward + AdamW step, the optimizer built as train.py builds it
(``engine.optim.build_optimizer``: DeiT's parameter groups; ``--optim-impl`` as ``optim.impl``,
default auto = fused AdamW on CPU and CUDA); an inference step is a forward under inference_mode.
On CPU, glibc's malloc is tuned as train.py tunes it (``engine.cpu_alloc``: freed memory is kept
for the next step instead of being returned to the OS and faulted in again); ``--malloc default``
measures with glibc's defaults. Both variants of a comparison always run in the same process.

Memory. Throughput variants report "peak extra MB": the peak of memory allocated during one
step above what was allocated before it (weights, optimizer state, the input batch):
- CUDA: torch.cuda.max_memory_allocated − memory_allocated at the start.
- CPU: the peak of live tensor storage bytes, counted by a TorchDispatchMode (``LiveTensorBytes``)
  that sees every tensor an op returns (custom ops are run with the mode on, so their
  temporaries count) and a weakref that sees it freed. It does not see scratch memory inside
  a kernel, nor buffers that compiled (Inductor) code allocates directly, so it is reported
  for eager CPU variants only.
``--preset memory`` measures one attention layer (forward + backward) and compares "peak MB":
the CUDA allocator peak, or on CPU the peak RSS increase of a fresh subprocess per layer
(glibc told to mmap every allocation ≥ 64 KiB, so that freed memory leaves the RSS; the
high-water mark is reset after warm-up and compilation), which sees everything the process
touched, compiled code included. The dispatch count is shown next to it for eager layers.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import models  # noqa: E402,F401  (registers the models with timm)
from engine.config import ADAMW_IMPLS, OptimConfig  # noqa: E402
from engine.cpu_alloc import ALLOCATOR_MODES, apply_allocator_mode  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.optim import adamw_impl, build_optimizer  # noqa: E402
from models.attention import MultiMaxAttention  # noqa: E402
from models.choices import ATTN_BACKENDS, NORMALIZERS, OUT_NORMALIZERS  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("train", "infer")
MB = 2.0 ** 20
# wall: elapsed time. cpu: CPU time of this process (all threads); with --threads 1 it is the
# work done, and much less sensitive to other processes on a shared machine than wall time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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
    optim: str = "auto"  # optim.impl of the train step's AdamW

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
    optimizer: str = "–"  # the AdamW implementation a train step runs (engine.optim.adamw_impl)
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


# ----------------------------------------------------------------------------- memory counting

class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of CPU tensor storages created inside the mode that are still alive,
    and their peak. Views and in-place results share a storage and are counted once. Custom
    ops are run through their CPU kernel with the mode on, so their temporaries count too."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("aten", "prim", "prims"):
            out = func(*args, **kwargs)
        else:  # a custom op (e.g. the chunked kernel): run its CPU kernel with this mode on, to see inside
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current -= size


class ExtraMemory:
    """Context manager: memory allocated inside the block above what was allocated at its
    start; ``peak_mb`` after the block, ``current_mb()`` inside it (see the module docstring
    for what the CPU counter sees)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = float("nan")
        self._start = 0
        self._tracker: Optional[LiveTensorBytes] = None

    def __enter__(self) -> "ExtraMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = LiveTensorBytes()
            self._tracker.__enter__()
        return self

    def current_mb(self) -> float:
        if self._tracker is not None:
            return self._tracker.current / MB
        return (torch.cuda.memory_allocated(self.device) - self._start) / MB

    def __exit__(self, *exc) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(*exc)
            self.peak_mb = self._tracker.peak / MB
        else:
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / MB


# ----------------------------------------------------------------------------- one step

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


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
    with torch.set_grad_enabled(v.mode == "train"):  # auto's choice depends on it
        kernel = attn.kernel(device)
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
            with torch.inference_mode(), _autocast(device, v.dtype):
                net(x)
        return step, result
    opt = build_optimizer(model, OptimConfig(impl=v.optim), lr=1e-5)
    result.optimizer = adamw_impl(v.optim, list(model.parameters()))
    scaler = torch.amp.GradScaler(device.type, enabled=v.dtype == "fp16")

    def step() -> None:
        with _autocast(device, v.dtype):
            loss = F.cross_entropy(net(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, result


def set_baselines(results: List[Result]) -> None:
    """Baseline of each result: the first softmax-attention result of the same group with the
    same architecture, mode, optimizer, compile flag, dtype and batch; ratio = median of the per-repeat
    time ratios (paired: both were timed in the same round)."""
    for r in results:
        v = r.variant
        for j, b in enumerate(results):
            w = b.variant
            if b.attn == "softmax" and (b.group, b.arch, w.mode, b.optimizer, w.compile, w.dtype, w.batch_size) == (
                r.group, r.arch, v.mode, r.optimizer, v.compile, v.dtype, v.batch_size
            ):
                ratios = [t / tb for t, tb in zip(r.times, b.times)]
                r.baseline, r.ratio = j, statistics.median(ratios)
                r.ratio_ci = median_ci(ratios)
                r.ratio_best = min(r.times) / min(b.times)
                break


def median_ci(xs: Sequence[float]) -> Tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median: the order statistics at ranks
    n/2 ∓ 0.98·√n (normal approximation of the binomial), clamped to the sample."""
    s = sorted(xs)
    n = len(s)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return s[lo], s[hi]


def time_rounds(
    runs: Sequence[Tuple[Callable[[], None], Union[Result, "MemoryResult"]]], device: torch.device, repeats: int,
    steps: int, clock: str, on_round: Optional[Callable[[int], None]] = None,
) -> None:
    """Time (step, result) pairs round-robin, in reverse order every other round (A B B A ...):
    each round appends to every ``result.times`` the time per step of ``steps`` steps, and to
    ``result.faults`` the minor page faults per step."""
    now = CLOCKS[clock]
    for r in range(repeats):
        for step, result in (runs if r % 2 == 0 else runs[::-1]):
            _sync(device)
            f0, t0 = _minor_faults(), now()
            for _ in range(steps):
                step()
            _sync(device)
            result.times.append((now() - t0) / steps)
            result.faults.append((_minor_faults() - f0) / steps)
        if on_round is not None:
            on_round(r)


def _minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the OS had to map."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_group(
    name: str, variants: Sequence[Variant], device: torch.device, warmup: int, repeats: int, steps: int,
    compile_mode: Optional[str] = None, memory: bool = True, clock: str = "wall",
    log: Callable[[str], None] = print,
) -> List[Result]:
    """Build and warm up every variant, then time them round-robin; then peak memory, one
    step per variant (skipped for compiled CPU variants, which the CPU counter cannot see)."""
    built = []
    for v in variants:
        t0 = time.perf_counter()
        step, result = build_step(v, device, compile_mode)
        result.group = name
        for _ in range(warmup):
            step()
        _sync(device)
        log(f"[{name}] built+warmed {_label(result)} in {time.perf_counter() - t0:.1f}s")
        built.append((step, result))
    time_rounds(built, device, repeats, steps, clock, on_round=lambda r: log(
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
    return (f"{v.model} {v.mode}{'' if v.mode == 'infer' else ' ' + r.optimizer} attn={r.attn} out={r.out} backend={v.backend}({r.kernel}) "
            f"compile={'on' if v.compile else 'off'} {v.dtype} b{v.batch_size} {r.tokens}tok")


# ----------------------------------------------------------------------------- attention memory

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


def build_layer(spec: LayerSpec, device: torch.device) -> Tuple[Callable[..., None], str]:
    """A closure running forward + backward of a fresh attention layer (gradients for the input
    and the layer's parameters; ``after_forward`` is called between them), and its kernel."""
    model = timm.create_model(spec.model)
    attn = MultiMaxAttention(model.embed_dim, model.blocks[0].attn.num_heads, normalizer=spec.normalizer,
                             backend=spec.backend).to(device)
    net = torch.compile(attn) if spec.compile else attn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch_size, spec.tokens, model.embed_dim, generator=gen).to(device).requires_grad_()

    def step(after_forward: Optional[Callable[[], None]] = None) -> None:
        attn.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(device, spec.dtype):
            out = net(x)
        if after_forward is not None:
            after_forward()
        out.backward(torch.ones_like(out))
    return step, attn.kernel(device)


def _tokens(model_name: str, img_size: int) -> int:
    with torch.device("meta"):
        patch = timm.create_model(model_name).patch_embed.patch_size[0]
    return (img_size // patch) ** 2


def measure_attention_memory(
    specs: Sequence[LayerSpec], device: torch.device, warmup: int, repeats: int, rss: bool, clock: str = "wall",
    log: Callable[[str], None] = print,
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
                res.rss_peak_mb = _rss_probe(spec)
            res.peak_mb = res.rss_peak_mb if res.rss_peak_mb is not None else res.tensor_peak_mb
            layers.append((step, res))
            log(f"[memory] {_layer_label(res)}: peak {_fmt(res.peak_mb, '.1f')} MB "
                f"(tensors {_fmt(res.tensor_peak_mb, '.1f')}, RSS {_fmt(res.rss_peak_mb, '.1f')})")
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


def _layer_label(r: MemoryResult) -> str:
    s = r.spec
    return f"{s.normalizer}/{s.backend}({r.kernel}) compile={'on' if s.compile else 'off'} {s.tokens} tokens"


def _rss_probe(spec: LayerSpec) -> Optional[float]:
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
    """Child side of ``_rss_probe``: build, warm up (compiles), reset the RSS high-water mark,
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


# ----------------------------------------------------------------------------- presets & output

def _optims_for(mode: str, optims: Sequence[str]) -> Sequence[str]:
    """The --optim-impl values a mode is measured with: all for train steps, the first for
    inference (no optimizer: one variant, not one per value)."""
    return optims if mode == "train" else optims[:1]


# --preset deit's sizes: (architecture, patch/resolution suffix) of the model names
DEIT_SIZES = {"tiny": ("deit_tiny", "patch16_224"), "small": ("deit_small", "patch16_224"),
              "base": ("deit_base", "patch16_224"), "micro": ("vit_micro", "patch7_28")}


def deit_groups(batch: int, dtypes: Sequence[str], compiles: Sequence[bool], modes: Sequence[str],
                optims: Sequence[str] = ("auto",), sizes: Sequence[str] = ("tiny", "small"),
                device: torch.device = torch.device("cpu")) -> Dict[str, List[Variant]]:
    """MultiMax vs the softmax-SDPA GAP baseline, one group per (size, mode, dtype), eager and
    compiled alternated within the group. On CUDA MultiMax runs twice, with the explicit path
    and with flex (CPU: ``auto``, i.e. explicit, as flex has no CPU backward)."""
    multimax = ["explicit", "flex"] if device.type == "cuda" else ["auto"]
    groups = {}
    for size, mode, dtype in itertools.product(sizes, modes, dtypes):
        arch, suffix = DEIT_SIZES[size]
        groups[f"{arch}-{mode}-{dtype}"] = [
            Variant(f"{arch}_{kind}_{suffix}", mode=mode, backend=backend, compile=c, dtype=dtype, batch_size=batch, optim=o)
            for c in compiles for o in _optims_for(mode, optims)
            for kind, backend in [("gap", "auto"), *(("multimax", b) for b in multimax)]
        ]
    return groups


def machine_info(device: torch.device) -> Dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "device": str(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _markdown_table(head: str, rows: Iterable[str]) -> str:
    """A markdown table from its header line and its row lines."""
    return "\n".join([head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|", *rows])


def throughput_table(results: List[Result]) -> str:
    head = ("| group | model | mode | optimizer | compile | attn/out | backend (kernel) | dtype | batch | tokens "
            "| img/s | ms/step | × baseline | 95% CI of × | × best-of-runs | faults/step | peak extra MB |")
    return _markdown_table(head, (
        f"| {r.group} | {r.variant.model} | {r.variant.mode} | {r.optimizer} | {'on' if r.variant.compile else 'off'} "
        f"| {r.attn}/{r.out} | {r.variant.backend} ({r.kernel}) | {r.variant.dtype} | {r.variant.batch_size} "
        f"| {r.tokens} | {r.img_per_s:.1f} | {r.median_s * 1e3:.0f} | {_fmt(r.ratio, '.3f')} "
        f"| {'–' if r.ratio_ci is None else f'{r.ratio_ci[0]:.3f}–{r.ratio_ci[1]:.3f}'} "
        f"| {_fmt(r.ratio_best, '.3f')} | {statistics.median(r.faults):.0f} | {_fmt(r.peak_extra_mb, '.1f')} |"
        for r in results
    ))


def memory_table(results: List[MemoryResult]) -> str:
    head = ("| layer of | normalizer | backend (kernel) | compile | dtype | batch | tokens | peak MB | × explicit "
            "| tensor peak MB | held after forward MB | fwd+bwd ms |")
    return _markdown_table(head, (
        f"| {r.spec.model} | {r.spec.normalizer} | {r.spec.backend} ({r.kernel}) | {'on' if r.spec.compile else 'off'} "
        f"| {r.spec.dtype} | {r.spec.batch_size} | {r.spec.tokens} | {_fmt(r.peak_mb, '.1f')} | {_fmt(r.ratio, '.3f')} "
        f"| {_fmt(r.tensor_peak_mb, '.1f')} | {_fmt(r.held_after_forward_mb, '.1f')} "
        f"| {statistics.median(r.times) * 1e3:.0f} |"
        for r in results
    ))


def _to_json(obj):
    if isinstance(obj, (Result, MemoryResult)):
        d = asdict(obj)
        if isinstance(obj, Result):
            d.update(median_s=obj.median_s, img_per_s=obj.img_per_s)
        else:
            d.update(median_s=statistics.median(obj.times))
        return d
    raise TypeError(type(obj))


def write_outputs(args: argparse.Namespace, info: Dict[str, object], throughput: List[Result],
                  memory: List[MemoryResult]) -> None:
    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "rss_probe"},
               "throughput": throughput, "attention_memory": memory}
    md = [f"Machine: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
          f"device {info['device']}{', ' + str(info['gpu']) if 'gpu' in info else ''}, torch {info['torch']}, "
          f"{info['date']}; clock: {args.clock} time; malloc: {info['malloc']}.", "", f"Command: `{info['command']}`", ""]
    if throughput:
        md += [throughput_table(throughput), ""]
    if memory:
        md += [memory_table(memory), ""]
    text = "\n".join(md)
    print(text)
    for path, content in ((args.out_json, json.dumps(payload, default=_to_json, indent=1)), (args.out_md, text)):
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write(content + "\n")
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("deit", "memory"), help="the tables of docs/PERFORMANCE.md")
    p.add_argument("--model", nargs="+", default=None,
                   help="timm model names (default: vit_micro_multimax_patch7_28; memory: deit_small_multimax_patch16_224)")
    p.add_argument("--attn-normalizer", nargs="+", default=[None], choices=[None, *NORMALIZERS],
                   help="override the models' attention normalizer")
    p.add_argument("--out-normalizer", nargs="+", default=[None], choices=[None, *OUT_NORMALIZERS])
    p.add_argument("--backend", nargs="+", default=["auto"], choices=ATTN_BACKENDS)
    p.add_argument("--compile", nargs="+", default=None, choices=("off", "on"), help="default: off (deit: off on)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="autocast dtype (fp32 = none; default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(DEIT_SIZES),
                   help="deit preset: model sizes (micro = the 28x28 CPU demo model)")
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--optim-impl", nargs="+", default=["auto"], choices=ADAMW_IMPLS,
                   help="train steps: how AdamW runs (optim.impl; auto = fused on CPU/CUDA as in train.py)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 128 on CUDA (memory: 4 / 32)")
    p.add_argument("--img-size", nargs="+", type=int, default=None,
                   help="image size(s); tokens = (img/patch)^2 (default: the model's; memory: 224 512)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiles)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--malloc", default="tuned", choices=ALLOCATOR_MODES,
                   help="CPU: glibc malloc tuned as train.py does (engine.cpu_alloc), or its defaults")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-rss", action="store_true", help="memory preset: skip the RSS subprocess check")
    p.add_argument("--out-json", help="write all settings, machine facts and raw times here")
    p.add_argument("--out-md", help="write the markdown table(s) here")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, low in (("warmup", 0), ("repeats", 1), ("steps", 1), ("batch_size", 1), ("threads", 1)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise UserError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available")
    return device


def _default_attn_normalizer(model: str) -> str:
    """The attention normalizer a model name builds with (built on the meta device: no memory)."""
    try:
        with torch.device("meta"):
            return timm.create_model(model).attn_normalizer
    except RuntimeError as e:
        raise UserError(f"unknown model {model!r}: {e}") from None


def cli_variants(args: argparse.Namespace, batch: int, device: torch.device) -> List[Variant]:
    """The cartesian product of the CLI lists, without the combinations that cannot run:
    sdpa with non-softmax attention, flex training on a device without flex backward."""
    out = []
    for model, attn, outn, backend, comp, dtype, mode, img in itertools.product(
        args.model or ["vit_micro_multimax_patch7_28"], args.attn_normalizer, args.out_normalizer,
        args.backend, args.compile or ["off"], args.dtype, args.mode, args.img_size or [None],
    ):
        if backend == "sdpa" and (attn or _default_attn_normalizer(model)) != "softmax":
            print(f"skipping {model} attn={attn}: backend sdpa computes softmax only")
            continue
        if backend == "flex" and mode == "train" and device.type != "cuda":
            print(f"skipping {model} flex train: flex has no backward on {device.type}")
            continue
        out += [Variant(model, mode, backend, comp == "on", dtype, batch, img, attn, outn, optim)
                for optim in _optims_for(mode, args.optim_impl)]
    if not out:
        raise UserError("no variant left to run (see the 'skipping' lines above)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe_main(args.rss_probe)
        return 0
    try:
        device = _device(args.device)
        info = machine_info(device)
        info["malloc"] = "tuned (engine.cpu_alloc)" if apply_allocator_mode(args.malloc, device.type) else "default"
        args.dtype = args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"])
        throughput: List[Result] = []
        memory: List[MemoryResult] = []
        if args.preset == "memory":
            batch = args.batch_size or (32 if device.type == "cuda" else 4)
            kernels = [("softmax", "sdpa"), ("multimax", "explicit"), ("multimax", "chunked")]
            if device.type == "cuda":
                kernels.append(("multimax", "flex"))
            model = (args.model or ["deit_small_multimax_patch16_224"])[0]
            specs = [LayerSpec(model, norm, backend, comp == "on", batch, _tokens(model, img), dtype)
                     for img in args.img_size or [224, 512] for comp in args.compile or ["off", "on"]
                     for dtype in args.dtype for norm, backend in kernels]
            memory = measure_attention_memory(specs, device, args.warmup, args.repeats, rss=not args.no_rss,
                                              clock=args.clock)
        else:
            batch = args.batch_size or (128 if device.type == "cuda" else 8)
            if args.preset == "deit":
                compiles = [c == "on" for c in args.compile or ["off", "on"]]
                groups = deit_groups(batch, args.dtype, compiles, args.mode, args.optim_impl, args.sizes, device)
            else:
                groups = {"cli": cli_variants(args, batch, device)}
            for name, variants in groups.items():
                throughput += run_group(name, variants, device, args.warmup, args.repeats, args.steps,
                                        args.compile_mode, memory=not args.no_memory, clock=args.clock)
                gc.collect()
            set_baselines(throughput)
        write_outputs(args, info, throughput, memory)
    except UserError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
