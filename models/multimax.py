"""MultiMax (Zhou, Fritz, Keuper, ICML 2024) and the baseline normalizers it is compared with.

MultiMax(x) = softmax(σ(x)) along the last dim, where σ is the SegLU ("segmented linear unit")
modulator of order N:

    σ(x) = x + Σ_{n=1..N} [ t_b⁽ⁿ⁾ · max(b⁽ⁿ⁾ − x, 0)ⁿ + t_d⁽ⁿ⁾ · max(x − d⁽ⁿ⁾, 0)ⁿ ]

The learnable scalars are laid out as in checkpoints trained with the paper's code:
``ranges = [b1, d1, b2, d2, ...]`` and ``ts = [t_b1, t_d1, t_b2, t_d2, ...]``, each of shape (2N,).

All normalizers compute in float32, also under fp16/bf16 autocast (σ squares its input), and
return the input's dtype. The learned modulators are read out of a model or a state dict here
too, in one shape (``ModulatorParams``), for the training log, eval's JSON and the figures.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .choices import MODULATOR_INITS, NORMALIZERS, check_choice
from .weights import CheckpointMismatchError, in_our_names

EVSOFTMAX_TRAIN_EPS = 1e-6


def seglu(x: torch.Tensor, ranges: torch.Tensor, ts: torch.Tensor,
          scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SegLU modulator σ(x), elementwise, any shape. ``ranges``/``ts``: (2N,) (or sequences
    of 0-d tensors). With ``scale``/``shift``: σ(scale·x + shift), the affine variant."""
    if scale is not None:
        x = x * scale + shift
    out = x
    for n in range(len(ranges) // 2):
        power = n + 1
        low = torch.relu(ranges[2 * n] - x)
        high = torch.relu(x - ranges[2 * n + 1])
        if power > 1:
            low, high = low.pow(power), high.pow(power)
        out = out + ts[2 * n] * low + ts[2 * n + 1] * high
    return out


def _no_autocast(x: torch.Tensor):
    """Autocast off for x's device: the modulator and the normalisation run in float32."""
    return torch.autocast(x.device.type, enabled=False)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _evsoftmax32(x: torch.Tensor, dim: int, training: bool) -> torch.Tensor:
    below = x < x.mean(dim=dim, keepdim=True)
    keep = torch.where(below, EVSOFTMAX_TRAIN_EPS if training else 0.0, 1.0)
    p = torch.softmax(x, dim=dim) * keep
    return p / p.sum(dim=dim, keepdim=True)


def multimax(x: torch.Tensor, ranges: torch.Tensor, ts: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """MultiMax: softmax(σ(x)) along ``dim``, computed in float32, returned in x's dtype."""
    with _no_autocast(x):
        return torch.softmax(seglu(_f32(x), _f32(ranges), _f32(ts)), dim=dim).to(x.dtype)


def softmax(x: torch.Tensor, dim: int = -1, temperature: float = 1.0) -> torch.Tensor:
    """softmax(x / temperature) in float32."""
    with _no_autocast(x):
        return torch.softmax(_f32(x) / temperature, dim=dim).to(x.dtype)


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo, 2016): Euclidean projection onto the simplex."""
    from entmax import sparsemax as _sparsemax

    with _no_autocast(x):
        return _sparsemax(_f32(x), dim=dim).to(x.dtype)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax (Peters et al., 2019), exact sort-based algorithm from the `entmax` package."""
    from entmax import entmax15 as _entmax15

    with _no_autocast(x):
        return _entmax15(_f32(x), dim=dim).to(x.dtype)


def evsoftmax(x: torch.Tensor, dim: int = -1, training: bool = False) -> torch.Tensor:
    """Evidential softmax (Chen et al., 2021): softmax with the entries below the row mean
    zeroed (multiplied by a small ε while training, so they keep a gradient), renormalised."""
    with _no_autocast(x):
        return _evsoftmax32(_f32(x), dim, training).to(x.dtype)


@register_notrace_module  # timm's FX tracing calls it as one node (it branches on the input's dtype)
class SegLU(nn.Module):
    """The MultiMax modulator σ of order ``order`` with learnable ``ranges`` and ``ts`` of shape (2N,).

    ``affine=True`` prepends x ↦ scale·x + shift (scale=1, shift=0 at init), the authors'
    "affine then first-order" variant. Input: any shape; output: same shape and dtype.
    """

    def __init__(self, order: int = 2, init: str = "trunc_normal", affine: bool = False):
        super().__init__()
        if order < 1:
            raise ValueError(f"SegLU order must be >= 1, got {order}")
        check_choice("SegLU init", init, MODULATOR_INITS)
        self.order = order
        self.init = init
        self.ranges = nn.Parameter(torch.zeros(2 * order))
        self.ts = nn.Parameter(torch.zeros(2 * order))
        if affine:
            self.scale = nn.Parameter(torch.ones(1))
            self.shift = nn.Parameter(torch.zeros(1))
        else:
            self.scale = self.shift = None
        self.init_weights()

    def init_weights(self) -> None:
        """Paper init: truncated normal, std 0.02 (σ ≈ identity); `zeros`: σ = identity.
        (timm's ViT init calls `init_weights` on submodules that have it.)"""
        with torch.no_grad():
            for p in (self.ranges, self.ts):
                if self.init == "trunc_normal":
                    nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
                else:
                    p.zero_()
            if self.scale is not None:
                self.scale.fill_(1.0)
                self.shift.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _no_autocast(x):
            return seglu(_f32(x), _f32(self.ranges), _f32(self.ts), self.scale, self.shift).to(x.dtype)

    def extra_repr(self) -> str:
        return f"order={self.order}, init={self.init}, affine={self.scale is not None}"


@register_notrace_module  # as SegLU, for every normalizer
class Normalizer(nn.Module):
    """Maps scores (..., L) to a distribution over the last dim, in float32, in the input's dtype.

    ``bias`` is an optional additive mask (0 / -inf), applied after the modulator and before
    the normalisation, as in the paper (σ acts on the raw scaled logits).
    """

    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.modulator: Optional[SegLU] = None

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        with _no_autocast(x):
            y = _f32(x)
            if self.modulator is not None:
                y = self.modulator(y)
            if bias is not None:
                y = y + _f32(bias)
            return self.normalize(y).to(x.dtype)

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Softmax(Normalizer):
    name = "softmax"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        return torch.softmax(y / self.temperature, dim=-1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class MultiMax(Normalizer):
    """softmax(σ(x)); the learnable modulator lives at ``.modulator`` (a SegLU)."""

    name = "multimax"

    def __init__(self, order: int = 2, init: str = "trunc_normal", affine: bool = False):
        super().__init__()
        self.modulator = SegLU(order, init, affine)

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        return torch.softmax(y, dim=-1)


class Sparsemax(Normalizer):
    name = "sparsemax"

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        from entmax import sparsemax as _sparsemax

        return _sparsemax(y, dim=-1)


class Entmax15(Normalizer):
    name = "entmax15"

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        from entmax import entmax15 as _entmax15

        return _entmax15(y, dim=-1)


class EvSoftmax(Normalizer):
    name = "evsoftmax"

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        return _evsoftmax32(y, -1, self.training)


_NORMALIZER_CLASSES: Dict[str, Callable[..., Normalizer]] = {
    "softmax": lambda order, init, affine, temperature: Softmax(temperature),
    "multimax": lambda order, init, affine, temperature: MultiMax(order, init, affine),
    "sparsemax": lambda order, init, affine, temperature: Sparsemax(),
    "entmax15": lambda order, init, affine, temperature: Entmax15(),
    "evsoftmax": lambda order, init, affine, temperature: EvSoftmax(),
}


def build_normalizer(
    name: str,
    order: int = 2,
    init: str = "trunc_normal",
    affine: bool = False,
    temperature: float = 1.0,
) -> Normalizer:
    """A normalizer module by name: one of ``NORMALIZERS``."""
    check_choice("normalizer", name, NORMALIZERS)
    return _NORMALIZER_CLASSES[name](order, init, affine, temperature)


# ---------------------------------------------------------------- reading modulators out

class ModulatorParams(NamedTuple):
    """One SegLU's parameters: ``ranges``/``ts`` (2N,), and ``scale``/``shift`` (1,) for the affine
    variant (else None); detached float32 copies on the CPU when read by the functions below."""

    ranges: torch.Tensor
    ts: torch.Tensor
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, modulator: SegLU) -> "ModulatorParams":
        return cls(*(None if p is None else p.detach().float().cpu()
                     for p in (modulator.ranges, modulator.ts, modulator.scale, modulator.shift)))

    def lists(self) -> Dict[str, List[float]]:
        """As JSON: ``ranges``, ``ts`` and, for the affine variant, ``scale``, ``shift``."""
        return {k: v.tolist() for k, v in self._asdict().items() if v is not None}


def modulators(model: nn.Module) -> Dict[str, SegLU]:
    """All SegLU modulators of a model by module name (``blocks.{i}.attn.normalizer.modulator``,
    ``out_modulator``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SegLU)}


def modulator_params(model: nn.Module) -> Dict[str, ModulatorParams]:
    """Every modulator's parameters by module name (eval's ``attn_stats``, the training log)."""
    return {name: ModulatorParams.of(m) for name, m in modulators(model).items()}


# A modulator's parameters in a state dict under our names (the paper's are mapped onto them)
_MODULATOR_KEY = re.compile(r"^(?:blocks\.(\d+)\.attn\.normalizer\.modulator|out_modulator)\.(ranges|ts|scale|shift)$")


def modulators_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, ModulatorParams]:
    """The modulators in a state dict (ours or the paper's code's), keyed ``blocks.{i}`` (attention
    layer i) and ``out`` (the output layer), blocks in order then ``out``; empty for a softmax model.
    A ``CheckpointMismatchError`` if one lacks ``ranges`` or ``ts`` of one even length."""
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in in_our_names(state_dict)[0].items():
        m = _MODULATOR_KEY.match(key)
        if m:
            name = f"blocks.{m.group(1)}" if m.group(1) is not None else "out"
            found.setdefault(name, {})[m.group(2)] = value.detach().float().cpu()
    out = {}
    for name in sorted(found, key=lambda n: (n == "out", int(n.split(".")[1]) if n != "out" else 0)):
        params = found[name]
        if ("ranges" not in params or "ts" not in params or params["ranges"].shape != params["ts"].shape
                or params["ranges"].dim() != 1 or params["ranges"].numel() % 2):
            raise CheckpointMismatchError(f"modulator {name}: needs 'ranges' and 'ts' of one even length (2N,), "
                                          f"got { {k: tuple(v.shape) for k, v in params.items()} }")
        out[name] = ModulatorParams(params["ranges"], params["ts"], params.get("scale"), params.get("shift"))
    return out


__all__ = [
    "NORMALIZERS", "MODULATOR_INITS", "seglu", "multimax", "softmax",
    "sparsemax", "entmax15", "evsoftmax", "SegLU", "Normalizer", "Softmax", "MultiMax",
    "Sparsemax", "Entmax15", "EvSoftmax", "build_normalizer", "ModulatorParams", "modulators", "modulator_params",
    "modulators_from_state_dict",
]
