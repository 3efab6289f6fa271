#!/usr/bin/env python
"""Check that this repository trains correctly on this machine's NVIDIA GPUs, within eight minutes.

    scripts/gpu_check.sh                               # every check; logs and tables in runs/gpu_check/
    scripts/gpu_check.sh --only flex-train benchmark   # some of them
    scripts/gpu_check.sh --budget-s 900 --out /tmp/c  # more time for the checks at the end of the list
    python scripts/gpu_check.py --device cpu           # self-test of the checks on tiny shapes (no GPU)

First the machine, on one line: Python, torch and its CUDA, the NVIDIA driver, the GPUs, Triton
and timm; then the compiler. The script stops there, with exit code 2 and one line naming the cause,
when the checks cannot run: no GPU at all (nothing was checked); a GPU that ``nvidia-smi -L``
lists or ``/dev/nvidia*`` shows but torch cannot use (a CPU-only build of torch, a driver older
than its CUDA, CUDA_VISIBLE_DEVICES hiding it); a package the checks import missing or older than
requirements.txt admits (with how to install it, also without internet); no C compiler or no
Python headers, which Triton (CUDA) and Inductor (CPU) build their kernels with; on CUDA,
torch.compile failing on a one-line function.

Then the checks, in this order, each in a child process of its own (a crash ends that check
only), each one line of the summary table: PASS, FAIL with the reason, or SKIP with the reason.
They share a time budget (``--budget-s``, 450 s from the start, so that the whole script ends
within eight minutes): a check the budget cuts short, or that would start after it is spent, is
SKIPped and says so. Exit code 1 if a check failed, else 0.

- flex-fp32, flex-bf16: one attention layer at DeiT-S shapes (batch 32, 6 heads, 196 tokens,
  head dim 64), the paper's MultiMax (order 2; in fp32 also the affine first-order ablation):
  output and the gradients of q, k, v and every modulator parameter of the flex backend against
  the explicit path, both against a float64 reference. flex passes if its relative error is at
  most twice the explicit path's (or below a floor: 1e-4 in fp32, 2e-2 in bf16). On CPU forward
  only.
- flex-train: 3 AdamW steps of a 4-block DeiT-S (its widths, heads and tokens; every block runs
  the same kernels), compiled, in bf16 autocast, batch 32, σ's parameters moved away from their
  init: at each step the loss and every parameter's gradient (the qkv projection's q, k and v
  parts apart) of the flex model and of the explicit one, both at the weights of a float32
  explicit reference (TF32 off) that takes the steps, both against it; flex passes if each error
  is at most twice the explicit path's (or below 2e-2). The only check that can show flex trains
  correctly. SKIP on CPU (flex has no backward there).
- train-bf16: train.py with configs/deit_small_multimax.yaml exactly as users run it (compiled,
  bf16, EMA, attn_backend auto) for a few steps and an evaluation on a generated image folder:
  finite loss, no skipped step, finite validation loss of the weights and of the EMA.
- ddp-parity: 2 processes with batch 16 each against 1 process with batch 32, fp32 with TF32
  off, not compiled, no random augmentation: the same weights after the steps. NCCL with 2 GPUs;
  with one, gloo with both processes on it (NCCL refuses two ranks on one GPU). Compiled DDP is
  shown on CPU by tests/test_train.py.
- train-fp16-overflow: train.py with train.amp=fp16 (not compiled, for time), the first step's
  scaled loss multiplied by 2^100 so that its float16 gradients overflow: train.py must skip
  that step (GradScaler lowers its scale) and train on.
- benchmark, benchmark-base: ``scripts/benchmark.py --preset deit --sizes small`` (``base``)
  ``--mode train --compile on`` (bf16, batch 128): train steps of softmax-SDPA, MultiMax
  explicit (the hand-written backward), MultiMax flex and MultiMax reference (autograd through
  the normalizer, which torch.compile fuses), DeiT-S and DeiT-B; tables in benchmark.md and
  benchmark-base.md. Whether the explicit path's hand-written backward earns its place on a GPU
  is its row against the reference row.
- cuda-tests: ``pytest -k cuda`` (the tests that need a GPU have "cuda" in their name).

Only flex-train can show that flex trains correctly: the summary proposes adding this torch
version to FLEX_TRAINING_PROVEN (models/attention_kernels.py) only when it passed, and only if
the benchmark measured the flex train step faster than the compiled explicit one.

With ``--device cpu`` the same checks run on tiny shapes (a micro ViT, not compiled) as a
self-test of the checks; the ones that need CUDA say SKIP.
"""
from __future__ import annotations

import argparse
import glob
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import runpy
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.errors import EXIT_USER_ERROR, one_line_reason  # noqa: E402  (imports nothing else)

INSTALL = ("install what is missing with `python3 -m pip install -r requirements.txt`; without internet, put the "
           "wheels in .whl/ (or $WHEEL_DIR) and run scripts/gpu_check.sh again, which installs them first")
try:
    import torch
except ImportError as e:  # one line, not a traceback: nothing can be checked without torch
    print(f"gpu_check: cannot import torch with {sys.executable} ({e}); {INSTALL}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)

CHECKS = ("flex-fp32", "flex-bf16", "flex-train", "train-bf16", "ddp-parity", "train-fp16-overflow",
          "benchmark", "benchmark-base", "cuda-tests")
NEEDED = ("torch", "torchvision", "timm", "numpy", "pyyaml", "pillow", "tensorboard")  # what the checks import
BUDGET_S = 450.0  # from the start; stopping a check and the summary take the rest of eight minutes
FLOORS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative errors small enough whatever the explicit path's
OVERFLOW_FACTOR = 2.0 ** 100  # × the first scaled loss: float16 gradients overflow, the float32 loss does not
INIT_SCALE = inspect.signature(torch.amp.GradScaler).parameters["init_scale"].default  # train.py's scaler's
PRESET = os.path.join(ROOT, "configs", "deit_small_multimax.yaml")
DDP_TIMEOUT_S = "180"  # MMVIT_DIST_TIMEOUT_S of the DDP runs: a hung collective fails the check, not the budget


class CheckFailed(Exception):
    """A check's assertion failed; the message is the summary's reason."""


class CheckSkipped(Exception):
    """A check cannot run here; the message says why."""


class Unfit(Exception):
    """The machine cannot run the checks; the message names the cause on one line."""


@dataclass(frozen=True)
class Profile:
    """Sizes of the checks: DeiT-S on a GPU, or tiny ones for the CPU self-test."""

    device: str
    attn_shape: Tuple[int, int, int, int]  # (batch, heads, tokens, head dim) of the flex checks
    train_model: Tuple[str, Tuple[Tuple[str, int], ...]]  # flex-train's timm model and its kwargs
    compile: bool  # models are compiled: flex-train's, and the preset's runs (model_overrides turn it off)
    model_overrides: Tuple[str, ...]  # on top of configs/deit_small_multimax.yaml
    batch: int
    steps: int
    bench_args: Tuple[str, ...]
    bench_sizes: Dict[str, Optional[str]]  # benchmark check → --sizes (None: not in this profile)
    timeout_s: int  # of each process a check starts: a hang fails the check


FLEX_TRAIN_STEPS = 3
GPU = Profile("cuda", (32, 6, 196, 64), ("deit_small_multimax_patch16_224", (("depth", 4),)), True, (), 16, 4,
              ("--preset", "deit", "--mode", "train", "--compile", "on", "--device", "cuda",
               "--repeats", "5", "--warmup", "2", "--steps", "2"),
              {"benchmark": "small", "benchmark-base": "base"}, 420)
CPU = Profile("cpu", (2, 2, 16, 8), ("vit_micro_multimax_patch7_28", (("depth", 2),)), False,
              ("model.name=vit_micro_multimax_patch7_28", "model.img_size=28", "train.compile=false"), 4, 3,
              ("--preset", "deit", "--mode", "train", "--compile", "off", "--device", "cpu",
               "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--steps", "1", "--no-memory"),
              {"benchmark": "micro", "benchmark-base": None}, 600)


@dataclass
class Outcome:
    check: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


# ----------------------------------------------------------------------------- the machine

def listed_gpus() -> List[str]:
    """The GPUs ``nvidia-smi -L`` lists ("GPU 0: NVIDIA H200 (UUID: GPU-…)"); none without it."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out[0] if out else "unknown"


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_line(gpus: Sequence[str]) -> str:
    """Python, torch and its CUDA, the driver, the GPUs, Triton and timm, on one line."""
    if torch.cuda.is_available():
        gpus = gpus or [f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    triton = _dist_version("triton") or _dist_version("pytorch-triton") or "not installed"
    return " | ".join([
        f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"driver {_driver_version()}", "; ".join(gpus) or "no GPU listed", f"triton {triton}",
        f"timm {_dist_version('timm') or 'not installed'}",
    ])


def cuda_unusable_reason() -> str:
    """Why torch cannot use the GPU this machine has, in one line."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): install a CUDA build"

    try:
        torch.cuda.init()  # raises with the driver's own words: too old for this CUDA, not loaded, ...
    except Exception as e:  # noqa: BLE001
        return f"torch.cuda.init() fails: {one_line_reason(e)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides it"
    return "torch.cuda.is_available() is False"


def _release(version: str) -> Tuple[int, ...]:
    """(2, 11, 0) of "2.11.0+cu130": the leading numbers of a version."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in match.group().split(".")) if match else ()


def _before(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) < b + (0,) * (width - len(b))


def requirement_problems(lines: Sequence[str], versions: Dict[str, Optional[str]]) -> Tuple[List[str], List[str]]:
    """Compare the installed ``versions`` of the packages in ``NEEDED`` with requirements.txt's
    ``lines``: (problems: missing, or older than the floor; notes: newer than the cap)."""
    problems, notes = [], []
    for line in lines:
        spec = line.split("#")[0].strip()
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec)
        if not match or match.group(1).lower() not in NEEDED:
            continue
        name, have = match.group(1).lower(), versions.get(match.group(1).lower())
        if have is None:
            problems.append(f"{name} is missing ({spec})")
            continue
        for op, bound in re.findall(r"(>=|<=|==|<|>)\s*([^,\s]+)", match.group(2)):
            below, above = _before(_release(have), _release(bound)), _before(_release(bound), _release(have))
            if (op in (">=", "==") and below) or (op == ">" and not above):
                problems.append(f"{name} {have} is older than requirements.txt admits ({spec})")
            elif (op == "<" and not below) or (op in ("<=", "==") and above):
                notes.append(f"{name} {have} is newer than requirements.txt's {spec} (tested up to there)")
    return problems, notes


def check_requirements() -> List[str]:
    """Raise Unfit if a package the checks import is missing or too old; the notes otherwise."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = f.read().splitlines()
    versions = {name: _dist_version(name) for name in NEEDED}
    versions["torch"] = torch.__version__  # the one imported, whatever its metadata says
    problems, notes = requirement_problems(lines, versions)
    if problems:
        raise Unfit(f"{'; '.join(problems)}: {INSTALL}")
    return notes


def check_toolchain(device_type: str) -> str:
    """The compiler and Python headers kernels are built with: Triton's launcher (C) on CUDA,
    Inductor's kernels (C++) on CPU. Compiles a file that includes Python.h; raises Unfit."""
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if device_type == "cuda":
        compiler, what, suffix = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"), "C", ".c"
        who = "Triton builds its kernel launcher with $CC, else gcc or clang"
    else:
        compiler, what, suffix = os.environ.get("CXX") or shutil.which("g++"), "C++", ".cpp"
        who = "Inductor builds its CPU kernels with $CXX, else g++"
    if not compiler or not shutil.which(compiler):
        raise Unfit(f"no {what} compiler{f' ({compiler!r} not found)' if compiler else ''}: {who}; "
                    "install gcc/g++ (e.g. apt-get install build-essential)")
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise Unfit(f"no Python headers ({include}/Python.h is missing): Triton and Inductor compile against them; "
                    f"install python{sysconfig.get_python_version()}-dev (Debian/Ubuntu) or python3-devel")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe" + suffix)
        with open(src, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return Py_IsInitialized(); }\n")
        try:
            proc = subprocess.run([compiler, "-fsyntax-only", f"-I{include}", src], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            raise Unfit(f"{compiler} does not run: {e}") from None
    if proc.returncode != 0:
        said = proc.stderr.strip().splitlines()[:1]
        raise Unfit(f"{compiler} cannot compile against {include}/Python.h{': ' + said[0] if said else ''}")
    return f"{what} compiler {compiler}, Python headers {include}"


def check_compile_smoke(device: torch.device) -> None:
    """torch.compile on a one-line function: Triton, its launcher build and the driver together."""

    def f(x):
        return torch.sin(x) * 2 + 1
    x = torch.randn(64, device=device)
    try:
        got = torch.compile(f)(x)
    except Exception as e:  # noqa: BLE001
        raise Unfit(f"torch.compile fails on a one-line function on {device}: {one_line_reason(e)}") from None
    if not torch.allclose(got, f(x), rtol=1e-5, atol=1e-5):
        raise Unfit(f"torch.compile computes a one-line function wrongly on {device}")


def preflight(device_type: str) -> Tuple[str, List[str]]:
    """Print the machine's line, then raise Unfit if the checks cannot run on it; the line and
    the notes to print after it (versions above the tested ones, the toolchain)."""
    gpus = listed_gpus()
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    machine = machine_line(gpus)
    print(f"gpu_check: {machine}", flush=True)
    notes = check_requirements()  # first: what follows imports the repository's modules
    if device_type == "cuda" and not torch.cuda.is_available():
        if gpus or nodes:
            raise Unfit(f"this machine has a GPU ({'; '.join(gpus) or ', '.join(nodes)}) but torch "
                        f"{torch.__version__} cannot use it: {cuda_unusable_reason()}")
        raise Unfit("no NVIDIA GPU here (nvidia-smi lists none, no /dev/nvidia*, torch sees none): nothing was "
                    "checked; `python scripts/gpu_check.py --device cpu` runs the checks' self-test on tiny shapes")
    notes.append(check_toolchain(device_type))
    if device_type == "cuda":
        check_compile_smoke(torch.device("cuda"))
    return machine, notes


# ----------------------------------------------------------------------------- flex against explicit

def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _unsettle(params: Sequence[torch.Tensor], seed: int) -> None:
    """Move σ's parameters away from their init (σ ≈ identity there), so that every term of σ
    and of its gradient counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.device))


def _within(label: str, candidate: str, err: float, err_explicit: float, floor: float) -> float:
    """Raise CheckFailed unless ``err`` ≤ max(2 × ``err_explicit``, ``floor``); the margin used."""
    allowed = max(2 * err_explicit, floor)
    if not math.isfinite(err) or err > allowed:
        raise CheckFailed(f"{label}: {candidate} error {err:.2e} > max(2 × explicit {err_explicit:.2e}, {floor:g})")
    return err / allowed


def _modulations(order: int, affine: bool, device: torch.device):
    from models.attention_kernels import ScoreModulation
    from models.multimax import build_normalizer

    norm = build_normalizer("multimax", order, "zeros", affine).to(device)
    _unsettle(list(norm.parameters()), order)
    return ScoreModulation.of(norm)


def check_flex(profile: Profile, dtype: torch.dtype) -> str:
    """flex against the explicit path at ``profile.attn_shape``; see the module docstring."""
    from models.attention_kernels import ScoreModulation, flex_attention_with, modulated_attention

    device = torch.device(profile.device)
    backward = device.type == "cuda"  # flex has no backward on CPU
    scale = profile.attn_shape[-1] ** -0.5
    worst = []
    # each case compiles flex anew: the affine ablation in fp32 only, to keep the run short
    for order, affine in ((2, False), (1, True))[:2 if dtype == torch.float32 else 1]:
        mod = _modulations(order, affine, device)
        g = torch.Generator().manual_seed(order)
        q, k, v = (torch.randn(profile.attn_shape, generator=g).to(device) for _ in range(3))
        dout = torch.randn(profile.attn_shape, generator=g).to(device)

        def run(fn, tensor_dtype, params):
            inputs = [t.to(tensor_dtype).requires_grad_(backward) for t in (q, k, v)]
            with torch.set_grad_enabled(backward):
                out = fn(*inputs, ScoreModulation(params, mod.scale_factor), scale)
                if not backward:
                    return [out.detach()]
                grads = torch.autograd.grad(out, [*inputs, *params], dout.to(out.dtype))
            return [out.detach(), *grads]

        ref_params = tuple(p.detach().double().requires_grad_(backward) for p in mod.params)
        ref = run(modulated_attention, torch.float64, ref_params)
        results = {name: run(fn, dtype, mod.params) for name, fn in
                   (("flex", flex_attention_with), ("explicit", modulated_attention))}
        labels = ["out", "dq", "dk", "dv"] + [f"d{n}" for n in ("ranges", "ts", "scale", "shift")][:len(mod.params)]
        for label, r, f, e in zip(labels, ref, results["flex"], results["explicit"]):
            err_flex, err_explicit = _rel_err(f, r), _rel_err(e, r)
            case = f"order {order}{' affine' if affine else ''} {label}"
            _within(case, "flex", err_flex, err_explicit, FLOORS[dtype])
            worst.append((err_flex, err_explicit))
    err_flex, err_explicit = max(worst)
    what = "forward and gradients" if backward else "forward only (no flex backward on CPU)"
    return f"{what}; largest relative error flex {err_flex:.1e} (explicit {err_explicit:.1e})"


def _loss_and_grads(model: torch.nn.Module, net: Callable, x: torch.Tensor, y: torch.Tensor,
                    amp: str) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Cross-entropy of ``net`` (``model`` or its compiled self) under train.py's ``amp`` autocast
    and the gradient of each parameter of ``model`` (left in ``.grad`` too); the qkv projections'
    as their q, k and v parts, where dq, dk and dv of the attention arrive separately."""
    from engine.loop import autocast

    model.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise CheckFailed(f"{name} got no gradient")
        grad = p.grad.detach().float()
        parts = zip("qkv", grad.chunk(3)) if name.endswith("attn.qkv.weight") else [("", grad)]
        grads.update({f"{name}[{part}]" if part else name: g.clone() for part, g in parts})
    return loss.item(), grads


def check_training(profile: Profile, backend: str = "flex") -> str:
    """``FLEX_TRAIN_STEPS`` train steps of ``profile.train_model`` with ``backend`` against the
    explicit path, in bf16 autocast; see flex-train in the module docstring."""
    import timm

    from engine.config import OptimConfig
    from engine.optim import build_optimizer
    from models.attention_kernels import flex_available  # importing models registers them with timm
    from models.multimax import modulators

    device = torch.device(profile.device)
    if backend == "flex" and device.type != "cuda":
        raise CheckSkipped(f"flex has no backward on {device.type} (torch {torch.__version__})")
    if backend == "flex" and not flex_available(device):
        raise CheckFailed("flex attention is not usable here (torch without flex attention, or no Triton)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the reference in IEEE fp32
    name, kwargs = profile.train_model[0], dict(profile.train_model[1])
    torch.manual_seed(0)
    ref = timm.create_model(name, attn_backend="explicit", **kwargs).to(device)
    _unsettle([p for mod in modulators(ref).values() for p in mod.parameters()], seed=1)
    nets = {}
    for kernel in ("explicit", backend):
        model = timm.create_model(name, attn_backend=kernel, **kwargs).to(device)
        model.load_state_dict(ref.state_dict())
        nets[kernel] = (model, torch.compile(model) if profile.compile else model)
    optimizer = build_optimizer(ref, OptimConfig(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    size = (profile.attn_shape[0], ref.patch_embed.proj.in_channels, *ref.patch_embed.img_size)
    margin, floor = 0.0, FLOORS[torch.bfloat16]
    for step in range(1, FLEX_TRAIN_STEPS + 1):
        x = torch.randn(size, generator=gen).to(device)
        y = torch.randint(0, ref.num_classes, (size[0],), generator=gen).to(device)
        ref_loss, ref_grads = _loss_and_grads(ref, ref, x, y, "none")
        errors = {}
        for kernel, (model, net) in nets.items():
            with torch.no_grad():
                for p, p_ref in zip(model.parameters(), ref.parameters()):
                    p.copy_(p_ref)
            loss, grads = _loss_and_grads(model, net, x, y, "bf16")
            errors[kernel] = {"loss": abs(loss - ref_loss) / abs(ref_loss),
                              **{n: _rel_err(g, ref_grads[n]) for n, g in grads.items()}}
        for key, err_explicit in errors["explicit"].items():
            margin = max(margin, _within(f"step {step} {key}", backend, errors[backend][key], err_explicit, floor))
        optimizer.step()
    worst = max((k for k in errors[backend] if k != "loss"), key=errors[backend].get)
    return (f"{FLEX_TRAIN_STEPS} steps{', compiled' if profile.compile else ''}, bf16: the loss and {len(ref_grads)} "
            f"gradients within tolerance (at most {margin:.0%} of it); largest error at the last step {worst}: "
            f"{backend} {errors[backend][worst]:.1e}, explicit {errors['explicit'][worst]:.1e}")


# ----------------------------------------------------------------------------- train.py runs

def write_image_folder(root: str, per_class: int, classes: int = 2, size: int = 32) -> str:
    """An ImageFolder (train/ and val/) of random RGB PNGs: enough for train.py's pipeline."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


def train_overrides(profile: Profile, data: str, run_dir: str, batch: int, *extra: str) -> List[str]:
    return [
        "data.dataset=imagefolder", f"data.root={data}", "data.workers=2", f"data.batch_size={batch}",
        "data.repeated_aug=1", "train.epochs=1", f"train.max_steps_per_epoch={profile.steps}",
        f"train.output_dir={run_dir}", "train.resume=none", "train.log_every=1", f"train.device={profile.device}",
        *profile.model_overrides, *extra,
    ]


def _run(cmd: Sequence[str], log: str, timeout: int, env: Optional[Dict[str, str]] = None) -> int:
    """Run ``cmd`` in the repository root, its output to ``log``; the exit code."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {timeout} s (log {log})") from None


def _pythonpath() -> str:
    """The repository first, then what was on PYTHONPATH (wheels gpu_check.sh installed)."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def _train(profile: Profile, out: str, data: str, name: str, *extra: str, force_overflow: bool = False) -> Dict:
    """train.py with the DeiT-S MultiMax preset and ``extra`` overrides in a child process, one
    epoch of ``profile.steps`` steps; its log.jsonl row, with the scaler's state and config.yaml."""
    import yaml

    run_dir = os.path.join(out, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    log = run_dir + ".log"
    cmd = [sys.executable, os.path.abspath(__file__), "--train-child", *(["--force-overflow"] if force_overflow else []),
           "--config", PRESET, *train_overrides(profile, data, run_dir, profile.batch, *extra)]
    rc = _run(cmd, log, profile.timeout_s)
    if rc != 0:
        stopped = " at the forced fp16 overflow: it must skip that step and train on" if force_overflow else ""
        raise CheckFailed(f"train.py exited {rc}{stopped} (log {log})")
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != 1 or rows[0]["step"] != profile.steps or not math.isfinite(rows[0]["train_loss"]):
        raise CheckFailed(f"expected one epoch of {profile.steps} steps with a finite loss, got {rows} (log {log})")
    row = rows[0]
    row["scaler"] = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True).get("scaler")
    with open(os.path.join(run_dir, "config.yaml")) as f:
        row["config"] = yaml.safe_load(f)
    return row


def check_train_bf16(profile: Profile, out: str, data: str) -> str:
    from scripts._benchmarking import meta_model

    row = _train(profile, out, data, "train-bf16")
    train, model = row["config"]["train"], row["config"]["model"]
    ran = {"compile": train["compile"], "amp": train["amp"], "ema": train["ema"], "attn_backend": model["attn_backend"]}
    want = {"compile": profile.compile, "amp": "bf16", "ema": True, "attn_backend": "auto"}
    if ran != want:
        raise CheckFailed(f"the run's config.yaml has {ran}, not the preset's {want}")
    losses = [row.get("val_loss", math.nan), row.get("val_loss_ema", math.nan)]
    if row.get("skipped_steps", 0) != 0 or not all(map(math.isfinite, losses)):
        raise CheckFailed(f"{row.get('skipped_steps')} steps skipped, val loss {losses[0]}, EMA val loss {losses[1]} "
                          "(expected none skipped, finite val losses)")
    kernel = meta_model(model["name"]).train().blocks[0].attn.kernel(torch.device(profile.device))
    return (f"{'compiled, ' if train['compile'] else ''}bf16, EMA, attention {kernel} (auto): {profile.steps} steps, "
            f"loss {row['train_loss']:.3f}, val loss {losses[0]:.3f}, EMA val loss {losses[1]:.3f}")


def check_train_fp16_overflow(profile: Profile, out: str, data: str) -> str:
    row = _train(profile, out, data, "train-fp16-overflow", "train.amp=fp16", "train.compile=false",
                 force_overflow=True)
    skipped, scale = row.get("skipped_steps", 0), (row["scaler"] or {}).get("scale", math.nan)
    if not 1 <= skipped < profile.steps or not scale < INIT_SCALE:
        raise CheckFailed(f"{skipped} of {profile.steps} steps skipped, loss scale {scale} (expected the overflowed "
                          f"step skipped, the others trained, the scale lowered from {INIT_SCALE:g})")
    return f"{skipped} of {profile.steps} steps skipped, loss scale {INIT_SCALE:g} → {scale:g}, loss {row['train_loss']:.3f}"


def train_child(argv: Sequence[str], force_overflow: bool) -> int:
    """The child process of the train checks: train.py run as a script in this process (it exits
    with its own code), with the first scaled loss blown up on request (patched on the
    GradScaler class, however train.py refers to it)."""
    if force_overflow:
        scale = torch.amp.GradScaler.scale
        forced = []

        def overflowing_scale(self, outputs):
            scaled = scale(self, outputs)
            if not forced:
                forced.append(True)
                return scaled * OVERFLOW_FACTOR
            return scaled
        torch.amp.GradScaler.scale = overflowing_scale
    sys.argv = [os.path.join(ROOT, "train.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def ddp_layout(profile: Profile) -> Tuple[str, str, str]:
    """(dist backend, train.device, what it runs on) of the 2-process check; CheckSkipped where
    no backend can run two processes here."""
    if profile.device != "cuda":
        return "gloo", profile.device, profile.device
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        return "nccl", "cuda", f"{gpus} GPUs"
    if torch.distributed.is_available() and torch.distributed.is_backend_available("gloo"):
        return "gloo", "auto", "both on the one GPU"  # train.device=auto: a process that sees one GPU takes cuda:0
    raise CheckSkipped("one GPU: NCCL refuses two ranks on one GPU, and this torch has no gloo")


def check_ddp_parity(profile: Profile, out: str, data: str) -> str:
    """What training changed in the weights, 2 processes against 1: ‖Δ₂ − Δ₁‖ ≤ 1% of ‖Δ₁‖."""
    backend, device, where = ddp_layout(profile)
    plain = ("train.amp=none", "train.tf32=false", "train.compile=false", "model.drop_path_rate=0",
             "data.train_transform=none", "data.mixup=0", "data.cutmix=0", "data.reprob=0", "train.ema=false",
             f"train.dist_backend={backend}", f"train.device={device}", "optim.scale_lr=false", "optim.lr=1e-3",
             "optim.warmup_epochs=0")
    runs = {}
    for name, procs in (("ddp-one", 1), ("ddp-two", 2)):
        run_dir = os.path.join(out, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        cmd = [sys.executable, *launch, os.path.join(ROOT, "train.py"), "--config", PRESET,
               *train_overrides(profile, data, run_dir, 2 * profile.batch // procs, *plain)]
        rc = _run(cmd, run_dir + ".log", profile.timeout_s,
                  env={"OMP_NUM_THREADS": "1", "MMVIT_DIST_TIMEOUT_S": DDP_TIMEOUT_S})
        if rc != 0:
            raise CheckFailed(f"{procs} process(es), {backend}: exit {rc} (log {run_dir}.log)")
        runs[name] = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True)["model"]
    init = _initial_weights(profile, data, *plain)
    keys = [k for k, t in init.items() if t.is_floating_point()]
    delta = {name: torch.cat([(w[k].double() - init[k].double()).flatten() for k in keys]) for name, w in runs.items()}
    moved, diff = delta["ddp-one"].norm(), (delta["ddp-two"] - delta["ddp-one"]).norm()
    if not moved > 0 or not diff <= 0.01 * moved:
        raise CheckFailed(f"weight change of 2 processes differs from 1 process's by {diff:.2e} (its norm {moved:.2e})")
    return f"{backend}, {where}, fp32, {profile.steps} steps: weight changes differ by {diff / moved:.1e} of their norm"


def _initial_weights(profile: Profile, data: str, *overrides: str) -> Dict[str, torch.Tensor]:
    """The weights train.py starts from with these overrides (it seeds before building)."""
    from engine.config import load_config
    from engine.model import build_model

    cfg = load_config(PRESET, train_overrides(profile, data, data, profile.batch, *overrides))  # nothing is written
    torch.manual_seed(cfg.train.seed)
    classes = len(os.listdir(os.path.join(data, "train")))
    return build_model(cfg.model, num_classes=classes, in_chans=3).state_dict()


# ----------------------------------------------------------------------------- tests and benchmark

def check_cuda_tests(profile: Profile, out: str) -> str:
    if profile.device != "cuda":
        raise CheckSkipped("needs CUDA")
    if _dist_version("pytest") is None:
        raise CheckSkipped("pytest is not installed (it is in requirements.txt)")
    log = os.path.join(out, "cuda-tests.log")
    rc = _run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests"], log, profile.timeout_s)
    with open(log) as f:
        last = [line.strip() for line in f if line.strip()][-1]
    if rc != 0:
        raise CheckFailed(f"pytest exited {rc}: {last} (log {log})")
    return last


def check_benchmark(profile: Profile, out: str, name: str) -> str:
    size = profile.bench_sizes[name]
    if size is None:
        raise CheckSkipped("the CPU self-test times one size")
    json_path, md_path, log = (os.path.join(out, name + ext) for ext in (".json", ".md", ".log"))
    rc = _run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *profile.bench_args, "--sizes", size,
               "--out-json", json_path, "--out-md", md_path], log, profile.timeout_s)
    if rc != 0:
        raise CheckFailed(f"benchmark.py exited {rc} (log {log})")
    kernels = bench_speeds(json_path)
    expected = {"sdpa", "explicit", "reference"} | ({"flex"} if profile.device == "cuda" else set())
    if set(kernels) != expected or not all(math.isfinite(v) and v > 0 for v in kernels.values()):
        raise CheckFailed(f"img/s by kernel {kernels}, expected {sorted(expected)} with positive img/s")
    with open(json_path) as f:
        ratios = {r["kernel"]: r["ratio"] for r in json.load(f)["throughput"]}
    return ", ".join(f"{k} {kernels[k]:.0f} img/s ({ratios[k]:.2f}× SDPA)"
                     for k in ("sdpa", "explicit", "reference", "flex") if k in kernels) + f" (table {md_path})"


def bench_speeds(json_path: str) -> Dict[str, float]:
    """img/s by kernel (sdpa, explicit, reference, flex) of a benchmark.py --out-json of one model size."""
    with open(json_path) as f:
        return {r["kernel"]: r["img_per_s"] for r in json.load(f)["throughput"]}


# ----------------------------------------------------------------------------- driver

def check_child(profile: Profile, out: str, name: str) -> int:
    """One check in this process (a child of ``run_checks``): its outcome into ``<out>/<name>.result.json``."""

    data = os.path.join(out, "images")
    checks: Dict[str, Callable[[], str]] = {
        "flex-fp32": lambda: check_flex(profile, torch.float32),
        "flex-bf16": lambda: check_flex(profile, torch.bfloat16),
        "flex-train": lambda: check_training(profile),
        "train-bf16": lambda: check_train_bf16(profile, out, data),
        "ddp-parity": lambda: check_ddp_parity(profile, out, data),
        "train-fp16-overflow": lambda: check_train_fp16_overflow(profile, out, data),
        "benchmark": lambda: check_benchmark(profile, out, "benchmark"),
        "benchmark-base": lambda: check_benchmark(profile, out, "benchmark-base"),
        "cuda-tests": lambda: check_cuda_tests(profile, out),
    }
    try:
        status, detail = "PASS", checks[name]()
    except CheckSkipped as e:
        status, detail = "SKIP", str(e)
    except CheckFailed as e:
        status, detail = "FAIL", str(e)
    except Exception as e:  # noqa: BLE001  (a crash is a failed check; its traceback goes to the log)
        traceback.print_exc()
        status, detail = "FAIL", one_line_reason(e)
    with open(os.path.join(out, name + ".result.json"), "w") as f:
        json.dump({"status": status, "detail": detail}, f)
    return 0


def child_command(profile: Profile, out: str, name: str) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), "--device", profile.device, "--out", out, "--check-child", name]


def _stop(proc: subprocess.Popen) -> None:
    """End a check's process and everything it started (train.py, torchrun's workers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_check(profile: Profile, out: str, name: str, deadline: float) -> Outcome:
    """``name`` in a child process of its own, stopped at ``deadline`` (time.monotonic())."""
    # <name>.check.log: the check process's own output (a crash's traceback); the logs of what it runs are <name>.log
    result, log = os.path.join(out, name + ".result.json"), os.path.join(out, name + ".check.log")
    if os.path.exists(result):
        os.remove(result)
    t0 = time.monotonic()
    if deadline <= t0:
        return Outcome(name, "SKIP", 0.0, "not started: the time budget (--budget-s) was spent")
    with open(log, "w") as f:
        proc = subprocess.Popen(child_command(profile, out, name), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": _pythonpath()}, start_new_session=True)
        try:
            rc = proc.wait(timeout=deadline - t0)
        except subprocess.TimeoutExpired:
            _stop(proc)
            seconds = time.monotonic() - t0
            return Outcome(name, "SKIP", seconds, f"stopped unfinished at the time budget after {seconds:.0f} s "
                                                  f"(log {log}); --budget-s gives it more")
    seconds = time.monotonic() - t0
    if not os.path.exists(result):
        with open(log) as f:
            last = [line.strip() for line in f if line.strip()][-1:] or ["(empty)"]
        return Outcome(name, "FAIL", seconds, f"its process ended with exit {rc} and no result; last line of "
                                              f"{log}: {last[0]}")
    with open(result) as f:
        r = json.load(f)
    return Outcome(name, r["status"], seconds, r["detail"])


def run_checks(profile: Profile, out: str, only: Sequence[str], deadline: float) -> List[Outcome]:
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "images")
    if {"train-bf16", "train-fp16-overflow", "ddp-parity"} & set(only) and not os.path.isdir(data):
        write_image_folder(data, per_class=profile.batch * profile.steps)
    outcomes = []
    for name in (c for c in CHECKS if c in only):
        outcomes.append(run_check(profile, out, name, deadline))
        o = outcomes[-1]
        print(f"[gpu_check] {name}: {o.status} ({o.seconds:.0f} s) {o.detail}", flush=True)
    return outcomes


def flex_verdict(outcomes: Sequence[Outcome], out: str) -> Optional[str]:
    """What the run says about FLEX_TRAINING_PROVEN: only flex-train's pass is evidence that flex
    trains correctly; the benchmark says whether it is worth it."""
    from models.attention_kernels import FLEX_TRAINING_PROVEN, flex_training_proven

    version = ".".join(torch.__version__.split(".")[:2])
    status = {o.check: o.status for o in outcomes}
    if flex_training_proven():
        return f"torch {version} is in FLEX_TRAINING_PROVEN: attn_backend=auto trains with flex here."
    if status.get("flex-train") != "PASS":
        return None
    where = f"FLEX_TRAINING_PROVEN {FLEX_TRAINING_PROVEN} (models/attention_kernels.py)"
    if status.get("benchmark") != "PASS":
        return (f"flex-train passed: flex trains correctly here. Whether it is faster than the compiled explicit path "
                f"was not measured (the benchmark check did not pass); run it before adding '{version}' to {where}.")
    speed = bench_speeds(os.path.join(out, "benchmark.json"))
    measured = f"DeiT-S train step: flex {speed['flex']:.0f} img/s, compiled explicit {speed['explicit']:.0f} img/s"
    if speed["flex"] > speed["explicit"]:
        return f"flex-train passed and flex is faster ({measured}): add '{version}' to {where}."
    return (f"flex-train passed, but flex is not faster ({measured}): attn_backend=auto keeps training with the "
            f"explicit path; leave {where} as it is.")


def summary(outcomes: Sequence[Outcome], machine: str, out: str, profile: Profile) -> str:
    rows = [f"| {o.check} | {o.status} | {o.seconds:.0f} | {o.detail.replace('|', '/')} |" for o in outcomes]
    lines = [f"Machine: {machine}", "", "| check | result | s | detail |", "|---|---|---|---|", *rows, "",
             f"{sum(o.status == 'PASS' for o in outcomes)} passed, {sum(o.status == 'FAIL' for o in outcomes)} failed, "
             f"{sum(o.status == 'SKIP' for o in outcomes)} skipped"]
    verdict = flex_verdict(outcomes, out) if profile.device == "cuda" else None
    return "\n".join(lines + ([verdict] if verdict else []))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: the checks (default); cpu: a self-test of the checks on tiny shapes")
    p.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="run these checks only")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="logs, tables and the summary")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"seconds from the start after which no check runs on (default {BUDGET_S:.0f})")
    p.add_argument("--check-child", choices=CHECKS, help=argparse.SUPPRESS)  # one check, in a child process
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--train-child"]:
        force = argv[1:2] == ["--force-overflow"]
        return train_child(argv[2 if force else 1:], force)
    args = parse_args(argv)
    profile, out = (GPU if args.device == "cuda" else CPU), os.path.abspath(args.out)
    if args.check_child:
        return check_child(profile, out, args.check_child)
    try:
        machine, notes = preflight(profile.device)
    except Unfit as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    for note in notes:
        print(f"gpu_check: {note}", flush=True)
    outcomes = run_checks(profile, out, args.only, start + args.budget_s)
    text = summary(outcomes, machine, out, profile)
    for name in ("benchmark", "benchmark-base"):
        table = os.path.join(out, name + ".md")
        if any(o.check == name and o.status == "PASS" for o in outcomes):
            with open(table) as f:
                print("\n" + f.read())
    print("\n" + text)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    return 1 if any(o.status == "FAIL" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
