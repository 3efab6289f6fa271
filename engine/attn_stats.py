"""The paper's attention statistics (Zhou et al., ICML 2024, Definitions 3.2/3.3), per row, and
an accumulator that reduces recorded attention batch by batch, per layer and per head.

For one distribution p = φ(x) over the last dim, with x the normalizer's *input* (for MultiMax
the raw scaled scores, before the modulator) and a threshold ε:

- multi-modality over the N relevant non-max entries — every entry except one argmax of x with
  x_n > ε (an entry tied with the max is one of them, with gap 0):
      M = 1 − (1/N) Σ_n (max p − p_n)
- sparsity over the L irrelevant entries, x_l < ε:
      S = (1/L) Σ_l exp(−p_l / s)
  with s the smallest entry of softmax(x) at temperature 1 on the same row (the paper's
  reference), or a fixed value.

A row without relevant (N = 0) or irrelevant (L = 0) entries has no M (or no S): the functions
return NaN there and every average skips such rows (nanmean). ε = 0 is the paper's choice; with
it softmax on (10, x2, −1) gives M = 1.0, 0.2384, 0.0360, 0.0050, 0.0007 for x2 = 10, 8, 6, 4, 2
and S = e⁻¹ = 0.3679, the paper's values (any ε in (−1, 2) gives the same on these inputs).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from models.multimax import modulator_params
from models.recording import AttentionRecord, attention_layers

DEFAULT_THRESHOLDS = (1e-4, 1e-3, 1e-2)
# Elements of one (rows, keys) chunk processed at once: bounds the temporaries of ``update``
# (a few float32 copies of the chunk) to a few hundred MB whatever the batch size.
_CHUNK_ELEMENTS = 1 << 24
# Columns of the per-layer (heads, columns) sums; one fraction-below column per threshold follows.
_S_SUM, _S_ROWS, _M_SUM, _M_ROWS, _H_SUM, _ROWS = range(6)
_NUM_BASE_COLUMNS = 6


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32 for half precision inputs; float32/float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def multimodality(x: torch.Tensor, p: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The paper's multi-modality M of each row of ``p = φ(x)``; x, p: (..., K) → (...,).

    Relevant entries: all but one argmax of x, with x_n > eps (ties with the max count, gap 0).
    ``max p`` is the row's largest probability (the max entry's, for monotone normalizers).
    NaN for rows without relevant entries.
    """
    x, p = _float(x), _float(p)
    relevant = x > eps
    relevant.scatter_(-1, x.argmax(-1, keepdim=True), False)
    n = relevant.sum(-1)
    gaps = torch.where(relevant, p.amax(-1, keepdim=True) - p, 0.0).sum(-1)
    return torch.where(n > 0, 1.0 - gaps / n.clamp_min(1), math.nan)


def sparsity(x: torch.Tensor, p: torch.Tensor, eps: float = 0.0, s: Optional[float] = None) -> torch.Tensor:
    """The paper's sparsity S of each row of ``p = φ(x)``; x, p: (..., K) → (...,).

    Irrelevant entries: x_l < eps. ``s=None``: the reference is min softmax(x) of the row,
    used in the log domain so that a reference that underflows float32 stays exact.
    NaN for rows without irrelevant entries.
    """
    x, p = _float(x), _float(p)
    if s is None:
        ratio = torch.exp(torch.log(p) - torch.log_softmax(x, dim=-1).amin(-1, keepdim=True))
    else:
        if s <= 0:
            raise ValueError(f"sparsity reference s must be > 0, got {s}")
        ratio = p / s
    irrelevant = x < eps
    n = irrelevant.sum(-1)
    total = torch.where(irrelevant, torch.exp(-ratio), 0.0).sum(-1)
    return torch.where(n > 0, total / n.clamp_min(1), math.nan)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row (0·log 0 = 0); (..., K) → (...,)."""
    return torch.special.entr(_float(p)).sum(-1)


def fraction_below(p: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """Fraction of each row's entries strictly below each threshold; (..., K) → (..., T)."""
    return torch.stack([(p < t).sum(-1) / p.shape[-1] for t in thresholds], dim=-1)


def _natural_key(name: str) -> List[Any]:
    """'blocks.2.attn' before 'blocks.10.attn' (digit runs compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _json_float(v: float) -> Optional[float]:
    """JSON-ready: NaN (no row had the statistic) becomes None."""
    return None if math.isnan(v) else v


class AttentionStats:
    """Running sums of S, M, entropy and fractions below thresholds, per layer and head.

    Each ``update(record)`` reduces one batch's recorded attention (``record_attention(model,
    scores=True)``) to per-head sums and counts in float64 on the CPU and keeps nothing else.
    Per layer the state is a (heads, columns) tensor of sums and row counts. Across DDP ranks:
    ``reduce(sum_fn)`` with a function that all-reduces a tensor (SUM); every rank must then
    hold the same layers, which pre-registering them (``model=``) guarantees even for a rank
    that saw no batch (layers are kept in natural name order, so the layouts agree).
    Averages are over rows (queries) that have the statistic; a layer's ``mean`` pools its heads.
    """

    def __init__(
        self,
        eps: float = 0.0,
        s: Optional[float] = None,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        model: Optional[nn.Module] = None,
    ) -> None:
        if s is not None and s <= 0:
            raise ValueError(f"sparsity reference s must be > 0, got {s}")
        self.eps = float(eps)
        self.s = None if s is None else float(s)
        self.thresholds = tuple(float(t) for t in thresholds)
        self._sums: Dict[str, torch.Tensor] = {}
        if model is not None:
            for name, m in attention_layers(model):
                self._layer(name, m.num_heads)

    @property
    def layers(self) -> List[str]:
        return list(self._sums)

    def _layer(self, name: str, heads: int) -> torch.Tensor:
        sums = self._sums.get(name)
        if sums is None:
            sums = torch.zeros(heads, _NUM_BASE_COLUMNS + len(self.thresholds), dtype=torch.float64)
            self._sums = dict(sorted({**self._sums, name: sums}.items(), key=lambda kv: _natural_key(kv[0])))
        elif sums.shape[0] != heads:
            raise ValueError(f"layer {name}: {heads} heads recorded, {sums.shape[0]} before")
        return sums

    def update(self, record: AttentionRecord) -> None:
        """Add one batch: ``record.probs[layer]`` and ``record.scores[layer]`` are lists of (B, H, N, N)."""
        for name, probs in record.probs.items():
            scores = record.scores.get(name)
            if scores is None or len(scores) != len(probs):
                raise ValueError(f"layer {name}: attention statistics need the scores too — "
                                 "use record_attention(model, scores=True)")
            for x, p in zip(scores, probs):
                if x.dim() != 4 or x.shape != p.shape:
                    raise ValueError(f"layer {name}: expected scores and probs of one shape (B, H, N, N), "
                                     f"got {tuple(x.shape)} and {tuple(p.shape)}")
                self._layer(name, x.shape[1]).add_(self._batch_sums(x, p))

    def _batch_sums(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) → (H, columns) sums over batch and queries, in chunks of batch items."""
        chunk = max(1, _CHUNK_ELEMENTS // (x.shape[1] * x.shape[2] * x.shape[3]))
        out = torch.zeros(x.shape[1], _NUM_BASE_COLUMNS + len(self.thresholds), dtype=torch.float64)
        for xs, ps in zip(x.split(chunk), p.split(chunk)):
            s_rows = sparsity(xs, ps, self.eps, self.s).double()
            m_rows = multimodality(xs, ps, self.eps).double()
            cols = [
                s_rows.nansum((0, 2)), (~s_rows.isnan()).sum((0, 2)),
                m_rows.nansum((0, 2)), (~m_rows.isnan()).sum((0, 2)),
                entropy(ps).double().sum((0, 2)), torch.full((xs.shape[1],), xs.shape[0] * xs.shape[2]),
                *fraction_below(ps, self.thresholds).double().sum((0, 2)).unbind(-1),
            ]
            out += torch.stack([c.double().cpu() for c in cols], dim=-1)
        return out

    def to_tensor(self) -> torch.Tensor:
        """All sums as one flat float64 tensor, layers in natural name order."""
        if not self._sums:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([s.flatten() for s in self._sums.values()])

    def from_tensor(self, flat: torch.Tensor) -> None:
        """Overwrite the sums with a tensor laid out like ``to_tensor()`` (e.g. all-reduced)."""
        flat = flat.detach().to("cpu", torch.float64)
        if flat.numel() != sum(s.numel() for s in self._sums.values()):
            raise ValueError(f"tensor of {flat.numel()} elements does not fit these statistics")
        offset = 0
        for sums in self._sums.values():
            sums.copy_(flat[offset:offset + sums.numel()].view_as(sums))
            offset += sums.numel()

    def reduce(self, sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum across processes: ``sum_fn`` takes ``to_tensor()`` and returns the summed tensor."""
        self.from_tensor(sum_fn(self.to_tensor()))

    def _means(self, sums: torch.Tensor) -> Dict[str, Any]:
        """(..., columns) sums → averages (lists for per-head rows, floats for a pooled row)."""
        def avg(total: torch.Tensor, count: torch.Tensor) -> Any:
            v = (total / count).tolist()  # 0/0 = NaN: no row had the statistic
            return [_json_float(a) for a in v] if isinstance(v, list) else _json_float(v)

        rows = sums[..., _ROWS]
        return {
            "sparsity": avg(sums[..., _S_SUM], sums[..., _S_ROWS]),
            "multimodality": avg(sums[..., _M_SUM], sums[..., _M_ROWS]),
            "entropy": avg(sums[..., _H_SUM], rows),
            "frac_below": {f"{t:g}": avg(sums[..., _NUM_BASE_COLUMNS + i], rows)
                           for i, t in enumerate(self.thresholds)},
        }

    @staticmethod
    def _counts(sums: torch.Tensor) -> Dict[str, int]:
        return {"rows": int(sums[..., _ROWS].sum()), "sparsity_rows": int(sums[..., _S_ROWS].sum()),
                "multimodality_rows": int(sums[..., _M_ROWS].sum())}

    def summary(self, model: Optional[nn.Module] = None) -> Dict[str, Any]:
        """JSON-ready averages: per layer ``per_head`` lists and the pooled ``mean``, the mean
        over all layers, and (with ``model``) every modulator's parameters."""
        layers = {
            name: {"per_head": self._means(sums), "mean": self._means(sums.sum(0)), "counts": self._counts(sums)}
            for name, sums in self._sums.items()
        }
        pooled = torch.stack([s.sum(0) for s in self._sums.values()]).sum(0) if self._sums else None
        return {
            "layers": layers,
            "mean": self._means(pooled) if pooled is not None else {},
            "modulators": {n: p.lists() for n, p in modulator_params(model).items()} if model is not None else {},
            "eps": self.eps,
            "s": "softmax_min" if self.s is None else self.s,
            "thresholds": list(self.thresholds),
            "entropy_unit": "nats",
        }


__all__ = ["DEFAULT_THRESHOLDS", "multimodality", "sparsity", "entropy", "fraction_below",
           "AttentionStats"]
