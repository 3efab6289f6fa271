"""Figure scripts: they run on a tiny checkpoint, and the simplex points match closed forms."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import timm
import torch

import models
from engine.errors import UserError
from engine.plots import modulator_curve, modulator_figure
from models.multimax import ModulatorParams, modulator_params, modulators_from_state_dict
from scripts._figures import barycentric_xy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_simplex = _script("plot_simplex")
plot_modulators = _script("plot_modulators")


def _state_dict(shift=0.0):
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_multimax_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                          num_heads=3, num_classes=7)
    sd = m.state_dict()
    sd["blocks.1.attn.normalizer.modulator.ranges"] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    sd["blocks.1.attn.normalizer.modulator.ts"] = torch.tensor([-3.0 - shift, -0.5, 0.0, 0.0])
    return sd


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    paths = []
    for epoch in (3, 1):  # written out of order: the script orders them by epoch
        path = d / f"checkpoint-epoch{epoch:04d}.pth"
        torch.save({"model": _state_dict(shift=epoch), "format_version": 1, "epoch": epoch}, path)
        paths.append(str(path))
    return paths


def _run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join("scripts", script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _is_png(path):
    return os.path.getsize(path) > 1000 and open(path, "rb").read(8) == PNG_MAGIC


def test_plot_simplex_script_on_checkpoint(checkpoints, tmp_path):
    out = tmp_path / "figs" / "simplex.png"
    proc = _run("plot_simplex.py", "--checkpoint", checkpoints[0], "--layer", "blocks.1", "--out", out, "--pdf")
    assert proc.returncode == 0, proc.stderr
    assert _is_png(out) and os.path.getsize(tmp_path / "figs" / "simplex.pdf") > 0


def test_plot_modulators_script_on_checkpoints(checkpoints, tmp_path):
    out = tmp_path / "mods.png"
    proc = _run("plot_modulators.py", "--checkpoints", *checkpoints, "--out", out, "--x-range", "-5", "5")
    assert proc.returncode == 0, proc.stderr
    assert _is_png(out)
    runs = plot_modulators.label_runs(checkpoints)
    assert list(runs) == ["epoch 1", "epoch 3"]
    assert list(runs["epoch 1"]) == ["blocks.0", "blocks.1", "out"]


@pytest.mark.parametrize("script", ["plot_simplex", "plot_modulators"])
@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_bad_checkpoint_is_one_line_exit_2(script, kind, tmp_path, capsys):
    path = tmp_path / "bad.pth"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    args = ["--checkpoint", str(path), "--layer", "out"] if script == "plot_simplex" else ["--checkpoints", str(path)]
    assert {"plot_simplex": plot_simplex, "plot_modulators": plot_modulators}[script].main(args) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and len(err.strip().splitlines()) == 1


def test_unknown_layer_lists_layers(checkpoints, tmp_path, capsys):
    rc = plot_simplex.main(["--checkpoint", checkpoints[0], "--layer", "blocks.7", "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "blocks.7" in err and "blocks.0, blocks.1, out" in err
    assert plot_modulators.main(["--checkpoints", checkpoints[0], "--x-range", "3", "1"]) == 2
    with pytest.raises(UserError, match="same even number"):
        plot_simplex.run(plot_simplex.parse_args(["--ranges", "0", "1", "--ts", "1"]))


def test_softmax_checkpoint_has_no_modulators(tmp_path, capsys):
    gap = timm.create_model("deit_tiny_gap_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=1,
                            num_heads=3, num_classes=7)
    torch.save({"model": gap.state_dict()}, tmp_path / "gap.pth")
    assert plot_modulators.main(["--checkpoints", str(tmp_path / "gap.pth")]) == 2
    assert "no MultiMax modulators" in capsys.readouterr().err


def test_both_key_layouts_read_the_same_modulators():
    ours = _state_dict()
    paper = {k.replace(".normalizer.modulator.", ".").replace("out_modulator.", ""): v for k, v in ours.items()}
    assert "blocks.1.attn.ranges" in paper and "ranges" in paper
    a, b = modulators_from_state_dict(ours), modulators_from_state_dict(paper)
    ddp = modulators_from_state_dict({f"module.{k}": v for k, v in ours.items()})
    assert list(a) == list(b) == list(ddp) == ["blocks.0", "blocks.1", "out"]
    for name in a:
        torch.testing.assert_close(a[name].ranges, b[name].ranges)
        torch.testing.assert_close(a[name].ts, ddp[name].ts)
    fig = modulator_figure({n: (p.ranges, p.ts) for n, p in a.items()})  # the training logger's call
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3


# ---------------------------------------------------------------- closed forms

X = plot_simplex.simplex_inputs()  # (10, x2, -1) for x2 = 10, 8, 6, 4, 2
ONE_HOT = [1.0, 0.0, 0.0]
HALF = [0.5, 0.5, 0.0]


def _softmax_closed(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _assert_rows(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("t", [0.5, 1.0, 5.0])
def test_softmax_points(t):
    _assert_rows(plot_simplex.normalizer_probs("softmax", X, temperature=t), [_softmax_closed(r, t) for r in X.tolist()])


def test_sparsemax_and_entmax_points():
    # ties at the top split the mass equally; any gap >= 1 (sparsemax) or >= 2 (entmax-1.5,
    # p_i = [x_i/2 - tau]_+^2 with tau = 4 when only 10 is in the support) leaves one entry
    want = [HALF] + [ONE_HOT] * 4
    _assert_rows(plot_simplex.normalizer_probs("sparsemax", X), want)
    _assert_rows(plot_simplex.normalizer_probs("entmax15", X), want)
    # an input where both keep more than one entry
    x = torch.tensor([[1.0, 0.8, 0.1]], dtype=torch.float64)
    # sparsemax: support {1, 2}, tau = (1 + 0.8 - 1) / 2 = 0.4 > 0.1
    _assert_rows(plot_simplex.normalizer_probs("sparsemax", x), [[0.6, 0.4, 0.0]])
    # entmax-1.5: all three in the support, sum_i (x_i/2 - tau)^2 = 1  <=>  3 tau^2 - 1.9 tau - 0.5875 = 0
    tau = (1.9 - math.sqrt(1.9 ** 2 + 4 * 3 * 0.5875)) / 6
    _assert_rows(plot_simplex.normalizer_probs("entmax15", x), [[(v / 2 - tau) ** 2 for v in (1.0, 0.8, 0.1)]])


def test_evsoftmax_points():
    # entries below the mean (19/3, 17/3, 5, 13/3, 11/3) are dropped, the rest renormalised
    want = []
    for row in X.tolist():
        kept = [v >= sum(row) / 3 for v in row]
        e = [math.exp(v) if k else 0.0 for v, k in zip(row, kept)]
        want.append([v / sum(e) for v in e])
    assert [w[1] > 0 for w in want] == [True, True, True, False, False]
    _assert_rows(plot_simplex.normalizer_probs("evsoftmax", X), want)


def test_multimax_points_from_cli_parameters():
    b, d, tb, td = 0.0, 2.0, -10.0, -0.7
    params = (torch.tensor([b, d], dtype=torch.float64), torch.tensor([tb, td], dtype=torch.float64))
    sigma = lambda v: v + tb * max(b - v, 0.0) + td * max(v - d, 0.0)  # first-order SegLU
    want = [_softmax_closed([sigma(v) for v in row]) for row in X.tolist()]
    _assert_rows(plot_simplex.normalizer_probs("multimax", X, modulator=params), want)


def test_barycentric_projection():
    h = math.sqrt(3) / 2
    p = torch.tensor([ONE_HOT, [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], HALF, [1 / 3] * 3], dtype=torch.float64)
    torch.testing.assert_close(barycentric_xy(p), torch.tensor(
        [[1.0, 0.0], [0.5, h], [0.0, 0.0], [0.75, h / 2], [0.5, h / 3]], dtype=torch.float64))
    # the series the script draws carry these coordinates and the paper's S/M
    series = {s.label: s for s in plot_simplex.build_series(X, temperatures=(1.0,), sweep=False)}
    soft = series["softmax t=1"]
    _assert_rows(soft.probs, [_softmax_closed(r) for r in X.tolist()])
    assert soft.multimodality[1].item() == pytest.approx(0.2384, abs=5e-5)
    assert series["sparsemax"].sparsity.tolist() == [1.0] * 5


def test_modulator_params_read_from_a_model_match_the_modules_including_affine():
    """What the log and the figures read of a live model (ModulatorParams.of) and of its state dict
    (modulators_from_state_dict) is the same σ as the modules compute."""
    torch.manual_seed(0)
    mods = {"plain": models.SegLU(order=2), "affine": models.SegLU(order=1, affine=True)}
    with torch.no_grad():
        mods["affine"].scale.fill_(2.0)
        mods["affine"].shift.fill_(-1.0)
        mods["affine"].ts.copy_(torch.tensor([-3.0, 0.5]))
    x = torch.linspace(-4, 4, 33)
    for name, mod in mods.items():
        torch.testing.assert_close(modulator_curve(ModulatorParams.of(mod), x), mod(x).detach())
    assert set(ModulatorParams.of(mods["plain"]).lists()) == {"ranges", "ts"}
    assert ModulatorParams.of(mods["affine"]).lists()["scale"] == [2.0]
    model = timm.create_model("vit_micro_multimax_patch7_28", depth=2, modulator_affine=True)
    live, stored = modulator_params(model), modulators_from_state_dict(model.state_dict())
    assert list(live) == ["blocks.0.attn.normalizer.modulator", "blocks.1.attn.normalizer.modulator", "out_modulator"]
    assert list(stored) == ["blocks.0", "blocks.1", "out"]
    for a, b in zip(live.values(), stored.values()):
        assert a.lists() == b.lists()


@pytest.mark.parametrize("script, args, words", [
    ("plot_simplex", ["--out", "m.xyz"], "unsupported format .xyz"),
    ("plot_simplex", ["--out", "noext"], "no file extension"),
    ("plot_simplex", ["--dpi", "0"], "--dpi must be a number in (0, 1200]"),
    ("plot_simplex", ["--dpi", "nan"], "--dpi must be a number in (0, 1200]"),
    ("plot_simplex", ["--ranges", "nan", "2", "--ts", "-10", "-0.7"], "--ranges must be finite"),
    ("plot_simplex", ["--ranges", "0", "2", "--ts", "inf", "-0.7"], "--ts must be finite"),
    ("plot_simplex", ["--x2", "8", "nan"], "--x2 must be finite"),
    ("plot_simplex", ["--temperatures", "nan"], "--temperatures must be finite"),
    ("plot_modulators", ["--out", "m.xyz"], "unsupported format .xyz"),
    ("plot_modulators", ["--dpi", "-3"], "--dpi must be a number in (0, 1200]"),
    ("plot_modulators", ["--x-range", "0", "inf"], "--x-range must be finite"),
])
def test_bad_figure_options_are_one_line_and_write_nothing(script, args, words, checkpoints, tmp_path, capsys,
                                                          monkeypatch):
    module = {"plot_simplex": plot_simplex, "plot_modulators": plot_modulators}[script]
    source = ["--checkpoints", checkpoints[0]] if script == "plot_modulators" else []
    out = [] if "--out" in args else ["--out", str(tmp_path / "fig.png")]
    monkeypatch.chdir(tmp_path)  # a relative --out would land here
    assert module.main([*source, *out, *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_other_formats_and_an_oversized_image(tmp_path, capsys):
    out = tmp_path / "simplex.svg"
    assert plot_simplex.main(["--no-sweep", "--out", str(out), "--pdf"]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and (tmp_path / "simplex.pdf").is_file()
    capsys.readouterr()
    assert plot_simplex.main(["--no-sweep", "--out", str(tmp_path / "big.png"), "--dpi", "1e5"]) == 2
    err = capsys.readouterr().err
    assert "--dpi must be a number in (0, 1200], got 100000" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["simplex.pdf", "simplex.svg"]
