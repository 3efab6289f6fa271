"""scripts/gpu_check.sh: without a GPU it says so and exits 0; its checks run on CPU as a
self-test on tiny shapes (--device cpu), pass on correct code and fail on wrong results."""
import os
import subprocess
import sys

import pytest
import torch

import models.attention_kernels as kernels
from helpers import ROOT, load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs an NVIDIA GPU" in proc.stdout and not os.listdir(tmp_path)


def test_flex_check_passes_and_catches_a_wrong_kernel(gpu_check, monkeypatch):
    assert "forward only" in gpu_check.check_flex(gpu_check.CPU, torch.float32)
    flex = kernels.flex_attention_with  # the checker looks it up at call time
    monkeypatch.setattr(kernels, "flex_attention_with", lambda q, k, v, mod, scale: flex(q, k, v, mod, scale * 1.01))
    with pytest.raises(gpu_check.CheckFailed, match="order 2 out: flex error"):
        gpu_check.check_flex(gpu_check.CPU, torch.float32)


@pytest.mark.slow
def test_training_ddp_and_benchmark_checks_pass_on_cpu(gpu_check, tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "train-bf16", "ddp-parity", "benchmark"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = (tmp_path / "summary.md").read_text()
    assert summary in out and "3 passed, 0 failed, 0 skipped" in summary
    for line in ("| train-bf16 | PASS |", "| ddp-parity | PASS |", "| benchmark | PASS |"):
        assert line in summary
    assert "gloo, 3 steps: weight changes differ by" in summary
    assert "| vit_micro_multimax_patch7_28 |" in out  # the benchmark's table is printed too


@pytest.mark.slow
def test_fp16_overflow_check_passes_on_cpu(gpu_check, tmp_path):
    data = gpu_check.write_image_folder(str(tmp_path / "images"), per_class=gpu_check.CPU.batch * gpu_check.CPU.steps)
    detail = gpu_check.check_train_fp16_overflow(gpu_check.CPU, str(tmp_path), data)
    assert "1 of 3 steps skipped, loss scale 65536 → 32768" in detail


def test_a_failing_or_crashing_check_fails_the_run(gpu_check, tmp_path, monkeypatch, capsys):
    def wrong(profile, dtype):
        raise gpu_check.CheckFailed("flex error 1e-1")

    def crash(profile, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_check, "check_flex", wrong)
    monkeypatch.setattr(gpu_check, "check_benchmark", crash)
    rc = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "cuda-tests", "flex-fp32", "benchmark"])
    summary = (tmp_path / "summary.md").read_text()
    assert rc == 1
    assert "| cuda-tests | SKIP | 0 | needs CUDA |" in summary
    assert "| flex-fp32 | FAIL |" in summary and "flex error 1e-1" in summary
    assert "RuntimeError: CUDA error: an illegal memory access was encountered |" in summary
    assert "0 passed, 2 failed, 1 skipped" in summary
