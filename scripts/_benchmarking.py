"""What the two benchmark scripts share: benchmark.py (step times of whole models) and
benchmark_memory.py (peak memory of one attention layer).

Timing: the variants of a comparison are built and warmed up first, then timed round-robin
(``time_rounds``): repeat r times {for each variant: ``steps`` steps}, in reverse order every
other round (A B B A ...), so slow drift of a shared machine hits all variants alike. The clock
is wall time or, with ``--clock cpu``, the process's CPU time (with one torch thread that is the
work done, and far less sensitive to other processes). Each round also counts the minor page
faults per step (Linux): each is a fresh page the OS had to map. A ratio of two variants is the
median of their per-round time ratios, with ``median_ci``'s distribution-free 95% interval.

Memory: ``ExtraMemory`` is the peak of memory allocated inside a block above what was allocated
at its start: on CUDA the allocator's peak; on CPU the peak of live tensor storage bytes
(``LiveTensorBytes``), which sees every tensor an op returns but neither scratch memory inside a
kernel nor buffers that compiled (Inductor) code allocates itself, so it is meaningful for eager
code only.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import sys
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from engine.errors import EXIT_OK, EXIT_USER_ERROR, UserError
from engine.loop import AMP_DTYPES, autocast as _amp_autocast

DTYPES = {"fp32": None, **AMP_DTYPES}  # the --dtype choices: engine.loop's AMP dtypes, "none" named fp32
MB = 2.0 ** 20
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# ----------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    """Autocast to ``dtype`` (a key of DTYPES; fp32 = none) on ``device``."""
    return _amp_autocast(device, "none" if DTYPES[dtype] is None else dtype)


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> torch.nn.Module:
    """The timm model ``name`` built on the meta device (no memory: cached), to read its shape
    and defaults from; a UserError if timm cannot build it."""
    try:
        with torch.device("meta"):
            return timm.create_model(name)
    except RuntimeError as e:
        raise UserError(f"unknown model {name!r}: {e}") from None


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_rounds(runs: Sequence[Tuple[Callable[[], None], Any]], device: torch.device, repeats: int, steps: int,
                clock: str, on_round: Optional[Callable[[int], None]] = None) -> None:
    """Time (step, result) pairs round-robin, in reverse order every other round (A B B A ...):
    each round appends to every ``result.times`` the time per step of ``steps`` steps, and to
    ``result.faults`` the minor page faults per step."""
    now = CLOCKS[clock]
    for r in range(repeats):
        for step, result in (runs if r % 2 == 0 else runs[::-1]):
            sync(device)
            f0, t0 = minor_faults(), now()
            for _ in range(steps):
                step()
            sync(device)
            result.times.append((now() - t0) / steps)
            result.faults.append((minor_faults() - f0) / steps)
        if on_round is not None:
            on_round(r)


def median_ci(xs: Sequence[float]) -> Tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median: the order statistics at ranks
    n/2 ∓ 0.98·√n (normal approximation of the binomial), clamped to the sample."""
    s = sorted(xs)
    n = len(s)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return s[lo], s[hi]


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
    start; ``peak_mb`` after the block, ``current_mb()`` inside it (CPU: eager code only)."""

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


# ----------------------------------------------------------------------------- command line and report

def add_common_args(p: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    """The options both scripts take: device and clock, rounds, output files."""
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="autocast dtype (fp32 = none; default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps per variant (compiles)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds over all variants")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--out-json", help="write all settings, machine facts and raw times here")
    p.add_argument("--out-md", help="write the markdown table(s) here")


def parse_cli_args(p: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                   minimums: Dict[str, int]) -> argparse.Namespace:
    """Parse ``argv``, check the options named in ``minimums`` (dest → lowest value; a UserError
    for the first one below it) and apply ``--threads``."""
    args = p.parse_args(argv)
    for key, low in minimums.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise UserError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def run_cli(prog: str, body: Callable[[], None]) -> int:
    """An entry script's exit code: ``body()``, a UserError printed as one line (exit 2)."""
    try:
        body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


def parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available")
    return device


def setup(args: argparse.Namespace) -> Tuple[torch.device, Dict[str, object]]:
    """Apply the common options (device; ``args.dtype`` filled in by device) and
    return the device and the machine facts for the report."""
    device = parse_device(args.device)
    info = machine_info(device)
    args.dtype = args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"])
    return device, info


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


def fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(head: str, rows: Sequence[str]) -> str:
    """A markdown table from its header line and its row lines."""
    return "\n".join([head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|", *rows])


def write_report(args: argparse.Namespace, info: Dict[str, object], results: Dict[str, List[Any]],
                 tables: Sequence[str], exclude: Sequence[str] = ()) -> None:
    """Print the tables under a line of machine facts, and write them
    (``--out-md``) and the settings (without the keys in ``exclude``), machine facts and
    ``results`` (objects with a ``to_json()``; ``--out-json``)."""
    settings = {k: v for k, v in vars(args).items() if k not in exclude}
    payload = {"machine": info, "settings": settings, **results}
    md = [f"Machine: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
          f"device {info['device']}{', ' + str(info['gpu']) if 'gpu' in info else ''}, torch {info['torch']}, "
          f"{info['date']}; clock: {args.clock} time.", "",
          f"Command: `{info['command']}`", ""]
    for table in tables:
        md += [table, ""]
    text = "\n".join(md)
    print(text)
    for path, content in ((args.out_json, json.dumps(payload, default=lambda o: o.to_json(), indent=1)),
                          (args.out_md, text)):
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write(content + "\n")
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror}") from None
