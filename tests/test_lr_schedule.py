"""engine/optim.py's lr schedules: the DeiT presets' per-epoch cosine is timm's CosineLRScheduler as
DeiT builds and steps it, the per-step cosine stays available, and both resume exactly."""
import argparse
import os

import pytest
import torch
from timm.scheduler import CosineLRScheduler, create_scheduler

from engine.config import OptimConfig, effective_lr, load_config
from engine.logger import read_jsonl
from engine.optim import EpochCosineSchedule, LRSchedule, build_schedule
from helpers import ROOT, run_train, tiny_overrides

DEIT_PRESETS = [os.path.join(ROOT, "configs", f"deit_{size}_{kind}.yaml") for size in ("tiny", "small", "base")
                for kind in ("gap", "multimax")]
STEPS_PER_EPOCH = 1251  # ImageNet-1k at a global batch of 1024


def deit_args(lr: float) -> argparse.Namespace:
    """DeiT's main.py defaults for the schedule (github.com/facebookresearch/deit, main.py), with
    its linearly scaled lr (lr x global batch / 512)."""
    return argparse.Namespace(sched="cosine", epochs=300, lr=lr, lr_noise=None, lr_noise_pct=0.67,
                              lr_noise_std=1.0, warmup_lr=1e-6, min_lr=1e-5, decay_epochs=30, warmup_epochs=5,
                              cooldown_epochs=10, patience_epochs=10, decay_rate=0.1)


def deit_epoch_lrs(lr: float, epochs: int = 300):
    """The lr each epoch trains at in DeiT: timm's create_scheduler, then (main.py's loop) one
    ``lr_scheduler.step(epoch)`` after every epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler, _ = create_scheduler(deit_args(lr), optimizer)
    assert isinstance(scheduler, CosineLRScheduler)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch)
    return lrs


@pytest.mark.parametrize("path", DEIT_PRESETS, ids=os.path.basename)
def test_deit_presets_train_every_epoch_at_deits_lr(path):
    cfg = load_config(path)
    lr = effective_lr(cfg, world_size=8)
    schedule = build_schedule(cfg.optim, lr, cfg.train.epochs, STEPS_PER_EPOCH)
    want = deit_epoch_lrs(lr)
    assert len(want) == cfg.train.epochs == 300
    for epoch, expected in enumerate(want):
        first, last = epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH - 1
        assert schedule(first) == expected, epoch
        assert schedule(last) == schedule(first), epoch  # constant within the epoch
    assert want[0] == want[1] == 1e-6 and want[6] == pytest.approx(1e-3, rel=1e-3)


def test_the_per_step_cosine_differs_from_deits():
    """The comparison above has teeth: the per-step schedule (``optim.sched=cosine``) does not
    pass it (its warmup ends an epoch earlier and its cosine restarts after the warmup)."""
    want = deit_epoch_lrs(1e-3)
    per_step = build_schedule(OptimConfig(sched="cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5), 1e-3, 300,
                              STEPS_PER_EPOCH)
    assert isinstance(per_step, LRSchedule)
    gaps = [abs(per_step(e * STEPS_PER_EPOCH) / want[e] - 1) for e in range(300)]
    assert max(gaps) > 0.05


def test_epoch_schedule_without_warmup_and_past_the_cycle():
    s = EpochCosineSchedule(base_lr=1.0, epochs=10, steps_per_epoch=3, warmup_epochs=0, warmup_lr=0.0, min_lr=0.1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    timm_schedule = CosineLRScheduler(optimizer, t_initial=10, lr_min=0.1, warmup_t=0, warmup_lr_init=0.0)
    for epoch in range(12):  # two epochs past t_initial: lr_min, as timm's single cycle ends
        assert s(3 * epoch + 2) == optimizer.param_groups[0]["lr"], epoch
        timm_schedule.step(epoch)


def test_epoch_schedule_resumes_exactly(fake_fmnist, tmp_path):
    """train.py with optim.sched=cosine_epoch: the lr of each epoch follows the schedule, and a run
    stopped after an epoch and resumed logs the uninterrupted run's lrs and losses."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    extra = {"optim.sched": "cosine_epoch", "optim.warmup_epochs": 1, "optim.warmup_lr": 1e-4, "train.epochs": 3,
             "train.max_steps_per_epoch": 2, "data.max_val_samples": 8}
    run_train(tiny_overrides(fake_fmnist, full, **extra))
    run_train(tiny_overrides(fake_fmnist, split, **extra, **{"train.stop_after_epochs": 2}), rc=75)
    run_train(tiny_overrides(fake_fmnist, split, **extra))
    a, b = read_jsonl(os.path.join(full, "log.jsonl")), read_jsonl(os.path.join(split, "log.jsonl"))
    schedule = EpochCosineSchedule(base_lr=2e-3, epochs=3, steps_per_epoch=2, warmup_epochs=1,
                                   warmup_lr=1e-4, min_lr=1e-5)
    assert [r["lr"] for r in a] == [schedule.at_epoch(e) for e in range(3)]
    assert [r["lr"] for r in a][:2] == [1e-4, 1e-4]  # epochs 0 and 1 at warmup_lr, as in DeiT
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-6)
