"""Attention backends (explicit, chunked, flex, sdpa, auto) agree; the benchmark runs end to end."""
import importlib.util
import json
import os
import sys

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from models import record_attention
from models.attention import MultiMaxAttention
from models.attention_kernels import (
    ScoreModulation, chunked_attention, flex_available, modulated_attention, modulated_softmax,
)
import models.attention_kernels as kernels
from models.multimax import build_normalizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bench():
    """scripts/benchmark.py as a module (scripts/ is not a package)."""
    if "benchmark_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(ROOT, "scripts", "benchmark.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmark_script"] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmark_script"]


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
    assert mm.kernel(cuda) == "flex" and mm.kernel(cuda, masked=True) == "explicit"
    monkeypatch.setattr("models.attention.flex_available", lambda device: False)
    assert mm.kernel(cuda) == "explicit"  # the fallback
    m = _tiny("chunked")
    assert m.blocks[0].attn.kernel(cuda) == "chunked"
    with record_attention(m):
        assert m.blocks[0].attn.kernel(cpu) == "explicit"


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
    outs = {"explicit": modulated_softmax((q * 0.25) @ k.transpose(-2, -1), mod, bias) @ v,
            "modulated_attention": modulated_attention(q, k, v, mod, 0.25, bias),
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

    def explicit(q, k, v, bias, *p):  # a learnable additive bias gets its gradient too
        return modulated_softmax((q * 0.5) @ k.transpose(-2, -1), ScoreModulation(p), bias) @ v

    def attention(q, k, v, bias, *p):  # the whole-attention Function of the training path
        return modulated_attention(q, k, v, ScoreModulation(p), 0.5, bias)

    assert torch.autograd.gradcheck(chunked, (q, k, v, *params))
    assert torch.autograd.gradcheck(explicit, (q, k, v, bias.clone().requires_grad_(), *params))
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
        ref = modulated_softmax((q * 0.25) @ k.transpose(-2, -1), mod) @ v
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grads, ref_grads = _grads(out.float(), [q, k, v, *params]), _grads(ref.float(), [q, k, v, *params])
    for label, a, b in zip(["q", "k", "v", "ranges", "ts"], grads, ref_grads):
        assert a.dtype == torch.float32, label
        assert (a - b).norm() <= 0.03 * b.norm(), f"d{label}: {(a - b).norm()} vs {b.norm()}"


@pytest.mark.parametrize("n", [50, 200])
def test_blocked_inference_equals_one_block(monkeypatch, n):
    """Inference on CPU in blocks of heads per batch entry (last block short) equals the
    gradient path; under autocast too; with a mask (one block)."""
    mod = ScoreModulation.of(_normalizer())
    q, k, v = (t.detach() for t in _qkv(b=3, h=3, n=n))
    bias = torch.zeros(n, n).masked_fill(torch.rand(n, n, generator=torch.Generator().manual_seed(3)) > 0.8, -torch.inf)
    bias.fill_diagonal_(0.0)
    with torch.enable_grad():
        ref, ref_masked = (modulated_attention(q, k, v.clone().requires_grad_(), mod, 0.25, b).detach() for b in (None, bias))
    monkeypatch.setattr(kernels, "CPU_BLOCK_ELEMENTS", 2 * n * n)  # 2 heads per block: 2 blocks per entry
    calls, block = [], kernels._inference_block
    monkeypatch.setattr(kernels, "_inference_block", lambda q, *a: calls.append(tuple(q.shape)) or block(q, *a))
    with torch.inference_mode():
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.25), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.25, bias), ref_masked, rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = modulated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mod, 0.25)
    # 3 entries × (2 heads + 1 head), then the masked call as one block, then 6 blocks under autocast
    assert calls[:7] == [(2, n, 16), (1, n, 16)] * 3 + [(3, 3, n, 16)], calls
    assert len(calls) == 13
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_ref = modulated_attention(qb, kb, vb, mod, 0.25).detach()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low, low_ref, rtol=1e-2, atol=1e-2)


def test_inference_blocks_are_bounded_under_compile(monkeypatch):
    """Compiled, a large batch is traced as one block instead of hundreds (compile time)."""
    q = torch.empty(40, 6, 196, 64)
    assert kernels._heads_per_block(q, q) == 3  # 80 blocks of 3 heads, eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kernels._heads_per_block(q, q) is None
    assert kernels._heads_per_block(q[:8], q[:8]) == 3  # 16 blocks: traced as blocks
    assert kernels._heads_per_block(q[:1, :2], q[:1, :2]) is None  # one block anyway


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
    torch.testing.assert_close(modulated_softmax((q * 0.25) @ k.transpose(-2, -1), mod) @ v, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(modulated_attention(q, k, v, mod, 0.25), ref, rtol=1e-5, atol=1e-6)


def test_chunked_peak_memory_is_a_fraction_of_explicit():
    bench = _bench()
    norm = _normalizer()
    mod = ScoreModulation.of(norm)
    q, k, v = _qkv(b=1, h=2, n=512, d=16)
    peaks = {}
    for name, fn in {"explicit": lambda: modulated_softmax((q * 0.25) @ k.transpose(-2, -1), mod) @ v,
                     "chunked": lambda: chunked_attention(q, k, v, mod, 0.25, chunk_size=32)}.items():
        with bench.LiveTensorBytes() as tracker:
            out = fn()
            out.backward(torch.ones_like(out))
        peaks[name] = tracker.peak
    n2_bytes = 2 * 512 * 512 * 4
    assert peaks["explicit"] >= 2 * n2_bytes  # scores and probabilities are materialised
    assert peaks["chunked"] <= peaks["explicit"] / 4


def test_live_tensor_counter():
    bench = _bench()
    with bench.LiveTensorBytes() as tracker:
        a = torch.empty(1000, 1000)  # 4 MB
        b = a.view(-1)[:10]  # a view: no new storage
        del a, b
        c = torch.ones(500, 1000)  # 2 MB, after the 4 MB were freed
    assert tracker.peak == 4_000_000 and tracker.current == 2_000_000
    del c


# ----------------------------------------------------------------------------- compile and flex

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
def test_auto_uses_flex_on_cuda_and_matches_explicit():
    torch.manual_seed(0)
    a, b = _tiny("explicit").cuda(), _tiny("auto").cuda()
    b.load_state_dict(a.state_dict())
    expected = "flex" if flex_available(torch.device("cuda")) else "explicit"
    assert b.blocks[0].attn.kernel(torch.device("cuda")) == expected
    x = torch.randn(2, 3, 32, 32, device="cuda")
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-4)


@CUDA
def test_chunked_matches_explicit_on_cuda():
    norm = _normalizer().cuda()
    q, k, v = [t.detach().cuda().requires_grad_() for t in _qkv()]
    mod = ScoreModulation.of(norm)
    out, ref = chunked_attention(q, k, v, mod, 0.25, chunk_size=16), _reference(q, k, v, norm, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(_grads(out, [q, k, v, *norm.parameters()]), _grads(ref, [q, k, v, *norm.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- benchmark script

def test_benchmark_end_to_end(tmp_path):
    bench = _bench()
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    rc = bench.main(["--model", "vit_micro_multimax_patch7_28", "--attn-normalizer", "multimax", "softmax",
                     "--backend", "auto", "chunked", "--mode", "train", "infer", "--batch-size", "4",
                     "--warmup", "1", "--repeats", "2", "--steps", "1", "--threads", "1",
                     "--out-json", str(out_json), "--out-md", str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    rows = data["throughput"]
    assert len(rows) == 8 and data["machine"]["torch"] == torch.__version__
    for r in rows:
        assert len(r["times"]) == 2 and r["img_per_s"] > 0 and r["peak_extra_mb"] is not None
        baseline = rows[r["baseline"]]
        assert baseline["attn"] == "softmax" and baseline["variant"]["mode"] == r["variant"]["mode"]
    assert {r["kernel"] for r in rows} == {"explicit", "sdpa", "chunked"}
    md = out_md.read_text()
    assert md.count("| vit_micro_multimax_patch7_28 |") == 8 and "× baseline" in md


def test_benchmark_optimizer_variants(tmp_path):
    """--optim-impl is a variant axis of train steps only; each optimizer is its own baseline."""
    bench = _bench()
    out_json = tmp_path / "o.json"
    rc = bench.main(["--model", "vit_micro_multimax_patch7_28", "--attn-normalizer", "softmax", "multimax",
                     "--optim-impl", "loop", "auto", "--mode", "train", "infer", "--batch-size", "2",
                     "--warmup", "1", "--repeats", "1", "--steps", "1", "--threads", "1", "--no-memory",
                     "--out-json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["throughput"]
    train = [(r["attn"], r["optimizer"]) for r in rows if r["variant"]["mode"] == "train"]
    assert sorted(train) == [("multimax", "fused"), ("multimax", "loop"), ("softmax", "fused"), ("softmax", "loop")]
    assert [r["optimizer"] for r in rows if r["variant"]["mode"] == "infer"] == ["–", "–"]
    for r in rows:
        assert rows[r["baseline"]]["optimizer"] == r["optimizer"] and rows[r["baseline"]]["attn"] == "softmax"


def test_benchmark_memory_preset(tmp_path):
    bench = _bench()
    out_json = tmp_path / "m.json"
    rc = bench.main(["--preset", "memory", "--model", "vit_micro_multimax_patch7_28", "--img-size", "28",
                     "--compile", "off", "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--no-rss",
                     "--out-json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["attention_memory"]
    assert [r["kernel"] for r in rows] == ["sdpa", "explicit", "chunked"]
    assert all(r["peak_mb"] > 0 and r["spec"]["tokens"] == 16 for r in rows) and rows[1]["ratio"] == 1.0


def test_benchmark_rss_probe():
    bench = _bench()
    spec = bench.LayerSpec("vit_micro_multimax_patch7_28", "multimax", "explicit", False, 8, 256, "fp32")
    # explicit MultiMax at 256 tokens, batch 8, 4 heads: one fp32 score tensor is 8 MiB, and the
    # scores, the probabilities and their gradients are all materialised
    assert bench._rss_probe(spec) > 3 * 8


def test_benchmark_user_errors(capsys):
    bench = _bench()
    assert bench.main(["--model", "no_such_model", "--repeats", "1"]) == 2
    assert "no_such_model" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_median_ci_brackets_the_median():
    bench = _bench()
    xs = [1.0 + 0.01 * ((7 * i) % 41) for i in range(41)]  # 1.00 … 1.40, shuffled
    lo, hi = bench.median_ci(xs)
    assert lo < sorted(xs)[20] < hi
    assert (lo, hi) == (sorted(xs)[14], sorted(xs)[26])  # ranks 20.5 ∓ 6.3 of 41
    assert bench.median_ci([1.2]) == (1.2, 1.2)
