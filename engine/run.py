"""Run-level plumbing for train.py: the run directory, full training state in and out, wrappers."""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import yaml

from . import distributed as dist
from .checkpoint import capture_rng_state, find_resume_checkpoint, load_checkpoint
from .config import config_to_dict, dump_config, resolve_config
from .errors import UserError
from .logger import console, truncate_jsonl
from .loop import TrainState
from .optim import load_optimizer_state

FORMAT_VERSION = 1

# Keys that may change between the jobs of one run (paths, throughput knobs, stopping);
# anything else means a different experiment and is refused unless train.allow_config_change.
_RESUMABLE_CHANGES = {
    "data.root", "data.workers", "data.pin_memory", "data.eval_batch_size",
    "train.resume", "train.allow_config_change", "train.log_every", "train.stop_after_epochs",
    "train.compile", "train.device", "train.dist_backend", "train.output_dir", "train.keep_top_k",
    "train.log_modulators", "train.plot_modulators", "model.attn_backend", "model.grad_checkpointing",
    "train.cpu_malloc", "optim.impl",
}


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


def write_run_config(cfg, info: dist.DistInfo) -> None:
    """Create the run directory (rank 0) and write the resolved config into it."""
    run_dir = cfg.train.output_dir
    if info.is_main:
        cfg_path = os.path.join(run_dir, "config.yaml")
        text = yaml.safe_dump(resolve_config(cfg, info.world_size), sort_keys=False)
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(cfg_path + ".tmp", "w") as f:
                f.write(text)
            os.replace(cfg_path + ".tmp", cfg_path)
        except OSError as e:
            raise UserError(f"train.output_dir: cannot write {run_dir}: {e.strerror}") from None
    dist.barrier()


def _check_same_experiment(cfg, cfg_path: str) -> None:
    with open(cfg_path) as f:
        old = yaml.safe_load(f) or {}
    old.pop("resolved", None)
    old_flat, new_flat = _flatten(old), _flatten(config_to_dict(cfg))
    changed = sorted(k for k in set(old_flat) | set(new_flat)
                     if k not in _RESUMABLE_CHANGES and old_flat.get(k) != new_flat.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in changed[:8])
        raise UserError(
            f"{cfg_path} holds a run with a different config ({diffs}). Use another train.output_dir, "
            "or pass train.allow_config_change=true to continue it anyway, or train.resume=none to start over"
        )


def training_state(cfg, model: nn.Module, ema, optimizer, scaler, epoch: int, state: TrainState,
                   best: Dict[str, Any], epoch_step: int = 0,
                   classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The checkpoint dict of DESIGN §4 (loadable with ``torch.load(weights_only=True)``).
    ``epoch`` is the last completed epoch; ``epoch_step`` > 0 marks a mid-epoch checkpoint
    (written on SIGTERM/SIGUSR1) holding that many optimizer steps of epoch ``epoch + 1``.
    ``classes``: the training set's class names by label (eval.py checks a split against them)."""
    return {
        "model": model.state_dict(),
        "model_ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": state.step,
        "epoch_step": epoch_step,
        "skipped_steps": state.skipped,
        "best": dict(best),
        "rng": gather_rng_states(),
        "config": dump_config(cfg),
        "classes": list(classes) if classes is not None else None,
        "format_version": FORMAT_VERSION,
    }


@dataclass
class Resume:
    """Where training starts: the loop state, the first epoch, the best metric so far, and for
    a mid-epoch checkpoint the steps of ``start_epoch`` already done and the RNG state after them."""

    state: TrainState = field(default_factory=TrainState)
    start_epoch: int = 0
    best: Dict[str, Any] = field(default_factory=lambda: {"metric": "val_top1", "value": None, "epoch": None})
    skip_steps: int = 0
    rng: Optional[Dict[str, Any]] = None


def restore_training_state(cfg, run_dir: str, model, ema, optimizer, scaler, info: dist.DistInfo) -> Resume:
    """Resume per ``train.resume`` (auto | none | path)."""
    path = find_resume_checkpoint(cfg.train.resume, run_dir)
    if path is None:
        return Resume()
    ckpt = load_checkpoint(path)
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
    epoch, epoch_step = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
    if info.is_main:
        truncate_jsonl(os.path.join(run_dir, "log.jsonl"), epoch)
    where = f"epoch {epoch + 1}, step {epoch_step} of it" if epoch_step else f"end of epoch {epoch}"
    console(f"resumed from {path} ({where}; global step {ckpt['step']})", info.is_main)
    return Resume(state=TrainState(step=int(ckpt["step"]), skipped=int(ckpt.get("skipped_steps", 0))),
                  start_epoch=epoch + 1, best=dict(ckpt["best"]), skip_steps=epoch_step,
                  rng=rank_rng_state(ckpt.get("rng"), info) if epoch_step else None)


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


class StopSignals:
    """SIGTERM / SIGUSR1 (SLURM preemption, ``scancel``, torchrun shutdown) ask training to stop
    after the current step; train.py then saves a mid-epoch checkpoint and exits cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_epoch(seed: int, epoch: int, rank: int, loaders) -> None:
    """Reseed every RNG from (seed, epoch, rank) at the start of each epoch, so that an epoch
    replays identically after a resume on every rank, whatever ran before it."""
    s = (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    for loader in (loaders.train, loaders.val):
        gen = getattr(loader, "generator", None)
        if gen is not None:
            gen.manual_seed(s)


def wrap_model(model: nn.Module, cfg, info: dist.DistInfo) -> nn.Module:
    """DDP across processes, then optionally torch.compile."""
    wrapped = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def epoch_record(epoch: int, step: int, train_stats: Dict[str, float], val: Optional[Dict[str, float]],
                 val_ema: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """One ``log.jsonl`` line."""
    record: Dict[str, Any] = {"epoch": epoch, "step": step, **train_stats}
    if val is not None:
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                      val_images=val["num_images"])
    if val_ema is not None:
        record.update(val_loss_ema=val_ema["loss"], val_top1_ema=val_ema["top1"], val_top5_ema=val_ema["top5"])
    return record
