"""Reading checkpoint files safely (one-line errors whose advice works) and loading weights as a
fine-tuning start: model.init_checkpoint from files and URLs, position grids resampled as timm does."""
import argparse
import dataclasses
import hashlib
import os
import shutil

import pytest
import timm
import torch

import models
import train
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import ModelConfig, load_config
from engine.errors import UserError
from engine.model import build_model
from helpers import ROOT, tiny_overrides
from models.weights import load_weights


def test_missing_truncated_and_junk_files_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, good)
    data = good.read_bytes()
    for name, content in (("half.pth", data[: len(data) // 2]), ("empty.pth", b""), ("junk.pth", b"not a checkpoint")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match="is truncated or not a PyTorch checkpoint") as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value) and str(e.value).endswith(")")


def test_safetensors_loads_with_config_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"head.weight": torch.randn(3, 2)}, str(path), metadata={"config": "model:\n  name: x\n"})
    out = load_checkpoint(path)
    assert set(out) == {"model", "config"} and out["config"] == "model:\n  name: x\n"
    assert out["model"]["head.weight"].shape == (3, 2)
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="bad.safetensors is truncated or not a safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


@dataclasses.dataclass
class RunSettings:  # an object a training script might pickle by accident
    lr: float


def test_deit_args_load_other_objects_are_refused_and_the_advice_works(tmp_path):
    deit = tmp_path / "deit.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=5e-4, model="deit_small_patch16_224")},
               deit)
    assert load_checkpoint(deit)["args"].model == "deit_small_patch16_224"
    assert argparse.Namespace not in torch.serialization.get_safe_globals()

    model = torch.nn.Linear(2, 3)
    odd = tmp_path / "odd.pth"
    torch.save({"model": model.state_dict(), "settings": RunSettings(1e-3)}, odd)
    with pytest.raises(UserError, match=r"pickled Python objects \(test_weights.RunSettings\)") as e:
        load_checkpoint(odd)
    assert "weights_only" not in str(e.value) and "torch.save({'model': model.state_dict()}, path)" in str(e.value)
    torch.save({"model": model.state_dict()}, odd)  # what the message says to do
    assert torch.equal(load_checkpoint(odd)["model"]["weight"], model.weight)


def _fmnist_run_args(fake_fmnist, out, init):
    return ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            *tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "model.init_checkpoint": init})]


def test_bad_init_checkpoint_is_one_line_in_our_words(fake_fmnist, tmp_path, capsys):
    good = tmp_path / "good.pth"
    save_checkpoint({"model": {"w": torch.randn(100)}}, good)
    torch.save({"model": {}, "x": RunSettings(0.1)}, tmp_path / "pickle.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:300])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name, words in (("pickle.pth", "pickled Python objects"), ("cut.pth", "truncated or not a PyTorch"),
                        ("bad.safetensors", "truncated or not a safetensors file"), ("none.pth", "not found")):
        capsys.readouterr()
        assert train.main(_fmnist_run_args(fake_fmnist, str(tmp_path / "run"), str(tmp_path / name))) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("train.py: error: model.init_checkpoint:") and words in err, err
        assert len(err.splitlines()) == 1 and "weights_only" not in err and "Traceback" not in err
        assert err.endswith((")", "path)")) or name == "none.pth", err  # never cut mid-sentence
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_class_token_grid_is_resampled_as_timm_resamples_it():
    """A 32 px DeiT into a 48 px GAP model: the class token's row dropped, the 4x4 grid resampled
    to 6x6 exactly as timm's own loader resamples it for a 48 px DeiT."""
    torch.manual_seed(0)
    kw = dict(patch_size=8, embed_dim=24, depth=1, num_heads=3, num_classes=5)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, **kw)
    gap = timm.create_model("deit_tiny_gap_patch16_224", img_size=48, qkv_bias=True, **kw)
    result = load_weights(gap, {"model": deit.state_dict()})
    assert result.resampled == ["pos_embed 4x4 -> 6x6"]
    assert result.dropped == ["cls_token", "pos_embed's first 1 row(s)"]
    timm_48 = timm.create_model("deit_tiny_patch16_224", img_size=48, pretrained=True,
                                pretrained_cfg_overlay={"state_dict": deit.state_dict(), "num_classes": 5}, **kw)
    torch.testing.assert_close(gap.pos_embed, timm_48.pos_embed[:, 1:], rtol=0, atol=0)
    with pytest.raises(models.CheckpointMismatchError, match="class-token model"):
        load_weights(gap, {"model": deit.state_dict()}, strict=True)


def test_init_checkpoint_urls_are_cached_per_url_hash_checked_and_refusals_leave_nothing(
        tmp_path, monkeypatch, capsys, http_server):
    base, served = http_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_micro_gap_patch7_28", kwargs={"depth": 1})
    src = build_model(cfg, 10, 1)
    release = tmp_path / "release.pth"
    torch.save({"model": src.state_dict()}, release)
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    name = f"micro-{digest[:8]}.pth"  # DeiT's naming: the hash prefix is checked
    shutil.copy(release, served / name)
    model = build_model(dataclasses.replace(cfg, init_checkpoint=f"{base}/{name}"), 10, 1)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert "every key as it is" in capsys.readouterr().out
    (cached,) = cache.glob(f"*/{name}")  # in a folder of its URL's own
    (served / name).unlink()  # the cached copy serves the next run
    build_model(dataclasses.replace(cfg, init_checkpoint=f"{base}/{name}"), 10, 1)

    # a file URL is read in place, its name's hash checked too
    shutil.copy(release, tmp_path / name)
    build_model(dataclasses.replace(cfg, init_checkpoint=(tmp_path / name).as_uri()), 10, 1)
    shutil.copy(release, tmp_path / "micro-00000000.pth")
    with pytest.raises(UserError, match=r"model.init_checkpoint: file://.*micro-00000000.pth: the file's SHA-256"):
        build_model(dataclasses.replace(cfg, init_checkpoint=(tmp_path / "micro-00000000.pth").as_uri()), 10, 1)

    # refused downloads leave nothing behind: a wrong hash, a page that is no checkpoint, a missing file
    shutil.copy(release, served / "micro-00000000.pth")
    (served / "login.pth").write_text("<html>sign in to download</html>")
    for url, reason in ((f"{base}/micro-00000000.pth", r"cannot download .*micro-00000000.pth: RuntimeError: invalid hash"),
                        (f"{base}/login.pth", r".*login.pth is truncated or not a PyTorch checkpoint .*nothing was kept"),
                        (f"{base}/gone.pth", r"cannot download .*gone.pth: HTTPError: HTTP Error 404")):
        with pytest.raises(UserError, match=f"model.init_checkpoint: {reason}"):
            build_model(dataclasses.replace(cfg, init_checkpoint=url), 10, 1)
    assert set(cache.rglob("*")) == {cached.parent, cached}


def test_finetune_presets_start_from_released_and_224_weights(tmp_path, capsys):
    """configs/finetune: DeiT's softmax DeiT-S into MultiMax GAP (class token dropped, blocks and
    head kept, modulators at init), then that model at 384 px (grid resampled). Two blocks
    instead of twelve keep the test small; every other key is the preset's."""
    depth = ["model.kwargs.depth=2"]
    torch.manual_seed(0)
    released = timm.create_model("deit_small_patch16_224", depth=2)  # DeiT's architecture and key names
    torch.save({"model": released.state_dict()}, tmp_path / "deit_small.pth")
    cfg = load_config(os.path.join(ROOT, "configs", "finetune", "deit_small_multimax_from_deit.yaml"),
                      [*depth, f"model.init_checkpoint={tmp_path / 'deit_small.pth'}"])
    capsys.readouterr()
    model = build_model(cfg.model, 1000, 3)
    log = capsys.readouterr().out
    assert "dropped cls_token, pos_embed's first 1 row(s); left at init 6 modulator tensors" in log
    assert model.out_normalizer == "multimax" and model.global_pool == "avg"
    for name in ("blocks.1.attn.qkv.bias", "head.weight", "norm.weight"):
        torch.testing.assert_close(model.state_dict()[name], released.state_dict()[name])
    torch.testing.assert_close(model.pos_embed, released.pos_embed[:, 1:])

    torch.save({"model": model.state_dict()}, tmp_path / "multimax_224.pth")
    cfg = load_config(os.path.join(ROOT, "configs", "finetune", "deit_small_multimax_384.yaml"),
                      [*depth, f"model.init_checkpoint={tmp_path / 'multimax_224.pth'}",
                       "model.qkv_bias=true"])  # this 224 model came from DeiT's weights, with qkv biases
    capsys.readouterr()
    at_384 = build_model(cfg.model, 1000, 3)
    assert "(ours format); resampled pos_embed 14x14 -> 24x24" in capsys.readouterr().out
    assert at_384.pos_embed.shape == (1, 576, 384)
    torch.testing.assert_close(at_384.blocks[0].attn.normalizer.modulator.ts,
                               model.blocks[0].attn.normalizer.modulator.ts)
