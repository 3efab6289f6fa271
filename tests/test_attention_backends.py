"""Attention backends (explicit, chunked, flex, sdpa, auto): they agree, and auto picks the right one."""
import os
from types import SimpleNamespace

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from models import record_attention
from models.attention import MultiMaxAttention
from models.attention_kernels import ScoreModulation, chunked_attention, flex_available, modulated_attention
import models.attention_kernels as kernels
from models.multimax import build_normalizer

from engine.config import load_config
from helpers import ROOT

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny(backend, name="deit_tiny_multimax_patch16_224", **kw):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3, "num_classes": 7, **kw}
    return timm.create_model(name, attn_backend=backend, **kw)


def _normalizer(order=2, affine=False, dtype=torch.float32, seed=0):
    """A MultiMax normalizer with modulator values far from identity, so σ matters."""
    g = torch.Generator().manual_seed(seed)
    norm = build_normalizer("multimax", order, "zeros", affine).to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.6)
    return norm


def _qkv(b=2, h=3, n=50, d=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _grads(out, tensors):
    g = torch.Generator().manual_seed(5)
    return torch.autograd.grad(out, tensors, torch.randn(out.shape, generator=g, dtype=out.dtype))


# ----------------------------------------------------------------------------- model level

@pytest.mark.parametrize("normalizer", ["multimax", "softmax"])
def test_model_backends_match_explicit(normalizer):
    torch.manual_seed(0)
    name = f"deit_tiny_{'multimax' if normalizer == 'multimax' else 'gap'}_patch16_224"
    kw = {"softmax_temperature": 0.6} if normalizer == "softmax" else {}
    ref = _tiny("explicit", name, **kw)
    x = torch.randn(3, 3, 32, 32)
    y_ref = ref(x)
    g_ref = torch.autograd.grad(y_ref.sum(), list(ref.parameters()))
    for backend in ["chunked", "auto"] + (["sdpa"] if normalizer == "softmax" else []):
        m = _tiny(backend, name, **kw)
        m.load_state_dict(ref.state_dict())
        y = m(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=backend)
        for (n, _), a, b in zip(ref.named_parameters(), torch.autograd.grad(y.sum(), list(m.parameters())), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{backend}: {n}")


def test_kernel_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    mm, sm = _tiny("auto").blocks[0].attn, _tiny("auto", "deit_tiny_gap_patch16_224").blocks[0].attn
    assert (mm.kernel(cpu), sm.kernel(cpu)) == ("explicit", "sdpa")
    monkeypatch.setattr("models.attention.flex_available", lambda device: True)
    with torch.no_grad():
        assert mm.kernel(cuda) == "flex" and mm.kernel(cuda, masked=True) == "explicit"
    monkeypatch.setattr("models.attention.flex_available", lambda device: False)
    with torch.no_grad():
        assert mm.kernel(cuda) == "explicit"  # the fallback
    m = _tiny("chunked")
    assert m.blocks[0].attn.kernel(cuda) == "chunked"
    with record_attention(m):
        assert m.blocks[0].attn.kernel(cpu) == "explicit"


def test_auto_trains_with_flex_only_where_its_backward_is_proven(monkeypatch):
    """On a (mocked) CUDA device with flex usable: inference takes flex; training takes the
    explicit path unless this torch's version is in FLEX_TRAINING_PROVEN. The forward calls
    the kernel the choice names."""
    m = _tiny("auto")
    version = ".".join(torch.__version__.split(".")[:2])
    assert version not in kernels.FLEX_TRAINING_PROVEN  # nothing proven on a GPU for this torch yet
    monkeypatch.setattr("models.attention.flex_available", lambda device: True)
    monkeypatch.setattr(MultiMaxAttention, "_weight_device", lambda self: torch.device("cuda", 0))
    called = []
    for name in ("flex_attention_with", "modulated_attention"):
        real = getattr(kernels, name)
        monkeypatch.setattr(f"models.attention.{name}", lambda *a, _n=name, _f=real, **kw: called.append(_n) or _f(*a, **kw))
    monkeypatch.setattr(kernels, "flex_available", lambda device: True)  # runs flex's CPU forward inside
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert called == ["modulated_attention"] * 2 and m.blocks[0].attn.kernel(torch.device("cuda")) == "explicit"
    called.clear()
    with torch.no_grad():
        m.eval()(x)
    assert called == ["flex_attention_with"] * 2
    monkeypatch.setattr(kernels, "FLEX_TRAINING_PROVEN", (version,))
    assert m.train().blocks[0].attn.kernel(torch.device("cuda")) == "flex"
    # dropout while training, or a mask, keep the explicit path whatever is proven
    drop = _tiny("auto", attn_drop_rate=0.1).blocks[0].attn
    assert drop.kernel(torch.device("cuda")) == "explicit"
    assert m.blocks[0].attn.kernel(torch.device("cuda"), masked=True) == "explicit"


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_multimax_presets_compile_the_explicit_training_path(size):
    """Where auto trains MultiMax with the explicit path (flex not proven), the presets compile it."""
    cfg = load_config(os.path.join(ROOT, "configs", f"deit_{size}_multimax.yaml"))
    assert cfg.train.compile and cfg.model.attn_backend == "auto"
    # the model name decides the normalizers (the presets leave them to the registered variant)
    assert "_multimax_" in cfg.model.name and cfg.model.attn_normalizer in (None, "multimax")


def test_chunk_rows_follow_each_devices_memory_budget(monkeypatch):
    """DeiT-B at batch 128 (12 heads, 196 tokens): a few chunks per layer on GPUs of 16 to
    80 GB and at least MIN_CHUNK_ROWS rows on CPU, never one row per chunk."""
    bh, n = 128 * 12, 196
    row_bytes = 4 * bh * n
    for gib, max_chunks in [(80, 2), (40, 3), (16, 8)]:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, _g=gib: SimpleNamespace(total_memory=_g * 2**30))
        budget = kernels.chunk_budget_bytes(torch.device("cuda", 0))
        assert budget == gib * 2**30 // 512
        rows = kernels.chunk_rows(bh, n, n, budget)
        chunks = -(-n // rows)
        assert chunks <= max_chunks and rows * row_bytes <= budget, (gib, rows)
        assert rows * chunks - n < chunks  # the chunks are even: none is a short remainder
    cpu_rows = kernels.chunk_rows(bh, n, n, kernels.chunk_budget_bytes(torch.device("cpu")))
    assert cpu_rows >= kernels.MIN_CHUNK_ROWS and -(-n // cpu_rows) <= 13
    # where the budget fits more than the minimum, it decides: one DeiT-S layer at 1024 tokens, batch 4
    assert kernels.chunk_rows(4 * 6, 1024, 1024, kernels.CPU_CHUNK_BYTES) == 21
    assert kernels.chunk_rows(4, 8, 8, kernels.CPU_CHUNK_BYTES) == 8  # short sequences: one chunk


def test_cuda_chunk_budget_traces_as_a_constant(monkeypatch):
    """Compiled, the device's memory is read once at trace time, not a graph break per layer."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=2**36))
    explain = torch._dynamo.explain(lambda x: x * kernels.chunk_budget_bytes(torch.device("cuda", 0)))(torch.ones(2))
    assert explain.graph_break_count == 0


def test_float16_scales_q_before_the_product():
    """In float16, q·kᵀ before the 1/√d scale overflows (> 65504) where timm's order (scale q
    first) does not: the explicit path follows timm's, with and without gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 64, generator=g) * s for s in (60, 60, 1))
    assert (q @ k.transpose(-2, -1)).abs().max() > 65504 > (q * 0.125 @ k.transpose(-2, -1)).abs().max()
    norm = _normalizer()
    mod = ScoreModulation.of(norm)
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    out = modulated_attention(q, k, v, mod, 0.125)
    ref = _reference(q, k, v, norm, 0.125)  # timm's order
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    # scores this large make the softmax one-hot, so the gradients are ill-conditioned: finite is the point
    assert all(torch.isfinite(g).all() for g in _grads(out, [q, k, v, *mod.params]))
    with torch.no_grad():
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.125), ref, rtol=2e-3, atol=2e-3)


def test_float16_gradients_with_q_scaled_first():
    """The float16 branch's backward (q scaled before the product) against autograd."""
    norm = _normalizer()
    mod = ScoreModulation.of(norm)
    q, k, v = (t.detach().half().requires_grad_() for t in _qkv(d=64))
    out = modulated_attention(q, k, v, mod, 0.125)
    ref = _reference(q, k, v, norm, 0.125)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for label, a, b in zip("q k v ranges ts".split(), _grads(out, [q, k, v, *mod.params]), _grads(ref, [q, k, v, *mod.params])):
        assert (a.float() - b.float()).norm() <= 0.01 * b.float().norm(), label


@pytest.mark.parametrize("backend", ["chunked", "flex", "auto"])
def test_record_attention_forces_explicit(backend):
    m = _tiny(backend).eval()
    with torch.no_grad(), record_attention(m) as rec:
        m(torch.randn(2, 3, 32, 32))
    p = rec.probs["blocks.1.attn"][0]
    assert p.shape == (2, 3, 16, 16)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 16))


def test_constructor_errors():
    for kw, match in [(dict(backend="chunked", attn_drop=0.1), "dropout"), (dict(backend="flex", attn_drop=0.1), "dropout"),
                      (dict(backend="chunked", normalizer="sparsemax"), "sparsemax"), (dict(backend="fused"), "fused")]:
        with pytest.raises(ValueError, match=match):
            MultiMaxAttention(24, 3, **kw)


def test_chunked_masks_match_explicit():
    torch.manual_seed(0)
    a = MultiMaxAttention(24, 3, backend="explicit")
    b = MultiMaxAttention(24, 3, backend="chunked")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.normalizer.modulator.ts.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]))
        b.normalizer.modulator.ts.copy_(a.normalizer.modulator.ts)
    x = torch.randn(2, 9, 24)
    keep = torch.rand(9, 9) > 0.3
    keep |= torch.eye(9, dtype=torch.bool)
    torch.testing.assert_close(b(x, attn_mask=keep), a(x, attn_mask=keep), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b(x, is_causal=True), a(x, is_causal=True), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_chunked_close_to_explicit():
    torch.manual_seed(0)
    a, b = _tiny("explicit"), _tiny("chunked")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = a(x), b(x)
    assert ya.dtype == yb.dtype == torch.float32
    torch.testing.assert_close(yb, ya, rtol=0.05, atol=0.05)
    yb.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in b.parameters())


# ----------------------------------------------------------------------------- kernels vs autograd

def _reference(q, k, v, norm, scale, bias=None):
    """The materialising path with autograd through models.multimax (independent of the kernels)."""
    return norm((q * scale) @ k.transpose(-2, -1), bias) @ v


@pytest.mark.parametrize("order,affine", [(2, False), (1, False), (3, True)])
def test_kernels_match_autograd_reference(order, affine):
    norm = _normalizer(order, affine)
    params = list(norm.parameters())
    q, k, v = _qkv()
    bias = torch.zeros(50, 50).masked_fill(torch.rand(50, 50, generator=torch.Generator().manual_seed(3)) > 0.8, -torch.inf)
    bias.fill_diagonal_(0.0)
    ref = _reference(q, k, v, norm, 0.25, bias)
    g_ref = _grads(ref, [q, k, v, *params])
    mod = ScoreModulation.of(norm)
    outs = {"modulated_attention": modulated_attention(q, k, v, mod, 0.25, bias),
            "chunked": chunked_attention(q, k, v, mod, 0.25, bias, chunk_size=16)}  # 4 chunks, last one short
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=name)
        for label, a, b in zip(["q", "k", "v", "ranges", "ts", "scale", "shift"], _grads(out, [q, k, v, *params]), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name}: d{label}")


def test_gradcheck_float64():
    norm = _normalizer(2, affine=True, dtype=torch.float64)
    params = tuple(norm.parameters())
    q, k, v = _qkv(b=1, h=2, n=6, d=4, dtype=torch.float64)
    bias = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def chunked(q, k, v, *p):
        return chunked_attention(q, k, v, ScoreModulation(p), 0.5, bias, chunk_size=4)

    def attention(q, k, v, bias, *p):  # the whole-attention Function of the training path; a learnable
        return modulated_attention(q, k, v, ScoreModulation(p), 0.5, bias)  # additive bias gets its gradient too

    assert torch.autograd.gradcheck(chunked, (q, k, v, *params))
    assert torch.autograd.gradcheck(attention, (q, k, v, bias.clone().requires_grad_(), *params))


def test_modulated_attention_under_autocast():
    """bf16 autocast, float32 inputs: the products run in bf16 as autograd would run them,
    the gradients come back in float32 and agree with autograd through the same ops."""
    norm = _normalizer()
    params = list(norm.parameters())
    q, k, v = _qkv()
    mod = ScoreModulation.of(norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulated_attention(q, k, v, mod, 0.25)
        ref = _reference(q, k, v, norm, 0.25)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grads, ref_grads = _grads(out.float(), [q, k, v, *params]), _grads(ref.float(), [q, k, v, *params])
    for label, a, b in zip(["q", "k", "v", "ranges", "ts"], grads, ref_grads):
        assert a.dtype == torch.float32, label
        assert (a - b).norm() <= 0.03 * b.norm(), f"d{label}: {(a - b).norm()} vs {b.norm()}"


def test_inference_path_equals_the_gradient_path():
    """Without a gradient the explicit path runs plain ops (no autograd Function): the same
    output as with one, with and without a mask, and close under bf16 autocast."""
    n = 50
    mod = ScoreModulation.of(_normalizer())
    q, k, v = (t.detach() for t in _qkv(b=3, h=3, n=n))
    bias = torch.zeros(n, n).masked_fill(torch.rand(n, n, generator=torch.Generator().manual_seed(3)) > 0.8, -torch.inf)
    bias.fill_diagonal_(0.0)
    with torch.enable_grad():
        ref, ref_masked = (modulated_attention(q, k, v.clone().requires_grad_(), mod, 0.25, b).detach() for b in (None, bias))
    with torch.inference_mode():
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.25), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.25, bias), ref_masked, rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = modulated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mod, 0.25)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_ref = modulated_attention(qb, kb, vb, mod, 0.25).detach()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low, low_ref, rtol=1e-2, atol=1e-2)


def test_chunked_custom_ops_opcheck():
    """The fake (meta) kernels match the real ones, also for the strided q, k, v of the model."""
    norm = _normalizer()
    qkv = torch.randn(2, 10, 3, 3, 8).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D) as in MultiMaxAttention
    q, k, v = (t.requires_grad_() for t in qkv.clone().unbind(0))
    params = list(norm.parameters())
    torch.library.opcheck(torch.ops.multimax.chunked_attention_fwd, (q, k, v, None, params, 0.3, 4))
    out, lse = torch.ops.multimax.chunked_attention_fwd(q, k, v, None, params, 0.3, 4)
    dout = torch.randn(2, 10, 3, 8).transpose(1, 2)  # (B, H, N, D), not contiguous
    torch.library.opcheck(torch.ops.multimax.chunked_attention_bwd,
                          (dout, q.detach(), k.detach(), v.detach(), lse.detach(), None,
                           [p.detach() for p in params], 0.3, 4))


def test_softmax_temperature_kernels_match_sdpa():
    norm = build_normalizer("softmax", temperature=0.7)
    q, k, v = _qkv()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25 / 0.7)
    mod = ScoreModulation.of(norm)
    torch.testing.assert_close(chunked_attention(q, k, v, mod, 0.25, chunk_size=16), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_reference(q, k, v, norm, 0.25), ref, rtol=1e-5, atol=1e-6)  # the explicit path
    with torch.no_grad():
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.25), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- compile and flex

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["explicit", "chunked", "flex"])
def test_model_traces_without_graph_breaks(backend):
    """One graph for training, bf16 autocast and inference (flex: inference only on CPU)."""
    m = _tiny(backend)
    contexts = {"train": torch.enable_grad, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                "no_grad": torch.no_grad, "inference": torch.inference_mode}
    for name, ctx in contexts.items():
        if backend == "flex" and name in ("train", "bf16"):
            continue
        with ctx():
            explain = torch._dynamo.explain(m)(torch.randn(2, 3, 32, 32))
        assert explain.graph_break_count == 0, (name, explain.break_reasons)


@pytest.mark.slow
def test_compiled_explicit_multimax_matches_eager():
    torch.manual_seed(0)
    eager = MultiMaxAttention(32, 2, backend="explicit")
    with torch.no_grad():
        eager.normalizer.modulator.ts.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]))
    x = torch.randn(2, 24, 32, requires_grad=True)
    compiled = torch.compile(eager)
    out = compiled(x)
    grads = _grads(out, [x, *eager.parameters()])
    ref = eager(x)
    for a, b in zip(grads, _grads(ref, [x, *eager.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not flex_available(torch.device("cpu")), reason="flex attention not in this torch")
def test_flex_forward_matches_explicit_on_cpu():
    torch.manual_seed(0)
    a, b = _tiny("explicit").eval(), _tiny("flex").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="no backward on cpu"):
        b(x)  # gradients needed: flex has none on CPU


@CUDA
@pytest.mark.parametrize("normalizer", ["multimax", "softmax"])
def test_flex_forward_and_gradients_match_explicit_on_cuda(normalizer):
    if not flex_available(torch.device("cuda")):
        pytest.skip("flex attention unusable on this GPU install")
    norm = (_normalizer() if normalizer == "multimax" else build_normalizer("softmax", temperature=0.7)).cuda()
    params = list(norm.parameters())
    q, k, v = [t.detach().cuda().requires_grad_() for t in _qkv(n=200, d=64)]
    from models.attention_kernels import flex_attention_with
    out = flex_attention_with(q, k, v, ScoreModulation.of(norm), 0.125)
    ref = _reference(q, k, v, norm, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(out, [q, k, v, *params]), _grads(ref, [q, k, v, *params])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@CUDA
def test_auto_on_cuda_matches_explicit():
    """auto on a GPU: flex for inference (where flex is usable), for training only where its
    backward is proven; either way the explicit path's outputs and gradients."""
    torch.manual_seed(0)
    a, b = _tiny("explicit").cuda(), _tiny("auto").cuda()
    b.load_state_dict(a.state_dict())
    cuda, usable = torch.device("cuda"), flex_available(torch.device("cuda"))
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert b.blocks[0].attn.kernel(cuda) == ("flex" if usable else "explicit")
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-4)
    assert b.blocks[0].attn.kernel(cuda) == ("flex" if usable and kernels.flex_training_proven() else "explicit")
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
    for (n, _), ga, gb in zip(a.named_parameters(), torch.autograd.grad(ya.sum(), list(a.parameters())),
                              torch.autograd.grad(yb.sum(), list(b.parameters()))):
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4, msg=n)


@CUDA
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.slow
def test_compiled_model_trains_with_flex_on_cuda(dtype):
    """The model compiled as train.compile compiles it, flex inside: Inductor lowers flex's
    backward with our score_mod (what FLEX_TRAINING_PROVEN rests on) and matches explicit."""
    if not flex_available(torch.device("cuda")):
        pytest.skip("flex attention unusable on this GPU install")
    torch.manual_seed(0)
    a, b = _tiny("explicit", modulator_init="zeros").cuda(), _tiny("flex", modulator_init="zeros").cuda()
    with torch.no_grad():
        for m in (a, b):
            for i, blk in enumerate(m.blocks):
                blk.attn.normalizer.modulator.ts.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]) * (i + 1))
    b.load_state_dict(a.state_dict())
    compiled = torch.compile(b)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        ya, yb = a(x), compiled(x)
    tol, grad_tol = (1e-3, 1e-2) if dtype == "fp32" else (5e-2, 1e-1)  # bf16: the products round differently
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
    for (n, _), ga, gb in zip(a.named_parameters(), torch.autograd.grad(ya.float().sum(), list(a.parameters())),
                              torch.autograd.grad(yb.float().sum(), list(b.parameters()))):
        assert (gb - ga).norm() <= grad_tol * ga.norm() + 1e-6, n


@CUDA
def test_chunked_matches_explicit_on_cuda():
    norm = _normalizer().cuda()
    q, k, v = [t.detach().cuda().requires_grad_() for t in _qkv()]
    mod = ScoreModulation.of(norm)
    out, ref = chunked_attention(q, k, v, mod, 0.25, chunk_size=16), _reference(q, k, v, norm, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(_grads(out, [q, k, v, *norm.parameters()]), _grads(ref, [q, k, v, *norm.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
