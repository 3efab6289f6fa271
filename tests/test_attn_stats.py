"""The paper's sparsity S and multi-modality M, and the per-layer/per-head accumulator."""
import json
import math

import pytest
import timm
import torch

import engine.attn_stats as attn_stats
import models
from engine.attn_stats import AttentionStats, entropy, fraction_below, multimodality, sparsity

PAPER_M = {10: 1.0, 8: 0.2384, 6: 0.0360, 4: 0.0050, 2: 0.0007}  # softmax(t=1) on (10, x2, -1)


def _paper_inputs(dtype):
    return torch.tensor([[10.0, x2, -1.0] for x2 in PAPER_M], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_paper_values_softmax(dtype):
    x = _paper_inputs(torch.float64)
    p = torch.softmax(x, dim=-1)
    m = multimodality(x.to(dtype), p.to(dtype))
    s = sparsity(x.to(dtype), p.to(dtype))
    tol = 5e-5 if dtype != torch.bfloat16 else 5e-3  # bf16 probabilities carry 3 significant digits
    for got, want in zip(m.tolist(), PAPER_M.values()):
        assert got == pytest.approx(want, abs=tol)
    if dtype != torch.bfloat16:  # exp(-p/s) with p = s: needs p itself to full precision
        assert s.tolist() == pytest.approx([math.exp(-1.0)] * 5, abs=5e-5)


def test_eps_zero_is_the_default_and_eps_moves_the_sets():
    x = _paper_inputs(torch.float64)
    p = torch.softmax(x, dim=-1)
    torch.testing.assert_close(multimodality(x, p), multimodality(x, p, eps=0.0))
    # ε = 2: x2 = 2 is no longer relevant, so that row has no M
    assert math.isnan(multimodality(x, p, eps=2.0)[-1].item())
    # ε below every entry: nothing is irrelevant (S undefined) and -1 becomes relevant
    assert torch.isnan(sparsity(x, p, eps=-5.0)).all()
    m = multimodality(x, p, eps=-5.0)
    p1, p2, p3 = p[1].tolist()
    assert m[1].item() == pytest.approx(1 - ((p1 - p2) + (p1 - p3)) / 2, abs=1e-12)


def test_ties_hand_computed():
    x = torch.tensor([5.0, 5.0, 1.0, -2.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # any distribution: the metric is on p
    # relevant: one of the two tied maxima (gap to max p = 0.1) and x=1 (gap 0.2)
    assert multimodality(x, p).item() == pytest.approx(1 - (0.1 + 0.2) / 2, abs=1e-12)
    z = 2 * math.exp(5) + math.exp(1) + math.exp(-2)
    s_ref = math.exp(-2) / z  # smallest entry of softmax(x)
    assert sparsity(x, p).item() == pytest.approx(math.exp(-0.1 / s_ref), abs=1e-12)
    assert sparsity(x, p, s=0.05).item() == pytest.approx(math.exp(-2.0), abs=1e-12)
    # all entries tied: N = 3 relevant entries, all with gap 0
    x3 = torch.tensor([3.0, 3.0, 3.0, 3.0])
    assert multimodality(x3, torch.full((4,), 0.25)).item() == 1.0


def test_rows_without_entries_are_nan_and_tiny_probabilities_are_finite():
    x = torch.tensor([[1.0, -1.0, -2.0], [1.0, 2.0, 3.0]])
    p = torch.softmax(x, dim=-1)
    assert math.isnan(multimodality(x, p)[0].item()) and not math.isnan(multimodality(x, p)[1].item())
    assert math.isnan(sparsity(x, p)[1].item()) and not math.isnan(sparsity(x, p)[0].item())
    # a reference s that underflows float32 and an exactly zero probability: S stays exact
    x = torch.tensor([[100.0, 50.0, -100.0]])
    p = torch.tensor([[0.6, 0.4, 0.0]])
    assert sparsity(x, p).item() == 1.0


def test_entropy_and_fraction_below():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.4995, 5e-4, 0.0]])
    torch.testing.assert_close(entropy(p)[:2], torch.tensor([math.log(4), 0.0]))
    frac = fraction_below(p, (1e-3, 0.3))
    assert frac.shape == (3, 2)
    assert frac.tolist() == [[0.0, 1.0], [0.75, 0.75], [0.5, 0.5]]


def _tiny_model():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                          num_heads=3, num_classes=7)
    with torch.no_grad():  # a modulator that visibly changes the distributions
        m.blocks[0].attn.normalizer.modulator.ts.copy_(torch.tensor([-2.0, -0.5, 0.0, 0.0]))
    return m.eval()


def _recorded(model, images):
    with torch.no_grad(), models.record_attention(model, scores=True) as record:
        model(images)
    return record


def test_accumulator_per_layer_per_head_and_merge():
    model = _tiny_model()
    batches = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    records = [_recorded(model, b) for b in batches]
    names = ["blocks.0.attn", "blocks.1.attn"]

    one = AttentionStats(thresholds=(1e-2, 0.1))
    for r in records:
        one.update(r)
    summary = one.summary(model)
    assert list(summary["layers"]) == names
    for name in names:
        per_head = summary["layers"][name]["per_head"]
        x = torch.cat([r.scores[name][0] for r in records])  # (5, 3, 16, 16)
        p = torch.cat([r.probs[name][0] for r in records])
        for key, fn in (("sparsity", sparsity), ("multimodality", multimodality), ("entropy", lambda x, p: entropy(p))):
            want = fn(x, p).double().transpose(0, 1).reshape(3, -1).nanmean(-1)
            assert per_head[key] == pytest.approx(want.tolist(), rel=1e-6, abs=1e-9), key
            assert summary["layers"][name]["mean"][key] == pytest.approx(fn(x, p).double().nanmean().item(), rel=1e-6)
        want = fraction_below(p, (0.1,))[..., 0].transpose(0, 1).reshape(3, -1).double().mean(-1)
        assert per_head["frac_below"]["0.1"] == pytest.approx(want.tolist(), rel=1e-6)
        assert summary["layers"][name]["counts"]["rows"] == 5 * 3 * 16
    assert summary["s"] == "softmax_min" and summary["eps"] == 0.0
    assert summary["modulators"]["blocks.0.attn.normalizer.modulator"]["ts"] == [-2.0, -0.5, 0.0, 0.0]
    assert len(summary["modulators"]["out_modulator"]["ranges"]) == 4
    json.dumps(summary, allow_nan=False)

    # two ranks' accumulators summed (reduce with an all-reduce stand-in) = one over both batches
    a, b = AttentionStats(thresholds=(1e-2, 0.1)), AttentionStats(thresholds=(1e-2, 0.1))
    a.update(records[0])
    b.update(records[1])
    a.reduce(lambda t: t + b.to_tensor())
    torch.testing.assert_close(a.to_tensor(), one.to_tensor())
    assert a.summary(model)["layers"] == summary["layers"]


def test_chunked_update_equals_whole_batch(monkeypatch):
    model = _tiny_model()
    record = _recorded(model, torch.randn(4, 3, 32, 32))
    whole = AttentionStats()
    whole.update(record)
    monkeypatch.setattr(attn_stats, "_CHUNK_ELEMENTS", 1)  # one batch item per chunk
    chunked = AttentionStats()
    chunked.update(record)
    torch.testing.assert_close(chunked.to_tensor(), whole.to_tensor())


def test_registered_layers_reduce_without_batches_and_nan_becomes_null():
    model = _tiny_model()
    empty = AttentionStats(model=model)  # a rank that saw no batch still has the same layout
    assert empty.layers == ["blocks.0.attn", "blocks.1.attn"]
    full = AttentionStats(model=model, eps=-1e9)  # ε below every score: S is undefined everywhere
    full.update(_recorded(model, torch.randn(2, 3, 32, 32)))
    assert empty.to_tensor().numel() == full.to_tensor().numel() and empty.to_tensor().sum() == 0
    empty.reduce(lambda t: t + full.to_tensor())
    torch.testing.assert_close(empty.to_tensor(), full.to_tensor())
    summary = full.summary()
    assert summary["layers"]["blocks.0.attn"]["per_head"]["sparsity"] == [None, None, None]
    assert summary["layers"]["blocks.0.attn"]["per_head"]["multimodality"][0] is not None
    json.dumps(summary, allow_nan=False)


def test_update_needs_scores():
    model = _tiny_model()
    with torch.no_grad(), models.record_attention(model) as record:
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="scores=True"):
        AttentionStats().update(record)
