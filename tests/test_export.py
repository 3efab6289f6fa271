"""scripts/export.py: a Hugging Face Hub-layout folder that timm rebuilds exactly ("local-dir:"),
that eval.py evaluates to the checkpoint's exact predictions, and that --push-to-hub hands to
timm's own upload helper."""
import importlib.util
import json
import os

import pytest
import timm
import torch

import eval as evaluate_script
import models  # noqa: F401  (registers the architecture timm reads from config.json)
from engine.config import dump_config, load_config
from engine.model import build_model
from helpers import ROOT

_spec = importlib.util.spec_from_file_location("export", os.path.join(ROOT, "scripts", "export.py"))
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)


@pytest.fixture(scope="module")
def checkpoint(fake_fmnist, tmp_path_factory):
    """Our checkpoint as train.py writes it (weights, EMA, config, classes, best), with the
    modulators away from their init so that a wrong load shows."""
    d = tmp_path_factory.mktemp("export")
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
                       f"data.root={fake_fmnist}", "data.workers=0", "train.ema=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulator" in name:
                p.uniform_(-1, 1)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = d / "best.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema, "config": dump_config(cfg), "epoch": 3,
                "best": {"metric": "val_top1", "value": 81.25, "epoch": 3},
                "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                            "Ankle boot"], "format_version": 1}, path)
    return str(path), model.eval()


def test_exported_folder_round_trips_through_timm_and_eval(checkpoint, tmp_path):
    path, model = checkpoint
    ref = tmp_path / "ref.json"
    assert evaluate_script.main(["--checkpoint", path, "--output", str(ref)]) == 0
    out = tmp_path / "exported"
    assert export.main([path, "--out", str(out), "--eval-result", str(ref)]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_micro_multimax_patch7_28" and config["num_classes"] == 10
    assert config["label_names"][1] == "Trouser" and config["model_args"]["embed_dim"] == 32
    pcfg = config["pretrained_cfg"]
    assert (pcfg["input_size"], pcfg["crop_pct"], pcfg["mean"]) == ([1, 28, 28], 1.0, [0.286])
    assert config["training_config"] == torch.load(path, weights_only=True)["config"]
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "modulator_order: 2" in card  # the training config
    result = json.loads(ref.read_text())
    assert f"top-1 {result['top1']:.2f}%" in card and "local-dir:" in card

    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert type(rebuilt) is type(model) and rebuilt.pretrained_cfg["label_names"] == config["label_names"]

    res = tmp_path / "from_folder.json"
    assert evaluate_script.main(["--checkpoint", str(out), "--output", str(res)]) == 0
    got = json.loads(res.read_text())
    for key in ("top1", "top5", "loss", "num_images"):
        assert got[key] == result[key], key
    assert got["checkpoint"] == str(out) and got["model"] == "vit_micro_multimax_patch7_28"


def test_ema_weights_and_a_card_from_the_training_log(checkpoint, tmp_path):
    path, _ = checkpoint
    assert export.main([path, "--out", str(tmp_path / "ema"), "--use-ema"]) == 0
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True)
    ema = torch.load(path, weights_only=True)["model_ema"]
    assert all(torch.equal(v, ema[k]) for k, v in rebuilt.state_dict().items())
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "(EMA weights)" in card and "val_top1 81.25 at epoch 3 (logged by training)" in card


def test_push_to_hub_goes_through_timm_and_failures_keep_the_folder(checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = checkpoint
    calls = []
    monkeypatch.setattr(timm.models, "push_to_hf_hub", lambda model, repo_id, **kw: calls.append((repo_id, kw)))
    assert export.main([path, "--out", str(tmp_path / "a"), "--push-to-hub", "me/micro"]) == 0
    (repo, kw), = calls
    assert repo == "me/micro" and kw["safe_serialization"] is True
    assert kw["model_config"]["label_names"][0] == "T-shirt/top" and "training_config" in kw["model_config"]
    assert kw["model_card"]["details"]["Architecture"] == "vit_micro_multimax_patch7_28"

    def offline(model, repo_id, **kw):
        raise OSError("Cannot reach https://huggingface.co")

    monkeypatch.setattr(timm.models, "push_to_hf_hub", offline)
    capsys.readouterr()
    assert export.main([path, "--out", str(tmp_path / "b"), "--push-to-hub", "me/micro"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "upload failed (OSError: Cannot reach" in err
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_a_checkpoint_without_config_needs_model(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "bare.pth")
    assert export.main([str(tmp_path / "bare.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "carries no config: name its architecture with --model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_folder_whose_config_json_is_wrong_is_named_without_unrelated_advice(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "exported"
    assert export.main([path, "--out", str(out)]) == 0
    good = json.loads((out / "config.json").read_text())
    for change, message in (({"architecture": "vit_micro_multimax_patch7_99"},
                             f"{out / 'config.json'}: architecture 'vit_micro_multimax_patch7_99' is not a model timm "
                             "knows"),
                            ({"model_args": {**good["model_args"], "bogus": 1}},
                             f"from {out / 'config.json'}: TypeError: VisionTransformer.__init__() got an unexpected "
                             "keyword argument 'bogus'")):
        (out / "config.json").write_text(json.dumps({**good, **change}))
        capsys.readouterr()
        assert evaluate_script.main(["--checkpoint", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert "offline" not in err and "--pretrained-file" not in err


def test_use_ema_without_ema_weights_is_one_line(tmp_path, capsys):
    torch.save(build_model(load_config(os.path.join(ROOT, "configs", "quickstart.yaml")).model, 10, 1).state_dict(),
               tmp_path / "bare.pth")
    assert export.main([str(tmp_path / "bare.pth"), "--out", str(tmp_path / "x"), "--model",
                        "vit_micro_multimax_patch7_28", "--use-ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"export.py: error: {tmp_path / 'bare.pth'}: checkpoint has no EMA weights ('model_ema' is missing " \
                  "or empty)"
    assert not (tmp_path / "x").exists()
