"""Released checkpoints evaluate as their authors ran them: timm/DeiT class-token and distilled
models in their own architecture (exactly timm's predictions and loss), timm's pretrained
weights from a local file, DeiT main.py checkpoints (Namespace allowed, nothing else), and no
silent architecture change."""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.scheduler import CosineLRScheduler

import eval as evaluate_script
import models
from engine.attn_stats import AttentionStats
from engine.config import ModelConfig
from engine.evaluation import authors_crop_pct, checkpoint_model
from engine.model import build_model
from helpers import ROOT

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3)
# the same architecture on eval.py's command line
TINY_ARGS = ["--img-size", "32", "model.kwargs.patch_size=8", "model.kwargs.embed_dim=24", "model.kwargs.depth=2",
             "model.kwargs.num_heads=3"]


def tiny_timm(name, seed=0, classes=5):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=classes, **TINY).eval()


def run_eval(*args):
    return evaluate_script.main([str(a) for a in args])


def reference(model, root, batch_size=4):
    """timm's model, timm's transform with DeiT's eval crop (main.py's --eval-crop-ratio 0.875),
    the split's images in ImageFolder order, sums over batches as eval.py takes them.
    Returns (metrics, logits, images)."""
    cfg = {**timm.data.resolve_input_data_config(model), "crop_pct": 0.875}
    transform = timm.data.create_transform(**cfg)
    files = sorted(glob.glob(os.path.join(root, "val", "*", "*.png")))
    classes = sorted(os.listdir(os.path.join(root, "val")))
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    target = torch.tensor([classes.index(os.path.basename(os.path.dirname(f))) for f in files])
    sums, logits = torch.zeros(3, dtype=torch.float64), []
    with torch.no_grad():
        for x, y in zip(images.split(batch_size), target.split(batch_size)):
            out = model(x).float()
            logits.append(out)
            top = out.topk(5, dim=-1).indices.eq(y[:, None])
            sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                 top[:, :1].sum().double(), top.any(-1).sum().double()])
    n = len(files)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "num_images": n}, torch.cat(logits), images


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_class_token_and_distilled_checkpoints_match_timm_exactly(image_folder, tmp_path, name):
    model = tiny_timm(name)
    path = tmp_path / "released.pth"
    torch.save({"model": model.state_dict()}, path)  # DeiT's release format
    common = ["--checkpoint", path, "--model", name, "--data-root", image_folder, "--batch-size", 4, "--workers", 0,
              *TINY_ARGS]
    assert run_eval(*common, "--output", tmp_path / "r.json") == 0
    res = json.loads((tmp_path / "r.json").read_text())
    want, _, images = reference(model, image_folder)
    for key in ("top1", "top5", "loss", "num_images"):
        assert res[key] == want[key], key
    assert (res["preprocessing"]["crop_pct"], res["preprocessing"]["resize"]) == (0.875, 36)  # as DeiT evaluates
    assert res["weights"]["dropped"] == []  # nothing of the checkpoint left out
    # the model eval.py builds gives timm's logits bit for bit (the distilled one averages its two heads)
    spec = evaluate_script.eval_spec(evaluate_script.parse_args(["--checkpoint", str(path), "--model", name, *TINY_ARGS]))
    built, _, _, _ = checkpoint_model(spec, torch.load(path, weights_only=True), str(path))
    with torch.no_grad():
        assert torch.equal(built.eval()(images[:4]), model(images[:4]))
        if "distilled" in name:
            x = model.forward_features(images[:4])
            torch.testing.assert_close(model(images[:4]), (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2)
    # attention statistics of timm's own Attention, by the same definition as ours
    assert run_eval(*common, "--attn-stats", "--output", tmp_path / "stats.json") == 0
    res = json.loads((tmp_path / "stats.json").read_text())
    stats = AttentionStats(model=model)
    with torch.no_grad(), models.record_attention(model, scores=True) as rec:
        for x in images.split(4):
            model(x)
            stats.update(rec)
            rec.probs.clear()
            rec.scores.clear()
    assert res["attn_stats"]["layers"] == json.loads(json.dumps(stats.summary()["layers"]))
    per_head = res["attn_stats"]["layers"]["blocks.1.attn"]["per_head"]
    assert len(per_head["sparsity"]) == 3 and all(v is not None for v in per_head["multimodality"])
    assert res["attn_stats"]["modulators"] == {}  # softmax: nothing learned to report


@pytest.mark.slow
def test_pretrained_file_loads_offline_like_timm(image_folder, tmp_path):
    """--pretrained-file: a local copy of timm's weights (its hub format, or DeiT's release
    format) goes through timm's own loader, with the network off."""
    from safetensors.torch import save_file

    model = tiny_timm("deit_tiny_patch16_224", seed=1)
    want, _, _ = reference(model, image_folder)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save({"model": model.state_dict()}, tmp_path / "deit_tiny.pth")
    for name in ("model.safetensors", "deit_tiny.pth"):
        out = tmp_path / f"{name}.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", "deit_tiny_patch16_224",
                               "--pretrained-file", str(tmp_path / name), "--data-root", image_folder,
                               "--batch-size", "4", "--workers", "0", "--output", str(out), *TINY_ARGS],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        res = json.loads(out.read_text())
        assert res["checkpoint"] == str(tmp_path / name) and res["weights"]["source"] == "timm"
        for key in ("top1", "top5", "loss"):
            assert res[key] == want[key], (name, key)


def test_pretrained_without_network_or_cache_is_one_line(image_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t"),
           "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", "deit_tiny_patch16_224",
                           "--pretrained", "--data-root", image_folder],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "deit_tiny_patch16_224" in err and "--pretrained-file" in err


def test_pretrained_with_the_hub_unreachable_fails_fast_or_loads_the_cached_copy(tmp_path, monkeypatch):
    """No connection to the hub (HF_HUB_OFFLINE unset): one line at once instead of huggingface_hub's
    back-off retries (1+2+4+8+8 s for each of two file names), and a cached copy loads as fast."""
    import socket

    from huggingface_hub import constants
    from safetensors.torch import save_file

    from engine.errors import UserError
    from engine.model import build_pretrained

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    kwargs = dict(TINY)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^cannot load pretrained weights for deit_tiny_patch16_224 from timm's "
                                        r"source: the Hugging Face hub is offline .* holds no copy; --pretrained-file"):
        build_pretrained("deit_tiny_patch16_224", **kwargs)
    assert time.monotonic() - start < 20

    model = timm.create_model("deit_tiny_patch16_224", **kwargs)
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(model.state_dict(), str(repo / "snapshots" / revision / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the hub is probed again
    start = time.monotonic()
    loaded = build_pretrained("deit_tiny_patch16_224", **kwargs)
    assert time.monotonic() - start < 20
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def _deit_main_checkpoint(model, ema_model):
    """A checkpoint as DeiT's main.py writes it: its seven entries, args an argparse.Namespace."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = CosineLRScheduler(optimizer, t_initial=300, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6)
    args = argparse.Namespace(model="deit_tiny_patch16_224", input_size=32, batch_size=64, lr=5e-4, epochs=300,
                              model_ema=True, model_ema_decay=0.99996, opt_betas=None, aa="rand-m9-mstd0.5-inc1",
                              data_path="/datasets01/imagenet", nb_classes=5, output_dir="out", dist_url="env://")
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 299, "model_ema": ema_model.state_dict(),
            "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args}


def test_deit_main_checkpoint_evaluates_with_and_without_ema(image_folder, tmp_path):
    model, ema = tiny_timm("deit_tiny_patch16_224", seed=2), tiny_timm("deit_tiny_patch16_224", seed=3)
    path = tmp_path / "checkpoint.pth"
    torch.save(_deit_main_checkpoint(model, ema), path)
    model.eval()
    for flags, source in (([], model), (["--use-ema"], ema)):
        out = tmp_path / f"r{len(flags)}.json"
        assert run_eval("--checkpoint", path, "--model", "deit_tiny_patch16_224", "--data-root", image_folder,
                        "--batch-size", 4, "--workers", 0, "--output", out, *flags, *TINY_ARGS) == 0
        res, want = json.loads(out.read_text()), reference(source, image_folder)[0]
        assert (res["loss"], res["top1"], res["use_ema"]) == (want["loss"], want["top1"], bool(flags))
    losses = [json.loads((tmp_path / f"r{i}.json").read_text())["loss"] for i in (0, 1)]
    assert losses[0] != losses[1]


@pytest.mark.parametrize("kind", ["deit_main_without_ema", "bare_state_dict"])
def test_use_ema_on_a_checkpoint_without_ema_is_one_line(image_folder, tmp_path, capsys, kind):
    model = tiny_timm("deit_tiny_patch16_224")
    ckpt = _deit_main_checkpoint(model, model)
    del ckpt["model_ema"]  # DeiT's main.py without --model-ema
    path = tmp_path / f"{kind}.pth"
    torch.save(ckpt if kind == "deit_main_without_ema" else model.state_dict(), path)
    capsys.readouterr()
    assert run_eval("--checkpoint", path, "--model", "deit_tiny_patch16_224", "--use-ema", "--data-root",
                    image_folder, *TINY_ARGS) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"eval.py: error: {path}: checkpoint has no EMA weights ('model_ema' is missing or empty)"


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["entry", "inside_args"])
def test_pickled_code_is_refused_and_never_runs(image_folder, tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    ckpt = _deit_main_checkpoint(tiny_timm("deit_tiny_patch16_224"), tiny_timm("deit_tiny_patch16_224"))
    if where == "entry":
        ckpt["payload"] = _WritesAFile(str(marker))
    else:
        ckpt["args"].payload = _WritesAFile(str(marker))
    torch.save(ckpt, tmp_path / "evil.pth")
    capsys.readouterr()
    assert run_eval("--checkpoint", tmp_path / "evil.pth", "--model", "deit_tiny_patch16_224", "--data-root",
                    image_folder, *TINY_ARGS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"pickled Python objects \(\w+\.open\)", err)
    assert "weights_only" not in err
    assert not marker.exists()
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed only during a load


def test_class_token_checkpoint_into_a_gap_model(image_folder, tmp_path, capsys):
    """eval.py refuses (one line naming timm's architecture); model.init_checkpoint takes it as a
    fine-tuning start and says what it dropped."""
    path = tmp_path / "deit.pth"
    deit = tiny_timm("deit_tiny_distilled_patch16_224")
    torch.save({"model": deit.state_dict()}, path)
    capsys.readouterr()
    assert run_eval("--checkpoint", path, "--model", "deit_tiny_gap_patch16_224", "--data-root", image_folder,
                    "model.patch_size=8", *TINY_ARGS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class-token model (cls_token, dist_token)" in err
    assert "--model deit_tiny_distilled_patch16_224 " in err
    # in a class-token model without the distillation token: that is what it lacks
    assert run_eval("--checkpoint", path, "--model", "deit_tiny_patch16_224", "--data-root", image_folder,
                    *TINY_ARGS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no class token" not in err
    assert ("it has a class token and a distillation token (cls_token, dist_token), this model a class token "
            "(cls_token)") in err and "--model deit_tiny_distilled_patch16_224 " in err
    # the advice, followed (this tiny model's head count filled in), evaluates it
    advice = err.split("--model ", 1)[1].split(" (model.init_checkpoint")[0].replace("<its heads>", "3").split()
    assert run_eval("--checkpoint", path, "--model", *advice, "--data-root", image_folder, "--workers", 0,
                    "--output", tmp_path / "advised.json") == 0

    cfg = ModelConfig(name="deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, init_checkpoint=str(path),
                      kwargs={"embed_dim": 24, "depth": 2, "num_heads": 3, "qkv_bias": True})
    torch.manual_seed(0)
    gap = build_model(cfg, num_classes=5, in_chans=3)
    log = capsys.readouterr().out
    assert f"model.init_checkpoint: {path}: loaded (timm format)" in log
    assert "dropped cls_token, dist_token, head_dist.weight, head_dist.bias, pos_embed's first 2 row(s)" in log
    assert "left at init 6 modulator tensors" in log  # ranges and ts of 2 attention layers and the output
    torch.testing.assert_close(gap.blocks[1].attn.qkv.weight, deit.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(gap.pos_embed, deit.pos_embed[:, 2:])
    torch.testing.assert_close(gap.head.weight, deit.head.weight)


def test_released_sizes_are_named_and_preprocessed_as_their_authors_did():
    from models.weights import class_token_architecture

    for name in ("deit_small_patch16_224", "deit_base_distilled_patch16_384", "deit_tiny_patch16_224"):
        model = timm.create_model(name, device="meta")
        assert class_token_architecture(model.state_dict()) == name
    # DeiT's releases are evaluated at DeiT's crop, other timm models at timm's
    assert authors_crop_pct("deit_base_distilled_patch16_384.fb_in1k", 1.0) == 0.875
    assert authors_crop_pct("vit_small_patch16_224.augreg_in21k_ft_in1k", 0.9) == 0.9
