"""scripts/gpu_check.sh: it stops in one line, before any check, where the machine cannot run the
checks (a GPU torch cannot use, no GPU, a package too old, no compiler); its checks run in child
processes within a time budget, and on CPU as a self-test on tiny shapes (--device cpu), passing
on correct code and failing on wrong results."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import models.attention as attention
import models.attention_kernels as kernels
from helpers import ROOT, load_script

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def _gpu_check_sh(*args, path_first=None, **env):
    path = os.environ["PATH"] if path_first is None else f"{path_first}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "PATH": path, **env}, timeout=300)


FAKE_NVIDIA_SMI = textwrap.dedent("""\
    #!/bin/sh
    # what nvidia-smi prints on a one-GPU machine, for the two questions gpu_check asks
    case "$*" in
      -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-8f6a3c2e-1b7d-4e59-a0c4-5d2e9b7f1a36)" ;;
      --query-gpu=driver_version*) echo "580.159.03" ;;
      *) exit 9 ;;
    esac
""")


@NO_GPU
def test_a_gpu_that_torch_cannot_use_fails_in_one_line(tmp_path):
    """nvidia-smi lists a GPU, torch sees none (here: no driver behind it): the machine's line,
    then exit 2 with one line naming the GPU and the cause; no check runs, nothing is written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    proc = _gpu_check_sh("--out", str(tmp_path / "out"), path_first=str(bin_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("gpu_check: this machine has a GPU (GPU 0: NVIDIA H200 (UUID: GPU-8f6a3c2e")
    reason = "CPU-only build" if torch.version.cuda is None else "torch.cuda.init() fails: "
    assert f"but torch {torch.__version__} cannot use it: {reason}" in errors[0]
    machine = proc.stdout.splitlines()[0]
    for part in (f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})", "driver 580.159.03",
                 "GPU 0: NVIDIA H200", "triton "):
        assert part in machine
    assert not (tmp_path / "out").exists()


def test_why_torch_cannot_use_the_gpu(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert gpu_check.cuda_unusable_reason() == (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda "
                                                "is None): install a CUDA build")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.cuda_unusable_reason() == "CUDA_VISIBLE_DEVICES='' hides it"


@NO_GPU
@pytest.mark.skipif(bool(shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*")), reason="a GPU is here")
def test_without_a_gpu_nothing_is_checked_and_it_says_so(tmp_path):
    proc = _gpu_check_sh("--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no NVIDIA GPU here (nvidia-smi lists none, no /dev/nvidia*, torch sees none): nothing was "
        "checked; `python scripts/gpu_check.py --device cpu` runs the checks' self-test on tiny shapes"]
    assert "driver unknown | no GPU listed" in proc.stdout and not (tmp_path / "out").exists()


def test_missing_or_too_old_packages_are_named_newer_ones_noted(gpu_check):
    lines = ["torch>=2.7,<2.15", "timm>=1.0.23,<2  # attn_layer", "numpy>=1.24", "entmax>=1.3", "pyyaml>=6.0"]
    versions = {"torch": "2.15.0+cu130", "timm": "1.0.19", "numpy": None, "pyyaml": "6.0"}
    problems, notes = gpu_check.requirement_problems(lines, versions)
    assert problems == ["timm 1.0.19 is older than requirements.txt admits (timm>=1.0.23,<2)",
                        "numpy is missing (numpy>=1.24)"]  # entmax: no check imports it
    assert notes == ["torch 2.15.0+cu130 is newer than requirements.txt's torch>=2.7,<2.15 (tested up to there)"]
    assert gpu_check.requirement_problems(lines, {**versions, "timm": "1.0.23", "numpy": "2.0"}) == ([], notes)
    assert gpu_check.check_requirements() == []  # this machine has what the checks need


def test_no_compiler_stops_before_any_check(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu",
                           "--out", str(tmp_path / "out")], env={**os.environ, "CXX": "/nonexistent/g++"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no C++ compiler ('/nonexistent/g++' not found): Inductor builds its CPU kernels with $CXX, "
        "else g++; install gcc/g++ (e.g. apt-get install build-essential)"]
    assert not (tmp_path / "out").exists()


def test_flex_check_passes_and_catches_a_wrong_kernel(gpu_check, monkeypatch):
    assert "forward only" in gpu_check.check_flex(gpu_check.CPU, torch.float32)
    flex = kernels.flex_attention_with  # the checker looks it up at call time
    monkeypatch.setattr(kernels, "flex_attention_with", lambda q, k, v, mod, scale: flex(q, k, v, mod, scale * 1.01))
    with pytest.raises(gpu_check.CheckFailed, match="order 2 out: flex error"):
        gpu_check.check_flex(gpu_check.CPU, torch.float32)


def test_training_check_passes_and_catches_a_wrong_backward(gpu_check, monkeypatch):
    """flex has no backward on CPU, so the training check runs chunked (which has one) against
    explicit here; a backward that is wrong where the forward is right fails it."""
    with pytest.raises(gpu_check.CheckSkipped, match="flex has no backward on cpu"):
        gpu_check.check_training(gpu_check.CPU)
    detail = gpu_check.check_training(gpu_check.CPU, "chunked")
    assert detail.startswith("3 steps, bf16: the loss and 39 gradients within tolerance"), detail
    chunked = attention.chunked_attention

    def wrong_backward(q, k, v, mod, scale, bias=None):
        return chunked(q + (q - q.detach()) * 0.5, k, v, mod, scale, bias)  # the same forward, dL/dq × 1.5
    monkeypatch.setattr(attention, "chunked_attention", wrong_backward)
    with pytest.raises(gpu_check.CheckFailed, match=r"step 1 blocks\.0\.attn\.qkv\.weight\[q\]: chunked error"):
        gpu_check.check_training(gpu_check.CPU, "chunked")


def test_ddp_check_layout_on_one_gpu_or_more(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert gpu_check.ddp_layout(gpu_check.GPU) == ("nccl", "cuda", "8 GPUs")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # train.device=auto: each process takes cuda:0
    assert gpu_check.ddp_layout(gpu_check.GPU) == ("gloo", "auto", "both on the one GPU")
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda name: name != "gloo")
    with pytest.raises(gpu_check.CheckSkipped, match="NCCL refuses two ranks on one GPU, and this torch has no gloo"):
        gpu_check.ddp_layout(gpu_check.GPU)
    assert gpu_check.ddp_layout(gpu_check.CPU) == ("gloo", "cpu", "cpu")


def test_only_flex_train_proposes_flex_training_and_only_where_flex_is_faster(gpu_check, tmp_path):
    version = ".".join(torch.__version__.split(".")[:2])
    assert version not in kernels.FLEX_TRAINING_PROVEN

    def verdict(flex_train, benchmark="PASS", flex=1200.0, explicit=1000.0):
        (tmp_path / "benchmark.json").write_text(json.dumps({"throughput": [
            {"kernel": "sdpa", "img_per_s": 1100.0}, {"kernel": "explicit", "img_per_s": explicit},
            {"kernel": "flex", "img_per_s": flex}]}))
        statuses = {"flex-bf16": "PASS", "flex-train": flex_train, "train-bf16": "PASS", "benchmark": benchmark}
        outcomes = [gpu_check.Outcome(name, status, 1.0, "") for name, status in statuses.items()]
        return gpu_check.flex_verdict(outcomes, str(tmp_path))

    assert verdict("PASS").startswith(f"flex-train passed and flex is faster (DeiT-S train step: flex 1200 img/s, "
                                      f"compiled explicit 1000 img/s): add '{version}' to FLEX_TRAINING_PROVEN")
    assert "leave FLEX_TRAINING_PROVEN () (models/attention_kernels.py) as it is" in verdict("PASS", flex=900.0)
    assert f"run it before adding '{version}'" in verdict("PASS", benchmark="SKIP")
    assert verdict("SKIP") is None and verdict("FAIL") is None  # train-bf16 trains with explicit: no evidence


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_each_check_runs_in_a_child_that_the_budget_stops(gpu_check, tmp_path, monkeypatch):
    """A check past the budget is stopped with everything it started, and says SKIP; one that
    would start after it is not started."""
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setattr(gpu_check, "child_command", lambda profile, out, name: [
        "bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
    t0 = time.monotonic()
    o = gpu_check.run_check(gpu_check.CPU, str(tmp_path), "ddp-parity", deadline=t0 + 3)
    assert time.monotonic() - t0 < 60
    assert o.status == "SKIP" and o.detail.startswith("stopped unfinished at the time budget after")
    assert not _alive(int(pid_file.read_text()))
    o = gpu_check.run_check(gpu_check.CPU, str(tmp_path), "ddp-parity", deadline=time.monotonic())
    assert (o.status, o.detail) == ("SKIP", "not started: the time budget (--budget-s) was spent")


@pytest.mark.slow
def test_a_failing_or_crashing_check_fails_the_run_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    real = gpu_check.child_command
    fakes = {
        "flex-fp32": ["-c", "import json, sys; json.dump({'status': 'FAIL', 'detail': 'flex error 1e-1'}, "
                            f"open({str(tmp_path / 'flex-fp32.result.json')!r}, 'w'))"],
        "benchmark": ["-c", "print('CUDA error: an illegal memory access was encountered'); raise SystemExit(1)"],
    }
    monkeypatch.setattr(gpu_check, "child_command", lambda profile, out, name: (
        [sys.executable, *fakes[name]] if name in fakes else real(profile, out, name)))
    rc = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "flex-fp32", "flex-train",
                         "benchmark", "cuda-tests"])
    summary = (tmp_path / "summary.md").read_text()
    assert rc == 1
    assert summary.startswith("Machine: python ") and f"torch {torch.__version__}" in summary.splitlines()[0]
    assert "| flex-fp32 | FAIL |" in summary and "| flex error 1e-1 |" in summary
    assert "| flex-train | SKIP |" in summary and "flex has no backward on cpu" in summary
    assert (f"exit 1 and no result; last line of {tmp_path / 'benchmark.check.log'}: CUDA error: an illegal memory "
            "access was encountered |") in summary
    assert "| cuda-tests | SKIP |" in summary and "| needs CUDA |" in summary
    assert "0 passed, 2 failed, 2 skipped" in summary
    assert json.loads((tmp_path / "cuda-tests.result.json").read_text())["status"] == "SKIP"


@pytest.mark.slow
def test_training_ddp_and_benchmark_checks_pass_on_cpu(gpu_check, tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "train-bf16", "ddp-parity", "benchmark",
                         "--budget-s", "3000"])
    out = capsys.readouterr().out
    assert rc == 0, out + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    summary = (tmp_path / "summary.md").read_text()
    assert summary in out and "3 passed, 0 failed, 0 skipped" in summary
    assert "| train-bf16 | PASS |" in summary and "| bf16, EMA, attention explicit (auto): 3 steps, loss" in summary
    assert "| ddp-parity | PASS |" in summary and "gloo, cpu, fp32, 3 steps: weight changes differ by" in summary
    bench_row, = (line for line in summary.splitlines() if line.startswith("| benchmark | PASS |"))
    assert all(f"{k} " in bench_row for k in ("sdpa", "explicit", "reference"))  # img/s of each kernel
    assert "| vit_micro_multimax_patch7_28 |" in out  # the benchmark's table is printed too


@pytest.mark.slow
def test_fp16_overflow_check_passes_on_cpu(gpu_check, tmp_path):
    data = gpu_check.write_image_folder(str(tmp_path / "images"), per_class=gpu_check.CPU.batch * gpu_check.CPU.steps)
    detail = gpu_check.check_train_fp16_overflow(gpu_check.CPU, str(tmp_path), data)
    assert "1 of 3 steps skipped, loss scale 65536 → 32768" in detail
