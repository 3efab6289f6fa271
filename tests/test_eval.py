"""eval.py on our checkpoints: reproduces training's evaluation, exact under DDP, statistics, the
whole split, class names checked, directories of checkpoints, result names, clear errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import eval as evaluate_script
import models  # noqa: F401
from conftest import write_image_folder
from data import build_eval_loader, datasets
from data.datasets import FashionMNIST
from engine.config import config_from_yaml_text, dump_config, load_config
from engine.errors import UserError
from engine.logger import read_jsonl
from engine.model import build_model
from helpers import ROOT, run_train, tiny_overrides


@pytest.fixture(scope="module")
def trained_run(fake_fmnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalrun") / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.ema": "true", "train.ema_decay": 0.5}))
    return out


def run_eval(*args):
    return evaluate_script.main([str(a) for a in args])


def one_line_error(capsys, *args):
    capsys.readouterr()
    try:
        rc = run_eval(*args)
    except SystemExit as e:  # argument errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval.py: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


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


@pytest.mark.slow
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
    src = timm.create_model("vit_micro_gap_patch7_28", qkv_bias=True)  # a softmax GAP model saved by other code
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
    assert res["model_config"]["qkv_bias"] is (kind == "timm")  # read off the weights


def test_checkpoints_record_class_names_and_eval_takes_the_whole_split(trained_run, tmp_path):
    ckpt = torch.load(os.path.join(trained_run, "last.pth"), weights_only=True)
    assert ckpt["classes"] == list(FashionMNIST.classes)
    cfg = config_from_yaml_text(ckpt["config"])
    cfg.data.max_val_samples = 8  # a smoke-run setting of training, not of evaluation
    ckpt["config"] = dump_config(cfg)
    torch.save(ckpt, tmp_path / "subset.pth")
    assert run_eval("--checkpoint", tmp_path / "subset.pth", "--output", tmp_path / "all.json") == 0
    assert json.loads((tmp_path / "all.json").read_text())["num_images"] == 37
    assert run_eval("--checkpoint", tmp_path / "subset.pth", "--output", tmp_path / "five.json",
                    "data.max_val_samples=5") == 0
    res = json.loads((tmp_path / "five.json").read_text())
    assert res["num_images"] == 5 and res["dataset"]["max_samples"] == 5


@pytest.fixture(scope="module")
def folder_checkpoint(tmp_path_factory):
    """A GAP micro ViT trained (so to speak) on an ImageFolder with classes a..e."""
    d = tmp_path_factory.mktemp("folder_ckpt")
    root = write_image_folder(str(d / "data"))
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.name=vit_micro_gap_patch7_28", "model.kwargs.depth=1", "data.dataset=imagefolder",
                       f"data.root={root}", "data.workers=0", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 5, 3)
    path = d / "folder.pth"
    torch.save({"model": model.state_dict(), "config": dump_config(cfg), "classes": list("abcde")}, path)
    return str(path), root, cfg


def test_a_split_with_other_classes_is_refused(folder_checkpoint, tmp_path, capsys):
    path, root, _ = folder_checkpoint
    assert run_eval("--checkpoint", path, "--output", tmp_path / "same.json") == 0  # the same classes
    other = write_image_folder(str(tmp_path / "other"), classes=("a", "b", "x", "d", "e"))
    err = one_line_error(capsys, "--checkpoint", path, "--data-root", other)
    assert "trained on 5 classes, the split has 5; not among the checkpoint's: ['x']" in err
    fewer = write_image_folder(str(tmp_path / "fewer"), classes=("b", "d"))
    err = one_line_error(capsys, "--checkpoint", path, "--data-root", fewer)
    assert "--class-subset" in err
    # a checkpoint without class names: the counts must agree, the head is never re-initialised
    ckpt = torch.load(path, weights_only=True)
    ckpt["classes"] = None
    torch.save(ckpt, tmp_path / "nameless.pth")
    err = one_line_error(capsys, "--checkpoint", tmp_path / "nameless.pth", "--data-root", fewer)
    assert "the model has 5 classes, the split 2" in err
    err = one_line_error(capsys, "--checkpoint", tmp_path / "nameless.pth", "--data-root", fewer, "--class-subset")
    assert "matches classes by name" in err


def test_a_deliberate_subset_maps_labels_onto_the_checkpoint_s_classes(folder_checkpoint, tmp_path):
    path, _, cfg = folder_checkpoint
    fewer = write_image_folder(str(tmp_path / "fewer"), classes=("b", "d"), per_class=4, seed=3)
    out = tmp_path / "subset.json"
    assert run_eval("--checkpoint", path, "--data-root", fewer, "--class-subset", "--output", out) == 0
    res = json.loads(out.read_text())
    assert res["dataset"]["class_subset"] is True and res["num_images"] == 8
    # by hand: split label 0 is class 'b' = output 1, label 1 is 'd' = output 3; all 5 outputs compete
    cfg.data.root = fewer
    loader, _ = build_eval_loader(cfg.data, cfg.model.img_size, 0, 1)
    ckpt = torch.load(path, weights_only=True)
    model = build_model(cfg.model, 5, 3)
    model.load_state_dict(ckpt["model"])
    model.eval()
    hits = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(x).argmax(-1) == torch.tensor([1, 3])[y]).sum())
    assert res["top1"] == 100 * hits / 8


def test_directory_hard_links_once_bad_file_reported_names_never_collide(trained_run, tmp_path, capsys):
    d = tmp_path / "ckpts"
    d.mkdir()
    for name in os.listdir(trained_run):
        if name.endswith(".pth"):
            os.link(os.path.join(trained_run, name), d / name)
    (d / "broken.pth").write_bytes(b"not a checkpoint")
    inodes = {}
    for name in sorted(os.listdir(d)):
        if name != "broken.pth":
            inodes.setdefault(os.stat(d / name).st_ino, []).append(name)
    assert len(inodes) < len(os.listdir(d)) - 1  # the run dir does hard-link its checkpoints
    capsys.readouterr()
    assert run_eval("--checkpoint", d) == 2  # the bad file makes the run fail, after the others
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "broken.pth is truncated" in err[0] and "1 of" in err[1]
    results = sorted(f for f in os.listdir(d) if f.endswith(".eval.json"))
    assert len(results) == len(inodes)  # each distinct file once
    for names in inodes.values():
        res = json.loads((d / f"{os.path.splitext(names[0])[0]}.vit_micro_multimax_patch7_28.fashion_mnist-val.28px"
                              ".eval.json").read_text())
        assert sorted(os.path.basename(p) for p in res["same_file"]) == names[1:]
    assert len((d / "eval_results.csv").read_text().strip().splitlines()) == 1 + len(inodes)
    # another split and the EMA weights of the same file: new names, nothing overwritten
    last = d / "last.pth"
    assert run_eval("--checkpoint", last, "--split", "train") == 0
    assert run_eval("--checkpoint", last, "--use-ema") == 0
    names = set(os.listdir(d))
    assert {"last.vit_micro_multimax_patch7_28.fashion_mnist-train.28px.eval.json",
            "last_ema.vit_micro_multimax_patch7_28.fashion_mnist-val.28px.eval.json"} <= names
    assert len([f for f in names if f.endswith(".eval.json")]) == len(inodes) + 2


def test_output_as_a_directory_or_a_file(trained_run, tmp_path, capsys):
    last = os.path.join(trained_run, "last.pth")
    out = tmp_path / "results"
    out.mkdir()
    assert run_eval("--checkpoint", last, "--output", out) == 0
    assert sorted(os.listdir(out)) == ["eval_results.csv",
                                       "last.vit_micro_multimax_patch7_28.fashion_mnist-val.28px.eval.json"]
    assert run_eval("--checkpoint", last, "--output", str(tmp_path / "new") + os.sep) == 0
    assert len(os.listdir(tmp_path / "new")) == 2
    d = tmp_path / "two"
    d.mkdir()
    for name in ("a.pth", "b.pth"):
        shutil.copy(last, d / name)
    err = one_line_error(capsys, "--checkpoint", d, "--output", tmp_path / "one.json")
    assert "names one file, but 2 checkpoints" in err and not (tmp_path / "one.json").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_clear_errors(trained_run, fake_fmnist, tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, "--checkpoint", tmp_path / "nope.pth")
    data = open(os.path.join(trained_run, "last.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(capsys, "--checkpoint", tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    assert "cut.pth" not in one_line_error(capsys, "--checkpoint", tmp_path / "text.pth")
    last = os.path.join(trained_run, "last.pth")
    err = one_line_error(capsys, "--checkpoint", last, "model.kwargs.depth=3")
    assert "blocks.2" in err  # names the keys that do not fit
    err = one_line_error(capsys, "--checkpoint", last, "--data-root", tmp_path / "none")
    assert str(tmp_path / "none") in err
    for n in ("0", "-1"):
        assert "--attn-stats-batches: expected an integer >= 1" in one_line_error(
            capsys, "--checkpoint", last, "--attn-stats", "--attn-stats-batches", n)
    assert "--pretrained/--pretrained-file need --model" in one_line_error(capsys, "--pretrained")
    assert "deit_small_patch16_224" in one_line_error(capsys, "--checkpoint", last, "--model", "deit_smal_patch16_224")


def test_urls_with_one_file_name_are_two_checkpoints(trained_run, tmp_path, monkeypatch, http_server):
    """Two runs' last.pth by URL: file:// is read in place, http(s) cached per URL, so neither answers
    for the other; results go to the working directory, never into the cache."""
    base, served = http_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ckpt = torch.load(os.path.join(trained_run, "last.pth"), weights_only=True)
    for run, scale in (("a", 1.0), ("b", -1.0)):  # b: the head negated, its predictions differ
        ckpt["model"]["head.weight"] *= scale
        for folder in (tmp_path / run, served / run):
            folder.mkdir()
            torch.save(ckpt, folder / "last.pth")
    name = "last.vit_micro_multimax_patch7_28.fashion_mnist-val.28px.eval.json"
    results = {}
    for url in [(tmp_path / r / "last.pth").as_uri() for r in "ab"] + [f"{base}/{r}/last.pth" for r in "ab"]:
        assert run_eval("--checkpoint", url, "--output", work / f"{len(results)}.json") == 0
        results[url] = json.loads((work / f"{len(results)}.json").read_text())
        assert results[url]["checkpoint"] == url and results[url]["num_images"] == 37
    file_a, file_b, http_a, http_b = results.values()
    assert file_a["loss"] != file_b["loss"] and http_a["loss"] != http_b["loss"]
    assert (http_a["loss"], http_b["loss"]) == (file_a["loss"], file_b["loss"])
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert len(list(cache.glob("*/last.pth"))) == 2  # the two http URLs; the file URLs were not copied
    assert run_eval("--checkpoint", (tmp_path / "a" / "last.pth").as_uri()) == 0
    assert (work / name).is_file() and not list(cache.rglob("*.json"))


def test_another_dataset_or_root_leaves_the_stored_root_alone(trained_run, fake_fmnist, tmp_path, monkeypatch,
                                                             capsys):
    """A checkpoint trained on an ImageFolder at a root with data.download on, evaluated on
    Fashion-MNIST: the stored root and download give way, nothing is written under that root."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-debian"))
    stored_root = tmp_path / "folder_data"
    stored_root.mkdir()
    ckpt = torch.load(os.path.join(trained_run, "last.pth"), weights_only=True)
    cfg = config_from_yaml_text(ckpt["config"])
    cfg.data.dataset, cfg.data.root, cfg.data.download = "imagefolder", str(stored_root), True
    cfg.data.val_split = "holdout"
    ckpt["config"] = dump_config(cfg)
    torch.save(ckpt, tmp_path / "folder.pth")
    err = one_line_error(capsys, "--checkpoint", tmp_path / "folder.pth", "--dataset", "fashion_mnist")
    assert "Fashion-MNIST not found" in err and str(stored_root) not in err  # looked for where the default is
    assert run_eval("--checkpoint", tmp_path / "folder.pth", "--dataset", "fashion_mnist", "--data-root", fake_fmnist,
                    "--output", tmp_path / "r.json") == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num_images"] == 37 and res["dataset"]["split"] == "val"  # the stored "holdout" went too
    # the same dataset at another root: the stored download does not follow it there
    other = tmp_path / "other_root"
    other.mkdir()
    last = os.path.join(trained_run, "last.pth")
    assert config_from_yaml_text(torch.load(last, weights_only=True)["config"]).data.download  # the quickstart's
    assert "Fashion-MNIST not found" in one_line_error(capsys, "--checkpoint", last, "--data-root", other)
    assert os.listdir(stored_root) == [] and os.listdir(other) == []
    assert not (tmp_path / "cache").exists()


def test_non_finite_weights_are_evaluated_with_a_warning_and_exit_3(trained_run, tmp_path, capsys):
    ckpt = torch.load(os.path.join(trained_run, "last.pth"), weights_only=True)
    ckpt["model"]["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pth")
    capsys.readouterr()
    assert run_eval("--checkpoint", tmp_path / "nan.pth", "--output", tmp_path / "nan.json") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"eval.py: warning: {tmp_path / 'nan.pth'}: the loss is nan")
    assert "1 weight tensor(s) hold NaN/Inf (blocks.1.mlp.fc2.weight)" in err
    res = json.loads((tmp_path / "nan.json").read_text())  # the result is still written, as it is
    assert math.isnan(res["loss"]) and res["weights"]["nonfinite"] == ["blocks.1.mlp.fc2.weight"]
    assert run_eval("--checkpoint", os.path.join(trained_run, "last.pth"), "--output", tmp_path / "ok.json") == 0
    assert json.loads((tmp_path / "ok.json").read_text())["weights"]["nonfinite"] == []


def test_an_image_size_off_the_patch_grid_is_refused(trained_run, capsys):
    err = one_line_error(capsys, "--checkpoint", os.path.join(trained_run, "last.pth"), "--img-size", "30")
    assert "model.img_size 30 is not a multiple of the patch size 7" in err and "use 28 or 35" in err
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["model.img_size=30"])
    with pytest.raises(UserError, match="model.img_size 30 is not a multiple"):  # training builds it the same way
        build_model(cfg.model, 10, 1)


def test_imports_point_one_way():
    """No module imports an entry script (what scripts share with eval.py lives in engine/), only
    scripts import scripts/ (what only they share), and models/ imports nothing of engine/ or data/."""
    import ast
    import glob

    files = [os.path.relpath(p, ROOT) for d in ("", "models", "engine", "data", "scripts")
             for p in glob.glob(os.path.join(ROOT, d, "*.py"))]
    assert "engine/evaluation.py" in files and "eval.py" in files
    for path in files:
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not imported & {"eval", "train"}, path
        if not path.startswith("scripts/"):  # what only scripts use lives beside them
            assert "scripts" not in imported, path
        if path.startswith("models/"):
            assert not imported & {"engine", "data"}, path
