#!/usr/bin/env python
"""Check that this repository trains correctly on a machine's NVIDIA GPUs (meant to take about five minutes).

    scripts/gpu_check.sh                       # all checks; logs and tables in runs/gpu_check/
    scripts/gpu_check.sh --only flex benchmark # some of them
    python scripts/gpu_check.py --device cpu   # self-test of the checks on tiny shapes (no GPU)

Each check asserts and ends as one line of the summary table (PASS, FAIL with the reason, or
SKIP with the reason); the exit code is 1 if any check failed, else 0. Without a GPU the
script says so and exits 0.

- cuda-tests: ``pytest -k cuda`` (the tests that need a GPU have "cuda" in their name).
- flex-fp32, flex-bf16: one attention layer at DeiT-S shapes (batch 32, 6 heads, 196 tokens,
  head dim 64), the paper's MultiMax (order 2; in fp32 also the affine first-order ablation):
  output and the gradients of q, k, v and every modulator parameter of the flex backend against
  the explicit path, both against a float64 reference. flex passes if its relative error is at
  most twice the explicit path's (or below a floor: 1e-4 in fp32, 2e-2 in bf16). On CPU forward
  only.
- train-bf16: train.py with configs/deit_small_multimax.yaml (compiled, as the preset) for a few
  steps and an evaluation on a generated image folder: finite loss, no skipped step.
- train-fp16-overflow: the same with train.amp=fp16 (not compiled, for time), the first step's
  scaled loss multiplied by 2^100 so that its float16 gradients overflow: train.py must skip
  that step (GradScaler lowers its scale) and train on.
- ddp-parity: 2 processes (NCCL) with batch 8 each against 1 process with batch 16, fp32, no
  random augmentation: the same weights after the steps. Needs 2 GPUs.
- benchmark: ``scripts/benchmark.py --preset deit --sizes small --mode train --compile on``
  (bf16, batch 128): train steps of softmax-SDPA, MultiMax explicit and MultiMax flex.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

CHECKS = ("cuda-tests", "flex-fp32", "flex-bf16", "train-bf16", "train-fp16-overflow", "ddp-parity", "benchmark")
OVERFLOW_FACTOR = 2.0 ** 100  # × the first scaled loss: float16 gradients overflow, the float32 loss does not
INIT_SCALE = inspect.signature(torch.amp.GradScaler).parameters["init_scale"].default  # train.py's scaler's
PRESET = os.path.join(ROOT, "configs", "deit_small_multimax.yaml")


class CheckFailed(Exception):
    """A check's assertion failed; the message is the summary's reason."""


class CheckSkipped(Exception):
    """A check cannot run here; the message says why."""


@dataclass(frozen=True)
class Profile:
    """Sizes of the checks: DeiT-S on a GPU, or tiny ones for the CPU self-test."""

    device: str
    attn_shape: Tuple[int, int, int, int]  # (batch, heads, tokens, head dim) of the flex check
    model_overrides: Tuple[str, ...]  # on top of configs/deit_small_multimax.yaml
    batch: int
    steps: int
    bench_args: Tuple[str, ...]
    timeout_s: int


GPU = Profile("cuda", (32, 6, 196, 64), (), 16, 4,
              ("--preset", "deit", "--sizes", "small", "--mode", "train", "--compile", "on", "--device", "cuda",
               "--repeats", "5", "--warmup", "2", "--steps", "2"), 900)
CPU = Profile("cpu", (2, 2, 16, 8),
              ("model.name=vit_micro_multimax_patch7_28", "model.img_size=28", "train.compile=false"), 4, 3,
              ("--preset", "deit", "--sizes", "micro", "--mode", "train", "--compile", "off", "--device", "cpu",
               "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--steps", "1", "--no-memory"), 600)


@dataclass
class Outcome:
    check: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


# ----------------------------------------------------------------------------- flex against explicit

def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _modulations(order: int, affine: bool, device: torch.device):
    from models.attention_kernels import ScoreModulation
    from models.multimax import build_normalizer

    norm = build_normalizer("multimax", order, "zeros", affine).to(device)
    g = torch.Generator().manual_seed(order)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.3).to(device))
    return ScoreModulation.of(norm)


def check_flex(profile: Profile, dtype: torch.dtype) -> str:
    """flex against the explicit path at ``profile.attn_shape``; see the module docstring."""
    from models.attention_kernels import ScoreModulation, flex_attention_with, modulated_attention

    device = torch.device(profile.device)
    backward = device.type == "cuda"  # flex has no backward on CPU
    floor = 1e-4 if dtype == torch.float32 else 2e-2
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
            if not math.isfinite(err_flex) or err_flex > max(2 * err_explicit, floor):
                raise CheckFailed(f"order {order}{' affine' if affine else ''} {label}: flex error {err_flex:.2e} "
                                  f"> max(2 × explicit {err_explicit:.2e}, {floor:g})")
            worst.append((err_flex, err_explicit))
    err_flex, err_explicit = max(worst)
    what = "forward and gradients" if backward else "forward only (no flex backward on CPU)"
    return f"{what}; largest relative error flex {err_flex:.1e} (explicit {err_explicit:.1e})"


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
                                  env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {timeout} s (log {log})") from None


def _train(profile: Profile, out: str, data: str, name: str, *extra: str, force_overflow: bool = False) -> Dict:
    """train.py with the DeiT-S MultiMax preset and ``extra`` overrides in a child process, one
    epoch of ``profile.steps`` steps; its log.jsonl row."""
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
    return row


def check_train_bf16(profile: Profile, out: str, data: str) -> str:
    row = _train(profile, out, data, "train-bf16", "train.amp=bf16")
    if row.get("skipped_steps", 0) != 0 or not math.isfinite(row.get("val_loss", math.nan)):
        raise CheckFailed(f"{row.get('skipped_steps')} steps skipped, val loss {row.get('val_loss')} "
                          "(expected none skipped, a finite val loss)")
    return f"{profile.steps} steps, loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}"


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


def check_ddp_parity(profile: Profile, out: str, data: str) -> str:
    """What training changed in the weights, 2 processes against 1: ‖Δ₂ − Δ₁‖ ≤ 1% of ‖Δ₁‖."""
    if profile.device == "cuda" and torch.cuda.device_count() < 2:
        raise CheckSkipped(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    backend = "nccl" if profile.device == "cuda" else "gloo"
    plain = ("train.amp=none", "train.compile=false", "model.drop_path_rate=0", "data.train_transform=none",
             "data.mixup=0", "data.cutmix=0", "data.reprob=0", "train.ema=false", f"train.dist_backend={backend}",
             "optim.scale_lr=false", "optim.lr=1e-3", "optim.warmup_epochs=0")
    runs = {}
    for name, procs in (("ddp-one", 1), ("ddp-two", 2)):
        run_dir = os.path.join(out, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        cmd = [sys.executable, *launch, os.path.join(ROOT, "train.py"), "--config", PRESET,
               *train_overrides(profile, data, run_dir, 2 * profile.batch // procs, *plain)]
        rc = _run(cmd, run_dir + ".log", profile.timeout_s, env={"OMP_NUM_THREADS": "1"})
        if rc != 0:
            raise CheckFailed(f"{procs} process(es): exit {rc} (log {run_dir}.log)")
        runs[name] = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True)["model"]
    init = _initial_weights(profile, data, *plain)
    keys = [k for k, t in init.items() if t.is_floating_point()]
    delta = {name: torch.cat([(w[k].double() - init[k].double()).flatten() for k in keys]) for name, w in runs.items()}
    moved, diff = delta["ddp-one"].norm(), (delta["ddp-two"] - delta["ddp-one"]).norm()
    if not moved > 0 or not diff <= 0.01 * moved:
        raise CheckFailed(f"weight change of 2 processes differs from 1 process's by {diff:.2e} (its norm {moved:.2e})")
    return f"{backend}, {profile.steps} steps: weight changes differ by {diff / moved:.1e} of their norm"


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
    log = os.path.join(out, "cuda-tests.log")
    rc = _run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests"], log, profile.timeout_s)
    with open(log) as f:
        last = [line.strip() for line in f if line.strip()][-1]
    if rc != 0:
        raise CheckFailed(f"pytest exited {rc}: {last} (log {log})")
    return last


def check_benchmark(profile: Profile, out: str) -> str:
    json_path, md_path = os.path.join(out, "benchmark.json"), os.path.join(out, "benchmark.md")
    log = os.path.join(out, "benchmark.log")
    rc = _run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *profile.bench_args,
               "--out-json", json_path, "--out-md", md_path], log, profile.timeout_s)
    if rc != 0:
        raise CheckFailed(f"benchmark.py exited {rc} (log {log})")
    with open(json_path) as f:
        rows = json.load(f)["throughput"]
    kernels = {r["kernel"]: r for r in rows}
    expected = {"sdpa", "explicit", "flex"} if profile.device == "cuda" else {"sdpa", "explicit"}
    if set(kernels) != expected or not all(math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0 for r in rows):
        raise CheckFailed(f"rows for kernels {sorted(kernels)} with img/s {[r['img_per_s'] for r in rows]}, "
                          f"expected {sorted(expected)} with positive img/s")
    return ", ".join(f"{k} {kernels[k]['img_per_s']:.0f} img/s ({kernels[k]['ratio']:.2f}× SDPA)"
                     for k in ("sdpa", "explicit", "flex") if k in kernels) + f" (table {md_path})"


# ----------------------------------------------------------------------------- driver

def run_checks(profile: Profile, out: str, only: Sequence[str]) -> List[Outcome]:
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "images")
    needs_data = {"train-bf16", "train-fp16-overflow", "ddp-parity"} & set(only)
    if needs_data and not os.path.isdir(data):
        write_image_folder(data, per_class=profile.batch * profile.steps)
    checks: Dict[str, Callable[[], str]] = {
        "cuda-tests": lambda: check_cuda_tests(profile, out),
        "flex-fp32": lambda: check_flex(profile, torch.float32),
        "flex-bf16": lambda: check_flex(profile, torch.bfloat16),
        "train-bf16": lambda: check_train_bf16(profile, out, data),
        "train-fp16-overflow": lambda: check_train_fp16_overflow(profile, out, data),
        "ddp-parity": lambda: check_ddp_parity(profile, out, data),
        "benchmark": lambda: check_benchmark(profile, out),
    }
    outcomes = []
    for name in CHECKS:
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            status, detail = "PASS", checks[name]()
        except CheckSkipped as e:
            status, detail = "SKIP", str(e)
        except CheckFailed as e:
            status, detail = "FAIL", str(e)
        except Exception as e:  # noqa: BLE001 (a crash is a failed check; the others still run)
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        outcomes.append(Outcome(name, status, time.perf_counter() - t0, detail))
        print(f"[gpu_check] {name}: {status} ({outcomes[-1].seconds:.0f} s) {detail}", flush=True)
    return outcomes


def summary(outcomes: Sequence[Outcome], profile: Profile) -> str:
    from models.attention_kernels import FLEX_TRAINING_PROVEN, flex_training_proven

    rows = [f"| {o.check} | {o.status} | {o.seconds:.0f} | {o.detail.replace('|', '/')} |" for o in outcomes]
    lines = ["| check | result | s | detail |", "|---|---|---|---|", *rows, "",
             f"{sum(o.status == 'PASS' for o in outcomes)} passed, {sum(o.status == 'FAIL' for o in outcomes)} failed, "
             f"{sum(o.status == 'SKIP' for o in outcomes)} skipped; torch {torch.__version__}"
             + (f", {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if profile.device == "cuda" else "")]
    version = ".".join(torch.__version__.split(".")[:2])
    passed = {o.check for o in outcomes if o.status == "PASS"}
    if profile.device == "cuda" and not flex_training_proven() and {"flex-fp32", "flex-bf16", "train-bf16"} <= passed:
        lines.append(f"flex's backward passed here. attn_backend=auto trains with flex only on torch versions in "
                     f"FLEX_TRAINING_PROVEN {FLEX_TRAINING_PROVEN} (models/attention_kernels.py): add '{version}' if "
                     f"the benchmark above shows flex faster than the compiled explicit path (docs/PERFORMANCE.md).")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: the checks (default); cpu: a self-test of the checks on tiny shapes")
    p.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="run these checks only")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="logs, tables and the summary")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--train-child"]:
        force = argv[1:2] == ["--force-overflow"]
        return train_child(argv[2 if force else 1:], force)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: needs an NVIDIA GPU (torch.cuda.is_available() is False here), so there is nothing to "
              "check; run it on a GPU machine, or `python scripts/gpu_check.py --device cpu` for its self-test.")
        return 0
    profile = GPU if args.device == "cuda" else CPU
    outcomes = run_checks(profile, os.path.abspath(args.out), args.only)
    text = summary(outcomes, profile)
    bench_md = os.path.join(os.path.abspath(args.out), "benchmark.md")
    if "benchmark" in args.only and os.path.exists(bench_md):
        with open(bench_md) as f:
            print("\n" + f.read())
    print("\n" + text)
    with open(os.path.join(os.path.abspath(args.out), "summary.md"), "w") as f:
        f.write(text + "\n")
    return 1 if any(o.status == "FAIL" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
