"""Model registry, architecture rules, attention paths and the three checkpoint formats."""
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from engine.checkpoint import load_checkpoint
from models import CheckpointMismatchError, load_weights
from models.multimax import NORMALIZERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAMES = sorted(
    n for n in timm.list_models("*")
    if n.startswith(("deit_tiny_", "deit_small_", "deit_base_", "vit_micro_"))
    and ("_multimax_" in n or "_gap_" in n)
)


def _tiny(name="deit_tiny_multimax_patch16_224", **kw):
    """A DeiT-layout model small enough for fast CPU tests."""
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3, "num_classes": 7, **kw}
    return timm.create_model(name, **kw)


def test_registered_names():
    for size in ("tiny", "small", "base"):
        for kind in ("multimax", "gap"):
            assert f"deit_{size}_{kind}_patch16_224" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_create_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    chans, size = model.pretrained_cfg["input_size"][0], model.pretrained_cfg["input_size"][1]
    out = model(torch.randn(2, chans, size, size))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # paper architecture: no class token, final norm before the mean, no fc_norm, no qkv bias
    assert model.cls_token is None and model.global_pool == "avg"
    assert isinstance(model.fc_norm, torch.nn.Identity)
    assert model.blocks[0].attn.qkv.bias is None
    assert model.pos_embed.shape[1] == model.patch_embed.num_patches


@pytest.mark.parametrize("size,depth", [("tiny", 12), ("small", 12), ("base", 12)])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_extra_parameters_over_gap(size, depth, order):
    count = lambda m: sum(p.numel() for p in m.parameters())
    mm = timm.create_model(f"deit_{size}_multimax_patch16_224", modulator_order=order)
    gap = timm.create_model(f"deit_{size}_gap_patch16_224")
    assert count(mm) - count(gap) == 4 * order * (depth + 1)
    if size == "small" and order == 2:
        assert count(mm) - count(gap) == 104


def test_modulator_init_and_qkv_bias_knobs():
    m = _tiny(modulator_init="zeros", qkv_bias=True)
    assert m.blocks[0].attn.qkv.bias is not None
    for mod in models.modulators(m).values():
        assert torch.count_nonzero(mod.ranges) == 0 and torch.count_nonzero(mod.ts) == 0
    assert set(models.modulators(m)) == {"blocks.0.attn.normalizer.modulator",
                                         "blocks.1.attn.normalizer.modulator", "out_modulator"}


def test_misspelled_attention_arguments_are_refused():
    from models.attention import MultiMaxAttention

    with pytest.raises(TypeError, match="modulator_ordr"):
        MultiMaxAttention(24, 3, modulator_ordr=1)
    with pytest.raises(TypeError, match="attn_head_dim"):  # timm's Attention takes it, Block never passes it
        MultiMaxAttention(24, 3, attn_head_dim=16)
    with pytest.raises(TypeError, match="modulator_ordr"):
        _tiny(modulator_ordr=1)


def test_affine_ablation_is_the_authors_variant():
    """configs/ablations/first_order_affine.yaml: affine + first-order σ in attention, a plain
    first-order σ on the logits (the authors' DeiT code for this variant)."""
    from engine.config import load_config
    from engine.model import build_model

    cfg = load_config(os.path.join(ROOT, "configs", "ablations", "first_order_affine.yaml"))
    with torch.device("meta"):
        m = build_model(cfg.model, num_classes=10, in_chans=3)
    attn = [b.attn.normalizer.modulator for b in m.blocks]
    assert all(s.order == 1 and s.scale is not None and s.shift is not None for s in attn)
    assert m.out_modulator.order == 1 and m.out_modulator.scale is None
    tiny = _tiny(modulator_order=1, modulator_affine=True).eval()
    with torch.no_grad():
        tiny.out_modulator.ts.copy_(torch.tensor([0.5, -0.3]))
        x = torch.randn(2, 3, 32, 32)
        logits = tiny.head(tiny.forward_head(tiny.forward_features(x), pre_logits=True))
        r, t = tiny.out_modulator.ranges, tiny.out_modulator.ts
        want = logits + t[0] * torch.relu(r[0] - logits) + t[1] * torch.relu(logits - r[1])
        torch.testing.assert_close(tiny(x), want)


def test_zero_init_multimax_equals_softmax_gap():
    torch.manual_seed(0)
    mm = _tiny(modulator_init="zeros")
    gap = _tiny("deit_tiny_gap_patch16_224")
    gap.load_state_dict({k: v for k, v in mm.state_dict().items() if "modulator" not in k})
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(mm(x), gap(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_every_attention_normalizer_trains(name):
    torch.manual_seed(0)
    m = _tiny(attn_normalizer=name, drop_path_rate=0.1, softmax_temperature=0.5)
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert torch.isfinite(m.blocks[0].attn.qkv.weight.grad).all()


def test_sdpa_and_explicit_softmax_agree():
    torch.manual_seed(0)
    a = _tiny("deit_tiny_gap_patch16_224", softmax_temperature=0.7)
    b = _tiny("deit_tiny_gap_patch16_224", softmax_temperature=0.7, attn_backend="explicit")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sdpa"):
        _tiny(attn_backend="sdpa")


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a, b = _tiny(), _tiny(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        m(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_bf16_autocast_finite_for_large_logits():
    torch.manual_seed(0)
    m = _tiny().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        m.head.bias.zero_()
        raw = m.forward_head(m.forward_features(x), pre_logits=True) @ m.head.weight.T
        m.head.weight.mul_(100.0 / raw.abs().max())  # logits now span up to ±100
        m.out_modulator.ts.copy_(torch.tensor([0.05, 0.05, 0.02, 0.02]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- checkpoint formats

def paper_forward(sd, x, depth, heads, patch):
    """The forward pass of the paper's released code, written out from its state dict; with
    ``blocks.{i}.attn.t``/``.b`` that of its "affine then first-order" variant (their DeiT
    vision_transformer.py at commit 31ff228: attn = t·attn + b, then a first-order SeLU reading
    ranges[:2]/ts[:2], also on the logits)."""
    affine = "blocks.0.attn.t" in sd

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def sigma(t, r, ts):
        first = t + ts[0] * torch.relu(r[0] - t) + ts[1] * torch.relu(t - r[1])
        return first if affine else first + ts[2] * torch.relu(r[2] - t) ** 2 + ts[3] * torch.relu(t - r[3]) ** 2

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    B, N, C = x.shape
    for i in range(depth):
        p = f"blocks.{i}"
        qkv = (ln(x, p + ".norm1") @ sd[p + ".attn.qkv.weight"].T).reshape(B, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
        if affine:
            attn = sd[p + ".attn.t"] * attn + sd[p + ".attn.b"]
        attn = sigma(attn, sd[p + ".attn.ranges"], sd[p + ".attn.ts"]).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(y, sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + ".norm2"), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
    logits = F.linear(ln(x, "norm").mean(1), sd["head.weight"], sd["head.bias"])
    return sigma(logits, sd["ranges"], sd["ts"])


def _paper_state_dict(depth=2, heads=3, dim=24, patch=8, img=32, classes=7, seed=0, affine=False):
    """A state dict in the paper code's key layout, with random weights and large modulators;
    ``affine``: its affine variant's, with 0-d ``t``/``b`` per attention layer."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    n = (img // patch) ** 2
    sd = {"patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "pos_embed": r(1, n, dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim),
          "head.weight": r(classes, dim), "head.bias": r(classes), "ranges": r(4) * 5, "ts": r(4)}
    for i in range(depth):
        p = f"blocks.{i}"
        sd.update({f"{p}.norm1.weight": 1 + r(dim), f"{p}.norm1.bias": r(dim),
                   f"{p}.attn.qkv.weight": r(3 * dim, dim), f"{p}.attn.proj.weight": r(dim, dim),
                   f"{p}.attn.proj.bias": r(dim), f"{p}.attn.ranges": r(4) * 5, f"{p}.attn.ts": r(4),
                   f"{p}.norm2.weight": 1 + r(dim), f"{p}.norm2.bias": r(dim),
                   f"{p}.mlp.fc1.weight": r(4 * dim, dim), f"{p}.mlp.fc1.bias": r(4 * dim),
                   f"{p}.mlp.fc2.weight": r(dim, 4 * dim), f"{p}.mlp.fc2.bias": r(dim)})
        if affine:  # nn.Parameter(torch.tensor(1.0)) and (0.0) in their code, trained away from there
            sd.update({f"{p}.attn.t": 1 + r(()) * 5, f"{p}.attn.b": r(()) * 5})
    return sd


def test_load_paper_code_checkpoint_reproduces_logits(tmp_path):
    sd = _paper_state_dict()
    path = tmp_path / "paper.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 299, "args": "ignored"}, path)
    model = _tiny().eval()
    result = load_weights(model, load_checkpoint(path))
    assert result.source == "paper" and not result.reset
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), paper_forward(sd, x, 2, 3, 8), rtol=1e-4, atol=1e-4)
    assert models.infer_model_kwargs({"model": sd}) == {
        "qkv_bias": False, "num_classes": 7, "out_normalizer": "multimax", "modulator_order": 2,
        "modulator_affine": False}


def test_load_paper_affine_first_order_checkpoint_reproduces_logits():
    sd = _paper_state_dict(affine=True)
    assert sd["blocks.0.attn.t"].dim() == 0 and sd["ranges"].shape == sd["blocks.1.attn.ts"].shape == (4,)
    kwargs = models.infer_model_kwargs({"model": sd})
    assert kwargs == {"qkv_bias": False, "num_classes": 7, "out_normalizer": "multimax", "modulator_order": 1,
                      "modulator_affine": True}
    model = _tiny(**kwargs).eval()
    result = load_weights(model, {"model": sd}, strict=True)
    assert result.source == "paper" and not result.reset
    assert result.dropped == ["entries 2+ of 6 ranges/ts tensors (the paper's first-order affine code never reads them)"]
    attn = model.blocks[1].attn.normalizer.modulator
    assert attn.scale.item() == sd["blocks.1.attn.t"].item() and attn.shift.item() == sd["blocks.1.attn.b"].item()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), paper_forward(sd, x, 2, 3, 8), rtol=1e-4, atol=1e-4)
    # a model without the affine map is told which keys it lacks
    with pytest.raises(CheckpointMismatchError, match="modulator.scale"):
        load_weights(_tiny(), {"model": sd})
    # eval.py's path: the architecture read off the weights, the model built and loaded strictly
    from engine.evaluation import EvalSpec, checkpoint_model

    spec = EvalSpec(model="deit_tiny_multimax_patch16_224", overrides=[
        "model.img_size=32", "model.patch_size=8", "model.kwargs.embed_dim=24", "model.kwargs.depth=2",
        "model.kwargs.num_heads=3"])
    built, cfg, _, _ = checkpoint_model(spec, {"model": sd}, "paper.pth")
    assert (cfg.model.modulator_order, cfg.model.modulator_affine, cfg.model.num_classes) == (1, True, 7)
    with torch.no_grad():
        torch.testing.assert_close(built.eval()(x), paper_forward(sd, x, 2, 3, 8), rtol=1e-4, atol=1e-4)


def test_load_our_checkpoint_reproduces_logits(tmp_path):
    torch.manual_seed(1)
    src = _tiny(modulator_order=3).eval()
    torch.save({"model": src.state_dict(), "format_version": 1}, tmp_path / "ours.pth")
    dst = _tiny(modulator_order=3).eval()
    assert load_weights(dst, load_checkpoint(tmp_path / "ours.pth")).source == "ours"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))


def test_load_timm_gap_checkpoint_with_prefixes_reproduces_logits():
    torch.manual_seed(2)
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                            num_heads=3, num_classes=7, class_token=False, global_pool="avg",
                            fc_norm=False).eval()
    ckpt = {"model": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}}
    dst = _tiny("deit_tiny_gap_patch16_224", qkv_bias=True).eval()
    assert load_weights(dst, ckpt).source == "timm"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_load_deit_class_token_checkpoint_drops_token_and_resets_head():
    torch.manual_seed(3)
    src = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                            num_heads=3, num_classes=1000)
    sd = src.state_dict()
    assert "cls_token" in sd and sd["pos_embed"].shape[1] == 17
    dst = _tiny("deit_tiny_multimax_patch16_224", qkv_bias=True, num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    result = load_weights(dst, {"model": sd})
    assert result.source == "timm" and "cls_token" in result.dropped
    assert {"head.weight", "head.bias", "out_modulator.ranges"} <= set(result.reset)
    new = dst.state_dict()
    torch.testing.assert_close(new["pos_embed"], sd["pos_embed"][:, 1:])
    torch.testing.assert_close(new["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(new["head.weight"], before["head.weight"])
    torch.testing.assert_close(new["out_modulator.ts"], before["out_modulator.ts"])


def test_mismatched_checkpoint_lists_keys():
    sd = _paper_state_dict()
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(72)
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(_tiny(), {"model": sd})
    msg = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.attn.qkv.bias" in msg and "qkv_bias=True" in msg
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_weights(_tiny(embed_dim=48), {"model": _paper_state_dict(classes=7)})
