"""record_attention: opt-in, on our MultiMaxAttention and on timm's own Attention (ViT, DeiT),
with the scores and probabilities each layer really computes, and nothing left behind."""
import pytest
import timm
import torch

import models
from models import record_attention

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5)


def _left_behind(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks, [n for n, m in models.attention_layers(model) if not m.fused_attn]


def test_ours_is_opt_in_and_leaves_nothing():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_multimax_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
        with record_attention(m, scores=True) as rec:
            y_rec = m(x)
    assert sorted(rec.probs) == ["blocks.0.attn", "blocks.1.attn"]
    p, s = rec.probs["blocks.0.attn"][0], rec.scores["blocks.0.attn"][0]
    assert p.shape == s.shape == (2, 3, 16, 16)
    attn = m.blocks[0].attn
    torch.testing.assert_close(p, attn.normalizer(s))  # the probabilities are σ + softmax of the scores
    torch.testing.assert_close(y_rec, y)  # the explicit path computes the same function
    assert _left_behind(m) == (0, [])


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_attention_is_recorded_as_it_computes(name):
    torch.manual_seed(0)
    m = timm.create_model(name, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = 16 + m.num_prefix_tokens
    with torch.no_grad():
        fused = m(x)
        with record_attention(m, scores=True) as rec:
            recorded = m(x)
            m(x[:1])  # a second forward: a second entry per layer
        for _, layer in models.attention_layers(m):
            layer.fused_attn = False
        unfused = m(x)
        for _, layer in models.attention_layers(m):
            layer.fused_attn = True
    assert torch.equal(recorded, unfused)  # recording only switches timm's own switch
    torch.testing.assert_close(recorded, fused)
    assert [len(v) for v in rec.probs.values()] == [2, 2]
    p, s = rec.probs["blocks.1.attn"][0], rec.scores["blocks.1.attn"][0]
    assert p.shape == (2, 3, tokens, tokens)
    assert torch.equal(p, s.softmax(-1))
    # the scores are q·kᵀ/√d of that layer's input
    attn, block = m.blocks[1].attn, m.blocks[1]
    with torch.no_grad():
        h = m.blocks[0](m._pos_embed(m.patch_embed(x)))
        q, k, _ = attn.qkv(block.norm1(h)).reshape(2, tokens, 3, 3, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(s, (q * attn.scale) @ k.transpose(-2, -1))
    assert _left_behind(m) == (0, [])


def test_models_without_recordable_attention_say_so():
    with pytest.raises(ValueError, match="no attention layer to record"):
        with record_attention(timm.create_model("resnet10t", num_classes=3)):
            pass
