"""One epoch of training and one pass of evaluation (DeiT's engine.py, in our terms).

An optimizer step reads like nanoGPT's (``Trainer._forward_backward`` then ``Trainer._step``):
``accum_steps`` micro-batches forward and backward (DDP syncs gradients on the last one only),
then the update. Nothing on that path waits for the device: the loss, the gradient norm and
whether the step was good are summed on the device (``EpochSums``), and a step whose loss or
gradients are not finite is skipped by the update itself (fused AdamW's ``engine.optim.step_if``,
or the fp16 GradScaler). At every ``train.log_every``-th step and at the end of the epoch the host
reads those sums once (``Trainer._check``): it logs and applies the non-finite policy.

Stop requests (``engine.signals``) ride each step's loss all-reduce, so every rank learns of any
rank's request with no collective of its own; the host reads that agreement one step late
(``_Votes``), from a copy the device made when it finished the previous step, so the wait never
covers the step the device is running, and all ranks stop after the same step.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from . import distributed as dist
from .checkpoint import restore_rng_state
from .config import OptimConfig, TrainConfig
from .errors import NonFiniteLossError
from .logger import Progress
from .optim import clip_groups, step_if
from .signals import Halt, Interrupted, StopSignals, shielded_batches

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def epoch_steps(train: TrainConfig, num_batches: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` batches: ``train.accum_steps`` batches each,
    at most ``train.max_steps_per_epoch``."""
    steps = num_batches // train.accum_steps
    return steps if train.max_steps_per_epoch is None else min(steps, train.max_steps_per_epoch)


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
    """``stats`` is the epoch's log row (None when it ``halt``-ed: all ranks stopped after step
    ``steps_done``, maybe the last); ``sums`` and ``steps_done`` are what a mid-epoch checkpoint
    stores."""

    stats: Optional[Dict[str, float]]
    halt: Halt
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
        self.values = {f: torch.tensor(self.last[f], dtype=torch.float64, device=device) for f in self.FIELDS}

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, good: torch.Tensor, fatal: torch.Tensor,
            epoch_step: int) -> None:
        v, skipped = self.values, ~good
        v["loss"] += torch.where(good, loss, 0.0)
        v["grad_norm"] += torch.where(good, grad_norm.double(), 0.0)
        v["good"] += good.double()
        v["skipped"] += skipped.double()
        v["fatal"] += fatal.double()
        v["consecutive"] = (v["consecutive"] + 1) * skipped
        v["first_fatal"] = torch.where((v["first_fatal"] == 0) & fatal, float(epoch_step), v["first_fatal"])

    def read(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(the sums now, what was added since the last read), in one host read."""
        now = dict(zip(self.FIELDS, torch.stack([self.values[f] for f in self.FIELDS]).tolist()))
        since = {f: now[f] - self.last[f] for f in self.FIELDS}
        self.last = now
        return now, since


def _votes(halt: Halt, like: torch.Tensor) -> torch.Tensor:
    """This rank's ``halt`` as counts [signal, failure] (float64, on ``like``'s device): summed over
    ranks they say how many asked for each. Filled on the device, so no host-to-device copy."""
    return torch.stack([like.new_full((), float(halt == h), dtype=torch.float64)
                        for h in (Halt.SIGNAL, Halt.FAILURE)])


def _agreed(counts: List[float]) -> Halt:
    signal_votes, failure_votes = counts
    return Halt.FAILURE if failure_votes > 0 else Halt.SIGNAL if signal_votes > 0 else Halt.NONE


def agree(halt: Halt, info: "dist.DistInfo") -> Halt:
    """Every rank's ``halt`` combined (one all-reduce), for the points between steps."""
    return _agreed(dist.all_reduce_sum(_votes(halt, torch.zeros((), device=info.device))).tolist())


class _Votes:
    """The ranks' summed stop votes of each step, read by the host one step later: the device
    copies them to pinned memory right after the step's all-reduce and records an event; by the
    next step the host waits at most for that event, never for the step the device is running."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.view = np.zeros(2)  # what the host reads: host memory
        self.host = torch.from_numpy(self.view)
        if cuda:
            self.host = self.host.pin_memory()  # page-locked, for the asynchronous copy
            self.view = self.host.numpy()
        self.ready = torch.cuda.Event() if cuda else None
        self.posted = False

    def exchange(self, votes: torch.Tensor) -> Halt:
        """Post this step's summed ``votes`` (on the device); return the previous step's agreement."""
        previous = Halt.NONE
        if self.posted:
            if self.ready is not None:
                self.ready.synchronize()
            previous = _agreed(self.view.tolist())
        self.host.copy_(votes, non_blocking=True)
        if self.ready is not None:
            self.ready.record()
        self.posted = True
        return previous


class Trainer:
    """The optimizer step and its bookkeeping for one run: built once, then one
    ``train_one_epoch`` call per epoch. ``state`` is updated in place."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable,
                 lr_schedule: Callable[[int], float], state: TrainState, info: "dist.DistInfo", train: TrainConfig,
                 optim: OptimConfig, scaler: Optional[torch.amp.GradScaler] = None, ema=None,
                 mixup_fn: Optional[Callable] = None):
        """``train`` and ``optim``: the run config's sections, whose keys the loop reads (``train.amp``,
        ``train.accum_steps``, ``train.log_every``, the non-finite policy, ``optim.clip_grad``)."""
        self.model, self.optimizer, self.criterion, self.lr_schedule = model, optimizer, criterion, lr_schedule
        self.state, self.info, self.train, self.optim = state, info, train, optim
        self.scaler, self.ema, self.mixup_fn = scaler, ema, mixup_fn
        self.module = unwrap_model(model)  # without DDP / torch.compile: what the EMA follows
        # without clipping one group in the model's order (the norm's float32 sum depends on it)
        self.grad_groups = clip_groups(self.module) if optim.clip_grad else [list(model.parameters())]
        self.lr = lr_schedule(max(0, state.step - 1))  # the last step's: an epoch resumed after it reports it
        self.first_step = True  # of this job: compiles under torch.compile; nothing of it to save yet

    def train_one_epoch(self, loader, epoch: int, start: Optional[EpochStart] = None,
                        stop: Optional[StopSignals] = None,
                        on_log: Optional[Callable[[Dict[str, float], int], None]] = None) -> EpochResult:
        """Train for one epoch, or for its rest from a mid-epoch checkpoint's ``start`` (``loader``
        then yields the batches from there on: ``data.set_epoch``'s ``start_batch``). If any rank's
        ``stop`` asks to halt, every rank ends the epoch one or two steps later, after the same step,
        with ``halt`` set; the job's first step is an ``immediate`` window (``Interrupted``)."""
        self.model.train()
        steps = epoch_steps(self.train, len(loader))
        done = start.steps_done if start else 0
        sums = EpochSums(self.info.device, start.sums if start else None, self.state.consecutive_skips)
        batches = shielded_batches(loader)
        if start is not None and start.rng is not None:
            restore_rng_state(start.rng)  # the streams as they were after the steps already done
        votes = _Votes(self.info.device)
        progress = Progress(steps, f"epoch {epoch}", self.info.is_main, start=done)
        for k in range(done + 1, steps + 1):
            with stop.immediate() if stop is not None and self.first_step else contextlib.nullcontext():
                loss, images = self._forward_backward(batches)
                step_votes = self._step(loss, sums, k, stop.halt() if stop is not None else Halt.NONE)
            self.first_step = False
            progress.count(images * self.info.world_size)
            halt = votes.exchange(step_votes)
            if k % self.train.log_every == 0 or k == steps or halt:
                self._check(sums, epoch, k, progress, on_log)
            if halt:
                return EpochResult(None, halt, k, sums.last)
        totals = sums.last
        if totals["good"] == 0:
            raise NonFiniteLossError(
                f"every optimizer step of epoch {epoch} was skipped (non-finite loss or gradients); stopping "
                "before its evaluation and checkpoint. Lower optim.lr or enable optim.clip_grad")
        stats = {"train_loss": totals["loss"] / totals["good"], "lr": self.lr,
                 "grad_norm": totals["grad_norm"] / totals["good"], "train_img_per_s": progress.images_per_second,
                 "skipped_steps": int(totals["skipped"])}
        return EpochResult(stats, Halt.NONE, steps, totals)

    def _forward_backward(self, batches: Iterator) -> Tuple[torch.Tensor, int]:
        """``accum_steps`` micro-batches forward and backward (DDP syncs the gradients on the last
        one only). Returns this rank's mean loss over them, on the device, and its image count."""
        device, accum = self.info.device, self.train.accum_steps
        losses, images_seen = [], 0
        for micro in range(accum):
            images, target = next(batches)
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if self.mixup_fn is not None:
                images, target = self.mixup_fn(images, target)
            last = micro == accum - 1
            no_sync = self.model.no_sync if self.info.distributed and hasattr(self.model, "no_sync") else None
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(device, self.train.amp):
                    loss = self.criterion(self.model(images), target)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(loss.detach())
            images_seen += images.shape[0]
        return torch.stack(losses).mean(), images_seen

    def _step(self, loss: torch.Tensor, sums: EpochSums, epoch_step: int, halt: Halt) -> torch.Tensor:
        """After the backward passes: this step's LR, unscaling (fp16), the gradient norm (clipped),
        the update unless the loss or the gradients are not finite, the EMA; the step goes into ``sums``.
        Returns the ranks' summed stop votes (this rank's: ``halt``), on the device."""
        self.lr = self.lr_schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        reduced = dist.all_reduce_sum(torch.cat([loss.double().reshape(1), _votes(halt, loss)]))
        mean_loss = reduced[0] / self.info.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = grad_norm_(self.grad_groups, self.optim.clip_grad)
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
        return reduced[1:]

    def _update(self, good: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped if unscale_ found inf/NaN gradients (a NaN loss makes them)
            self.scaler.update()
        else:
            step_if(self.optimizer, good)

    def _check(self, sums: EpochSums, epoch: int, epoch_step: int, progress: Progress, on_log) -> None:
        """A log step (or the step training stops after), the loop's one host read of the device:
        read the sums, apply the non-finite policy, log the steps since the last log step."""
        now, since = sums.read()
        step = self.state.step
        if now["fatal"] and self.train.nonfinite == "stop":
            first = int(now["first_fatal"])
            raise NonFiniteLossError(
                f"non-finite loss or gradients at epoch {epoch}, step {step - epoch_step + first} ({first} of the "
                "epoch); stopping all ranks. Lower optim.lr, enable optim.clip_grad, or set train.nonfinite=skip")
        if now["consecutive"] >= self.train.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{int(now['consecutive'])} optimizer steps in a row were skipped (non-finite loss or gradients) "
                f"up to epoch {epoch}, step {step}; stopping (train.max_consecutive_skips="
                f"{self.train.max_consecutive_skips}). Lower optim.lr or enable optim.clip_grad")
        self.state.consecutive_skips = int(now["consecutive"])
        good = since["good"]
        loss = since["loss"] / good if good else math.nan
        grad_norm = since["grad_norm"] / good if good else math.nan
        progress.show(epoch_step, loss=loss, lr=self.lr)
        if on_log is not None:
            on_log({"train/loss": loss, "train/lr": self.lr, "train/grad_norm": grad_norm,
                    "train/img_per_s": progress.images_per_second, "train/skipped_steps": since["skipped"]}, step)


def grad_norm_(groups: Sequence[Sequence[torch.Tensor]], clip: Optional[float]) -> torch.Tensor:
    """The L2 norm of the gradients of all parameters in ``groups``, on the device, from foreach
    kernels; with ``clip`` each group's gradients are scaled down in place to that norm on their
    own (``engine.optim.clip_groups``: the modulators apart from the rest)."""
    if not clip:
        grads = [p.grad for group in groups for p in group if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    with_grads = [[p for p in group if p.grad is not None] for group in groups]
    norms = [torch.nn.utils.clip_grad_norm_(group, clip, foreach=True) for group in with_grads if group]
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: "dist.DistInfo", amp: str = "none",
             on_batch: Optional[Callable[[], None]] = None, ema_model: Optional[nn.Module] = None,
             stop: Optional[StopSignals] = None) -> Optional[Dict[str, Any]]:
    """Exact top-1/top-5/loss over the whole dataset: each rank sees a disjoint shard (no
    padding), and sums are all-reduced, so the count equals the dataset size.
    ``on_batch`` runs after each batch's forward (eval.py reduces recorded attention there).
    ``ema_model`` is evaluated on the same decoded batches (one pass over the data); its
    metrics are under ``"ema"``. With ``stop`` the pass is an ``immediate`` window: a signal ends
    it at once, and if any rank's did (the final all-reduce carries the votes), the result is None."""
    nets = [model] if ema_model is None else [model, ema_model]
    for net in nets:
        net.eval()
    device = info.device
    sums = torch.zeros(len(nets), 4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    halt = Halt.NONE
    try:
        with stop.immediate() if stop is not None else contextlib.nullcontext():
            for images, target in shielded_batches(loader):
                images = images.to(device, non_blocking=True)
                target = target.to(device, non_blocking=True)
                for j, net in enumerate(nets):
                    with autocast(device, amp):
                        logits = net(images).float()
                    if on_batch is not None and j == 0:
                        on_batch()
                    sums[j] += _batch_sums(logits, target)
    except Interrupted:
        halt = Halt.SIGNAL
    totals = dist.all_reduce_sum(torch.cat([sums.flatten(), _votes(halt, sums)])).tolist()
    if _agreed(totals[-2:]):
        return None
    results = [_metrics(totals[4 * j: 4 * j + 4]) for j in range(len(nets))]
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
