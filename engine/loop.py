"""One epoch of training and one pass of evaluation (DeiT's engine.py, in our terms).

An optimizer step reads like nanoGPT's (``Trainer._forward_backward`` then ``Trainer._step``):
``accum_steps`` micro-batches forward and backward (DDP syncs gradients on the last one only),
then the update. Nothing on that path waits for the device: the loss, the gradient norm and
whether the step was good are summed on the device (``EpochSums``), and a step whose loss or
gradients are not finite is skipped by the update itself (``found_inf`` of fused AdamW and of
the fp16 GradScaler). At every ``train.log_every``-th step and at the end of the epoch the host
reads those sums once (``Trainer._check``): it logs, applies the non-finite policy, and agrees
with the other ranks on stopping for a signal.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from . import distributed as dist
from .checkpoint import restore_rng_state
from .config import OptimConfig, TrainConfig
from .logger import Progress
from .signals import shielded_batches

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Training diverged (on any rank): a non-finite loss under ``train.nonfinite=stop``, a whole
    epoch of skipped steps, or ``train.max_consecutive_skips`` skipped steps in a row."""


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix with label smoothing), in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def build_criterion(mixup_active: bool, smoothing: float) -> Callable:
    if mixup_active:
        return soft_target_cross_entropy
    return lambda logits, target: F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


@dataclass(frozen=True)
class LoopOptions:
    """The training loop's knobs: the run config's ``train`` and ``optim`` sections, each key read by
    its name (``opts.amp`` is ``train.amp``, ``opts.clip_grad`` is ``optim.clip_grad``; the sections
    share no name), declared once, with default and check, in engine/config.py."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def from_config(cls, cfg) -> "LoopOptions":
        return cls(cfg.train, cfg.optim)

    def __getattr__(self, name: str) -> Any:  # reached only for names the class itself lacks
        if name not in ("train", "optim") and not name.startswith("__"):
            for section in (self.train, self.optim):
                if hasattr(section, name):
                    return getattr(section, name)
        raise AttributeError(f"LoopOptions has no {name!r} (no train.{name} or optim.{name} key)")

    def steps_per_epoch(self, num_batches: int) -> int:
        steps = num_batches // self.accum_steps
        return steps if self.max_steps_per_epoch is None else min(steps, self.max_steps_per_epoch)


@dataclass
class TrainState:
    """What carries over from epoch to epoch (and into checkpoints): the global optimizer step
    (the LR is a function of it) and the skipped steps in a row so far."""

    step: int = 0
    consecutive_skips: int = 0


@dataclass
class EpochStart:
    """A mid-epoch checkpoint's place in its epoch: optimizer steps done, their sums
    (``EpochSums.read``) and this rank's RNG state after them (None: keep the current streams)."""

    steps_done: int
    sums: Dict[str, float]
    rng: Optional[Dict[str, Any]] = None


@dataclass
class EpochResult:
    """``stats`` is the epoch's log row (None when ``interrupted``); ``sums`` and ``steps_done``
    are what a mid-epoch checkpoint stores."""

    stats: Optional[Dict[str, float]]
    interrupted: bool
    steps_done: int
    sums: Dict[str, float]


class EpochSums:
    """Running sums over one epoch's optimizer steps, on the device in float64, so that adding a
    step never waits for it: ``loss`` (the mean over ranks) and ``grad_norm`` over good steps; the
    numbers of ``good``, ``skipped`` and ``fatal`` steps (fatal: what stops training under
    ``train.nonfinite=stop``); ``consecutive`` skipped steps (carried across epochs); the epoch
    step (1-based) of the ``first_fatal`` one, 0 if none. ``read`` is one host sync."""

    FIELDS = ("loss", "grad_norm", "good", "skipped", "fatal", "consecutive", "first_fatal")

    def __init__(self, device: torch.device, saved: Optional[Dict[str, float]] = None, consecutive: int = 0):
        start = {**dict.fromkeys(self.FIELDS, 0.0), "consecutive": float(consecutive), **(saved or {})}
        self.last = {f: float(start[f]) for f in self.FIELDS}  # the host's copy as of the last read
        self.values = torch.tensor([self.last[f] for f in self.FIELDS], dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, good: torch.Tensor, fatal: torch.Tensor,
            epoch_step: int) -> None:
        v, skipped = self.values, ~good
        v[:5] += torch.stack([torch.where(good, loss, 0.0), torch.where(good, grad_norm.double(), 0.0),
                              good.double(), skipped.double(), fatal.double()])
        v[5] = (v[5] + 1) * skipped
        v[6] = torch.where((v[6] == 0) & fatal, float(epoch_step), v[6])

    def read(self, extra: torch.Tensor) -> Tuple[Dict[str, float], Dict[str, float], List[float]]:
        """(the sums now, what was added since the last read, ``extra``'s values), in one host read."""
        values = torch.cat([self.values, extra.to(self.values)]).tolist()
        now = dict(zip(self.FIELDS, values))
        since = {f: now[f] - self.last[f] for f in self.FIELDS}
        self.last = now
        return now, since, values[len(self.FIELDS):]


class Trainer:
    """The optimizer step and its bookkeeping for one run: built once, then one
    ``train_one_epoch`` call per epoch. ``state`` is updated in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable,
                 lr_schedule: Callable[[int], float], state: TrainState, info: "dist.DistInfo", opts: LoopOptions,
                 scaler: Optional[torch.amp.GradScaler] = None, ema=None, mixup_fn: Optional[Callable] = None):
        self.model, self.optimizer, self.criterion, self.lr_schedule = model, optimizer, criterion, lr_schedule
        self.state, self.info, self.opts = state, info, opts
        self.scaler, self.ema, self.mixup_fn = scaler, ema, mixup_fn
        self.params = list(model.parameters())  # the model's order: the norm's float32 sum depends on it
        self.module = unwrap_model(model)  # without DDP / torch.compile: what the EMA follows
        self.fused = any(group.get("fused") for group in optimizer.param_groups)
        self.lr = lr_schedule(state.step)

    def train_one_epoch(self, loader, epoch: int, start: Optional[EpochStart] = None,
                        stop_requested: Callable[[], bool] = lambda: False,
                        on_log: Optional[Callable[[Dict[str, float], int], None]] = None) -> EpochResult:
        """Train for one epoch, or for its rest from a mid-epoch checkpoint's ``start``. If some rank
        was asked to stop, the epoch ends at the next log step with ``interrupted`` set."""
        self.model.train()
        steps = self.opts.steps_per_epoch(len(loader))
        done = start.steps_done if start else 0
        sums = EpochSums(self.info.device, start.sums if start else None, self.state.consecutive_skips)
        batches = _replay(shielded_batches(loader), done * self.opts.accum_steps, start.rng if start else None)
        progress = Progress(steps, f"epoch {epoch}", self.info.is_main, start=done)
        for k in range(done + 1, steps + 1):
            loss, images = self._forward_backward(batches)
            self._step(loss, sums, k)
            progress.count(images * self.info.world_size)
            if k % self.opts.log_every == 0 or k == steps:
                if self._check(sums, epoch, k, progress, stop_requested, on_log) and k < steps:
                    return EpochResult(None, True, k, sums.last)
        totals = sums.last
        if totals["good"] == 0:
            raise NonFiniteLossError(
                f"every optimizer step of epoch {epoch} was skipped (non-finite loss or gradients); stopping "
                "before its evaluation and checkpoint. Lower optim.lr or enable optim.clip_grad")
        stats = {"train_loss": totals["loss"] / totals["good"], "lr": self.lr,
                 "grad_norm": totals["grad_norm"] / totals["good"], "train_img_per_s": progress.images_per_second,
                 "skipped_steps": int(totals["skipped"])}
        return EpochResult(stats, False, steps, totals)

    def _forward_backward(self, batches: Iterator) -> Tuple[torch.Tensor, int]:
        """``accum_steps`` micro-batches forward and backward (DDP syncs the gradients on the last
        one only). Returns this rank's mean loss over them, on the device, and its image count."""
        device, accum = self.info.device, self.opts.accum_steps
        losses, images_seen = [], 0
        for micro in range(accum):
            images, target = next(batches)
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if self.mixup_fn is not None:
                images, target = self.mixup_fn(images, target)
            last = micro == accum - 1
            no_sync = self.model.no_sync if self.info.distributed and hasattr(self.model, "no_sync") else None
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(device, self.opts.amp):
                    loss = self.criterion(self.model(images), target)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(loss.detach())
            images_seen += images.shape[0]
        return torch.stack(losses).mean(), images_seen

    def _step(self, loss: torch.Tensor, sums: EpochSums, epoch_step: int) -> None:
        """After the backward passes: this step's LR, unscaling (fp16), the gradient norm (clipped),
        the update unless the loss or the gradients are not finite, the EMA; the step goes into ``sums``."""
        self.lr = self.lr_schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        mean_loss = dist.all_reduce_sum(loss.double().reshape(1))[0] / self.info.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = grad_norm_(self.params, self.opts.clip_grad)
        loss_ok, grads_ok = torch.isfinite(mean_loss), torch.isfinite(grad_norm)
        good = loss_ok & grads_ok
        # fp16: non-finite gradients of a finite loss are the GradScaler's overflow, a skipped step
        # that lowers the scale (as in DeiT and torch); any other non-finite value is a divergence
        fatal = ~loss_ok if self.scaler is not None else ~good
        self._update(good)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module, good)
        sums.add(mean_loss, grad_norm, good, fatal, epoch_step)
        self.state.step += 1

    def _update(self, good: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped if unscale_ found inf/NaN gradients (a NaN loss makes them)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = (~good).float()  # fused AdamW skips the update and its step count
            self.optimizer.step()
            del self.optimizer.found_inf
        elif bool(good):  # the for-loop and foreach AdamW cannot skip on the device: one host sync a step
            self.optimizer.step()

    def _check(self, sums: EpochSums, epoch: int, epoch_step: int, progress: Progress,
               stop_requested: Callable[[], bool], on_log) -> bool:
        """A log step, the loop's one host sync: read the sums and whether any rank was asked to stop
        (one all-reduce), apply the non-finite policy, log the steps since the last log step.
        Returns True if training must stop for a signal."""
        stop = torch.full((1,), float(stop_requested()), dtype=torch.float64, device=self.info.device)
        now, since, (stop_votes,) = sums.read(dist.all_reduce_max(stop))
        step = self.state.step
        if now["fatal"] and self.opts.nonfinite == "stop":
            first = int(now["first_fatal"])
            raise NonFiniteLossError(
                f"non-finite loss or gradients at epoch {epoch}, step {step - epoch_step + first} ({first} of the "
                "epoch); stopping all ranks. Lower optim.lr, enable optim.clip_grad, or set train.nonfinite=skip")
        if now["consecutive"] >= self.opts.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{int(now['consecutive'])} optimizer steps in a row were skipped (non-finite loss or gradients) "
                f"up to epoch {epoch}, step {step}; stopping (train.max_consecutive_skips="
                f"{self.opts.max_consecutive_skips}). Lower optim.lr or enable optim.clip_grad")
        self.state.consecutive_skips = int(now["consecutive"])
        good = since["good"]
        loss = since["loss"] / good if good else math.nan
        grad_norm = since["grad_norm"] / good if good else math.nan
        progress.show(epoch_step, loss=loss, lr=self.lr)
        if on_log is not None:
            on_log({"train/loss": loss, "train/lr": self.lr, "train/grad_norm": grad_norm,
                    "train/img_per_s": progress.images_per_second, "train/skipped_steps": since["skipped"]}, step)
        return stop_votes > 0


def _replay(batches: Iterator, skip: int, rng: Optional[Dict[str, Any]]) -> Iterator:
    """Resuming mid-epoch: draw (and drop) the ``skip`` batches already trained on, so that the
    rest replays the same augmentation, then restore the RNG state saved after them."""
    for _ in range(skip):
        next(batches)
    if skip and rng is not None:
        restore_rng_state(rng)
    return batches


def grad_norm_(params: List[torch.Tensor], clip: Optional[float]) -> torch.Tensor:
    """The L2 norm of all gradients, on the device, from foreach kernels; with ``clip`` the
    gradients are scaled down to that norm in place."""
    grads = [p.grad for p in params if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(grads, clip, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: "dist.DistInfo", amp: str = "none",
             on_batch: Optional[Callable[[], None]] = None, ema_model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Exact top-1/top-5/loss over the whole dataset: each rank sees a disjoint shard (no
    padding), and sums are all-reduced, so the count equals the dataset size.
    ``on_batch`` runs after each batch's forward (eval.py reduces recorded attention there).
    ``ema_model`` is evaluated on the same decoded batches (one pass over the data); its
    metrics are under ``"ema"``."""
    nets = [model] if ema_model is None else [model, ema_model]
    for net in nets:
        net.eval()
    device = info.device
    sums = torch.zeros(len(nets), 4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    for images, target in shielded_batches(loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        for j, net in enumerate(nets):
            with autocast(device, amp):
                logits = net(images).float()
            if on_batch is not None and j == 0:
                on_batch()
            sums[j] += _batch_sums(logits, target)
    results = [_metrics(s) for s in dist.all_reduce_sum(sums).tolist()]
    if ema_model is not None:
        results[0]["ema"] = results[1]
    return results[0]


def _batch_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    # a row with a NaN/inf logit ranks its classes arbitrarily: it counts as a miss, never a hit
    hit = top.eq(target[:, None]) & torch.isfinite(logits).all(dim=-1, keepdim=True)
    return torch.stack([
        F.cross_entropy(logits, target, reduction="sum").double(),
        hit[:, :1].sum().double(),
        hit.any(dim=-1).sum().double(),
        torch.full((), float(target.shape[0]), dtype=torch.float64, device=logits.device),
    ])


def _metrics(sums: List[float]) -> Dict[str, float]:
    loss, top1, top5, n = sums
    if n == 0:
        return {"loss": math.nan, "top1": math.nan, "top5": math.nan, "num_images": 0}
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "num_images": int(n)}
