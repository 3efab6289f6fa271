#!/usr/bin/env python
"""Train a MultiMax (or baseline) ViT with the DeiT recipe, from one CPU to many GPUs and nodes.

    python train.py                                    # the CPU quickstart (configs/quickstart.yaml)
    python train.py --config configs/deit_small_multimax.yaml optim.lr=5e-4 model.attn_normalizer=softmax
    torchrun --nproc_per_node=8 train.py --config configs/deit_small_multimax.yaml data.root=/data/imagenet

Trailing key.sub=value arguments override the config. --print-config prints the full config a
command line resolves to, each key with its meaning and allowed values (declared in
engine/config.py: ModelConfig, DataConfig, OptimConfig, TrainConfig; README.md "Configs").

The run directory is train.output_dir. Rerunning the same command resumes from its last.pth;
a finished run says so and changes nothing; train.resume=none starts over (the previous run's
files move to <output_dir>/previous/). Only one run at a time may use a run directory.

Exit codes: 0 done (or already finished); 2 a mistake in the input, named on one line;
3 training diverged (non-finite loss); 75 stopped by SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 after
saving a resumable checkpoint: rerun the same command to continue.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from data import build_loaders, set_epoch
from engine import distributed as dist
from engine.checkpoint import LAST, CheckpointManager, save_checkpoint
from engine.config import dump_config, effective_lr, load_config
from engine.errors import EXIT_NONFINITE, EXIT_OK, EXIT_RESUMABLE, EXIT_USER_ERROR, UserError
from engine.logger import RunLogger, console
from engine.loop import LoopOptions, NonFiniteLossError, Trainer, build_criterion, evaluate
from engine.model import EMA, build_model, built_model_config
from engine.optim import build_optimizer, build_schedule, describe_groups
from engine.run import (
    RunLock, check_run_dir, epoch_record, find_resume, prepare_run_dir, restore_training_state, seed_epoch,
    set_matmul_precision, training_state, wrap_model,
)
from engine.signals import StopSignals, protect_workers
from models.multimax import modulators

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML config (default: configs/quickstart.yaml, the CPU demo on Fashion-MNIST)")
    p.add_argument("--print-config", action="store_true",
                   help="print the full resolved config (defaults <- file <- overrides) as YAML, each key "
                        "with its meaning, and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.epochs=10")
    return p.parse_args(argv)


def train(cfg, info) -> int:
    """The whole run: data, model, optimiser, resume, then epochs of train → eval → checkpoint → log.
    Returns the exit code."""
    set_matmul_precision(cfg.train.tf32, info.device)
    loaders = build_loaders(cfg.data, cfg.model.img_size, info.rank, info.world_size, cfg.train.seed,
                            num_classes=cfg.model.num_classes)
    protect_workers(loaders.train, loaders.val)  # they must outlive a stop signal sent to the process group
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    model = build_model(cfg.model, loaders.info.num_classes, loaders.info.in_chans).to(info.device)
    cfg.model = built_model_config(cfg.model, model)  # config.yaml and checkpoints name the normalizers built
    run_dir = check_run_dir(cfg)  # nothing is written before data, model and resume are known good
    resume = find_resume(cfg, run_dir, info)
    if resume.finished(cfg.train.epochs):
        console(f"{run_dir}: already finished at epoch {resume.start_epoch - 1} (train.epochs={cfg.train.epochs}); "
                "nothing changed. train.resume=none starts it over", info.is_main)
        return EXIT_OK
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema else None
    lr = effective_lr(cfg, info.world_size)
    optimizer = build_optimizer(model, cfg.optim, lr)
    opts = LoopOptions.from_config(cfg)
    steps_per_epoch = opts.steps_per_epoch(len(loaders.train))
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size {cfg.data.batch_size} × world size {info.world_size} × accum_steps "
                        f"{cfg.train.accum_steps} is larger than the training set ({len(loaders.train.dataset)} images)")
    schedule = build_schedule(cfg.optim, lr, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type) if cfg.train.amp == "fp16" else None
    restore_training_state(resume, model, ema, optimizer, scaler, info)
    trainer = Trainer(wrap_model(model, cfg, info), optimizer, build_criterion(loaders.mixup_fn is not None,
                      cfg.data.smoothing), schedule, resume.state, info, opts, scaler, ema, loaders.mixup_fn)
    state, best = trainer.state, resume.best

    with RunLock(run_dir, info), StopSignals() as stop:
        prepare_run_dir(cfg, resume, info)
        logger = RunLogger(run_dir, info.is_main, purge_step=state.step + 1)
        checkpoints = CheckpointManager(run_dir, cfg.train.keep_top_k, metric="val_top1", mode="max",
                                        is_main=info.is_main)
        groups = describe_groups(optimizer)
        console(f"run dir {run_dir} | world size {info.world_size} | device {info.device} | lr {lr:.3g} | "
                f"{steps_per_epoch} steps/epoch | params: " + ", ".join(
                    f"{k} {v['num_params']} ({v['num_tensors']} tensors, wd {v['weight_decay']})"
                    for k, v in groups.items()), info.is_main)
        logger.text("optimizer_groups", "\n".join(f"{k}: {', '.join(v['names'])}" for k, v in groups.items()))
        try:
            for epoch in range(resume.start_epoch, cfg.train.epochs):
                if dist.any_rank_true(stop(), info):  # a signal during setup, evaluation or a checkpoint
                    checkpoints.wait()
                    console(f"{stop.name}: stopped before epoch {epoch}; {run_dir}/{LAST} holds epoch {epoch - 1}. "
                            f"Exit {EXIT_RESUMABLE}: rerun the same command to resume", info.is_main)
                    return EXIT_RESUMABLE
                seed_epoch(cfg.train.seed, epoch, info.rank, loaders)
                set_epoch(loaders, epoch)
                start = resume.epoch_start if epoch == resume.start_epoch else None
                result = trainer.train_one_epoch(loaders.train, epoch, start, stop, logger.scalars)
                if result.interrupted:
                    checkpoints.wait()  # the previous epoch's file first
                    ckpt = training_state(cfg, model, ema, optimizer, scaler, epoch - 1, state, best,  # on every rank
                                          epoch_step=result.steps_done, epoch_sums=result.sums,
                                          classes=loaders.info.classes)
                    if info.is_main:
                        save_checkpoint(ckpt, os.path.join(run_dir, LAST))
                    console(f"{stop.name}: saved {run_dir}/{LAST} at epoch {epoch}, step {result.steps_done} of "
                            f"{steps_per_epoch}. Exit {EXIT_RESUMABLE}: rerun the same command to resume", info.is_main)
                    dist.barrier()  # no rank leaves (and has its launcher end the job) before the file is whole
                    return EXIT_RESUMABLE
                val = None
                if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                    val = evaluate(trainer.model, loaders.val, info, cfg.train.amp,
                                   ema_model=ema.module if ema is not None else None)
                record = epoch_record(epoch, state.step, result.stats, val)
                metric = record.get("val_top1")
                if metric is not None and (best.get("value") is None or metric > best["value"]):
                    best = {"metric": "val_top1", "value": metric, "epoch": epoch}
                checkpoints.save_in_background(training_state(cfg, model, ema, optimizer, scaler, epoch, state, best,
                                                              classes=loaders.info.classes), epoch, metric)
                logger.log_epoch(record, state.step)
                if cfg.train.log_modulators:
                    logger.modulators(modulators(model), state.step, figure=cfg.train.plot_modulators)
                console(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                        info.is_main)
                stop_after = cfg.train.stop_after_epochs
                if stop_after is not None and epoch + 1 - resume.start_epoch >= stop_after and epoch + 1 < cfg.train.epochs:
                    console(f"stopping after {stop_after} epoch(s) of this job (train.stop_after_epochs); "
                            f"rerun the same command to resume", info.is_main)
                    break
            return EXIT_OK
        finally:
            logger.close()
            checkpoints.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        return _fail(e, EXIT_USER_ERROR)
    if args.print_config:
        print(dump_config(cfg, help=True), end="")
        return EXIT_OK
    info = None
    try:
        info = dist.init_distributed(cfg.train.device, cfg.train.dist_backend)
        return train(cfg, info)
    except UserError as e:
        return _fail(e, EXIT_USER_ERROR)
    except NonFiniteLossError as e:
        return _fail(e, EXIT_NONFINITE)
    except KeyboardInterrupt:  # Ctrl-C before training began (in training it is a stop signal)
        return _fail("interrupted during setup; no checkpoint was written", 130)
    finally:
        if info is not None:
            dist.cleanup()


def _fail(error, code: int) -> int:
    print(f"train.py: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
