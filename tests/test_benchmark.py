"""scripts/benchmark.py and scripts/benchmark_memory.py: end to end on tiny models, the variant
axes, the deit preset and the statistics; the memory counters (scripts/_benchmarking.py, the RSS
probe) and the memory target they measure (chunked attention's peak)."""
import json

import pytest
import torch

from scripts._benchmarking import LiveTensorBytes, median_ci
from helpers import load_script
from models.attention_kernels import ScoreModulation, chunked_attention, modulated_attention
from models.multimax import build_normalizer

pytestmark = pytest.mark.slow


def test_benchmark_end_to_end(tmp_path):
    bench = load_script("benchmark")
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


def test_benchmark_memory_end_to_end(tmp_path):
    bench = load_script("benchmark_memory")
    out_json, out_md = tmp_path / "m.json", tmp_path / "m.md"
    rc = bench.main(["--model", "vit_micro_multimax_patch7_28", "--img-size", "28", "--compile", "off",
                     "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--no-rss",
                     "--out-json", str(out_json), "--out-md", str(out_md)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["attention_memory"]
    assert [r["kernel"] for r in rows] == ["sdpa", "explicit", "chunked"]
    assert all(r["peak_mb"] > 0 and r["spec"]["tokens"] == 16 for r in rows) and rows[1]["ratio"] == 1.0
    assert out_md.read_text().count("| vit_micro_multimax_patch7_28 |") == 3


def test_benchmark_rss_probe():
    bench = load_script("benchmark_memory")
    spec = bench.LayerSpec("vit_micro_multimax_patch7_28", "multimax", "explicit", False, 8, 256, "fp32")
    # explicit MultiMax at 256 tokens, batch 8, 4 heads: one fp32 score tensor is 8 MiB, and the
    # scores, the probabilities and their gradients are all materialised
    assert bench.rss_probe(spec) > 3 * 8


def test_benchmark_user_errors(capsys):
    for script, args in (("benchmark", ["--model", "no_such_model", "--repeats", "1"]),
                         ("benchmark_memory", ["--model", "no_such_model", "--no-rss"]),
                         ("benchmark", ["--repeats", "0"]), ("benchmark_memory", ["--batch-size", "0"])):
        assert load_script(script).main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{script}.py: error: ") and ("no_such_model" in err or "must be >= 1" in err), err
    if not torch.cuda.is_available():
        assert load_script("benchmark").main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_median_ci_brackets_the_median():
    xs = [1.0 + 0.01 * ((7 * i) % 41) for i in range(41)]  # 1.00 … 1.40, shuffled
    lo, hi = median_ci(xs)
    assert lo < sorted(xs)[20] < hi
    assert (lo, hi) == (sorted(xs)[14], sorted(xs)[26])  # ranks 20.5 ∓ 6.3 of 41
    assert median_ci([1.2]) == (1.2, 1.2)


def test_deit_preset_puts_flex_next_to_compiled_explicit_on_cuda():
    """On CUDA the deit preset times softmax-SDPA, MultiMax explicit and MultiMax flex side by
    side for each compile flag; on CPU (no flex backward) MultiMax runs as auto picks it."""
    bench = load_script("benchmark")
    groups = bench.deit_groups(128, ["bf16"], [False, True], ["train"], sizes=["small"], device=torch.device("cuda"))
    (name, variants), = groups.items()
    assert name == "deit_small-train-bf16"
    assert [(v.model.split("_")[2], v.backend, v.compile, v.fused) for v in variants] == [
        ("gap", "auto", False, True), ("multimax", "explicit", False, True), ("multimax", "flex", False, True),
        ("multimax", "explicit", False, False),
        ("gap", "auto", True, True), ("multimax", "explicit", True, True), ("multimax", "flex", True, True),
        ("multimax", "explicit", True, False)]
    cpu = bench.deit_groups(8, ["fp32"], [True], ["train", "infer"], device=torch.device("cpu"))
    assert list(cpu) == ["deit_tiny-train-fp32", "deit_tiny-infer-fp32", "deit_small-train-fp32", "deit_small-infer-fp32"]
    assert [(v.backend, v.fused) for v in cpu["deit_tiny-train-fp32"]] == [("auto", True), ("auto", True),
                                                                            ("explicit", False)]
    assert [(v.backend, v.fused) for v in cpu["deit_tiny-infer-fp32"]] == [("auto", True), ("auto", True)]


def test_deit_preset_runs_on_the_micro_size(tmp_path):
    bench = load_script("benchmark")
    out_json = tmp_path / "d.json"
    rc = bench.main(["--preset", "deit", "--sizes", "micro", "--mode", "train", "--compile", "off", "--batch-size", "2",
                     "--warmup", "1", "--repeats", "1", "--steps", "1", "--threads", "1", "--no-memory",
                     "--out-json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["throughput"]
    assert [(r["attn"], r["kernel"], r["variant"]["dtype"]) for r in rows] == [
        ("softmax", "sdpa", "fp32"), ("multimax", "explicit", "fp32"), ("multimax", "reference", "fp32")]
    assert rows[2]["baseline"] == 0 and rows[2]["ratio"] > 0


def test_the_reference_row_trains_through_the_reference_normalizer(monkeypatch):
    """fused=False: no attention layer calls the explicit kernel (hand-written backward); the
    attention normalizers run as modules under autograd and the step updates the weights."""
    import models.attention as attention
    bench = load_script("benchmark")

    def refuse(*args, **kwargs):
        raise AssertionError("the reference row ran the explicit kernel")
    calls = []
    monkeypatch.setattr(attention, "modulated_attention", refuse)
    v = bench.Variant("vit_micro_multimax_patch7_28", backend="explicit", batch_size=2, fused=False)
    step, result = bench.build_step(v, torch.device("cpu"), None)
    assert result.kernel == "reference"
    model = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
    for block in model.blocks:
        block.attn.normalizer.register_forward_hook(lambda m, i, o: calls.append(m))
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    step()
    assert len(calls) == len(model.blocks)
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    fused = bench.Variant("vit_micro_multimax_patch7_28", backend="explicit", batch_size=2)
    with pytest.raises(AssertionError, match="explicit kernel"):
        bench.build_step(fused, torch.device("cpu"), None)[0]()


def test_chunked_peak_memory_is_a_fraction_of_explicit():
    g = torch.Generator().manual_seed(0)
    norm = build_normalizer("multimax")
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.6)  # σ far from identity
    mod = ScoreModulation.of(norm)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g).requires_grad_() for _ in range(3))
    peaks = {}
    for name, fn in {"explicit": lambda: modulated_attention(q, k, v, mod, 0.25),
                     "chunked": lambda: chunked_attention(q, k, v, mod, 0.25, chunk_size=32)}.items():
        with LiveTensorBytes() as tracker:
            out = fn()
            out.backward(torch.ones_like(out))
        peaks[name] = tracker.peak
    n2_bytes = 2 * 512 * 512 * 4
    assert peaks["explicit"] >= 2 * n2_bytes  # scores and probabilities are materialised
    assert peaks["chunked"] <= peaks["explicit"] / 4


def test_live_tensor_counter():
    with LiveTensorBytes() as tracker:
        a = torch.empty(1000, 1000)  # 4 MB
        b = a.view(-1)[:10]  # a view: no new storage
        del a, b
        c = torch.ones(500, 1000)  # 2 MB, after the 4 MB were freed
    assert tracker.peak == 4_000_000 and tracker.current == 2_000_000
    del c
