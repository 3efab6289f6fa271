"""timm's model contracts hold for our registered models: the checks timm's own model tests
(tests/test_models.py in timm's repository) make of a ViT, on small instances of every
registered name. TorchScript is not supported (docs/MODELS.md)."""
import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models  # noqa: F401  (registers the models)
from models.multimax import seglu

NAMES = sorted(n for n in timm.list_models("*") if "_multimax_" in n or "_gap_patch" in n)
FX_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                 param_shapes_constant=True)


def _small(name, **kw):
    """``name`` at a size fast on CPU: DeiT layouts shrunk to 32 px, 8 px patches, 4 blocks."""
    if not name.startswith("vit_micro"):
        kw = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 4, "num_heads": 3, **kw}
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    if getattr(model, "out_modulator", None) is not None:
        with torch.no_grad():  # far from the identity, so that applying σ or not shows
            model.out_modulator.ts.copy_(torch.tensor([0.5, -0.4, 0.3, 0.2]))
    return model


def _input(model, batch=2):
    return torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def test_every_registered_model_is_covered():
    assert len(NAMES) == 8 and "deit_small_multimax_patch16_224" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_no_classifier_gives_pooled_features(name):
    """num_classes=0 and reset_classifier(0): the pooled features (forward_head's pre_logits),
    with no σ on them; a new classifier gets σ again."""
    model = _small(name).eval()
    x = _input(model)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.head(pooled)
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == (2, model.num_features) == (2, model.head_hidden_size)
        assert torch.equal(out, pooled)
        headless = _small(name, num_classes=0).eval()
        headless.load_state_dict(model.state_dict())
        assert torch.equal(headless(x), pooled)
        model.reset_classifier(5)
        if model.out_modulator is not None:
            m = model.out_modulator
            assert not torch.allclose(m(logits), logits)  # σ is not the identity here
            torch.testing.assert_close(model(x), seglu(model.head(pooled), m.ranges, m.ts))
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_and_forward_intermediates_as_timms_vit(name):
    """features_only=True: the getter over the last 3 blocks, NCHW maps with the channels and
    reductions of timm's own ViT of that shape; equal to forward_intermediates of the full model,
    whose final output is forward_features."""
    model = _small(name).eval()
    kw = {} if name.startswith("vit_micro") else dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3)
    features = timm.create_model(name, features_only=True, **kw).eval()
    timm_vit = timm.create_model("vit_tiny_patch16_224", features_only=True, **{
        "img_size": model.patch_embed.img_size, "patch_size": model.patch_embed.patch_size,
        "in_chans": model.patch_embed.proj.in_channels, "embed_dim": model.embed_dim,
        "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads})
    assert features.feature_info.channels() == timm_vit.feature_info.channels()
    assert features.feature_info.reduction() == timm_vit.feature_info.reduction()
    assert [i["module"] for i in features.feature_info.get_dicts()] == [f"blocks.{i}" for i in (1, 2, 3)]
    features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no head, no final norm
    x = _input(model)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=3)
        maps = features(x)
        torch.testing.assert_close(final, model.forward_features(x))
    grid = model.patch_embed.grid_size
    assert len(maps) == len(intermediates) == 3
    for a, b in zip(maps, intermediates):
        assert a.shape == (2, model.embed_dim, *grid)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_fx_feature_extraction_forward_and_backward(name):
    """Symbolic tracing with timm's leaf modules and functions, as timm's FX tests do: the
    traced model's output equals the model's, and every parameter gets a gradient."""
    model = _small(name).eval()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_TRACER)
    traced = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                      eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=FX_TRACER)
    with torch.no_grad():
        (out,) = traced(x).values()
    assert torch.equal(out, ref)
    traced.train()
    (out,) = traced(x).values()
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", ["deit_tiny_multimax_patch16_224", "vit_micro_gap_patch7_28"])
def test_grad_checkpointing_and_torch_export_keep_the_output(name):
    model = _small(name).eval()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), ref, rtol=1e-5, atol=1e-6)
