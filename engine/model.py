"""Model construction from the config (ours or any timm model, optionally started from a checkpoint),
and the EMA copy of the weights."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import socket
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import get_arch_name, model_entrypoint

import models
from models.vision_transformer import MultiMaxVisionTransformer
from models.weights import CheckpointMismatchError, LoadResult

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .distributed import is_main_process
from .errors import UserError, one_line_reason
from .logger import console


def model_kwargs(cfg: ModelConfig, num_classes: Optional[int], in_chans: Optional[int]) -> Dict[str, Any]:
    """timm.create_model kwargs for ``cfg``; dataset-derived values fill what the config leaves None,
    and a None the registered model fills (the normalizers of its ``*_multimax_*``/``*_gap_*`` variant)."""
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
        pos_drop_rate=cfg.pos_drop_rate,
        proj_drop_rate=cfg.proj_drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    kwargs.update(cfg.kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def built_model_config(cfg: ModelConfig, model: nn.Module) -> ModelConfig:
    """``cfg`` with the normalizers ``model`` was built with, so that a run records what it trains
    (not a None that means "the variant's")."""
    return dataclasses.replace(cfg, attn_normalizer=getattr(model, "attn_normalizer", cfg.attn_normalizer),
                               out_normalizer=getattr(model, "out_normalizer", cfg.out_normalizer))


# Knobs of our registered models; another timm model gets one only when model.kwargs names it,
# since its own defaults (e.g. DeiT's qkv_bias=True) describe its weights.
_OURS_ONLY = ("attn_normalizer", "out_normalizer", "modulator_order", "modulator_init", "modulator_affine",
              "softmax_temperature", "attn_backend", "grad_checkpointing", "qkv_bias")
# Generic knobs that not every timm model takes (qkv_bias: eval.py reads it off a ViT checkpoint's
# weights): the entrypoint hides the class behind **kwargs, so a refusal shows only when the
# model is built, and such a knob is then left out.
_IF_ACCEPTED = ("img_size", "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
                "qkv_bias")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def is_multimax_model(name: str) -> bool:
    """True for the models this repository registers (models/vision_transformer.py), which take
    the MultiMax knobs; False for timm's own and unknown names."""
    arch = get_arch_name(name)
    return timm.is_model(arch) and model_entrypoint(arch).__module__ == MultiMaxVisionTransformer.__module__


def build_model(cfg: ModelConfig, num_classes: Optional[int] = None, in_chans: Optional[int] = None) -> nn.Module:
    """The model named in ``cfg``, optionally initialised from ``cfg.init_checkpoint``: one of
    ours with every knob, or any other timm model (``timm.list_models()``, tags included) in its
    own architecture with the generic arguments it accepts (classes, channels, image and patch
    size, dropout rates, ``model.kwargs``)."""
    if not timm.is_model(get_arch_name(cfg.name)):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (timm.list_models() lists the known names)"
        raise UserError(f"model.name: unknown model {cfg.name!r}{hint}")
    ours = is_multimax_model(cfg.name)
    kwargs = model_kwargs(cfg, num_classes, in_chans)
    if not ours:
        kwargs = {k: v for k, v in kwargs.items() if k not in _OURS_ONLY or k in cfg.kwargs}
    model = _create(cfg.name, kwargs, optional=() if ours else _IF_ACCEPTED)
    _check_patch_grid(model)
    if cfg.grad_checkpointing and not ours:
        model.set_grad_checkpointing(True)
    if cfg.init_checkpoint:
        init_from_checkpoint(model, cfg.init_checkpoint)
    return model


def _create(name: str, kwargs: Dict[str, Any], optional: Tuple[str, ...]) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, leaving out the ``optional`` kwargs the model refuses."""
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as e:
            refused = _UNEXPECTED.search(str(e))
            if refused and refused.group(1) in optional and refused.group(1) in kwargs:
                del kwargs[refused.group(1)]
                continue
            raise UserError(f"model: cannot build {name!r}: {one_line_reason(e)}") from None
        except (ValueError, AssertionError, RuntimeError) as e:
            raise UserError(f"model: cannot build {name!r}: {one_line_reason(e)}") from None


def build_pretrained(name: str, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                     num_classes: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """timm's ``name`` with its pretrained weights, loaded by timm's own loader (its checkpoint
    filter, e.g. DeiT's release format, and its strict check): from timm's source for the name
    (the Hugging Face hub cache, downloaded if missing; ``local-dir:``/``hf-hub:`` folders), or
    ``state_dict``, a local copy of them whose head has ``num_classes`` rows (timm would
    re-initialise a head of another size than its config's). ``kwargs`` left None are not passed.
    Where the hub cannot be reached, huggingface_hub is put in its offline mode first (see
    ``_hub_unreachable``): cached weights load, missing ones fail at once."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    overlay = None
    if state_dict is not None:
        overlay = {"state_dict": state_dict, **({"num_classes": num_classes} if num_classes else {})}
    if not (name.startswith(("local-dir:", "hf-hub:")) or timm.is_model(get_arch_name(name))):
        raise UserError(f"--model: unknown timm model {name!r}")
    if state_dict is not None:
        where = "its local copy"
    elif name.startswith("local-dir:"):
        where = os.path.join(name[len("local-dir:"):], "config.json")
    else:
        where = "timm's source"
    offline = where == "timm's source" and _from_hub(name) and _hub_unreachable()
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:
        keys = _state_dict_keys(str(e))
        reason = "; ".join(f"{kind} keys {', '.join(found[:8])}{' ...' if len(found) > 8 else ''}"
                           for kind, found in keys.items() if found) or one_line_reason(e)
        raise UserError(f"cannot load pretrained weights for {name} from {where}: {reason}") from None
    except (OSError, ValueError, AssertionError, ImportError, TypeError) as e:  # no network / cache, bad folder
        reason = one_line_reason(e)
        if where == "timm's source" and isinstance(e, OSError):
            from huggingface_hub import constants

            if offline:
                reason = (f"the Hugging Face hub is offline (unreachable, or HF_HUB_OFFLINE set) and its cache "
                          f"({constants.HF_HUB_CACHE}) holds no copy")
            reason += "; --pretrained-file PATH takes a local copy"
        raise UserError(f"cannot load pretrained weights for {name} from {where}: {reason}") from None
    _check_patch_grid(model)
    return model


# How long the check that the Hugging Face hub can be reached waits for a connection.
HUB_PROBE_TIMEOUT_S = 3.0


def _from_hub(name: str) -> bool:
    """Whether timm fetches the pretrained weights of ``name`` from the Hugging Face hub."""
    return name.startswith("hf-hub:") or bool(getattr(timm.get_pretrained_cfg(name), "hf_hub_id", None))


def _hub_unreachable() -> bool:
    """True when huggingface_hub is offline: set so (HF_HUB_OFFLINE), or put so here because one
    TCP connection to its endpoint (or the proxy for it) fails within ``HUB_PROBE_TIMEOUT_S``.
    Without the switch every file it looks for is retried with back-off, about a minute of
    warnings before the error, even for files in its cache."""
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    endpoint = urlparse(constants.ENDPOINT)
    proxy = None if proxy_bypass(endpoint.hostname or "") else getproxies().get(endpoint.scheme)
    target = urlparse(proxy) if proxy else endpoint
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
        socket.create_connection((target.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return False
    except (OSError, ValueError):  # no route, refused, no name resolution, a malformed address
        constants.HF_HUB_OFFLINE = True
        return True


def _check_patch_grid(model: nn.Module) -> None:
    """Refuse an image size that is not a multiple of a ViT's patch size: its patch embedding
    would silently leave out the last pixel rows and columns of every image."""
    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, PatchEmbed) or embed.dynamic_img_pad or embed.img_size is None:
        return
    for size, patch in zip(embed.img_size, embed.patch_size):
        if size % patch:
            lower = size - size % patch
            sizes = f"{lower} or {lower + patch}" if lower else f"{patch}"
            raise UserError(f"model.img_size {size} is not a multiple of the patch size {patch}: the last "
                            f"{size % patch} pixel rows and columns of every image would be left out; use {sizes}")


def _state_dict_keys(message: str) -> Dict[str, list]:
    """The key names in torch's load_state_dict error text, by kind (missing, unexpected, mis-shaped)."""
    out: Dict[str, list] = {"missing": [], "unexpected": [], "mis-shaped": []}
    for line in message.splitlines():
        if "Missing key(s)" in line:
            out["missing"] += re.findall(r'"([^"]+)"', line)
        elif "Unexpected key(s)" in line:
            out["unexpected"] += re.findall(r'"([^"]+)"', line)
        elif "size mismatch for" in line:
            out["mis-shaped"] += re.findall(r"size mismatch for ([\w.]+)", line)
    return out


def init_from_checkpoint(model: nn.Module, path: str) -> LoadResult:
    """Load ``model.init_checkpoint`` (a file or an http(s) URL, cached) as a fine-tuning start:
    class/distillation tokens dropped, the position grid resampled, a head of another shape and
    missing modulators left at init; the main process prints what was changed."""
    where = f"model.init_checkpoint: {path}"
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        raise UserError(f"model.init_checkpoint: {e}") from None
    try:
        result = models.load_weights(model, ckpt)
    except CheckpointMismatchError as e:
        raise UserError(f"{where}: {e}") from None
    changes = result.describe()
    console(f"{where}: loaded ({result.source} format){'; ' + changes if changes else ', every key as it is'}",
            is_main_process())
    return result


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
