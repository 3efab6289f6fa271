"""One epoch of training and one pass of evaluation (DeiT's engine.py, in our terms)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist
from .logger import Progress
from .model import unwrap

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf (on any rank) and the policy is ``stop``."""


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@dataclass
class TrainState:
    """What the loop carries across steps: the global optimizer step and the skipped-step count."""

    step: int = 0
    skipped: int = 0


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix with label smoothing), in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def build_criterion(mixup_active: bool, smoothing: float) -> Callable:
    if mixup_active:
        return soft_target_cross_entropy
    return lambda logits, target: F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    lr_schedule: Callable[[int], float],
    state: TrainState,
    info: "dist.DistInfo",
    epoch: int,
    *,
    amp: str = "none",
    scaler: Optional[torch.amp.GradScaler] = None,
    mixup_fn: Optional[Callable] = None,
    ema=None,
    accum_steps: int = 1,
    clip_grad: Optional[float] = None,
    max_steps: Optional[int] = None,
    nonfinite: str = "stop",
    log_every: int = 50,
    on_step: Optional[Callable[[Dict[str, float], int], None]] = None,
    skip_steps: int = 0,
    rng_after_skip: Optional[Dict] = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Dict[str, float]:
    """Train for one epoch; ``state.step`` counts optimizer steps globally (the LR is a function
    of it). Micro-batches before each optimizer step skip DDP's gradient sync (``no_sync``).

    Resuming mid-epoch: the first ``skip_steps`` optimizer steps' batches are drawn but not
    trained on (their augmentation replays as before), then ``rng_after_skip`` is restored.
    ``stop_requested`` (a signal arrived) is agreed on by all ranks after every step; the epoch
    then ends early with ``interrupted`` set and ``steps_done`` telling where.
    Returns the epoch's mean loss (over ranks), last lr, mean grad norm and img/s."""
    model.train()
    device = info.device
    steps = len(loader) // accum_steps
    if max_steps is not None:
        steps = min(steps, max_steps)
    progress = Progress(steps, f"epoch {epoch}", log_every, info.is_main)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    counted, grad_norms = 0, []
    lr = lr_schedule(state.step)
    optimizer.zero_grad(set_to_none=True)
    micro_losses = []
    interrupted = False
    steps_done = skip_steps
    for i, (images, target) in enumerate(loader):
        if i >= steps * accum_steps:
            break
        if i < skip_steps * accum_steps:
            if i + 1 == skip_steps * accum_steps and rng_after_skip is not None:
                from .checkpoint import restore_rng_state

                restore_rng_state(rng_after_skip)
            continue
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        sync = (i + 1) % accum_steps == 0
        no_sync = model.no_sync() if info.distributed and not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with autocast(device, amp):
                loss = criterion(model(images), target)
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        micro_losses.append(loss.detach())
        if not sync:
            continue

        lr = lr_schedule(state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.stack(micro_losses).mean()
        micro_losses = []
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = _grad_norm(model, clip_grad)
        bad = not (math.isfinite(step_loss.item()) and math.isfinite(grad_norm))
        # one collective per step: the mean loss over ranks (for the log) and the two flags
        # that every rank must agree on (non-finite somewhere, a stop signal somewhere)
        agreed = dist.all_reduce_sum(torch.stack([
            step_loss.double(), torch.tensor(float(bad), device=device, dtype=torch.float64),
            torch.tensor(float(stop_requested()), device=device, dtype=torch.float64)]))
        step_loss = agreed[0] / info.world_size
        bad, stop = bool(agreed[1] > 0), bool(agreed[2] > 0)
        if bad:
            if nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss or gradients at epoch {epoch}, step {state.step} "
                    f"(batch {i + 1} of the epoch, loss {step_loss.item():.4g}, grad norm {grad_norm:.4g}); "
                    "stopping all ranks. Lower optim.lr, enable optim.clip_grad, or set train.nonfinite=skip."
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # lowers the fp16 scale after the inf/NaN it saw
            state.skipped += 1
            state.step += 1
            steps_done += 1
            if stop:
                interrupted = True
                break
            continue
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unwrap(model))
        state.step += 1
        steps_done += 1
        loss_sum += step_loss.double()
        counted += 1
        grad_norms.append(grad_norm)
        progress.update(steps_done, images.shape[0] * accum_steps * info.world_size,
                        loss=step_loss.item(), lr=lr)
        if on_step is not None:
            on_step({"train/loss": step_loss.item(), "train/lr": lr, "train/grad_norm": grad_norm,
                                 "train/img_per_s": progress.images_per_second}, state.step)
        if stop:
            interrupted = True
            break
    return {
        "train_loss": loss_sum.item() / counted if counted else float("nan"),
        "lr": lr,
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        "train_img_per_s": progress.images_per_second,
        "skipped_steps": state.skipped,
        "interrupted": interrupted,
        "steps_done": steps_done,
    }


def _grad_norm(model: nn.Module, clip: Optional[float]) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])))


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: "dist.DistInfo", amp: str = "none",
             log_every: int = 0, desc: str = "eval",
             on_batch: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Exact top-1/top-5/loss over the whole dataset: each rank sees a disjoint shard (no
    padding), and sums are all-reduced, so the count equals the dataset size.
    ``on_batch`` runs after each batch's forward (eval.py reduces recorded attention there)."""
    model.eval()
    device = info.device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, n
    progress = Progress(len(loader), desc, log_every or max(1, len(loader)), info.is_main and log_every > 0)
    for i, (images, target) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        if on_batch is not None:
            on_batch()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top.eq(target[:, None])
        sums += torch.stack([
            F.cross_entropy(logits, target, reduction="sum").double(),
            hit[:, :1].sum().double(),
            hit.any(dim=-1).sum().double(),
            torch.tensor(float(target.shape[0]), device=device, dtype=torch.float64),
        ])
        progress.update(i + 1, images.shape[0] * info.world_size)
    sums = dist.all_reduce_sum(sums)
    n = sums[3].item()
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "num_images": 0}
    return {"loss": sums[0].item() / n, "top1": 100.0 * sums[1].item() / n,
            "top5": 100.0 * sums[2].item() / n, "num_images": int(n)}
