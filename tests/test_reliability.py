"""Nothing lost, nothing executed, every bad input named (issue: reliability and security)."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import write_idx_dataset
from engine.logger import read_jsonl
from helpers import ROOT, run_train, tiny_overrides

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def long_fmnist(tmp_path_factory):
    """Enough images for 30 steps an epoch, so that signals land mid-training."""
    return write_idx_dataset(str(tmp_path_factory.mktemp("long")), n_train=480, n_test=40, seed=1)


def train_cmd(overrides):
    return [PY, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            *overrides]


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)


def assert_same_weights(a, b, atol=1e-6):
    assert a["step"] == b["step"]
    for key in ("model", "model_ema"):
        assert (a[key] is None) == (b[key] is None)
        for name, t in (a[key] or {}).items():
            torch.testing.assert_close(b[key][name], t, rtol=0, atol=atol, msg=f"{key}.{name}")


def wait_for_output(proc, needle, timeout=120):
    """Read the process's stdout until a line contains ``needle``."""
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(lines)[-3000:]}")


# ------------------------------------------------------------------ 2. crash safety

def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(long_fmnist, tmp_path):
    extra = {"train.epochs": 4, "train.ema": "true", "train.ema_decay": 0.9, "model.drop_path_rate": 0.1,
             "train.log_every": 5}
    ref, crashed = str(tmp_path / "ref"), str(tmp_path / "crashed")
    run_train(tiny_overrides(long_fmnist, ref, **extra))
    rng = random.Random(1234)
    kills = 0
    for attempt in range(8):
        proc = subprocess.Popen(train_cmd(tiny_overrides(long_fmnist, crashed, **extra)), env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # wait for a random number of progress lines (steps), then kill -9 without warning
            for _ in range(rng.randint(1, 9)):
                wait_for_output(proc, "/30")
            proc.kill()
            kills += 1
        except AssertionError:
            pass  # it finished before we struck
        proc.wait(timeout=120)
        if proc.returncode == 0 and len(read_jsonl(os.path.join(crashed, "log.jsonl"))) == 4:
            break
        last = os.path.join(crashed, "last.pth")
        if os.path.exists(last):
            torch.load(last, weights_only=True)  # loadable after every crash
    proc = subprocess.run(train_cmd(tiny_overrides(long_fmnist, crashed, **extra)), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert kills >= 2
    assert [r["epoch"] for r in read_jsonl(os.path.join(crashed, "log.jsonl"))] == [0, 1, 2, 3]
    assert_same_weights(final_weights(ref), final_weights(crashed))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_mid_epoch_and_resume_is_exact(long_fmnist, tmp_path, sig):
    extra = {"train.epochs": 2, "train.log_every": 1, "model.drop_path_rate": 0.1}
    ref, pre = str(tmp_path / "ref"), str(tmp_path / "pre")
    run_train(tiny_overrides(long_fmnist, ref, **extra))
    proc = subprocess.Popen(train_cmd(tiny_overrides(long_fmnist, pre, **extra)), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_output(proc, "epoch 1 7/30")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    ckpt = final_weights(pre)
    assert ckpt["epoch"] == 0 and 7 <= ckpt["epoch_step"] < 30
    run_train(tiny_overrides(long_fmnist, pre, **extra))
    assert_same_weights(final_weights(ref), final_weights(pre))


# ------------------------------------------------------------------ 3. non-finite loss

def test_nonfinite_stop_leaves_last_good_checkpoint(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.stop_after_epochs": 1}))
    last = os.path.join(out, "last.pth")
    before = open(last, "rb").read()
    rc = train.main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                     *tiny_overrides(fake_fmnist, out, **{"optim.lr": 1e30, "train.allow_config_change": "true"})])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 1" in err and "step" in err
    assert open(last, "rb").read() == before


def test_nonfinite_skip_policy_skips_steps(fake_fmnist, tmp_path):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"optim.lr": 1e30, "train.nonfinite": "skip",
                                                  "optim.warmup_epochs": 0}))
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert rows[-1]["skipped_steps"] > 0
    weights = final_weights(out)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.dtype.is_floating_point)


# ------------------------------------------------------------------ 4. bad inputs

def one_line_error(capsys, argv, rc=2):
    capsys.readouterr()
    assert train.main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_config_inputs_are_named_and_write_nothing(fake_fmnist, tmp_path, capsys):
    out = tmp_path / "never"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  name: [unclosed\n")
    assert "bad.yaml" in one_line_error(capsys, ["--config", str(bad_yaml), f"train.output_dir={out}"])
    base = ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), f"train.output_dir={out}"]
    assert "optim.lrr" in one_line_error(capsys, [*base, "optim.lrr=1"])
    assert "data.batch_size" in one_line_error(capsys, [*base, "data.batch_size=abc"])
    assert "optim.lr" in one_line_error(capsys, [*base, "optim.lr=-1"])
    assert "data.batch_size" in one_line_error(capsys, [*base, "data.batch_size=0"])
    assert "data.crop_pct" in one_line_error(capsys, [*base, "data.crop_pct=1.5"])
    assert "model.modulator_order" in one_line_error(capsys, [*base, "model.modulator_order=0"])
    assert str(tmp_path / "nodata") in one_line_error(
        capsys, [*base, "data.dataset=imagefolder", f"data.root={tmp_path / 'nodata'}"])
    assert not out.exists()


def test_run_dir_of_another_config_is_refused(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1}))
    before = open(os.path.join(out, "last.pth"), "rb").read()
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "model.modulator_order": 3})])
    assert "model.modulator_order" in err and "allow_config_change" in err
    assert open(os.path.join(out, "last.pth"), "rb").read() == before


def test_resume_checkpoint_of_another_model_or_truncated(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1}))
    other = str(tmp_path / "other")
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, other, **{"model.kwargs.depth": 3,
                                                                         "train.resume": f"{out}/last.pth"})])
    assert "last.pth" in err
    cut = tmp_path / "cut.pth"
    data = open(os.path.join(out, "last.pth"), "rb").read()
    cut.write_bytes(data[: len(data) // 3])
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, str(tmp_path / "o2"), **{"train.resume": str(cut)})])
    assert "truncated" in err


# ------------------------------------------------------------------ 5. disk

def test_disk_full_keeps_previous_checkpoint(fake_fmnist, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.stop_after_epochs": 1}))
    before = open(os.path.join(out, "last.pth"), "rb").read()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k) if not hasattr(f, "write") else f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, out)])
    assert "No space left" in err and "last.pth" in err
    assert open(os.path.join(out, "last.pth"), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_unwritable_run_dir(fake_fmnist, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, str(blocker / "run"))])
    assert str(blocker / "run") in err


# ------------------------------------------------------------------ 6. dead workers

def test_dead_ddp_worker_ends_the_job(long_fmnist, tmp_path):
    out = str(tmp_path / "run")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(tiny_overrides(long_fmnist, out, **{"train.epochs": 50, "data.batch_size": 8}))[1:]]
    proc = subprocess.Popen(cmd, env={**ENV, "MMVIT_DIST_TIMEOUT_S": "60"}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_output(proc, "epoch 0 5/")
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        os.kill(int(children[1]), signal.SIGKILL)
        start = time.time()
        proc.communicate(timeout=180)
        assert proc.returncode != 0
        assert time.time() - start < 180
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
