"""scripts/report.py: the per-variant table (mean ± std over finished seeds, unfinished runs
marked and left out), the CSVs and the figures, from run directories whose files the test writes."""
import csv
import importlib.util
import json
import os
import sys

import pytest
import yaml

from scripts._sweep_files import call_end, call_start
from helpers import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("report_script", os.path.join(ROOT, "scripts", "report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = load_script()
LAYERS = ("blocks.0.attn", "blocks.1.attn")


def write_run(run_dir, epochs, top1, loss, ema=None, img_per_s=1000.0, done=None, attn=None):
    """A run directory as train.py and eval.py leave it: config.yaml (train.epochs, resolved global
    batch 100), ``done`` epochs of log.jsonl (10 steps each) with val_top1 = top1[i], val_top5 =
    top1[i] + 10, val_loss = loss[i], and with ``attn`` an eval.json of per-layer (S, M)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"train": {"epochs": epochs, "seed": 0}, "resolved": {"global_batch": 100}}, f)
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        for e in range(epochs if done is None else done):
            row = {"epoch": e, "step": 10 * (e + 1), "train_loss": 1.0, "lr": 1e-3, "grad_norm": 1.0,
                   "train_img_per_s": img_per_s, "skipped_steps": 0,
                   "val_loss": loss[e], "val_top1": top1[e], "val_top5": top1[e] + 10, "val_images": 50}
            if ema is not None:
                row.update(val_loss_ema=loss[e], val_top1_ema=ema[e], val_top5_ema=ema[e] + 10)
            f.write(json.dumps(row) + "\n")
    open(os.path.join(run_dir, "last.pth"), "wb").close()
    if attn is not None:
        layers = {name: {"mean": {"sparsity": s, "multimodality": m}} for name, (s, m) in zip(LAYERS, attn)}
        overall = {"sparsity": sum(s for s, _ in attn) / len(attn),
                   "multimodality": sum(m for _, m in attn) / len(attn)}
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump({"top1": top1[-1], "attn_stats": {"layers": layers, "mean": overall}}, f)


@pytest.fixture
def sweep_dir(tmp_path):
    """Variant a: 3 finished seeds with EMA; b: seed 0 finished, seed 1 after 1 of 3 epochs, seed 2 not started."""
    out = tmp_path / "sweep"
    runs = []
    for seed, (t, s) in enumerate([(80.0, 0.1), (82.0, 0.2), (84.0, 0.3)]):
        write_run(out / "a" / f"seed{seed}", 3, top1=[t - 20, t + 1, t], loss=[2.0, 1.0, 1.0 + seed],
                  ema=[0.0, 0.0, t - 1], attn=[(s, 0.5), (s + 0.1, 0.7)])
        runs.append({"variant": "a", "seed": seed, "run_dir": f"a/seed{seed}"})
    write_run(out / "b" / "seed0", 3, top1=[50.0, 60.0, 70.0], loss=[3.0, 2.0, 1.5], img_per_s=500.0,
              attn=[(0.9, 0.05), (0.8, 0.1)])
    write_run(out / "b" / "seed1", 3, top1=[99.0, 99.0, 99.0], loss=[0.1] * 3, done=1)
    runs += [{"variant": "b", "seed": s, "run_dir": f"b/seed{s}"} for s in range(3)]
    (out / "sweep.json").write_text(json.dumps({"runs": runs}))
    return out


def read_csv(path):
    with open(path) as f:
        return {row.get("variant") + (f"/{row['seed']}" if "seed" in row else ""): row for row in csv.DictReader(f)}


def test_table_has_the_means_and_spreads_of_finished_runs(sweep_dir, capsys):
    assert report.main([str(sweep_dir)]) == 0
    rows = read_csv(sweep_dir / "report.csv")
    a, b = rows["a"], rows["b"]
    assert a["seeds"] == "3" and a["unfinished"] == ""
    expected_a = {"final_top1": (82.0, 2.0), "best_top1": (83.0, 2.0), "final_top5": (92.0, 2.0),
                  "final_loss": (2.0, 1.0), "best_loss": (1.0, 0.0), "final_top1_ema": (81.0, 2.0),
                  "sparsity": (0.25, 0.1), "multimodality": (0.6, 0.0),
                  "sparsity[blocks.0.attn]": (0.2, 0.1), "multimodality[blocks.1.attn]": (0.7, 0.0),
                  "train_min": (3 * 10 * 100 / 1000 / 60, 0.0)}
    for column, (mean, std) in expected_a.items():
        assert float(a[f"{column}_mean"]) == pytest.approx(mean), column
        assert float(a[f"{column}_std"]) == pytest.approx(std, abs=1e-12), column
    # b: only seed 0 is averaged (no std from one run); seed 1's 99% must not leak in
    assert b["seeds"] == "1" and b["unfinished"] == "seed 1: 1 of 3 epochs, seed 2: not started"
    assert float(b["final_top1_mean"]) == 70.0 and b["final_top1_std"] == "" and b["final_top1_ema_mean"] == ""
    assert float(b["train_min_mean"]) == pytest.approx(3 * 10 * 100 / 500 / 60)
    assert float(b["sparsity[blocks.1.attn]_mean"]) == pytest.approx(0.8)

    md = (sweep_dir / "report.md").read_text()
    line_a = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert "| 3 | 82.00 ± 2.00 | 83.00 ± 2.00 |" in line_a and "| 0.2500 ± 0.1000 | 0.6000 ± 0.0000 |" in line_a
    line_b = next(line for line in md.splitlines() if line.startswith("| b |"))
    assert "| 1 | 70.00 | 70.00 |" in line_b and line_b.endswith("| seed 1: 1 of 3 epochs, seed 2: not started |")
    assert "![val_top1](val_top1.png)" in md and "![attention_sm](attention_sm.png)" in md
    for name in ("val_top1.png", "attention_sm.png"):
        assert (sweep_dir / name).stat().st_size > 10_000

    per_run = read_csv(sweep_dir / "runs.csv")
    assert per_run["b/1"]["state"] == "1 of 3 epochs" and per_run["b/2"]["state"] == "not started"
    assert float(per_run["a/2"]["final_top1"]) == 84.0 and float(per_run["a/2"]["sparsity[blocks.0.attn]"]) == 0.3


def test_run_directories_without_a_sweep_are_grouped_by_name(sweep_dir, tmp_path, capsys):
    out = tmp_path / "rep"
    dirs = [str(sweep_dir / "a" / "seed0"), str(sweep_dir / "a" / "seed2"), str(sweep_dir / "b")]
    assert report.main([*dirs, "--out", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    assert rows["a"]["seeds"] == "2" and float(rows["a"]["final_top1_mean"]) == pytest.approx(82.0)
    assert float(rows["a"]["final_top1_std"]) == pytest.approx(2.8284271247)
    assert rows["b"]["seeds"] == "1" and rows["b"]["unfinished"] == "seed 1: 1 of 3 epochs"  # found by walking b/


def test_stale_eval_result_is_not_used(sweep_dir, capsys):
    run = sweep_dir / "b" / "seed0"
    os.utime(run / "eval.json", (1, 1))  # older than last.pth: evaluated before the last training
    assert report.main([str(sweep_dir)]) == 0
    assert read_csv(sweep_dir / "report.csv")["b"]["sparsity_mean"] == ""
    line_b = next(line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("| b |"))
    assert line_b.endswith("| seed 1: 1 of 3 epochs, seed 2: not started, seed 0: no eval.json (S, M) |")


def test_bad_input_is_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("report.py: error: ") and "missing: not a directory" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "holds no run directory" in capsys.readouterr().err


def test_failed_runs_are_listed_as_failed_and_unreadable_logs_are_said(sweep_dir, capsys):
    """A run whose last train.py call failed (the sweep's train.log ends with its exit status, or in
    logs of older sweeps with its error line) is 'failed', not 'not started'; a log.jsonl that cannot
    be read is said on the console, and a finished run with one is not counted as 0 epochs."""
    seed2 = sweep_dir / "b" / "seed2"
    seed2.mkdir()
    (seed2 / "train.log").write_text(
        call_start(["python", "train.py"]) + "run dir b/seed2 | world size 1\n"
        + "train.py: error: train.output_dir b/seed2 is in use by another training run (PID 7 on vm)\n"
        + "epoch 0 12/40 loss 2.03 (the other run, in the same log)\n" + call_end(2))
    interrupted = sweep_dir / "b" / "seed1"
    (interrupted / "train.log").write_text(call_start(["python", "train.py"]) + "epoch 1 3/10\n" + call_end(75))
    older = sweep_dir / "c" / "seed0"
    older.mkdir(parents=True)
    (older / "train.log").write_text("=== 2024-01-01T00:00:00 python train.py\n"
                                     "train.py: error: data.root: dataset directory /x/val does not exist\n")
    unreadable = sweep_dir / "a" / "seed1"
    (unreadable / "log.jsonl").write_bytes(b"\x00\xff" * 64 + b"\n")
    middle = sweep_dir / "a" / "seed2"
    rows = (middle / "log.jsonl").read_text().splitlines()
    (middle / "log.jsonl").write_text("\n".join([rows[0], "{not json", *rows[1:]]) + "\n")
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    manifest["runs"].append({"variant": "c", "seed": 0, "run_dir": "c/seed0"})
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))

    capsys.readouterr()
    assert report.main([str(sweep_dir)]) == 0
    err = capsys.readouterr().err.splitlines()
    states = {k: r["state"] for k, r in read_csv(sweep_dir / "runs.csv").items()}
    assert states["b/2"] == "failed (train.py exit 2)" and states["c/0"] == "failed (train.py failed)"
    assert states["b/1"] == "1 of 3 epochs" and states["a/1"] == "log.jsonl unreadable"
    assert states["a/2"] == "finished"  # one bad line skipped, said below
    assert f"report.py: warning: {seed2}: train.py exit 2: train.py: error: train.output_dir b/seed2 is in use by " \
           f"another training run (PID 7 on vm) (log: {seed2 / 'train.log'})" in err
    assert f"report.py: warning: {unreadable / 'log.jsonl'}: 1 line(s) are not JSON records (line 1), skipped" in err
    assert f"report.py: warning: {middle / 'log.jsonl'}: 1 line(s) are not JSON records (line 2), skipped" in err
    assert any(line.startswith(f"report.py: warning: {older}: train.py failed: train.py: error: data.root")
               for line in err)
    rows = read_csv(sweep_dir / "report.csv")
    assert rows["a"]["seeds"] == "2" and rows["a"]["unfinished"] == "seed 1: log.jsonl unreadable"
    assert rows["b"]["unfinished"] == "seed 1: 1 of 3 epochs, seed 2: failed (train.py exit 2)"


def add_patch_similarity(run_dir, values):
    """Put eval.py --patch-similarity's entry (one value per block) into the run's eval.json."""
    path = os.path.join(run_dir, "eval.json")
    with open(path) as f:
        result = json.load(f)
    result["patch_similarity"] = {"layers": {f"blocks.{i}": v for i, v in enumerate(values)}, "images": 50}
    with open(path, "w") as f:
        json.dump(result, f)


def test_patch_similarity_is_tabled_per_variant_and_drawn_against_depth(sweep_dir, monkeypatch, capsys):
    for seed, values in enumerate([(0.2, 0.4, 0.6), (0.3, 0.5, 0.7), (0.4, 0.6, 0.8)]):
        add_patch_similarity(sweep_dir / "a" / f"seed{seed}", values)
    drawn, finish = {}, report._finish

    def keep(ax, *args):
        drawn[os.path.basename(args[-1])] = ax
        return finish(ax, *args)

    monkeypatch.setattr(report, "_finish", keep)
    assert report.main([str(sweep_dir)]) == 0
    a, b = (read_csv(sweep_dir / "report.csv")[v] for v in "ab")
    for block, mean in (("blocks.0", 0.3), ("blocks.2", 0.7)):
        assert float(a[f"patch_similarity[{block}]_mean"]) == pytest.approx(mean)
        assert float(a[f"patch_similarity[{block}]_std"]) == pytest.approx(0.1)
        assert b[f"patch_similarity[{block}]_mean"] == ""  # b's finished run has no patch similarity
    assert float(read_csv(sweep_dir / "runs.csv")["a/1"]["patch_similarity[blocks.1]"]) == 0.5
    md = (sweep_dir / "report.md").read_text()
    assert "### Patch similarity per block" in md and "![patch_similarity](patch_similarity.png)" in md
    assert "| a | 0.3000 ± 0.1000 | 0.5000 ± 0.1000 | 0.7000 ± 0.1000 |" in md
    line_b = next(line for line in md.splitlines() if line.startswith("| b |"))
    assert line_b.endswith("seed 0: no patch similarity |")
    assert (sweep_dir / "patch_similarity.png").stat().st_size > 10_000
    ax = drawn["patch_similarity.png"]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("a ")]
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [1, 2, 3]
    assert list(lines[0].get_ydata()) == pytest.approx([0.3, 0.5, 0.7])
    assert not [line for line in ax.get_lines() if line.get_label().startswith("b ")]


def test_final_against_best_counts_the_runs_per_metric(sweep_dir, capsys):
    assert report.final_is_best({"top1": [(1.0, 1.0), (2.0, 3.0)], "loss": [(0.5, 0.4)]}) == {"top1": (1, 2),
                                                                                                "loss": (0, 1)}
    assert report.main([str(sweep_dir)]) == 0
    md = (sweep_dir / "report.md").read_text()
    table = md.split("### Final epoch against best epoch")[1]
    # a: top-1 peaks an epoch before the end in every seed; the loss ends at its lowest in seed 0 only
    assert "| a | 0 of 3 | 0 of 3 | 1 of 3 |" in table and "| b | 1 of 1 | 1 of 1 | 1 of 1 |" in table


def test_pairs_beyond_the_spread_are_those_whose_seeds_do_not_overlap(tmp_path, capsys):
    values = {"low": [1.0, 2.0, 3.0], "high": [3.5, 4.0, 5.0], "mid": [2.5, 3.2, 3.6], "one": [10.0]}
    assert report.separated_pairs(values) == [("high", "low")]  # mid overlaps both; one seed has no spread
    assert report.separated_pairs({"a": [1.0, 2.0], "b": [2.0, 3.0]}) == []  # touching ranges overlap
    out = tmp_path / "sweep"
    for variant, top1s in {"x": (80.0, 81.0), "y": (85.0, 86.0), "z": (80.5, 85.5)}.items():
        for seed, t in enumerate(top1s):
            write_run(out / variant / f"seed{seed}", 2, top1=[t - 1, t], loss=[1.0, 1.0 - t / 1000])
    assert report.main([str(out)]) == 0
    rows = [line for line in (out / "report.md").read_text().split("### Differences beyond the seed spread")[1]
            .splitlines() if line.startswith("| final")]
    assert rows == ["| final top-1 (%) | y | 85.00–86.00 | x | 80.00–81.00 |",
                    "| final top-5 (%) | y | 95.00–96.00 | x | 90.00–91.00 |",
                    "| final val loss | x | 0.9190–0.9200 | y | 0.9140–0.9150 |"]
