"""Run-level plumbing for train.py: the run directory (its lock, a fresh start, the resolved
config), the full training state in and out, seeding and wrappers."""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import yaml

from . import distributed as dist
from .checkpoint import (
    FORMAT_VERSION, capture_rng_state, find_resume_checkpoint, load_checkpoint, pid_alive,
)
from .config import KEYS, RETIRED_KEYS, Config, config_to_dict, dump_config, resolve_config
from .errors import UserError, write_error
from .logger import console, truncate_jsonl
from .loop import EpochStart, TrainState
from .optim import load_optimizer_state


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_run_dir(cfg) -> str:
    """Refuse to mix runs of different configs in ``train.output_dir``; writes nothing."""
    run_dir = cfg.train.output_dir
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(cfg_path) and cfg.train.resume != "none" and not cfg.train.allow_config_change:
        _check_same_experiment(cfg, cfg_path)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"train.output_dir: {run_dir} exists and is not a directory")
    return run_dir


def _check_same_experiment(cfg, cfg_path: str) -> None:
    with open(cfg_path) as f:
        old = yaml.safe_load(f) or {}
    old.pop("resolved", None)
    # a key the old file lacks (written before the key existed) had its default value then; one
    # the schema no longer has changed no result
    old_flat = {k: v for k, v in {**_flatten(config_to_dict(Config())), **_flatten(old)}.items()
                if k not in RETIRED_KEYS}
    new_flat = _flatten(config_to_dict(cfg))
    changed = sorted(k for k in set(old_flat) | set(new_flat)  # a key not declared resumable changes results
                     if not (k in KEYS and KEYS[k].resumable) and old_flat.get(k) != new_flat.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in changed[:8])
        raise UserError(
            f"{cfg_path} holds a run with a different config ({diffs}). Use another train.output_dir, "
            "or pass train.allow_config_change=true to continue it anyway, or train.resume=none to start over"
        )


def training_state(*, cfg, model: nn.Module, ema, optimizer, scaler, epoch: int, state: TrainState,
                   best: Dict[str, Any], classes: Optional[Sequence[str]], epoch_step: int = 0,
                   epoch_sums: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """The checkpoint dict (format in engine/checkpoint.py). ``epoch`` is the last completed epoch;
    ``epoch_step`` > 0 marks a mid-epoch checkpoint (written when a stop signal arrived) holding
    that many optimizer steps of epoch ``epoch + 1``, with their ``epoch_sums`` so that the resumed
    epoch's log row averages over all its steps. ``classes``: the training set's class names by
    label (eval.py checks a split against them). Collective (gathers every rank's RNG state): call
    it on every rank."""
    return {
        "model": model.state_dict(),
        "model_ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": state.step,
        "epoch_step": epoch_step,
        "epoch_sums": dict(epoch_sums) if epoch_step else None,
        "consecutive_skips": state.consecutive_skips,
        "best": dict(best),
        "rng": gather_rng_states(),
        "config": dump_config(cfg),
        "classes": list(classes) if classes is not None else None,
        "format_version": FORMAT_VERSION,
    }


@dataclass
class Resume:
    """Where training starts: the checkpoint it resumes (``path`` None: a fresh run), the loop
    state, the first epoch, the best metric so far, and for a mid-epoch checkpoint where in
    ``start_epoch`` it stopped (``epoch_start``)."""

    path: Optional[str] = None
    checkpoint: Optional[Dict[str, Any]] = None
    state: TrainState = field(default_factory=TrainState)
    start_epoch: int = 0
    best: Dict[str, Any] = field(default_factory=lambda: {"metric": "val_top1", "value": None, "epoch": None})
    epoch_start: Optional[EpochStart] = None

    def finished(self, epochs: int) -> bool:
        return self.path is not None and self.start_epoch >= epochs

    def where(self) -> str:
        """Where the resumed run starts, for the console."""
        if self.epoch_start:
            return f"epoch {self.start_epoch}, step {self.epoch_start.steps_done} of it; global step {self.state.step}"
        return f"end of epoch {self.start_epoch - 1}; global step {self.state.step}"


def find_resume(cfg, run_dir: str, info: dist.DistInfo) -> Resume:
    """Read the checkpoint ``train.resume`` (auto | none | path) means; nothing is written."""
    path = find_resume_checkpoint(cfg.train.resume, run_dir)
    if path is None:
        return Resume()
    ckpt = load_checkpoint(path)
    try:
        epoch, epoch_step = int(ckpt["epoch"]), int(ckpt.get("epoch_step") or 0)
        state = TrainState(step=int(ckpt["step"]), consecutive_skips=int(ckpt.get("consecutive_skips") or 0))
        best = dict(ckpt["best"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot resume from {path}: not a training checkpoint ({type(e).__name__}: {e})") from None
    start = None
    if epoch_step:
        sums = ckpt.get("epoch_sums") or {}
        start = EpochStart(epoch_step, {k: float(v) for k, v in sums.items()}, rank_rng_state(ckpt.get("rng"), info))
    return Resume(path, ckpt, state, epoch + 1, best, start)


def restore_training_state(resume: Resume, model, ema, optimizer, scaler) -> None:
    """Load the resumed checkpoint's weights, EMA, optimizer and scaler state (then drop it from
    memory); a checkpoint of another model or optimizer is refused with one line."""
    ckpt, path = resume.checkpoint, resume.path
    if ckpt is None:
        return
    try:
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["model_ema"] if ckpt.get("model_ema") else ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())[:400]
        raise UserError(f"cannot resume from {path}: it does not match this model/optimizer ({detail})") from None
    resume.checkpoint = None


class RunLock:
    """One training run at a time in a run directory. Rank 0 holds an exclusive ``flock`` on
    ``<run_dir>/.lock``, which the OS releases when the process dies (a crashed run's lock is
    simply taken over), and writes its PID and host into it for the message a second run prints.

    On file systems without ``flock`` (Lustre without ``-o flock``, some NFS mounts) the file's
    content decides: the holder rewrites "PID host time" every ``HEARTBEAT_S`` seconds. A lock of
    a dead process on this host is stale; one from another host is stale once its content has
    not changed for ``STALE_S`` seconds (a killed job's successor waits at most that long), and
    a live one, whose heartbeat moves meanwhile, is refused. The outcome is broadcast, so every
    rank stops with the same one-line error."""

    NAME = ".lock"
    HEARTBEAT_S = 10.0
    STALE_S = 60.0

    def __init__(self, run_dir: str, info: dist.DistInfo):
        self.run_dir, self.info = run_dir, info
        self.path = os.path.join(run_dir, self.NAME)
        self.fd: Optional[int] = None
        self._heartbeat: Optional[threading.Thread] = None
        self._stop_beating = threading.Event()

    def __enter__(self) -> "RunLock":
        error = None
        if self.info.is_main:
            try:
                self._acquire()
            except UserError as e:
                error = str(e)
        error = dist.broadcast_object(error)
        if error:
            raise UserError(error)
        return self

    def _acquire(self) -> None:
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"train.output_dir: cannot create {self.run_dir}: {e.strerror or e}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from None
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _lock_owner(_read_lock(self.path))
                os.close(fd)
                raise UserError(self._busy(owner)) from None
            except OSError:  # no flock here: the content decides
                flocked = False
                try:
                    self._wait_until_stale()
                except UserError:
                    os.close(fd)
                    raise
            try:  # the holder may have removed the file between our open and our lock: retry then
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        try:
            self._beat()
        except OSError as e:
            self.__exit__()
            raise write_error(self.path, e) from None
        if not flocked:
            self._heartbeat = threading.Thread(target=self._beat_until_released, name="run-lock-heartbeat",
                                               daemon=True)
            self._heartbeat.start()

    def _wait_until_stale(self) -> None:
        """Without flock: return once the lock file is free or stale, raise if a live run holds it."""
        text = _read_lock(self.path)
        owner = _lock_owner(text)
        if owner is None:
            return
        pid, host, beat = owner
        if host == socket.gethostname():
            if pid_alive(pid):
                raise UserError(self._busy(owner))
            return
        if beat is not None and time.time() - beat > self.STALE_S:
            return
        console(f"{self.path}: held by PID {pid} on {host}, and this file system has no flock; waiting up to "
                f"{self.STALE_S:.0f} s to see whether its heartbeat goes on")
        deadline = time.monotonic() + self.STALE_S
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.STALE_S / 10))
            if _read_lock(self.path) != text:
                raise UserError(self._busy(owner))
        # unchanged for STALE_S: its writer is gone

    def _beat(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n".encode(), 0)
        os.fsync(self.fd)  # other hosts see the content only once it is on the server

    def _beat_until_released(self) -> None:
        while not self._stop_beating.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a missed beat is retried; STALE_S spans several
                self._beat()

    def _busy(self, owner: Optional[Tuple[int, str, Optional[float]]]) -> str:
        who = f"PID {owner[0]} on {owner[1]}" if owner else f"the holder of {self.path}"
        return (f"train.output_dir {self.run_dir} is in use by another training run ({who}); wait for it "
                "to end or choose another train.output_dir")

    def __exit__(self, *exc) -> None:
        if self._heartbeat is not None:
            self._stop_beating.set()
            self._heartbeat.join()
            self._heartbeat = None
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # before unlocking: a newcomer then re-creates it (see _acquire)
            os.close(self.fd)
            self.fd = None


def _read_lock(path: str) -> str:
    """A lock file's content, read afresh (a new open sees another host's writes on NFS)."""
    try:
        with open(path, errors="replace") as f:
            return f.read(256)
    except OSError:
        return ""


def _lock_owner(text: str) -> Optional[Tuple[int, str, Optional[float]]]:
    """(PID, host, heartbeat time or None) written in a lock file, or None if it holds nothing readable."""
    fields = text.split()
    if len(fields) not in (2, 3) or not fields[0].isdigit():
        return None
    try:
        beat = float(fields[2]) if len(fields) == 3 else None
    except ValueError:
        beat = None
    return int(fields[0]), fields[1], beat


PREVIOUS = "previous"


def prepare_run_dir(cfg, resume: Resume, info: dist.DistInfo) -> None:
    """Under the run lock, on rank 0: start the logs over for ``train.resume=none`` (the previous
    run's files move to ``previous/<time>/``, kept, not mixed in) or drop the log rows after the
    resumed checkpoint; then write the resolved config."""
    run_dir = cfg.train.output_dir
    if info.is_main:
        try:
            if cfg.train.resume == "none":
                moved = _set_previous_run_aside(run_dir)
                if moved:
                    console(f"train.resume=none: the previous run's files are now in {moved}")
            else:
                truncate_jsonl(os.path.join(run_dir, "log.jsonl"), resume.start_epoch - 1)
            text = yaml.safe_dump(resolve_config(cfg, info.world_size), sort_keys=False)
            cfg_path = os.path.join(run_dir, "config.yaml")
            with open(cfg_path + ".tmp", "w") as f:
                f.write(text)
            os.replace(cfg_path + ".tmp", cfg_path)
        except OSError as e:
            raise UserError(f"train.output_dir: cannot write {run_dir}: {e.strerror or e}") from None
    dist.barrier()


def _set_previous_run_aside(run_dir: str) -> Optional[str]:
    names = sorted(n for n in os.listdir(run_dir) if n not in (RunLock.NAME, PREVIOUS))
    if not names:
        return None
    base = os.path.join(run_dir, PREVIOUS, time.strftime("%Y%m%d-%H%M%S"))
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(run_dir, name), os.path.join(dest, name))
    return dest


def gather_rng_states() -> Dict[str, Any]:
    """Every rank's RNG state (a mid-epoch resume restores each rank's own stream)."""
    state = capture_rng_state()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return {"ranks": states}
    return {"ranks": [state]}


def rank_rng_state(rng: Optional[Dict[str, Any]], info: dist.DistInfo) -> Optional[Dict[str, Any]]:
    """This rank's saved RNG state; with another world size the streams cannot line up, so none."""
    ranks = (rng or {}).get("ranks")
    if not ranks or len(ranks) != info.world_size:
        console("note: the checkpoint's RNG streams were saved with another world size; the resumed "
                "epoch continues with fresh streams", info.is_main)
        return None
    return ranks[info.rank]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed the training loop's RNGs from (seed, epoch, rank) at the start of each epoch, so that
    an epoch replays identically after a resume on every rank, whatever ran before it (the data's
    augmentation has seeds of its own: ``data.SeededBatchSampler``)."""
    s = (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def wrap_model(model: nn.Module, cfg, info: dist.DistInfo) -> nn.Module:
    """DDP across processes, then optionally torch.compile."""
    wrapped = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def epoch_record(epoch: int, step: int, train_stats: Dict[str, float], val: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``log.jsonl`` line (``val``: ``evaluate``'s result, the EMA's under ``"ema"``)."""
    record: Dict[str, Any] = {"epoch": epoch, "step": step, **train_stats}
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                      val_images=val["num_images"])
        if "ema" in val:
            ema = val["ema"]
            record.update(val_loss_ema=ema["loss"], val_top1_ema=ema["top1"], val_top5_ema=ema["top5"])
    return record


def set_matmul_precision(tf32: bool, device: torch.device) -> None:
    """``train.tf32``: float32 matmuls and cuDNN convolutions (the patch embedding) on CUDA run on
    TF32 tensor cores (Ampere and newer), or in full float32; CPU runs stay IEEE float32 (exact).
    Both switches are set: cuDNN allows TF32 by default, whatever the matmul precision says."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
