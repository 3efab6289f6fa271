"""AdamW with DeiT's parameter groups, and the learning rate as a pure function of the step
(DeiT's per-epoch cosine, or a per-step cosine; ``optim.sched``).

Weight decay applies to matrices and convolution kernels only: every 1-D parameter (biases,
LayerNorm scales, every SegLU ``ranges``/``ts``) and the names the model lists in
``no_weight_decay()`` (``pos_embed``) go to the no-decay group.

Gradient clipping (``optim.clip_grad``) clips two groups on their own (``clip_groups``): the
network's parameters, and the SegLU modulators'.

AdamW runs fused where torch has the kernel for the parameters (floating point on CPU and CUDA):
one pass over all parameters instead of a handful of ops per parameter tensor, and a step whose
gradients are not finite is skipped on the device (``step_if``), so the loop never waits for
the GPU; elsewhere torch's default implementation (the same update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Union

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler

from models.multimax import modulators

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``, each with the parameter names it holds."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if p.ndim <= 1 or name in skip else decay
        group[0].append(name)
        group[1].append(p)
    return [
        {"name": "decay", "params": decay[1], "param_names": decay[0], "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay[1], "param_names": no_decay[0], "weight_decay": 0.0},
    ]


def clip_groups(model: nn.Module) -> List[List[nn.Parameter]]:
    """The groups ``optim.clip_grad`` clips, each to the norm on its own (``engine.loop.grad_norm_``):
    the trainable parameters that are not in a SegLU, then those of every SegLU (attention and
    output modulators), each in the model's order; an empty group is left out.

    Why their own group rather than scaling them by 1/sqrt(classes): the output σ's few scalars
    see the gradient summed over every class (its norm grows like sqrt(classes), and like classes
    where the classes' gradients agree), the attention σ's over every score of every head, row and
    image; in one global norm they set the clip factor of the whole backbone. Their own group
    bounds them whatever the class count, sequence length or training state, and leaves the
    backbone's clipping exactly what it would be without modulators."""
    own = {id(p) for m in modulators(model).values() for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [[p for p in params if id(p) not in own], [p for p in params if id(p) in own]]
    return [g for g in groups if g]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` at learning rate ``lr`` (the schedule overwrites it every step)."""
    groups = param_groups(model, cfg.weight_decay)
    fused = True if fusable([p for g in groups for p in g["params"]]) else None  # None: torch's default
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fusable(params: List[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on CPU or CUDA."""
    return all(p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in params)


def step_if(optimizer: torch.optim.Optimizer, good: torch.Tensor) -> None:
    """``optimizer.step()`` if ``good`` (a 0-d bool tensor on the device) is true; else nothing, not
    even the step count. A fused AdamW decides on the device, so the host never waits for it; any
    other optimizer reads ``good`` on the host, one sync a step.

    torch's fused Adam(W) takes the flag from an attribute: during ``step`` it skips its update where
    ``optimizer.found_inf`` (a float tensor, 1: skip) says so. That is the protocol of
    ``torch.amp.GradScaler``, which sets ``found_inf`` before the step of an optimizer that skips by
    itself and deletes it after, as here. ``Optimizer.step`` has no argument for it (torch's
    functional ``adamw`` has, but calling it would mean keeping AdamW's state by hand), so this is
    the one place that sets it."""
    if not any(group.get("fused") for group in optimizer.param_groups):
        if bool(good):
            optimizer.step()
        return
    optimizer.found_inf = (~good).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


_IMPL_KEYS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's implementation: torch takes
    every group setting from the saved groups, ``fused``/``foreach`` included, so a state saved by
    another implementation (a for-loop run, or a device without the fused kernel) would go on with
    it. The fused kernel wants its step counts as float32 tensors on the parameters' device; the
    for-loop saves them on the CPU."""
    keep = [{k: g.get(k) for k in _IMPL_KEYS} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, keep):
        group.update(flags)
        if flags["fused"]:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def describe_groups(optimizer: torch.optim.Optimizer) -> Dict[str, Dict]:
    """For the log: per group, its weight decay, size and parameter names."""
    return {
        g["name"]: {
            "weight_decay": g["weight_decay"],
            "num_tensors": len(g["params"]),
            "num_params": sum(p.numel() for p in g["params"]),
            "names": list(g["param_names"]),
        }
        for g in optimizer.param_groups
    }


@dataclass(frozen=True)
class LRSchedule:
    """``optim.sched`` = cosine | constant: per-step linear warmup from ``warmup_lr`` to ``base_lr``,
    then cosine to ``min_lr`` at ``total_steps`` (or constant). A pure function of the global
    optimizer step, so a resumed run sees exactly the learning rates of an uninterrupted one."""

    base_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class EpochCosineSchedule:
    """``optim.sched`` = cosine_epoch, DeiT's schedule: timm's ``CosineLRScheduler`` as DeiT's
    main.py builds it (timm's ``create_scheduler``: ``t_initial`` = epochs, ``warmup_t`` = warmup
    epochs, no warmup prefix, so the cosine spans all epochs, warmup included; one cycle; no noise;
    the cooldown epochs the factory adds are never run, DeiT trains ``epochs``) and steps it
    once per epoch, after the epoch. Epoch 0 trains at the lr the scheduler sets when built
    (``warmup_lr``), epoch e >= 1 at the one ``step(e - 1)`` sets, so epochs 0 and 1 both train at
    ``warmup_lr``. (DeiT's own resume steps it to the resumed epoch instead, one epoch ahead; here a
    resumed run keeps the uninterrupted run's lr.) A pure function of the optimizer step: the
    epoch is ``step // steps_per_epoch``, and timm's ``step(epoch)`` sets the lr from the epoch alone."""

    def __init__(self, base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float, warmup_lr: float,
                 min_lr: float):
        self.steps_per_epoch = steps_per_epoch
        # timm's scheduler writes its lr into an optimizer's groups: it gets an optimizer of its own
        # (one unused parameter), which only at_epoch reads
        self._holder = torch.optim.SGD([torch.zeros(1)], lr=base_lr)
        self._timm = CosineLRScheduler(self._holder, t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
                                       warmup_lr_init=warmup_lr)
        self._built_lr = self._holder.param_groups[0]["lr"]

    def at_epoch(self, epoch: int) -> float:
        """The lr epoch ``epoch`` trains at."""
        if epoch == 0:
            return self._built_lr
        self._timm.step(epoch - 1)
        return self._holder.param_groups[0]["lr"]

    def __call__(self, step: int) -> float:
        return self.at_epoch(step // self.steps_per_epoch)


def build_schedule(cfg: OptimConfig, base_lr: float, epochs: int,
                   steps_per_epoch: int) -> Union[LRSchedule, EpochCosineSchedule]:
    """The lr as a function of the optimizer step for ``optim.sched``, peaking at ``base_lr``."""
    if cfg.sched == "cosine_epoch":
        return EpochCosineSchedule(base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                   warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
    return LRSchedule(
        base_lr=base_lr,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        kind=cfg.sched,
    )
