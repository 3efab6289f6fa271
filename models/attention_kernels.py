"""Attention kernels for MultiMax (and softmax with temperature).

Each computes softmax(φ(q·kᵀ·scale) + bias) along the keys, where φ is the normalizer's score
modulation: σ (SegLU, optionally after the affine pre-map) for MultiMax, the identity for
softmax (whose temperature is folded into the scale). q, k, v: (B, H, N, D). The reference is
the normalizer module of ``models.multimax`` under autograd, which the explicit path runs
wherever it needs the probabilities themselves (attention dropout, ``record_attention``); the
kernels below stay where a benchmark row of docs/PERFORMANCE.md shows them winning on the
hardware they serve, or until the GPU table of scripts/gpu_check.sh decides where only a GPU can.

- ``modulated_attention``: the materialising (explicit) path. With a gradient, one autograd
  Function for the whole attention with a hand-written backward (``_ModulatedAttention``): it
  saves the scores and the probabilities (autograd through σ would save every intermediate),
  folds the scale into σ's pass and computes the gradients of σ's parameters in the same sweep
  as dL/ds. Plain tensor code, so torch.compile traces and fuses forward and backward. Without
  one, plain ops (``_inference``).
- ``chunked_attention``: memory-efficient on every device. Walks over query chunks, keeps only
  q, k, v and the per-row logsumexp of φ(scores), and recomputes each chunk's scores in the
  backward pass. Peak memory grows with chunk × N instead of N × N; the chunk is sized by a
  memory budget per device (``chunk_rows``). No attention dropout.
- ``flex_attention_with``: ``torch.nn.attention.flex_attention`` with ``score_mod`` = φ
  (``flex_score_mod``: the learnable scalars captured as separate 0-d tensors), compiled once
  per process. Forward and backward on CUDA; forward only on CPU (this torch has no flex
  backward on CPU). No dropout, no masks. ``auto`` trains with it only where its backward is
  proven (``FLEX_TRAINING_PROVEN``).

φ and the softmax run in float32 (float64 stays float64, for gradcheck), as in
``models.multimax``.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .multimax import _f32, seglu

try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
    _FLEX_IMPORTABLE = True
except ImportError:  # torch without flex attention
    _FLEX_IMPORTABLE = False

FUSED_NORMALIZERS = ("multimax", "softmax")

Params = Tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------- φ and its gradient

class ScoreModulation(NamedTuple):
    """What a normalizer does to the scaled scores before its softmax.

    ``params``: () for softmax (φ = identity), (ranges, ts) for MultiMax, (ranges, ts, scale,
    shift) for the affine variant (φ(x) = σ(scale·x + shift)). ``scale_factor`` multiplies the
    attention scale and divides an additive mask (1/temperature for softmax), matching
    softmax((s + mask) / T) of the normalizer. (A NamedTuple, so that FX can pass it to the
    kernels, which it traces as leaf functions.)
    """

    params: Params
    scale_factor: float = 1.0

    @staticmethod
    def of(normalizer: nn.Module) -> "ScoreModulation":
        """From a ``models.multimax`` normalizer: ``multimax`` or ``softmax`` only."""
        if normalizer.name == "softmax":
            return ScoreModulation((), 1.0 / normalizer.temperature)
        if normalizer.name == "multimax":
            mod = normalizer.modulator
            extra = () if mod.scale is None else (mod.scale, mod.shift)
            return ScoreModulation((mod.ranges, mod.ts, *extra))
        raise ValueError(
            f"normalizer {normalizer.name!r} has no fused kernel; these attention backends support "
            f"{FUSED_NORMALIZERS} (use backend 'explicit')"
        )


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half precision, else x's dtype: where sums and φ are computed."""
    return torch.promote_types(x.dtype, torch.float32)


def modulate(s: torch.Tensor, params: Params) -> torch.Tensor:
    """φ(s), elementwise (see ``ScoreModulation``)."""
    return seglu(s, *params) if params else s


def modulate_backward(s: torch.Tensor, grad: torch.Tensor, params: Params) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Given dL/dφ(s) = ``grad``: dL/ds (same shape) and dL/d each parameter (summed).

    For order n (power p = n+1) with low = max(b − u, 0), high = max(u − d, 0) and
    gl = grad·low^(p−1)·[u < b], gh = grad·high^(p−1)·[u > d] (the subgradient at a kink is 0,
    as autograd's relu gives):
    dL/du = grad − Σ p·t_b·gl + Σ p·t_d·gh, dL/db = p·t_b·Σ gl, dL/dd = −p·t_d·Σ gh,
    dL/dt_b = Σ gl·low, dL/dt_d = Σ gh·high.
    """
    if not params:
        return grad, []
    ranges, ts = params[0], params[1]
    u = s * params[2] + params[3] if len(params) == 4 else s
    du = grad.clone()  # updated in place: fewer (B, H, N, N) temporaries alive at once
    d_ranges, d_ts = [], []
    for n in range(len(ranges) // 2):
        sums = _order_backward(u, grad, du, ranges[2 * n], ranges[2 * n + 1], ts[2 * n], ts[2 * n + 1], n + 1)
        d_ranges += sums[:2]
        d_ts += sums[2:]
    grads = [torch.stack(d_ranges), torch.stack(d_ts)]
    if len(params) == 4:
        grads += [_total(du * s).reshape(1), _total(du).reshape(1)]
        du = du.mul_(params[2])
    return du, grads


def _order_backward(
    u: torch.Tensor, grad: torch.Tensor, du: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
    t_b: torch.Tensor, t_d: torch.Tensor, power: int,
) -> List[torch.Tensor]:
    """One order's share of ``modulate_backward``: adds it to ``du`` in place and returns
    [dL/db, dL/dd, dL/dt_b, dL/dt_d]. Its temporaries die on return."""
    low, high = (b - u).relu_(), (u - d).relu_()
    gl, gh = _times_power(grad, low, power - 1), _times_power(grad, high, power - 1)
    du.addcmul_(gl, -power * t_b).addcmul_(gh, power * t_d)
    return [power * t_b * _total(gl), -power * t_d * _total(gh), _total(gl * low), _total(gh * high)]


def _times_power(grad: torch.Tensor, base: torch.Tensor, exponent: int) -> torch.Tensor:
    """grad·base^exponent for base = relu(...) ≥ 0; exponent 0 means grad·[base > 0]."""
    if exponent == 0:
        return grad * (base > 0)
    out = grad * base
    for _ in range(exponent - 1):
        out = out * base
    return out


def _total(x: torch.Tensor) -> torch.Tensor:
    """Sum of all entries, rows first: compiled, the row sums fuse into the row loop that
    also writes dL/ds (one sweep over the scores instead of two)."""
    return x.sum(-1).sum()


def _params32(params: Params) -> Params:
    return tuple(_f32(p) for p in params)


def _param_grads(grads: List[torch.Tensor], params: Params) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients in the parameters' dtypes and shapes."""
    return tuple(g.to(p.dtype).reshape(p.shape) for g, p in zip(grads, params))


# ----------------------------------------------------------------------------- explicit path

def _modulated_probs(
    s: torch.Tensor, bias: Optional[torch.Tensor], params: Params, scale: float = 1.0
) -> torch.Tensor:
    """softmax(φ(s·scale) + bias) over the last dim, in float32 (float64 stays)."""
    s = _f32(s)
    y = modulate(s if scale == 1.0 else s * scale, _params32(params))
    return torch.softmax(y if bias is None else y + bias, dim=-1)


def _matmul_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype a @ b runs in: autocast's if it is on for their device, else their promotion."""
    if torch.is_autocast_enabled(a.device.type):
        return torch.get_autocast_dtype(a.device.type)
    return torch.promote_types(a.dtype, b.dtype)


# What MultiMax training runs today (``auto`` on CUDA until flex's backward is proven, and on CPU).
# Its rows: docs/PERFORMANCE.md's DeiT table, the "explicit" train rows against the "reference"
# ones (autograd through the reference normalizer, ``fused_attn = False``) that
# ``benchmark.py --preset deit`` times beside them; on a GPU, the same two rows of
# scripts/gpu_check.sh's benchmark table decide whether it stays there.
class _ModulatedAttention(torch.autograd.Function):
    """out = softmax(φ(q·kᵀ·scale) + bias) @ v, with a hand-written backward.

    Saves the raw scores, the float32 probabilities and ``out``, besides q, k and v. The
    scale is applied inside φ's pass (forward) and dL/ds's pass (backward), not as separate
    products with q and dq; in float16 (largest value 65504) q is scaled before q·kᵀ instead,
    as timm does, so that the unscaled product cannot overflow. The softmax backward's row sums
    Σⱼ pᵢⱼ·dpᵢⱼ are taken as dOᵢ·outᵢ (flash attention's identity), over D columns instead of N,
    so the backward reads the (N, N) tensors in one sweep. The products run in autocast's dtype
    when it is on (as autograd would run them), φ and the softmax in float32.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, *params):
        mm, mv = _matmul_dtype(q, k), _matmul_dtype(v, v)
        q_scale = _query_scale(mm, scale)
        with torch.autocast(q.device.type, enabled=False):
            qm, km, vm = q.to(mm), k.to(mm), v.to(mv)
            if q_scale != 1.0:
                qm = qm * q_scale
            s = qm @ km.transpose(-2, -1)
            p = _modulated_probs(s, bias, params, scale / q_scale)
            out = p.to(mv) @ vm
        ctx.save_for_backward(qm, km, vm, s, p, out, *params)
        ctx.q_scale, ctx.s_scale, ctx.dtypes = q_scale, scale / q_scale, (q.dtype, k.dtype, v.dtype)
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        qm, km, vm, s, p, out, *params = ctx.saved_tensors
        params = tuple(params)
        dout = dout.to(out.dtype)
        dp = _f32(dout @ vm.transpose(-2, -1))
        rows = (_f32(dout) * _f32(out)).sum(-1, keepdim=True)  # = Σⱼ pᵢⱼ·dpᵢⱼ
        dy = p * (dp - rows)  # through the softmax
        u = _f32(s) if ctx.s_scale == 1.0 else _f32(s) * ctx.s_scale
        ds, grads = modulate_backward(u, dy, _params32(params))
        if ctx.s_scale != 1.0:
            ds = ds * ctx.s_scale
        ds = ds.to(qm.dtype)
        dq, dk = ds @ km, ds.transpose(-2, -1) @ qm  # qm carries q's scale when it was applied first
        if ctx.q_scale != 1.0:
            dq = dq * ctx.q_scale
        dv = p.to(vm.dtype).transpose(-2, -1) @ dout
        dbias = dy.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        dq, dk, dv = (g.to(dtype) for g, dtype in zip((dq, dk, dv), ctx.dtypes))
        return (dq, dk, dv, dbias, None, *_param_grads(grads, params))


def _query_scale(matmul_dtype: torch.dtype, scale: float) -> float:
    """The factor q is multiplied by before q·kᵀ: the attention scale in float16, whose range the
    unscaled product can exceed; 1 otherwise (the scale is then folded into φ's pass)."""
    return scale if matmul_dtype == torch.float16 else 1.0


def modulated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, modulation: ScoreModulation, scale: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(φ(q·kᵀ·scale·f) + bias·f) @ v (f = ``modulation.scale_factor``): the explicit path.

    Scores in q's dtype (autocast's if on), φ and the softmax in float32 with autocast off, the
    product with v in v's dtype (autocast's if on). With a gradient: ``_ModulatedAttention``
    (one autograd Function for the whole attention, hand-written backward). Without one
    (inference): plain tensor ops with the scale folded into φ's pass.
    """
    inputs = (q, k, v, bias, *modulation.params)
    factor = modulation.scale_factor
    scale, bias = scale * factor, None if bias is None else bias * factor
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _ModulatedAttention.apply(q, k, v, bias, scale, *modulation.params)
    return _inference(q, k, v, scale, bias, modulation.params)


# Inference where flex is not used: on CPU, where it wins (docs/PERFORMANCE.md's flex-on-CPU table,
# compiled DeiT-Ti inference against flex; the DeiT table's compiled inference rows measure it too),
# and on CUDA without Triton. Plain ops rather than the Function: nothing of autograd for
# torch.compile to trace. Whether flex beats it for CUDA inference, as ``auto`` assumes: pending
# the GPU table of scripts/gpu_check.sh.
def _inference(q, k, v, scale: float, bias: Optional[torch.Tensor], params: Params) -> torch.Tensor:
    """The products under the caller's autocast, as in the gradient path; φ + softmax in float32."""
    q_scale = _query_scale(_matmul_dtype(q, k), scale)
    if q_scale != 1.0:
        q, scale = q * q_scale, scale / q_scale
    qk = q @ k.transpose(-2, -1)
    with torch.autocast(v.device.type, enabled=False):
        probs = _modulated_probs(qk, bias, params, scale).to(qk.dtype)
    return probs.to(v.dtype) @ v


# ----------------------------------------------------------------------------- chunked path

# Memory budget of one chunk's float32 (B, H, rows, N) score block; a chunk keeps a few such blocks
# alive. CUDA: a fraction of the device's memory (160 MiB on an 80 GB GPU: DeiT-B at batch 128 in 2
# chunks per layer, not 196 one-row chunks of kernel launches). CPU: 2 MiB, small enough that the
# blocks stay in cache between the ops of a chunk (the CPU tables of docs/PERFORMANCE.md).
CUDA_CHUNK_MEMORY_FRACTION = 1 / 512
CPU_CHUNK_BYTES = 2 ** 21
# Fewer query rows would make each chunk's products matrix-vector products and its per-chunk
# overhead dominate; a chunk takes at least this many rows even where that exceeds the budget.
MIN_CHUNK_ROWS = 16


def chunk_budget_bytes(device: torch.device) -> int:
    """Bytes one chunk's score block may take on ``device`` (see ``CUDA_CHUNK_MEMORY_FRACTION``)."""
    if device.type == "cuda":
        return int(_cuda_memory(device.index if device.index is not None else torch.cuda.current_device())
                   * CUDA_CHUNK_MEMORY_FRACTION)
    return CPU_CHUNK_BYTES


@torch.compiler.assume_constant_result  # a fact of the machine: compiled code needs no guard
def _cuda_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).total_memory


def chunk_rows(batch_heads: int, queries: int, keys: int, budget_bytes: int) -> int:
    """Query rows per chunk: as many as fit a float32 (batch_heads, rows, keys) block into
    ``budget_bytes``, at least ``MIN_CHUNK_ROWS`` (or all), spread evenly over the chunks."""
    rows = max(MIN_CHUNK_ROWS, budget_bytes // (4 * batch_heads * keys))
    chunks = -(-queries // min(rows, queries))
    return -(-queries // chunks)


# Custom ops, not an autograd Function: torch.compile treats them as opaque, so it neither
# breaks the graph at them nor merges the backward's recomputation with the forward (which
# would bring back the saved N×N scores). Their rows: docs/PERFORMANCE.md's peak attention memory
# table, one DeiT-S layer at 1024 tokens, chunked against the explicit path, eager and compiled.
# Memory is what they are for on every device (opt-in: attn_backend=chunked); their GPU time:
# pending the GPU table of scripts/gpu_check.sh.

@torch.library.custom_op("multimax::chunked_attention_fwd", mutates_args=())
def _chunked_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
    params: List[torch.Tensor], scale: float, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, H, N, D) in v's dtype, lse (B, H, N) the row logsumexp of φ(scores)."""
    p32 = _params32(tuple(params))
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=_acc_dtype(q), device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for i in range(0, q.shape[-2], chunk):
            rows = slice(i, i + chunk)
            y = _chunk_logits(q[..., rows, :] * scale, k, p32, bias, rows)[1]
            lse_c = torch.logsumexp(y, dim=-1, keepdim=True)
            out[..., rows, :] = y.sub_(lse_c).exp_().to(v.dtype) @ v  # y is a fresh chunk: in place
            lse[..., rows] = lse_c.squeeze(-1)
    return out, lse


@_chunked_fwd.register_fake
def _(q, k, v, bias, params, scale, chunk):
    return torch.empty_like(v, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=_acc_dtype(q))


def _chunk_logits(
    q_c: torch.Tensor, k: torch.Tensor, params: Params, bias: Optional[torch.Tensor], rows: slice
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores s = q_c·kᵀ (float32) of one query chunk, and φ(s) + bias."""
    s = _f32(q_c @ k.transpose(-2, -1))
    y = modulate(s, params)
    return s, y if bias is None else y + bias[..., rows, :]


@torch.library.custom_op("multimax::chunked_attention_bwd", mutates_args=())
def _chunked_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    bias: Optional[torch.Tensor], params: List[torch.Tensor], scale: float, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """(dq, dk, dv, d params), recomputing each chunk's scores and probabilities."""
    p32 = _params32(tuple(params))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=_acc_dtype(k), device=k.device)  # summed over chunks
    dv = torch.zeros(v.shape, dtype=_acc_dtype(v), device=v.device)
    grads: List[torch.Tensor] = []
    with torch.autocast(q.device.type, enabled=False):
        for i in range(0, q.shape[-2], chunk):
            rows = slice(i, i + chunk)
            q_c, dout_c = q[..., rows, :] * scale, dout[..., rows, :]
            s, y = _chunk_logits(q_c, k, p32, bias, rows)
            # in place where the chunk's tensors are fresh (y is s itself for softmax: keep s)
            p = torch.exp(y - lse[..., rows, None]) if y is s else y.sub_(lse[..., rows, None]).exp_()
            del y
            dv += _f32(p.to(v.dtype).transpose(-2, -1) @ dout_c)
            dp = _f32(dout_c @ v.transpose(-2, -1))
            dy = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p)  # softmax backward
            del p, dp
            ds, chunk_grads = modulate_backward(s, dy, p32)
            del s, dy
            grads = chunk_grads if not grads else [a + b for a, b in zip(grads, chunk_grads)]
            ds = ds.to(q.dtype)
            dq[..., rows, :] = (ds @ k) * scale
            dk += _f32(ds.transpose(-2, -1) @ q_c)
    return dq, dk.to(k.dtype), dv.to(v.dtype), list(_param_grads(grads, tuple(params)))


@_chunked_bwd.register_fake
def _(dout, q, k, v, lse, bias, params, scale, chunk):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), [p.new_empty(p.shape) for p in params]


def _chunked_setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, params, scale, chunk = inputs
    ctx.save_for_backward(q, k, v, output[1], bias, *params)
    ctx.scale, ctx.chunk = scale, chunk


def _chunked_backward(ctx, dout, dlse):
    q, k, v, lse, bias, *params = ctx.saved_tensors
    dq, dk, dv, dparams = _chunked_bwd(dout, q, k, v, lse, bias, params, ctx.scale, ctx.chunk)
    return dq, dk, dv, None, dparams, None, None


_chunked_fwd.register_autograd(_chunked_backward, setup_context=_chunked_setup_context)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modulation: ScoreModulation,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Memory-efficient attention: q, k, v (B, H, N, D) → (B, H, N, D) in v's dtype.

    ``bias``: optional constant float additive mask broadcastable to (B, H, N, N). Scores are
    computed in q's dtype (as the explicit path does under autocast), φ and the softmax in
    float32. Saved for backward: q, k, v and the row logsumexp (B, H, N); scores, φ and the
    probabilities only ever exist for one chunk of ``chunk_size`` query rows (default:
    ``chunk_rows`` for the device's ``chunk_budget_bytes``).
    """
    if chunk_size is None:
        chunk_size = chunk_rows(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], chunk_budget_bytes(q.device))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    factor = modulation.scale_factor
    if bias is not None:
        if bias.requires_grad:
            raise ValueError("attention backend 'chunked' takes constant masks only (no gradient)")
        bias = (bias.expand(*q.shape[:-2], q.shape[-2], k.shape[-2]) * factor).contiguous()
    return _chunked_fwd(q, k, v, bias, list(modulation.params), scale * factor, chunk_size)[0]


# ----------------------------------------------------------------------------- flex path

# flex serves CUDA: ``auto``'s MultiMax inference there, and training where proven (below). No GPU row
# exists yet: kept until the GPU table of scripts/gpu_check.sh decides (its benchmark runs softmax-SDPA,
# compiled explicit and flex side by side). On CPU it is slower (docs/PERFORMANCE.md's flex-on-CPU
# table, compiled DeiT-Ti inference against the explicit path), so ``auto`` never picks it there;
# forced, it runs forward only.
#
# torch versions (major.minor) on which flex's backward with ``flex_score_mod`` is proven on a GPU:
# scripts/gpu_check.sh passed there (flex forward and gradients equal the explicit path's in fp32
# and bf16; DeiT-S train steps) and its benchmark measured the flex train step faster than the
# compiled explicit one. Only there does ``auto`` train with flex; elsewhere it trains with the
# explicit path (compiled when ``train.compile`` is on) and keeps flex for inference. Add a
# version here only with that evidence (docs/PERFORMANCE.md says how).
FLEX_TRAINING_PROVEN: Tuple[str, ...] = ()

_compiled_flex: Optional[Callable[..., torch.Tensor]] = None


@torch.compiler.assume_constant_result  # a fact of the install: compiled code needs no guard
def _flex_on_cuda() -> bool:
    """flex importable and Triton usable (flex's CUDA kernels are Triton templates)."""
    from torch.utils._triton import has_triton

    return _FLEX_IMPORTABLE and has_triton()


def flex_available(device: torch.device) -> bool:
    """Whether flex attention can run on ``device`` in this install (CPU: forward only)."""
    if device.type == "cuda":
        return _flex_on_cuda()
    return _FLEX_IMPORTABLE and device.type == "cpu"


def flex_training_proven() -> bool:
    """Whether this torch's version is in ``FLEX_TRAINING_PROVEN``."""
    return ".".join(torch.__version__.split(".")[:2]) in FLEX_TRAINING_PROVEN


def _flex() -> Callable[..., torch.Tensor]:
    """flex_attention, compiled once per process; inside a compiled model the raw op is traced."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return _flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex_attention, dynamic=False)
    return _compiled_flex


def flex_score_mod(params: Params) -> Optional[Callable[..., torch.Tensor]]:
    """φ as flex's ``score_mod`` (None for the identity), in float32.

    The parameters are unbound into 0-d tensors before the closure captures them, so that the
    score_mod indexes no captured tensor. Inductor's flex backward computes a captured tensor's
    gradient by scattering into it, and its pre-lowering check (``validate_joint_graph``) rejects
    a tensor that requires grad and is indexed more than once (``ranges[0]``, ``ranges[1]``, …);
    a 0-d capture is read whole. tests/test_flex_joint_graph.py runs that check on CPU.
    """
    if not params:
        return None
    ranges, ts, *affine = _params32(params)
    scalars = (ranges.unbind(), ts.unbind(), *(p.reshape(()) for p in affine))

    def score_mod(score, b, h, q_idx, kv_idx):  # flex's fixed signature
        return modulate(score, scalars)
    return score_mod


def flex_attention_with(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, modulation: ScoreModulation, scale: float
) -> torch.Tensor:
    """softmax(φ(q·kᵀ·scale)) @ v with flex attention; φ is the ``score_mod``.

    flex applies ``score_mod`` to q·kᵀ·``scale``, the same scaled scores σ sees in the explicit
    path. Raises NotImplementedError where flex has no backward (CPU) and a gradient is needed.
    """
    if not flex_available(q.device):
        raise NotImplementedError(
            f"attention backend 'flex' is not usable on {q.device.type} here (needs torch with flex "
            "attention; on CUDA also Triton); use backend 'auto', 'explicit' or 'chunked'"
        )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *modulation.params))
    if needs_grad and q.device.type != "cuda":
        raise NotImplementedError(
            f"attention backend 'flex' has no backward on {q.device.type} in torch {torch.__version__}; "
            "run it under torch.no_grad() / inference_mode(), or use backend 'chunked' or 'explicit'"
        )
    out = _flex()(q, k, v, score_mod=flex_score_mod(modulation.params), scale=scale * modulation.scale_factor)
    return out.to(v.dtype)


__all__ = [
    "FUSED_NORMALIZERS", "FLEX_TRAINING_PROVEN", "ScoreModulation", "modulate", "modulate_backward",
    "modulated_attention", "chunked_attention", "chunk_rows", "chunk_budget_bytes",
    "flex_attention_with", "flex_available", "flex_score_mod", "flex_training_proven",
]
