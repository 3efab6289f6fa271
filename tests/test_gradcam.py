"""scripts/gradcam.py: Grad-CAM through the grad-cam package on our GAP models (no class token) and
on timm's class-token ViT, the figure from checkpoints, and one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401  (registers the micro models with timm)
from engine.config import dump_config, load_config
from engine.model import build_model
from helpers import ROOT, load_script

gc = load_script("gradcam")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tokens_go_onto_the_patch_grid_row_major_without_prefix_tokens():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # 1 class token + a 2x3 grid
    grid = gc.tokens_to_grid(tokens, (2, 3), 1)
    assert grid.shape == (2, 3, 2, 3)
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(grid[:, :, r, c], tokens[:, 1 + 3 * r + c])


def _models():
    torch.manual_seed(0)
    ours = timm.create_model("vit_micro_multimax_patch7_28", num_classes=10, in_chans=1)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    return {"ours": (ours.eval(), (1, 28, 28), 0), "timm_vit": (vit.eval(), (3, 32, 32), 1)}


@pytest.mark.parametrize("name", ["ours", "timm_vit"])
def test_map_has_the_images_size_and_changes_with_the_target_class(name):
    model, shape, prefix = _models()[name]
    assert model.num_prefix_tokens == prefix
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    maps = gc.gradcam(model, x, [0, 0])
    assert maps.shape == (2, *shape[1:]) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1.0, atol=1e-5)  # scaled per map, not empty
    other = gc.gradcam(model, x, [3, 7])
    for i in range(2):
        assert np.abs(maps[i] - other[i]).max() > 0.05
    again = gc.gradcam(model, x, [3, 7])
    np.testing.assert_array_equal(other, again)  # deterministic, and no hook left behind to disturb it
    layer, layer_name = gc.cam_layer(model, -1)
    assert layer_name == f"blocks.{len(model.blocks) - 1}.norm1"
    assert not layer._forward_hooks


def _checkpoint(path, *overrides):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1)
    torch.save({"model": model.state_dict(), "config": dump_config(cfg), "format_version": 1,
                "classes": [f"c{i}" for i in range(10)]}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gradcam")
    img = d / "img.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(img)
    return {
        "img": str(img),
        "mm": _checkpoint(d / "mm.pth"),
        # timm's own ViT with a class token, 4x4 patches of 7 pixels, trained by our train.py
        "vit": _checkpoint(d / "vit.pth", "model.name=vit_tiny_patch16_224", "model.patch_size=7"),
    }


def _is_png(path):
    return os.path.getsize(path) > 1000 and open(path, "rb").read(8) == PNG_MAGIC


def test_script_compares_ours_with_a_class_token_vit(files, tmp_path):
    out = tmp_path / "figs" / "cam.png"
    proc = subprocess.run([sys.executable, os.path.join("scripts", "gradcam.py"), "--checkpoint", files["mm"],
                           "--compare", files["vit"], "--image", files["img"], files["img"], "--target", "4",
                           "--out", str(out), "--pdf"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _is_png(out) and os.path.getsize(tmp_path / "figs" / "cam.pdf") > 0
    assert proc.stdout.split() == ["wrote", str(out), "wrote", str(tmp_path / "figs" / "cam.pdf")]


def test_figure_from_dataset_images_names_models_and_targets(files, fake_fmnist, monkeypatch, tmp_path):
    drawn = {}
    figure = gc.gradcam_figure
    monkeypatch.setattr(gc, "gradcam_figure", lambda *a: drawn.setdefault("fig", figure(*a)))
    out = tmp_path / "ds.png"
    assert gc.main(["--checkpoint", files["mm"], "--compare", files["vit"], "--dataset-index", "0", "3",
                    "--target", "label", "--out", str(out), f"data.root={fake_fmnist}"]) == 0
    assert _is_png(out)
    axes = drawn["fig"].axes[:6]  # 2 images x (input, mm, vit); the colour bar follows
    titles = [ax.get_title() for ax in axes]
    assert "image 0, class" in titles[0] and "image 3, class" in titles[3]
    assert "vit_micro_multimax_patch7_28\nmultimax attention, MultiMax output" in titles[1]
    assert "vit_tiny_patch16_224\nsoftmax attention\n" in titles[2]
    label = int(titles[0].split("class ")[1].split()[0])
    assert f"target {label} (c{label})" in titles[1] and f"target {label} (c{label})" in titles[2]
    overlays = [ax.get_images()[-1].get_array() for ax in axes[1:3]]
    assert all(o.shape == (28, 28) for o in overlays)


@pytest.mark.parametrize("case, needle", [
    ("label", "--target label needs --dataset-index"),
    ("class", "--target 10 is outside the 10 classes"),
    ("block", "--block 2 is outside the model's 2 blocks"),
    ("image", "nope.png does not exist"),
    ("out", "unsupported format .txt"),
])
def test_user_errors_are_one_line_exit_2(case, needle, files, tmp_path, capsys):
    out = str(tmp_path / "never.png")
    argv = {
        "label": ["--image", files["img"], "--target", "label"],
        "class": ["--image", files["img"], "--target", "10"],
        "block": ["--image", files["img"], "--block", "2"],
        "image": ["--image", str(tmp_path / "nope.png")],
        "out": ["--image", files["img"], "--out", str(tmp_path / "cam.txt")],
    }[case]
    assert gc.main(["--checkpoint", files["mm"], "--out", out, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradcam.py: error:") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)
