"""scripts/attention_maps.py: rollout and query-map math, preprocessing, and the script on tiny checkpoints."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from engine.config import dump_config, load_config
from engine.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_spec = importlib.util.spec_from_file_location("attention_maps", os.path.join(ROOT, "scripts", "attention_maps.py"))
am = sys.modules["attention_maps"] = importlib.util.module_from_spec(_spec)  # its dataclass looks itself up
_spec.loader.exec_module(am)


# ---------------------------------------------------------------- math

def _random_attention(layers, heads, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(3 * torch.randn(heads, n, n, generator=g), -1) for _ in range(layers)]


def test_rollout_is_row_stochastic_and_multiplies_later_layers_on_the_left():
    probs = _random_attention(3, 2, 5)
    r = am.rollout(probs)
    assert r.dtype == torch.float64 and (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(5, dtype=torch.float64))
    # rows of A sum to 1, so rownorm(A + I) = (A + I) / 2; the last layer acts last (leftmost)
    a1, a2 = (p.double().mean(0) for p in _random_attention(2, 3, 4, seed=1))
    eye = torch.eye(4, dtype=torch.float64)
    want = ((a2 + eye) / 2) @ ((a1 + eye) / 2)
    assert not torch.allclose(want, ((a1 + eye) / 2) @ ((a2 + eye) / 2))  # the order is observable
    torch.testing.assert_close(am.rollout(_random_attention(2, 3, 4, seed=1)), want)


def test_rollout_of_identity_attention_is_uniform_over_patches():
    eye = [torch.eye(6).expand(2, 6, 6) for _ in range(3)]
    torch.testing.assert_close(am.rollout(eye), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(am.rollout_map(eye, (2, 3)), torch.full((2, 3), 1 / 6, dtype=torch.float64))
    # one layer of uniform attention: (U + I) / 2
    uniform = [torch.full((1, 4, 4), 0.25)]
    torch.testing.assert_close(am.rollout(uniform), (torch.full((4, 4), 0.25) + torch.eye(4)).double() / 2)


@pytest.mark.parametrize("prefix", [0, 1])
def test_query_maps_take_the_query_row_on_the_patch_grid(prefix):
    grid, n = (2, 3), 6 + prefix
    probs = _random_attention(2, 3, n)
    maps = am.query_maps(probs, (0, 2), grid, prefix)  # row 0, col 2 of a 2x3 grid = patch 2 (row-major)
    assert maps.shape == (2, 3, 2, 3)
    for layer in range(2):
        for head in range(3):
            torch.testing.assert_close(maps[layer, head].flatten(), probs[layer][head, prefix + 2, prefix:])
    assert am.rollout_map(probs, grid, prefix).shape == grid


# ---------------------------------------------------------------- checkpoints

def _checkpoint(path, *overrides):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1)
    torch.save({"model": model.state_dict(), "config": dump_config(cfg), "format_version": 1}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("attn_maps")
    img = d / "img.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(img)
    return {
        "img": str(img),
        "mm": _checkpoint(d / "mm.pth"),
        "gap": _checkpoint(d / "gap.pth", "model.name=vit_micro_gap_patch7_28", "model.attn_normalizer=softmax",
                           "model.out_normalizer=softmax"),
        "coarse": _checkpoint(d / "coarse.pth", "model.patch_size=14"),  # a 2x2 patch grid
    }


def _is_png(path):
    return os.path.getsize(path) > 1000 and open(path, "rb").read(8) == PNG_MAGIC


def test_script_compares_multimax_with_softmax(files, tmp_path):
    out = tmp_path / "figs" / "maps.png"
    proc = subprocess.run([sys.executable, os.path.join("scripts", "attention_maps.py"), "--checkpoint", files["mm"],
                           "--compare", files["gap"], "--image", files["img"], "--query", "1", "2", "--out", str(out),
                           "--pdf"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _is_png(out) and os.path.getsize(tmp_path / "figs" / "maps.pdf") > 0
    assert proc.stdout.split() == ["wrote", str(out), "wrote", str(tmp_path / "figs" / "maps.pdf")]


def test_figure_labels_both_models_and_draws_every_head(files):
    args = am.parse_args(["--checkpoint", files["mm"], "--compare", files["gap"], "--image", files["img"]])
    image = am.read_image(files["img"])
    panels = []
    for path in (files["mm"], files["gap"]):
        model, cfg, _ = am.load_model(path, None, False)
        panels.append(am.model_maps(model, cfg, image, am.patch_query(args.query, (4, 4), path), path))
    assert "multimax attention" in panels[0].label and "softmax attention" in panels[1].label
    assert panels[0].query.shape == (2, 2, 4, 4)  # layers, heads, patch grid
    torch.testing.assert_close(panels[1].query.sum((-2, -1)), torch.ones(2, 2))  # softmax rows over all patches
    fig = am.attention_figure(panels, (2, 2), "img.png")
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert titles == [p.label for p in panels]
    assert sum(ax.get_visible() for ax in fig.axes) == 2 * (2 + 2 * 2)  # input, rollout, layers x heads


def test_image_gets_the_configured_datasets_normalisation(files):
    _, cfg, _ = am.load_model(files["mm"], None, False)
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    x, shown = am.preprocess(Image.fromarray(pixels), cfg, 1)
    want = (torch.from_numpy(pixels).float() / 255 - 0.2860) / 0.3530  # Fashion-MNIST's, crop_pct 1.0
    torch.testing.assert_close(x, want[None, None])
    torch.testing.assert_close(shown, torch.from_numpy(pixels).float() / 255)


def test_dataset_index_and_foreign_checkpoint(files, fake_fmnist, tmp_path, capsys):
    out = tmp_path / "ds.png"
    argv = ["--checkpoint", files["mm"], "--dataset-index", "3", "--out", str(out), f"data.root={fake_fmnist}"]
    assert am.main(argv) == 0
    assert _is_png(out)
    foreign = tmp_path / "foreign.pth"
    torch.save(timm.create_model("vit_micro_gap_patch7_28").state_dict(), foreign)  # bare state dict, no config
    out = tmp_path / "foreign.png"
    assert am.main(["--checkpoint", str(foreign), "--model", "vit_micro_gap_patch7_28", "--image", files["img"],
                    "--out", str(out)]) == 0
    assert _is_png(out)
    capsys.readouterr()
    assert am.main(["--checkpoint", str(foreign), "--image", files["img"]]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize("case, needle", [
    ("query", "outside the 4x4 patch grid"),
    ("image", "nope.png does not exist"),
    ("checkpoint", "nope.pth"),
    ("index", "--dataset-index 37 is outside"),
    ("grid", "2x2 patch grid"),
])
def test_user_errors_are_one_line_exit_2(case, needle, files, fake_fmnist, tmp_path, capsys):
    argv = {
        "query": ["--checkpoint", files["mm"], "--image", files["img"], "--query", "4", "0"],
        "image": ["--checkpoint", files["mm"], "--image", str(tmp_path / "nope.png")],
        "checkpoint": ["--checkpoint", str(tmp_path / "nope.pth"), "--image", files["img"]],
        "index": ["--checkpoint", files["mm"], "--dataset-index", "37", f"data.root={fake_fmnist}"],  # 37 test images
        "grid": ["--checkpoint", files["mm"], "--compare", files["coarse"], "--image", files["img"],
                 "--query", "0", "0"],
    }[case]
    out = tmp_path / "never.png"
    assert am.main([*argv[:2], "--out", str(out), *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attention_maps.py: error:") and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
