#!/usr/bin/env python
"""Train a MultiMax (or baseline) ViT with the DeiT recipe, from one CPU to many GPUs and nodes.

    python train.py                                    # the CPU quickstart (configs/quickstart.yaml)
    python train.py --config configs/deit_small_multimax.yaml optim.lr=5e-4 model.attn_normalizer=softmax
    torchrun --nproc_per_node=8 train.py --config configs/deit_small_multimax.yaml data.root=/data/imagenet

Trailing key.sub=value arguments override the config. --print-config prints the full config a
command line resolves to, each key with its meaning and allowed values (declared in
engine/config.py: ModelConfig, DataConfig, OptimConfig, TrainConfig; docs/CONFIGURATION.md).

The run directory is train.output_dir. Rerunning the same command resumes from its last.pth;
a finished run says so and changes nothing; train.resume=none starts over (the previous run's
files move to <output_dir>/previous/). Only one run at a time may use a run directory.

Exit codes: 0 done (or already finished); 2 a mistake in the input or a failed write, named on
one line; 3 training diverged (non-finite loss); 75 stopped with a resumable checkpoint on disk
(SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 during training, or train.stop_after_epochs): rerun the same
command to continue; 130 Ctrl-C before training began (128 + the signal's number for SIGTERM and
SIGUSR1): nothing was written. With MMVIT_EXIT_CODE_FILE set, the exit code train.py chose is
also written to that file (not for 128 + N: the signal may be a launcher ending it for another
process's exit), for a launcher whose own exit code can be a signal's (scripts/slurm.sbatch).
"""
from __future__ import annotations

import argparse
import os
import sys

from engine.errors import (
    EXIT_NONFINITE, EXIT_OK, EXIT_RESUMABLE, EXIT_SIGNAL_BASE, EXIT_USER_ERROR, NonFiniteLossError, UserError,
    write_error,
)
from engine.signals import Interrupted, StopSignals

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.yaml")
EXIT_CODE_FILE_ENV = "MMVIT_EXIT_CODE_FILE"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML config (default: configs/quickstart.yaml, the CPU demo on Fashion-MNIST)")
    p.add_argument("--print-config", action="store_true",
                   help="print the full resolved config (defaults <- file <- overrides) as YAML, each key "
                        "with its meaning, and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.epochs=10")
    return p.parse_args(argv)


def train(cfg, info, stop: StopSignals) -> int:
    """The whole run: data, model, optimiser, resume, then epochs of train → eval → checkpoint → log.
    Returns the exit code. ``stop``: the process's stop signals, still in their setup phase."""
    # imported here, once main() has the stop signals in place: a Ctrl-C while torch loads is then a
    # one-line exit 130, and --help and --print-config answer without loading torch
    import contextlib

    import torch

    from data import build_loaders, set_epoch
    from engine.checkpoint import LAST, CheckpointManager, save_checkpoint
    from engine.config import effective_lr
    from engine.logger import RunLogger, console
    from engine.loop import Trainer, agree, build_criterion, epoch_steps, evaluate
    from engine.model import EMA, build_model, built_model_config
    from engine.optim import build_optimizer, build_schedule, describe_groups
    from engine.run import (
        RunLock, check_run_dir, epoch_record, find_resume, prepare_run_dir, restore_training_state, seed_epoch,
        set_matmul_precision, training_state, wrap_model,
    )
    from engine.signals import Halt, protect_workers, start_compile_workers
    from models.multimax import modulators

    set_matmul_precision(cfg.train.tf32, info.device)
    loaders = build_loaders(cfg.data, cfg.model.img_size, info.rank, info.world_size, cfg.train.seed,
                            num_classes=cfg.model.num_classes)
    protect_workers(loaders.train, loaders.val)  # they must outlive a stop signal sent to the process group
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    model = build_model(cfg.model, loaders.info.num_classes, loaders.info.in_chans).to(info.device)
    cfg.model = built_model_config(cfg.model, model)  # config.yaml and checkpoints name the normalizers built
    run_dir = check_run_dir(cfg)  # nothing is written before data, model and resume are known good
    resume = find_resume(cfg, run_dir, info)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema else None
    lr = effective_lr(cfg, info.world_size)
    optimizer = build_optimizer(model, cfg.optim, lr)
    steps_per_epoch = epoch_steps(cfg.train, len(loaders.train))
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size {cfg.data.batch_size} × world size {info.world_size} × accum_steps "
                        f"{cfg.train.accum_steps} is larger than the training set ({len(loaders.train.dataset)} images)")
    schedule = build_schedule(cfg.optim, lr, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type) if cfg.train.amp == "fp16" else None
    restore_training_state(resume, model, ema, optimizer, scaler)  # refuses a checkpoint of another model
    if resume.finished(cfg.train.epochs):
        console(f"{run_dir}: already finished at epoch {resume.start_epoch - 1} (train.epochs={cfg.train.epochs}); "
                "nothing changed. train.resume=none starts it over", info.is_main)
        return EXIT_OK
    if resume.path is not None:
        console(f"resumed from {resume.path} ({resume.where()})", info.is_main)
    if cfg.train.compile:
        start_compile_workers()  # shielded from the stop signals, as the DataLoader workers are
    trainer = Trainer(model=wrap_model(model, cfg, info), optimizer=optimizer,
                      criterion=build_criterion(loaders.mixup_fn is not None, cfg.data.smoothing),
                      lr_schedule=schedule, state=resume.state, info=info, train=cfg.train, optim=cfg.optim,
                      scaler=scaler, ema=ema, mixup_fn=loaders.mixup_fn)
    state, best = trainer.state, resume.best

    def snapshot(epoch: int, steps_done: int = 0, sums=None):
        """The checkpoint after ``epoch`` (and ``steps_done`` optimizer steps of the next one, with their
        ``sums``). Collective: every rank calls it."""
        return training_state(cfg=cfg, model=model, ema=ema, optimizer=optimizer, scaler=scaler, epoch=epoch,
                              state=state, best=best, classes=loaders.info.classes, epoch_step=steps_done,
                              epoch_sums=sums)
    on_disk = f"{resume.path} is as this job found it ({resume.where()})" if resume.path else "nothing was trained yet"

    stop.defer()  # from here on a signal asks for a resumable checkpoint
    with RunLock(run_dir, info):
        prepare_run_dir(cfg, resume, info)
        logger = RunLogger(run_dir, info.is_main, cfg.train.tensorboard, purge_step=state.step + 1)
        checkpoints = CheckpointManager(run_dir, cfg.train.keep_top_k, metric="val_top1", mode="max",
                                        is_main=info.is_main)
        stop.watch(lambda: logger.failed() or checkpoints.failed())  # rank 0's failed write stops every rank
        groups = describe_groups(optimizer)
        console(f"run dir {run_dir} | world size {info.world_size} | device {info.device} | lr {lr:.3g} | "
                f"{steps_per_epoch} steps/epoch | params: " + ", ".join(
                    f"{k} {v['num_params']} ({v['num_tensors']} tensors, wd {v['weight_decay']})"
                    for k, v in groups.items()), info.is_main)
        logger.text("optimizer_groups", "\n".join(f"{k}: {', '.join(v['names'])}" for k, v in groups.items()))

        def finish(*writes) -> None:
            """The decision to exit is made: no signal changes it any more; rank 0's pending writes end
            (and a failed one fails every rank)."""
            stop.finish()
            _settle(info, checkpoints.wait, *writes, logger.close, logger.check)

        try:
            for epoch in range(resume.start_epoch, cfg.train.epochs):
                halt = agree(stop.halt(), info)  # one during evaluation, checkpointing or logging
                if halt:
                    finish()  # a failed write raises here
                    console(f"{stop.name}: stopped before epoch {epoch}; {on_disk}. Exit {EXIT_RESUMABLE}: rerun "
                            "the same command to resume", info.is_main)
                    return EXIT_RESUMABLE
                seed_epoch(cfg.train.seed, epoch, info.rank)
                start = resume.epoch_start if epoch == resume.start_epoch else None
                set_epoch(loaders, epoch, start_batch=start.steps_done * cfg.train.accum_steps if start else 0)
                result = trainer.train_one_epoch(loaders.train, epoch, start, stop, logger.scalars)
                halt, val = result.halt, None
                if not halt and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
                    val = evaluate(trainer.model, loaders.val, info, cfg.train.amp,
                                   ema_model=ema.module if ema is not None else None, stop=stop)
                    halt = Halt.SIGNAL if val is None else Halt.NONE
                if halt == Halt.FAILURE:
                    finish()  # raises rank 0's write error on every rank
                if halt:  # saved as a mid-epoch checkpoint, maybe after the last step: then it resumes at evaluation
                    ckpt = snapshot(epoch - 1, result.steps_done, result.sums)
                    finish(lambda: save_checkpoint(ckpt, os.path.join(run_dir, LAST)))
                    console(f"{stop.name}: saved {run_dir}/{LAST} at epoch {epoch}, step {result.steps_done} of "
                            f"{steps_per_epoch}. Exit {EXIT_RESUMABLE}: rerun the same command to resume", info.is_main)
                    return EXIT_RESUMABLE
                record = epoch_record(epoch, state.step, result.stats, val)
                metric = record.get("val_top1")
                if metric is not None and (best.get("value") is None or metric > best["value"]):
                    best = {"metric": "val_top1", "value": metric, "epoch": epoch}
                # the logs before the checkpoint: a rerun redoes an epoch whose row is missing, and
                # drops the rows past its checkpoint, so the two never disagree
                logger.log_epoch(record, state.step)
                if cfg.train.log_modulators:
                    logger.modulators(modulators(model), state.step, figure=cfg.train.plot_modulators)
                if agree(stop.halt(), info) == Halt.FAILURE:
                    finish()  # raises rank 0's write error on every rank
                checkpoints.save_in_background(snapshot(epoch), epoch, metric)
                on_disk = f"{run_dir}/{LAST} holds epoch {epoch}"
                console(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                        info.is_main)
                stop_after = cfg.train.stop_after_epochs
                if stop_after is not None and epoch + 1 - resume.start_epoch >= stop_after and epoch + 1 < cfg.train.epochs:
                    finish()
                    console(f"stopping after {stop_after} epoch(s) of this job (train.stop_after_epochs); {on_disk}. "
                            f"Exit {EXIT_RESUMABLE}: rerun the same command to resume", info.is_main)
                    return EXIT_RESUMABLE
            finish()
            return EXIT_OK
        except Interrupted as e:  # in the job's first step: its last.pth is as the job found it
            stop.finish()  # no collective here: the other ranks may be anywhere in that step
            console(f"{e.name}: stopped in this job's first step (which compiles under train.compile); {on_disk}. "
                    f"Exit {EXIT_RESUMABLE}: rerun the same command to resume", info.is_main)
            return EXIT_RESUMABLE
        finally:
            logger.close()
            with contextlib.suppress(UserError):  # on an error's way out: that error is the one to report
                checkpoints.wait()


def _settle(info, *writes) -> None:
    """Run rank 0's ``writes`` (a checkpoint, the logs' last flush), then hand their outcome to
    every rank, which waits for it: a failed write (a UserError naming the path) ends every rank
    with it, and no rank exits (and has its launcher end the job) before rank 0's files are whole."""
    from engine import distributed as dist

    error = None
    if info.is_main:
        try:
            for write in writes:
                write()
        except UserError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise UserError(error)


def main(argv=None, exiting: bool = False) -> int:
    """train.py's command line. ``exiting``: the process ends when this returns (train.py run as a
    script), so the stop signals stay ignored through interpreter shutdown instead of restored."""
    with StopSignals(restore=not exiting) as stop:
        try:
            return _main(argv, stop)
        except Interrupted as e:  # before training began
            return _fail(f"interrupted by {e.name} during setup; nothing was written", EXIT_SIGNAL_BASE + e.signum)
        finally:
            stop.finish()


def _main(argv, stop: StopSignals) -> int:
    args = parse_args(argv)
    from engine.config import dump_config, load_config

    info = None
    try:
        try:
            cfg = load_config(args.config, args.overrides)
            if args.print_config:
                print(dump_config(cfg, help=True), end="")
                return EXIT_OK
            from engine import distributed as dist

            info = dist.init_distributed(cfg.train.device, cfg.train.dist_backend)
            code = train(cfg, info, stop)
        except UserError as e:
            code = _fail(e, EXIT_USER_ERROR)
        except NonFiniteLossError as e:
            code = _fail(e, EXIT_NONFINITE)
        return _record_exit(code)
    finally:  # after the exit code is recorded: tearing the process group down may hang on a dead peer
        if info is not None:
            dist.cleanup()


def _record_exit(code: int) -> int:
    """Write ``code`` to $MMVIT_EXIT_CODE_FILE, if set (every rank the same, in the common case;
    replaced whole, so a reader never sees two ranks' writes mixed)."""
    path = os.environ.get(EXIT_CODE_FILE_ENV)
    if path:
        tmp = f"{path}.{os.uname().nodename}.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(f"{code}\n")
            os.replace(tmp, path)
        except OSError as e:
            print(f"train.py: warning: {write_error(path, e)}", file=sys.stderr)
    return code


def _fail(error, code: int) -> int:
    print(f"train.py: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(exiting=True))
