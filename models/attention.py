"""Multi-head self-attention with a configurable normalizer (MultiMax, softmax, sparsemax, ...).

Drop-in for timm's ``Attention`` in timm's ``Block``: the arguments Block passes, and the same
``qkv`` / ``proj`` parameter names and shapes, so timm/DeiT weights load. The normalizer's parameters (for
MultiMax, the SegLU modulator) sit at ``<block>.attn.normalizer.modulator.{ranges,ts}``.

Backends (``backend=``; the kernels are described in ``models.attention_kernels``):
- ``sdpa``: ``F.scaled_dot_product_attention``; softmax only (temperature folded into the scale).
  torch's fused kernel, as in timm's own ``Attention``: the softmax-SDPA baseline of every table
  in docs/PERFORMANCE.md.
- ``explicit``: scores = q·kᵀ·scale → normalizer (float32) → dropout → @ v, materialising the
  (B, H, N, N) scores; for MultiMax without attention dropout and not recording,
  ``attention_kernels.modulated_attention`` (the whole attention as one Function); otherwise
  the normalizer module itself under autograd, the reference.
- ``flex``: ``attention_kernels.flex_attention_with``; multimax/softmax, no attention dropout,
  no masks; CPU: forward only (under no_grad).
- ``chunked``: ``attention_kernels.chunked_attention``, memory-efficient on every device;
  multimax/softmax, no attention dropout.
- ``auto``: sdpa for softmax; for multimax on CUDA flex where flex is usable (Triton present,
  no mask, no attention dropout while training) and, when gradients are on, only where its
  backward is proven (``attention_kernels.FLEX_TRAINING_PROVEN``); explicit otherwise, which
  ``train.compile`` compiles.

The choice depends only on the module's configuration, the device of its weights, grad mode
and recording, never on a traced value, so torch.compile guards on it and FX can trace the
model (the kernels are FX leaf functions; the normalizers and SegLU leaf modules for timm's
FX feature extraction). TorchScript is not supported.

``fused_attn`` (timm's switch, default True) set to False takes the explicit path with the
probabilities materialised and passed through ``attn_drop``: ``models.recording`` reads them there.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .attention_kernels import (
    FUSED_NORMALIZERS, ScoreModulation, chunked_attention, flex_attention_with, flex_available,
    flex_training_proven, modulated_attention,
)
from .choices import ATTN_BACKENDS, check_choice
from .multimax import build_normalizer

# FX traces a call to these as one node: they branch on their inputs (grad, device, shapes, masks)
for _leaf in ("modulated_attention", "chunked_attention", "flex_attention_with", "_additive_mask"):
    torch.fx.wrap(_leaf)


class MultiMaxAttention(nn.Module):
    """Self-attention over tokens. Input (B, N, C) → output (B, N, C).

    Takes the arguments timm's ``Block`` gives its attention layer (timm 1.0.23 to 1.0.31: dim,
    num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer, device,
    dtype), then the normalizer's; any other argument is a TypeError naming it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        normalizer: str = "multimax",
        modulator_order: int = 2,
        modulator_init: str = "trunc_normal",
        modulator_affine: bool = False,
        softmax_temperature: float = 1.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm/scale_norm need a norm_layer")
        check_choice("attention backend", backend, ATTN_BACKENDS)
        if backend == "sdpa" and normalizer != "softmax":
            raise ValueError(f"backend 'sdpa' computes softmax only, not {normalizer!r}")
        if backend in ("flex", "chunked") and normalizer not in FUSED_NORMALIZERS:
            raise ValueError(f"backend {backend!r} supports normalizers {FUSED_NORMALIZERS}, not {normalizer!r}")
        if backend in ("flex", "chunked") and attn_drop > 0:
            raise ValueError(f"backend {backend!r} supports attention dropout 0 only, got attn_drop={attn_drop}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.normalizer = build_normalizer(
            normalizer, modulator_order, modulator_init, modulator_affine, softmax_temperature
        )
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True  # False: the explicit path with materialised probabilities (recording)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # `is not False`: under FX, is_causal is a traced input (timm passes its forward's through)
        path = self.kernel(self._weight_device(), masked=attn_mask is not None or is_causal is not False)
        if path == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
                scale=self.scale / self.normalizer.temperature,
            )
        elif path == "flex":
            if attn_mask is not None or is_causal:
                raise NotImplementedError("attention backend 'flex' takes no attention mask; use 'chunked' or 'explicit'")
            out = flex_attention_with(q, k, v, ScoreModulation.of(self.normalizer), self.scale)
        elif path == "chunked":
            bias = _additive_mask(attn_mask, is_causal, N, q)
            out = chunked_attention(q, k, v, ScoreModulation.of(self.normalizer), self.scale, bias)
        else:
            out = self._explicit(q, k, v, _additive_mask(attn_mask, is_causal, N, q))
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(out)))

    def kernel(self, device: torch.device, masked: bool = False) -> str:
        """The kernel a forward on ``device`` uses now: sdpa | explicit | flex | chunked.

        Depends only on static facts (module config, device, training mode, grad mode,
        ``fused_attn``), so torch.compile guards on it instead of breaking the graph."""
        if not self.fused_attn:
            return "explicit"
        if self.backend != "auto":
            return self.backend
        name = self.normalizer.name
        if name == "softmax":
            return "sdpa"
        dropout = self.training and self.attn_drop.p > 0
        if (name == "multimax" and device.type == "cuda" and not masked and not dropout and flex_available(device)
                and (not torch.is_grad_enabled() or flex_training_proven())):
            return "flex"
        return "explicit"

    def _weight_device(self) -> torch.device:
        """The device of the layer's weights: a plain value even under FX tracing (the input's
        ``.device`` would be a traced value there; ``parameters()`` yields the tensors themselves)."""
        return next(self.qkv.parameters()).device

    def _explicit(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        dropout = self.training and self.attn_drop.p > 0
        if self.normalizer.name == "multimax" and self.fused_attn and not dropout:
            # the whole attention as one Function (hand-written backward); plain ops for inference
            return modulated_attention(q, k, v, ScoreModulation.of(self.normalizer), self.scale, bias)
        probs = self.normalizer((q * self.scale) @ k.transpose(-2, -1), bias)  # the reference, under autograd
        return self.attn_drop(probs).to(v.dtype) @ v


def _additive_mask(
    attn_mask: Optional[torch.Tensor], is_causal: bool, n: int, like: torch.Tensor
) -> Optional[torch.Tensor]:
    """A float32 additive mask (0 / -inf) from a boolean (True = keep) or additive mask."""
    if is_causal:
        keep = torch.ones(n, n, dtype=torch.bool, device=like.device).tril()
        attn_mask = keep if attn_mask is None else attn_mask & keep
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, device=like.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.float()


__all__ = ["MultiMaxAttention"]
