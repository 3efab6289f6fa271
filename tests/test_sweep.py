"""scripts/sweep.py: a sweep file expands into runs; tiny runs train, are evaluated, are skipped
once done, resume after an interruption, and a failing run does not stop the others; --dry-run
and the SLURM path (submitit) build the right commands and jobs."""
import importlib.util
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from helpers import ROOT

SWEEP_PY = os.path.join(ROOT, "scripts", "sweep.py")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def load_script(name="sweep"):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickle look classes up by module
    spec.loader.exec_module(module)
    return module


sweep = load_script()

MULTIMAX = ["model.attn_normalizer=multimax", "model.out_normalizer=multimax"]
SOFTMAX = ["model.name=vit_micro_gap_patch7_28", "model.attn_normalizer=softmax", "model.out_normalizer=softmax"]


def tiny(data_root, epochs=2, **extra):
    """Overrides of the quickstart config for runs of a few seconds on the fake dataset."""
    o = {"data.root": data_root, "data.workers": 0, "data.batch_size": 16, "data.train_transform": "light",
         "model.kwargs.depth": 2, "model.kwargs.embed_dim": 32, "model.kwargs.num_heads": 2,
         "train.epochs": epochs, "train.log_every": 1, "train.keep_top_k": 1}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def write_sweep(tmp_path, variants, seeds, overrides, name="sweep.yaml", **extra):
    path = tmp_path / name
    spec = {"base": QUICKSTART, "output_dir": str(tmp_path / "out"), "seeds": seeds, "overrides": overrides,
            "variants": variants, "eval": ["--batch-size", 64], **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def run_sweep(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SWEEP_PY, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for(predicate, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_sweep_runs_every_run_skips_finished_ones_and_survives_a_failure(fake_fmnist, tmp_path):
    path = write_sweep(tmp_path, {"mm": MULTIMAX, "sm": SOFTMAX}, [0, 1], tiny(fake_fmnist))
    out = tmp_path / "out"
    # a run directory holding another experiment: train.py refuses it, the sweep goes on
    broken = out / "sm" / "seed1"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("train:\n  epochs: 99\n")

    first = run_sweep(path, "--parallel", "2", cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "failed: sm/seed1: train.py exit 2: train.py: error:" in first.stdout  # its exit code and last line
    done = [("mm", 0), ("mm", 1), ("sm", 0)]
    for variant, seed in done:
        run_dir = out / variant / f"seed{seed}"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed and cfg["train"]["output_dir"] == str(run_dir)
        expected = "multimax" if variant == "mm" else "softmax"
        assert cfg["model"]["attn_normalizer"] == cfg["model"]["out_normalizer"] == expected
        assert [r["epoch"] for r in log_rows(run_dir)] == [0, 1]
        result = json.loads((run_dir / "eval.json").read_text())
        assert result["num_images"] == 37 and result["top1"] == pytest.approx(log_rows(run_dir)[-1]["val_top1"])
        assert set(result["attn_stats"]["layers"]) == {"blocks.0.attn", "blocks.1.attn"}
        assert set(result["patch_similarity"]["layers"]) == {"blocks.0", "blocks.1"}
    losses = [[r["train_loss"] for r in log_rows(out / "mm" / f"seed{s}")] for s in (0, 1)]
    assert losses[0] != losses[1]  # the seed reached train.py
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(r["variant"], r["seed"]) for r in manifest["runs"]] == [("mm", 0), ("sm", 0), ("mm", 1), ("sm", 1)]

    stamps = {d: [os.stat(out / d[0] / f"seed{d[1]}" / f).st_mtime_ns for f in ("last.pth", "eval.json", "train.log")]
              for d in done}
    (broken / "config.yaml").unlink()
    second = run_sweep(path, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 runs: 3 skipped, 1 done" in second.stdout
    assert [r["epoch"] for r in log_rows(broken)] == [0, 1] and (broken / "eval.json").exists()
    for d, before in stamps.items():  # finished runs were not touched, not even started
        assert [os.stat(out / d[0] / f"seed{d[1]}" / f).st_mtime_ns
                for f in ("last.pth", "eval.json", "train.log")] == before

    # report.py reads what train.py and eval.py wrote
    report = load_script("report")
    assert report.main([str(out)]) == 0
    rows = {r.variant: r for r in map(lambda x: report.read_run(*x), report.find_runs([str(out)])[0])}
    assert set(rows) == {"mm", "sm"} and all(r.finished for r in rows.values())
    for variant in ("mm", "sm"):
        top1 = [log_rows(out / variant / f"seed{s}")[-1]["val_top1"] for s in (0, 1)]
        line = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith(f"| {variant} |"))
        assert line.startswith(f"| {variant} | 2 | {sum(top1) / 2:.2f} ± ")
        assert 0 < rows[variant].values["sparsity"] <= 1 and 0 < rows[variant].values["multimodality"] <= 1


@pytest.mark.slow
def test_interrupted_sweep_saves_and_resumes(fake_fmnist, tmp_path):
    epochs = 8  # the signal comes after the first; the other 7 leave time for it to arrive mid-run
    path = write_sweep(tmp_path, {"mm": MULTIMAX}, [0], tiny(fake_fmnist, epochs))
    run_dir = tmp_path / "out" / "mm" / "seed0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, SWEEP_PY, path], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "log.jsonl").exists() and len(log_rows(run_dir)) >= 1)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output
    assert "interrupted: mm/seed0" in output
    saved = log_rows(run_dir)
    assert 1 <= len(saved) < epochs and (run_dir / "last.pth").exists() and not (run_dir / "eval.json").exists()

    resumed = run_sweep(path, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # resumed, not restarted: the saved epochs stay as they were and the others follow once each
    assert log_rows(run_dir)[:len(saved)] == saved
    assert [r["epoch"] for r in log_rows(run_dir)] == list(range(epochs))
    assert json.loads((run_dir / "eval.json").read_text())["num_images"] == 37


def test_dry_run_prints_the_commands_of_each_launcher(tmp_path, capsys):
    path = write_sweep(tmp_path, {"mm": MULTIMAX, "sm": SOFTMAX}, [3, 4], ["train.epochs=5"])
    assert sweep.main([path, "--dry-run", "--gpus", "0,1,2,3", "--gpus-per-run", "2", "data.root=/data/x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 8  # train + eval for 2 variants x 2 seeds
    train = [c for c in commands if "train.py" in c]
    assert [c.split()[1] for c in train] == ["CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3"] * 2
    for command, (variant, seed) in zip(train, [("mm", 3), ("sm", 3), ("mm", 4), ("sm", 4)]):
        assert "-m torch.distributed.run --standalone --nproc_per_node=2" in command
        run_dir = tmp_path / "out" / variant / f"seed{seed}"
        assert command.endswith(f"data.root=/data/x train.seed={seed} train.output_dir={run_dir}")
        assert f"train.epochs=5 {' '.join(MULTIMAX if variant == 'mm' else SOFTMAX)}" in command
    assert all(f"--attn-stats --output {tmp_path}/out/" in c and "--batch-size 64" in c
               for c in commands if "eval.py" in c)
    assert not (tmp_path / "out").exists()  # nothing written

    cores = len(os.sched_getaffinity(0))
    assert sweep.main([path, "--dry-run", "--parallel", "2", "--gpus", ""]) == 0
    train = [c for c in capsys.readouterr().out.splitlines() if "train.py" in c]
    assert all(c.startswith(f"OMP_NUM_THREADS={max(1, cores // 2)} {sys.executable} ") for c in train)
    assert not any("torch.distributed.run" in c or "CUDA_VISIBLE_DEVICES" in c for c in train)

    # SLURM: every task of a job runs train.py itself (the tasks are the ranks)
    assert sweep.main([path, "--dry-run", "--launcher", "slurm", "--gpus-per-run", "4", "--nodes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 node(s) x 4 GPU task(s)" in printed
    assert all(c.startswith(f"{sys.executable} {ROOT}/") for c in printed.splitlines() if not c.startswith("#"))


@pytest.mark.parametrize("spec, message", [
    ({"seeds": [0], "variants": {"a": []}}, "missing key 'output_dir'"),
    ({"output_dir": "o", "seeds": [0], "variants": {"a": []}, "seed": 1}, "unknown key 'seed'; did you mean 'seeds'?"),
    ({"output_dir": "o", "seeds": [0, 0], "variants": {"a": []}}, "seeds: must be a list of distinct integers"),
    ({"output_dir": "o", "seeds": [0], "variants": {"a": ["optim.lr=1e-3"]}}, "variants.a: names no config file"),
    ({"base": "nope.yaml", "output_dir": "o", "seeds": [0], "variants": {"a": []}}, "base: config file not found"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a": ["model.atn_normalizer=softmax"]}},
     "variants.a: unknown key 'model.atn_normalizer'; did you mean 'model.attn_normalizer'?"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a": ["model.attn_normalizer=softmx"]}},
     "variants.a: model.attn_normalizer = 'softmx' is not one of"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "overrides": ["train.epochs"], "variants": {"a": []}},
     "overrides: override 'train.epochs' must look like key=value"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a": ["train.seed=3"]}},
     "variants.a: train.seed is set by the sweep"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a/b": []}}, "variants.a/b: a variant name"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a": {"confg": "x.yaml"}}},
     "variants.a.confg: unknown key"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a": ["train.resume=none"]}},
     "variants.a: train.resume = 'none'"),
    ({"base": QUICKSTART, "output_dir": "o", "seeds": [0], "variants": {"a": []}, "eval": ["--output", "x"]},
     "eval: --output is set by the sweep"),
])
def test_bad_sweep_file_is_one_line_naming_file_and_key(tmp_path, capsys, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert sweep.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sweep.py: error: {path}") and message in err and err.count("\n") == 1, err


def test_duplicate_variant_name_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(f"base: {QUICKSTART}\noutput_dir: o\nseeds: [0]\nvariants:\n"
                    "  a: [optim.lr=1e-3]\n  b: []\n  a: [optim.lr=2e-3]\n")
    assert sweep.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"sweep.py: error: {path}, line 7: duplicate key 'a' (first at line 5); remove one of them\n"


def test_shipped_sweep_files_expand_with_explicit_normalizers():
    fmnist = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "fashion_mnist_normalizers.yaml"))
    assert set(fmnist.variants) == {"softmax", "multimax", "sparsemax", "entmax15", "evsoftmax",
                                    "attention_only", "output_only"}
    assert len(fmnist.seeds) >= 3 and len(fmnist.runs) == 7 * len(fmnist.seeds)
    imagenet = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "deit_small_ablations.yaml"))
    ablations = {os.path.realpath(os.path.join(ROOT, "configs", "ablations", f))
                 for f in os.listdir(os.path.join(ROOT, "configs", "ablations"))}
    configs = {os.path.realpath(v["config"]) for v in imagenet.variants.values()}
    assert ablations <= configs and len(imagenet.seeds) == 1 and imagenet.runs[0].nproc == 8
    for variants in (fmnist.variants, imagenet.variants):
        for spec in variants.values():
            keys = [o.split("=")[0] for o in spec["overrides"]]
            assert "model.attn_normalizer" in keys and "model.out_normalizer" in keys


def test_bad_override_on_the_command_line_and_unknown_variant(tmp_path, capsys):
    path = write_sweep(tmp_path, {"mm": MULTIMAX}, [0], [])
    assert sweep.main([path, "--dry-run", "optim.lrr=1"]) == 2
    assert "command line (variant mm): unknown key 'optim.lrr'" in capsys.readouterr().err
    assert sweep.main([path, "--dry-run", "train.seed=1"]) == 2
    assert "command line: train.seed is set by the sweep" in capsys.readouterr().err
    assert sweep.main([path, "--dry-run", "--only", "m"]) == 2
    assert "--only: " in capsys.readouterr().err


def fake_slurm_bin(tmp_path):
    """``sbatch`` that records the script it is given and answers like SLURM; an ``srun`` to be found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    return bin_dir


def test_slurm_array_has_one_job_per_run_with_the_asked_resources(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, {"mm": MULTIMAX, "sm": SOFTMAX}, [0, 1], [], gpus_per_run=4)
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}")
    rc = sweep.main([path, "--launcher", "slurm", "--partition", "gpu", "--nodes", "2", "--timeout-min", "600",
                     "--slurm", "qos=high", "--array-parallelism", "3"])
    assert rc == 0, capsys.readouterr()
    script = (tmp_path / "submitted.sh").read_text()
    for flag in ("--array=0-3%3", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--qos=high", "--time=600", "--signal=USR2@120", "--cpus-per-task=10"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "4242_3" in capsys.readouterr().out
    jobs = {}
    for i in range(4):
        with open(tmp_path / "out" / "slurm" / f"4242_{i}" / f"4242_{i}_submitted.pkl", "rb") as f:
            delayed = pickle.load(f)
        assert isinstance(delayed.function, sweep.RunJob) and delayed.function.slurm
        (run,) = delayed.args
        jobs[(run.variant, run.seed)] = run
        assert run.nproc == 4 and run.train_command(torchrun=False)[1] == os.path.join(ROOT, "train.py")
        assert run.overrides[-2:] == (f"train.seed={run.seed}", f"train.output_dir={run.run_dir}")
    assert set(jobs) == {("mm", 0), ("sm", 0), ("mm", 1), ("sm", 1)}


@pytest.mark.slow
def test_slurm_job_saves_on_preemption_and_its_requeue_resumes(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    epochs = 8
    path = write_sweep(tmp_path, {"mm": MULTIMAX}, [0], tiny(fake_fmnist, epochs))
    (run,) = sweep.load_sweep(path).runs
    job = sweep.RunJob(slurm=True)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(job.execute(run)))
    worker.start()
    try:
        wait_for(lambda: os.path.exists(os.path.join(run.run_dir, "log.jsonl")) and len(log_rows(run.run_dir)) >= 1)
        delayed = job.checkpoint(run)  # what submitit calls on preemption or time-out
    finally:
        job.stop()
        worker.join(120)
    assert outcome[0].status == "interrupted"
    saved = log_rows(run.run_dir)
    assert 1 <= len(saved) < epochs and os.path.exists(os.path.join(run.run_dir, "last.pth"))
    assert isinstance(delayed.function, sweep.RunJob) and delayed.function.slurm and delayed.args == (run,)

    # the requeued job, pickled and run in a job process by submitit's local executor
    requeued = run_sweep(path, "--launcher", "slurm", "--cluster", "local", cwd=tmp_path)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert "mm/seed0: done" in requeued.stdout
    assert log_rows(run.run_dir)[:len(saved)] == saved
    assert [r["epoch"] for r in log_rows(run.run_dir)] == list(range(epochs))
    assert os.path.exists(os.path.join(run.run_dir, "eval.json"))


@pytest.mark.parametrize("where, problem", [("a_file", "is not a directory"),
                                            ("a_file/below", "cannot be written")])
def test_an_output_dir_that_cannot_be_one_is_one_line(tmp_path, capsys, where, problem):
    (tmp_path / "a_file").write_text("not a directory")
    path = write_sweep(tmp_path, {"mm": MULTIMAX}, [0], [], output_dir=str(tmp_path / where))
    assert sweep.main([path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sweep.py: error: {path}: output_dir: {tmp_path / where} {problem}")
    assert err.count("\n") == 1 and (tmp_path / "a_file").read_text() == "not a directory"


def test_slurm_launcher_without_slurm_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, {"mm": MULTIMAX}, [0], [])
    bin_dir = tmp_path / "bin"  # a PATH with python but neither sbatch nor srun
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert sweep.main([path, "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err == ("sweep.py: error: --launcher slurm: no SLURM on this machine (sbatch and srun not found on PATH); "
                   "run the sweep on a login node of the cluster, or use --launcher local\n")
    assert not (tmp_path / "out").exists()


def test_a_failed_call_is_explained_by_its_own_lines_of_a_shared_log(tmp_path):
    """Another process (the other sweep's train.py) writes into the same train.log: the failure is
    explained by the call's own error line, not by the last line of the file."""
    log = tmp_path / "train.log"
    log.write_text("train.py: error: an earlier call's failure\nepoch 0 5/40 loss 2.1 (the other run)\n")
    child = ("import sys; print('train.py: error: train.output_dir x is in use by another training run', flush=True);"
             f"open({str(log)!r}, 'a').write('epoch 0 6/40 loss 2.0 (the other run)\\n'); sys.exit(2)")
    rc, why = sweep.RunJob()._run_child([sys.executable, "-c", child], str(log), dict(os.environ))
    assert (rc, why) == (2, "train.py: error: train.output_dir x is in use by another training run")
    lines = log.read_text().splitlines()
    assert lines[2].startswith("=== ") and lines[2].endswith(" -c " + shlex.quote(child))
    assert re.fullmatch(r"=== \S+ exit 2", lines[-1])
    rc, why = sweep.RunJob()._run_child([sys.executable, "-c", "print('done')"], str(log), dict(os.environ))
    assert (rc, why) == (0, "done")


@pytest.mark.slow
def test_a_second_sweep_on_the_same_output_dir_reports_the_lock(fake_fmnist, tmp_path):
    path = write_sweep(tmp_path, {"mm": MULTIMAX}, [0], tiny(fake_fmnist, 100))  # stopped long before the end
    run_dir = tmp_path / "out" / "mm" / "seed0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, SWEEP_PY, path], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "log.jsonl").exists() and len(log_rows(run_dir)) >= 1)
        second = run_sweep(path, cwd=tmp_path)
        os.killpg(first.pid, signal.SIGINT)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1, second.stdout + second.stderr
    assert re.search(r"failed: mm/seed0: train\.py exit 2: train\.py: error: train\.output_dir \S+ is in use by "
                     r"another training run \(PID \d+", second.stdout), second.stdout
