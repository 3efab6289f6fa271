"""Checkpoints: weights_only format, exact RNG state, atomic writes under failure, top-k
bookkeeping across restarts, and what ``train.resume`` resolves to (loading: test_weights.py)."""
import errno
import os
import random
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine import checkpoint as ck
from engine.checkpoint import (
    CheckpointManager, capture_rng_state, find_resume_checkpoint, load_checkpoint, restore_rng_state,
    save_checkpoint,
)
from engine.errors import UserError


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), float(np.random.standard_normal()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def _tiny_state(epoch: int, value: float = 0.0) -> dict:
    return {"model": {"w": torch.full((2,), float(epoch))}, "model_ema": None, "optimizer": {}, "scaler": None,
            "epoch": epoch, "step": 10 * epoch, "best": {"metric": "val_top1", "value": None, "epoch": None},
            "rng": {}, "config": "x: 1\n", "format_version": 1, "value": value}


def _files(d) -> set:
    return set(os.listdir(d))


# ---------------------------------------------------------------- RNG

def test_rng_state_restores_exactly_through_a_weights_only_file(tmp_path):
    random.gauss(0, 1)              # leaves a cached gaussian in python's generator
    np.random.standard_normal()     # and in numpy's legacy one
    state = capture_rng_state()
    expected = _draws()
    _draws()                        # move every generator on
    save_checkpoint({"rng": state}, tmp_path / "rng.pth")
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert _draws() == expected


def test_cuda_rng_state_is_the_ranks_own_and_goes_to_its_current_device(monkeypatch):
    """Each rank saves the stream of its own device only (no context on the others' GPUs) and a
    resumed rank restores it onto whatever device it has now: a requeued job that binds its GPUs
    differently gives every rank its own stream back, not that of the device with its old index."""
    streams = {5: torch.full((8,), 5, dtype=torch.uint8), 0: torch.zeros(8, dtype=torch.uint8)}
    device, restored = {"index": 5}, []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device["index"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device_="cuda": streams[device["index"]].clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every GPU's stream"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append((index, state)))
    state = capture_rng_state()
    assert len(state["cuda"]) == 1 and torch.equal(state["cuda"][0], streams[5])
    device["index"] = 0   # the requeued job put this rank on GPU 0
    restore_rng_state(state)
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], streams[5])


# ---------------------------------------------------------------- save / load

def test_round_trip_with_model_and_adamw_state_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "model_ema": None, "optimizer": opt.state_dict(), "scaler": None,
             "epoch": 3, "step": 42, "best": {"metric": "val_top1", "value": 81.2, "epoch": 2},
             "rng": capture_rng_state(), "config": "optim:\n  lr: 0.01\n", "format_version": 1}
    path = tmp_path / "ck.pth"
    save_checkpoint(state, path)
    raw = torch.load(path, weights_only=True)          # the contract itself
    loaded = load_checkpoint(path)
    assert raw.keys() == loaded.keys() == state.keys()
    assert loaded["best"] == state["best"] and loaded["step"] == 42 and loaded["config"] == state["config"]

    model2 = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(loaded["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_save_refuses_values_that_weights_only_cannot_load(tmp_path):
    path = tmp_path / "ck.pth"
    with pytest.raises(TypeError, match=r"\['best'\]\['value'\].*numpy"):
        save_checkpoint({"best": {"value": np.float64(80.0)}}, path)
    assert not path.exists()


class _FullDiskFile:
    """An open file whose writes fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.budget:
            self.f.write(bytes(memoryview(data).cast("B")[: self.budget]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk_after(budget):
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _FullDiskFile(f, budget) if "w" in mode else f
    return fake_open


def test_disk_full_mid_write_keeps_previous_file_and_names_path(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.setattr(ck, "open", _full_disk_after(2000), raising=False)
    with pytest.raises(UserError, match="No space left on device") as e:
        save_checkpoint({"model": {"w": torch.ones(100_000)}, "epoch": 2}, path)
    assert str(path) in str(e.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert _files(tmp_path) == {"last.pth"}  # the partial temp file is gone


def test_failed_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(ck.os, "replace", refuse)
    with pytest.raises(UserError, match=f"cannot write {path}: Permission denied"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert _files(tmp_path) == {"last.pth"}


# ---------------------------------------------------------------- CheckpointManager

def test_top_k_best_and_last_across_saves_and_a_rebuilt_manager(tmp_path):
    values = [10.0, 30.0, 20.0, 25.0, 5.0]
    mgr = CheckpointManager(tmp_path, keep_top_k=2, metric="val_top1", mode="max", is_main=True)
    for epoch, v in enumerate(values):
        mgr.save(_tiny_state(epoch, v), epoch, v)
    assert _files(tmp_path) == {"last.pth", "best.pth", "topk.json",
                                "checkpoint-epoch0001.pth", "checkpoint-epoch0003.pth"}
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 4
    assert load_checkpoint(tmp_path / "checkpoint-epoch0003.pth")["value"] == 25.0
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["epoch"] == 1 and best["best"] == {"metric": "val_top1", "value": 30.0, "epoch": 1}
    assert load_checkpoint(tmp_path / "last.pth")["best"] == best["best"]

    # a new job: the ranking continues from topk.json
    mgr = CheckpointManager(tmp_path, keep_top_k=2, metric="val_top1", mode="max", is_main=True)
    assert mgr.best == {"metric": "val_top1", "value": 30.0, "epoch": 1}
    mgr.save(_tiny_state(5, 27.0), 5, 27.0)
    assert {f for f in _files(tmp_path) if f.startswith("checkpoint")} == {
        "checkpoint-epoch0001.pth", "checkpoint-epoch0005.pth"}
    assert load_checkpoint(tmp_path / "best.pth")["epoch"] == 1     # 27 < 30: best untouched
    mgr.save(_tiny_state(6, 31.0), 6, 31.0)
    assert load_checkpoint(tmp_path / "best.pth")["best"]["value"] == 31.0
    assert load_checkpoint(tmp_path / "checkpoint-epoch0001.pth")["epoch"] == 1  # hard links never alias
    assert {f for f in _files(tmp_path) if f.startswith("checkpoint")} == {
        "checkpoint-epoch0006.pth", "checkpoint-epoch0001.pth"}


def test_manager_min_mode_no_metric_epochs_and_rewind(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_top_k=1, metric="val_loss", mode="min", is_main=True)
    for epoch, v in enumerate([3.0, 1.0, None, 2.0]):
        mgr.save(_tiny_state(epoch), epoch, v)
    assert {f for f in _files(tmp_path) if f.startswith("checkpoint")} == {"checkpoint-epoch0001.pth"}
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 3
    assert load_checkpoint(tmp_path / "best.pth")["best"] == {"metric": "val_loss", "value": 1.0, "epoch": 1}
    # resumed from an older checkpoint: the epochs after it are forgotten, their files removed
    mgr.save(_tiny_state(0), 0, 4.0)
    assert {f for f in _files(tmp_path) if f.startswith("checkpoint")} == {"checkpoint-epoch0000.pth"}
    assert mgr.history == {0: 4.0}


def test_manager_on_other_ranks_writes_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_top_k=3, is_main=False)
    mgr.save(_tiny_state(0), 0, 50.0)
    mgr.save_in_background(_tiny_state(1), 1, 60.0)
    mgr.wait()
    assert not (tmp_path / "run").exists()


def test_manager_disk_full_keeps_previous_checkpoints(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_top_k=2, is_main=True)
    mgr.save(_tiny_state(0, 50.0), 0, 50.0)
    before = _files(tmp_path)
    monkeypatch.setattr(ck, "open", _full_disk_after(100), raising=False)
    with pytest.raises(UserError, match="last.pth: No space left on device"):
        mgr.save(_tiny_state(1, 60.0), 1, 60.0)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    assert load_checkpoint(tmp_path / "best.pth")["best"]["value"] == 50.0


def test_background_save_lets_training_go_on_and_reports_its_error(tmp_path, monkeypatch):
    """The epoch checkpoint is written in a thread from a copy taken at the call: the caller goes
    on (other ranks are not held by rank 0's disk) and may change its tensors meanwhile; the
    next save or ``wait`` joins the write and raises what it met."""
    release, started, real_save = threading.Event(), threading.Event(), ck.save_checkpoint

    def slow_save(state, path):
        started.set()
        assert release.wait(60)
        real_save(state, path)

    monkeypatch.setattr(ck, "save_checkpoint", slow_save)
    mgr = CheckpointManager(tmp_path, keep_top_k=1, is_main=True)
    state = _tiny_state(0, 50.0)
    mgr.save_in_background(state, 0, 50.0)
    assert started.wait(60) and not (tmp_path / "last.pth").exists()   # still writing, the caller is free
    state["model"]["w"].add_(100.0)                                      # training moves the weights on
    release.set()
    mgr.wait()
    assert load_checkpoint(tmp_path / "last.pth")["model"]["w"].tolist() == [0.0, 0.0]  # the copy at the call
    assert load_checkpoint(tmp_path / "best.pth")["best"]["value"] == 50.0

    assert not mgr.failed()
    monkeypatch.setattr(ck, "open", _full_disk_after(100), raising=False)
    mgr.save_in_background(_tiny_state(1, 60.0), 1, 60.0)
    deadline = time.time() + 60
    while not mgr.failed():   # told at once, without waiting for (or raising in) the caller
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(UserError, match="last.pth: No space left on device"):
        mgr.wait()
    monkeypatch.undo()
    mgr.wait()  # reported once
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0


def test_manager_removes_temp_files_of_dead_writers(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".last.pth.tmp-{dead.pid}").write_bytes(b"partial")
    (tmp_path / f".last.pth.tmp-{os.getpid()}").write_bytes(b"ours")  # a live writer's file stays
    CheckpointManager(tmp_path, keep_top_k=1, is_main=True)
    assert _files(tmp_path) == {f".last.pth.tmp-{os.getpid()}"}


# ---------------------------------------------------------------- resume

def test_find_resume_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert find_resume_checkpoint("auto", run) is None              # no run dir yet
    run.mkdir()
    assert find_resume_checkpoint("auto", run) is None              # empty run dir
    mgr = CheckpointManager(run, keep_top_k=3, is_main=True)
    for epoch in range(3):
        mgr.save(_tiny_state(epoch), epoch, float(epoch))
    last = str(run / "last.pth")
    assert find_resume_checkpoint("auto", run) == last
    assert find_resume_checkpoint("none", run) is None
    assert find_resume_checkpoint(str(run), tmp_path) == last       # a run dir means its last.pth
    explicit = str(run / "checkpoint-epoch0001.pth")
    assert find_resume_checkpoint(explicit, tmp_path / "other") == explicit
    with pytest.raises(UserError, match="train.resume: .*missing.pth does not exist"):
        find_resume_checkpoint(str(run / "missing.pth"), run)

    # last.pth torn by an old non-atomic writer, newest epoch file too: fall back to epoch 1
    os.remove(run / "best.pth")
    (run / "last.pth").write_bytes(b"\x50\x4b\x03\x04 torn")
    (run / "checkpoint-epoch0002.pth").write_bytes(b"torn as well")
    with pytest.warns(UserWarning, match="last.pth is truncated.*resuming from .*checkpoint-epoch0001.pth"):
        assert find_resume_checkpoint("auto", run) == explicit

    for name in os.listdir(run):
        if name.startswith("checkpoint"):
            os.remove(run / name)
    with pytest.raises(UserError, match="last.pth is truncated.*train.resume=none"):
        find_resume_checkpoint("auto", run)


def test_best_and_top_k_share_last_pth_bytes_via_links_or_copies(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "linked", keep_top_k=1, is_main=True)
    mgr.save(_tiny_state(0, 1.0), 0, 1.0)
    linked = tmp_path / "linked"
    assert os.stat(linked / "best.pth").st_ino == os.stat(linked / "last.pth").st_ino  # no second write

    def no_links(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    monkeypatch.setattr(ck.os, "link", no_links)
    mgr = CheckpointManager(tmp_path / "copied", keep_top_k=1, is_main=True)
    for epoch, v in enumerate([1.0, 2.0, 0.5]):
        mgr.save(_tiny_state(epoch, v), epoch, v)
    copied = tmp_path / "copied"
    assert _files(copied) == {"last.pth", "best.pth", "topk.json", "checkpoint-epoch0001.pth"}
    assert load_checkpoint(copied / "best.pth")["epoch"] == 1
    assert load_checkpoint(copied / "checkpoint-epoch0001.pth")["epoch"] == 1
    assert load_checkpoint(copied / "last.pth")["epoch"] == 2
