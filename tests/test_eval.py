"""eval.py: reproduces training's evaluation, exact under DDP, foreign formats, statistics, errors."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import eval as evaluate_script
import models  # noqa: F401
from engine.logger import read_jsonl
from helpers import ROOT, run_train, tiny_overrides


@pytest.fixture(scope="module")
def trained_run(fake_fmnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalrun") / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.ema": "true", "train.ema_decay": 0.5}))
    return out


def run_eval(*args):
    return evaluate_script.main([str(a) for a in args])


def test_eval_reproduces_training_log(trained_run, tmp_path):
    last = read_jsonl(os.path.join(trained_run, "log.jsonl"))[-1]
    out = tmp_path / "res.json"
    assert run_eval("--checkpoint", os.path.join(trained_run, "last.pth"), "--output", out,
                    "--csv", tmp_path / "all.csv") == 0
    res = json.loads(out.read_text())
    for key in ("top1", "top5", "loss", "num_images", "checkpoint", "model", "preprocessing", "throughput"):
        assert key in res
    assert res["num_images"] == last["val_images"] == 37
    assert res["top1"] == pytest.approx(last["val_top1"], abs=1e-9)
    assert res["top5"] == pytest.approx(last["val_top5"], abs=1e-9)
    assert res["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert res["throughput"]["img_per_s"] > 0
    # EMA weights reproduce the EMA evaluation
    assert run_eval("--checkpoint", os.path.join(trained_run, "last.pth"), "--use-ema", "--output",
                    tmp_path / "ema.json", "--csv", tmp_path / "all.csv") == 0
    ema = json.loads((tmp_path / "ema.json").read_text())
    assert ema["top1"] == pytest.approx(last["val_top1_ema"], abs=1e-9) and ema["use_ema"] is True
    rows = (tmp_path / "all.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("checkpoint,")


def test_eval_one_and_two_processes_identical(trained_run, tmp_path):
    """37 test images, batch 4 per process: 37 is not a multiple of 2 x 4."""
    ckpt = os.path.join(trained_run, "last.pth")
    args = ["--checkpoint", ckpt, "--batch-size", "4", "--csv", str(tmp_path / "r.csv")]
    assert run_eval(*args, "--output", tmp_path / "one.json") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "eval.py"), *args, "--output", str(tmp_path / "two.json")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["num_images"] == two["num_images"] == 37
    assert two["throughput"]["world_size"] == 2
    assert one["top1"] == two["top1"] and one["top5"] == two["top5"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)


def test_attention_statistics_in_json(trained_run, tmp_path):
    out = tmp_path / "stats.json"
    assert run_eval("--checkpoint", os.path.join(trained_run, "best.pth"), "--attn-stats",
                    "--output", out, "--csv", tmp_path / "r.csv") == 0
    stats = json.loads(out.read_text())["attn_stats"]
    layers = stats["layers"]
    assert sorted(layers) == ["blocks.0.attn", "blocks.1.attn"]
    per_head = layers["blocks.0.attn"]["per_head"]
    for key in ("sparsity", "multimodality", "entropy"):
        assert len(per_head[key]) == 2  # heads of the tiny model
    assert "out_modulator" in stats["modulators"]
    assert len(stats["modulators"]["out_modulator"]["ranges"]) == 4


def _micro_state(kind):
    torch.manual_seed(0)
    if kind == "paper":
        src = timm.create_model("vit_micro_multimax_patch7_28")
        sd = {}
        for k, v in src.state_dict().items():
            k = k.replace(".normalizer.modulator.", ".").replace("out_modulator.", "")
            sd[k] = v
        return {"model": sd, "epoch": 10}
    src = timm.create_model("deit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, embed_dim=64,
                            depth=4, num_heads=4, num_classes=10)
    return {"model": src.state_dict()}


@pytest.mark.parametrize("kind,model", [("paper", "vit_micro_multimax_patch7_28"),
                                        ("timm", "vit_micro_gap_patch7_28")])
def test_foreign_checkpoints_evaluate(fake_fmnist, tmp_path, kind, model):
    path = tmp_path / f"{kind}.pth"
    torch.save(_micro_state(kind), path)
    out = tmp_path / "r.json"
    rc = run_eval("--checkpoint", path, "--model", model, "--dataset", "fashion_mnist", "--data-root",
                  fake_fmnist, "--split", "test", "--crop-pct", "1.0", "--mean", "0.5", "--std", "0.5",
                  "--output", out)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 37 and res["weights"]["source"] == kind
    assert res["preprocessing"]["mean"] == [0.5] and res["preprocessing"]["crop_pct"] == 1.0
    if kind == "timm":
        assert res["model_config"]["qkv_bias"] is True and "cls_token" in res["weights"]["dropped"]


def test_directory_of_checkpoints(trained_run, tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    for name in ("best.pth", "last.pth"):
        os.link(os.path.join(trained_run, name), d / name)
    assert run_eval("--checkpoint", d) == 0
    assert (d / "best.eval.json").exists() and (d / "last.eval.json").exists()
    assert len((d / "eval_results.csv").read_text().strip().splitlines()) == 3


def test_clear_errors(trained_run, fake_fmnist, tmp_path, capsys):
    def one_line_error(*args):
        capsys.readouterr()
        assert run_eval(*args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eval.py: error:") and "Traceback" not in err
        return err

    assert "does not exist" in one_line_error("--checkpoint", tmp_path / "nope.pth")
    data = open(os.path.join(trained_run, "last.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error("--checkpoint", tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    assert "cut.pth" not in one_line_error("--checkpoint", tmp_path / "text.pth")
    err = one_line_error("--checkpoint", os.path.join(trained_run, "last.pth"), "model.kwargs.depth=3")
    assert "blocks.2" in err  # names the keys that do not fit
    err = one_line_error("--checkpoint", os.path.join(trained_run, "last.pth"), "--data-root", tmp_path / "none")
    assert str(tmp_path / "none") in err
