"""Model construction from the config, and the EMA copy of the weights."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Union

import timm
import torch
import torch.nn as nn

import models
from models.weights import CheckpointMismatchError

from .config import ModelConfig
from .errors import UserError


def model_kwargs(cfg: ModelConfig, num_classes: Optional[int], in_chans: Optional[int]) -> Dict[str, Any]:
    """timm.create_model kwargs for ``cfg``; dataset-derived values fill what the config leaves None."""
    kwargs: Dict[str, Any] = dict(
        num_classes=cfg.num_classes if cfg.num_classes is not None else num_classes,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans if cfg.in_chans is not None else in_chans,
        attn_normalizer=cfg.attn_normalizer,
        out_normalizer=cfg.out_normalizer,
        modulator_order=cfg.modulator_order,
        modulator_init=cfg.modulator_init,
        modulator_affine=cfg.modulator_affine,
        softmax_temperature=cfg.softmax_temperature,
        qkv_bias=cfg.qkv_bias,
        attn_backend=cfg.attn_backend,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    kwargs.update(cfg.kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def build_model(cfg: ModelConfig, num_classes: Optional[int] = None, in_chans: Optional[int] = None) -> nn.Module:
    """The model named in ``cfg`` (a registered MultiMax/GAP ViT), optionally initialised from
    ``cfg.init_checkpoint``."""
    if cfg.name not in timm.list_models(cfg.name):
        known = ", ".join(n for n in timm.list_models() if "_multimax_" in n or "_gap_patch" in n)
        raise UserError(f"model.name: unknown model {cfg.name!r}; registered MultiMax/GAP models: {known}")
    try:
        model = timm.create_model(cfg.name, **model_kwargs(cfg, num_classes, in_chans))
    except (TypeError, ValueError) as e:
        raise UserError(f"model: cannot build {cfg.name!r}: {e}") from None
    if cfg.init_checkpoint:
        try:
            models.load_weights(model, cfg.init_checkpoint)
        except (FileNotFoundError, CheckpointMismatchError) as e:
            raise UserError(f"model.init_checkpoint: {cfg.init_checkpoint}: {e}") from None
    return model


class EMA:
    """Exponential moving average of a model's parameters and buffers, updated once per
    optimizer step: ema += (1 - decay) * (weights - ema), on the device in three foreach kernels.
    Kept here rather than timm's ModelEmaV3, which takes the step's weight as a Python number: a
    step skipped on the device (``good`` False) must leave the average as it is without a host sync."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._tensors: Optional[tuple] = None  # (model, its float tensors, ours, its others, ours)

    @torch.no_grad()
    def update(self, model: nn.Module, good: Union[torch.Tensor, bool] = True) -> None:
        if self._tensors is None or self._tensors[0] is not model:  # built once: state_dict() walks every module
            ema, weights = self.module.state_dict(), model.state_dict()
            floats = [n for n in ema if ema[n].dtype.is_floating_point]
            others = [n for n in ema if not ema[n].dtype.is_floating_point]
            self._tensors = (model, [weights[n] for n in floats], [ema[n] for n in floats],
                             [weights[n] for n in others], [ema[n] for n in others])
        _, weights_f, ema_f, weights_other, ema_other = self._tensors
        delta = torch._foreach_sub(weights_f, ema_f)
        torch._foreach_mul_(delta, good * (1.0 - self.decay))
        torch._foreach_add_(ema_f, delta)
        for e, w in zip(ema_other, weights_other):
            e.copy_(w)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
