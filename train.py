#!/usr/bin/env python
"""Train a MultiMax (or baseline) ViT with the DeiT recipe, from one CPU to many GPUs and nodes.

    python train.py --config configs/quickstart.yaml
    torchrun --nproc_per_node=8 train.py --config configs/deit_small_multimax.yaml data.root=/data/imagenet
    python train.py --config configs/deit_small_multimax.yaml optim.lr=5e-4 model.attn_normalizer=softmax

Trailing ``key.sub=value`` arguments override the config. The run directory is
``train.output_dir``; an interrupted run resumes from its ``last.pth`` by default.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from engine import distributed as dist
from engine.checkpoint import CheckpointManager, save_checkpoint
from engine.cpu_alloc import apply_allocator_mode
from engine.config import effective_lr, load_config
from engine.errors import UserError
from engine.loop import NonFiniteLossError, build_criterion, evaluate, train_one_epoch
from engine.logger import RunLogger, console
from engine.model import EMA, build_model, built_model_config, unwrap
from engine.optim import build_optimizer, build_schedule, describe_groups
from engine.run import (
    StopSignals, check_run_dir, epoch_record, restore_training_state, seed_epoch, training_state, wrap_model,
    write_run_config,
)
from data import build_loaders, set_epoch
from models.multimax import modulators


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: the built-in quickstart defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.epochs=10")
    return p.parse_args(argv)


def train(cfg, info: dist.DistInfo) -> dict:
    """The whole run: data, model, optimiser, resume, then epochs of train → eval → checkpoint → log."""
    apply_allocator_mode(cfg.train.cpu_malloc, info.device.type)
    loaders = build_loaders(cfg.data, cfg.model.img_size, info.rank, info.world_size, cfg.train.seed,
                            num_classes=cfg.model.num_classes)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    model = build_model(cfg.model, loaders.info.num_classes, loaders.info.in_chans).to(info.device)
    cfg.model = built_model_config(cfg.model, model)  # config.yaml and checkpoints name the normalizers built
    run_dir = check_run_dir(cfg)  # nothing is written before data, model and resume are known good
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema else None
    lr = effective_lr(cfg, info.world_size)
    optimizer = build_optimizer(model, cfg.optim, lr)
    steps_per_epoch = len(loaders.train) // cfg.train.accum_steps
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size {cfg.data.batch_size} × world size {info.world_size} × accum_steps "
                        f"{cfg.train.accum_steps} is larger than the training set ({len(loaders.train.dataset)} images)")
    schedule = build_schedule(cfg.optim, lr, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type) if cfg.train.amp == "fp16" else None
    resume = restore_training_state(cfg, run_dir, model, ema, optimizer, scaler, info)
    write_run_config(cfg, info)
    checkpoints = CheckpointManager(run_dir, cfg.train.keep_top_k, metric="val_top1", mode="max", is_main=info.is_main)
    logger = RunLogger(run_dir, info.is_main)
    state, start_epoch, best = resume.state, resume.start_epoch, resume.best
    train_model = wrap_model(model, cfg, info)
    criterion = build_criterion(loaders.mixup_fn is not None, cfg.data.smoothing)

    groups = describe_groups(optimizer)
    console(f"run dir {run_dir} | world size {info.world_size} | device {info.device} | lr {lr:.3g} | "
            f"{steps_per_epoch} steps/epoch | params: " + ", ".join(
                f"{k} {v['num_params']} ({v['num_tensors']} tensors, wd {v['weight_decay']})" for k, v in groups.items()),
            info.is_main)
    logger.text("optimizer_groups", "\n".join(f"{k}: {', '.join(v['names'])}" for k, v in groups.items()))

    record = {}
    with StopSignals() as stop_signal:
        for epoch in range(start_epoch, cfg.train.epochs):
            seed_epoch(cfg.train.seed, epoch, info.rank, loaders)
            set_epoch(loaders, epoch)
            skip = resume.skip_steps if epoch == start_epoch else 0
            train_stats = train_one_epoch(
                train_model, loaders.train, optimizer, criterion, schedule, state, info, epoch,
                amp=cfg.train.amp, scaler=scaler, mixup_fn=loaders.mixup_fn, ema=ema,
                accum_steps=cfg.train.accum_steps, clip_grad=cfg.optim.clip_grad,
                max_steps=cfg.train.max_steps_per_epoch, nonfinite=cfg.train.nonfinite,
                log_every=cfg.train.log_every, on_step=logger.scalars,
                skip_steps=skip, rng_after_skip=resume.rng if skip else None, stop_requested=stop_signal,
            )
            if train_stats.pop("interrupted"):
                if info.is_main:
                    save_checkpoint(training_state(cfg, model, ema, optimizer, scaler, epoch - 1, state, best,
                                                   epoch_step=train_stats["steps_done"], classes=loaders.info.classes),
                                    os.path.join(run_dir, "last.pth"))
                console(f"signal {stop_signal.received}: saved {run_dir}/last.pth at epoch {epoch}, step "
                        f"{train_stats['steps_done']} of it; rerun the same command to resume", info.is_main)
                break
            train_stats.pop("steps_done")
            val = val_ema = None
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                val = evaluate(train_model, loaders.val, info, cfg.train.amp)
                if ema is not None:
                    val_ema = evaluate(ema.module, loaders.val, info, cfg.train.amp)
            record = epoch_record(epoch, state.step, train_stats, val, val_ema)
            metric = record.get("val_top1")
            if metric is not None and (best.get("value") is None or metric > best["value"]):
                best = {"metric": "val_top1", "value": metric, "epoch": epoch}
            checkpoints.save(training_state(cfg, model, ema, optimizer, scaler, epoch, state, best,
                                            classes=loaders.info.classes), epoch, metric)
            logger.log_epoch(record, state.step)
            if cfg.train.log_modulators:
                logger.modulators(modulators(unwrap(model)), state.step, figure=cfg.train.plot_modulators)
            console(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                    info.is_main)
            stop_after = cfg.train.stop_after_epochs
            if stop_after is not None and epoch + 1 - start_epoch >= stop_after and epoch + 1 < cfg.train.epochs:
                console(f"stopping after {stop_after} epoch(s) of this job (train.stop_after_epochs); "
                        f"rerun the same command to resume", info.is_main)
                break
    logger.close()
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    info = None
    try:
        cfg = load_config(args.config, args.overrides)
        info = dist.init_distributed(cfg.train.device, cfg.train.dist_backend)
        train(cfg, info)
        return 0
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    finally:
        if info is not None:
            dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
