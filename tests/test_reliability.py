"""Nothing lost, nothing executed, every bad input named: crashes, stop signals under every launcher,
reruns, the run-directory lock, non-finite losses, bad inputs, full disks, dead workers."""
import errno
import fcntl
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import train
from conftest import write_idx_dataset
from engine.logger import read_jsonl
from helpers import ROOT, run_train, tiny_overrides

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def long_fmnist(tmp_path_factory):
    """Enough images for 30 steps an epoch, so that signals land mid-training."""
    return write_idx_dataset(str(tmp_path_factory.mktemp("long")), n_train=480, n_test=40, seed=1)


def train_cmd(overrides):
    return [PY, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            *overrides]


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)


def assert_same_weights(a, b, atol=1e-6):
    assert a["step"] == b["step"]
    for key in ("model", "model_ema"):
        assert (a[key] is None) == (b[key] is None)
        for name, t in (a[key] or {}).items():
            torch.testing.assert_close(b[key][name], t, rtol=0, atol=atol, msg=f"{key}.{name}")


def wait_for_output(proc, needle, timeout=120):
    """Read the process's stdout until a line contains ``needle``."""
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(lines)[-3000:]}")


# ------------------------------------------------------------------ 2. crash safety

@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(long_fmnist, tmp_path):
    extra = {"train.epochs": 4, "train.ema": "true", "train.ema_decay": 0.9, "model.drop_path_rate": 0.1,
             "train.log_every": 5}
    ref, crashed = str(tmp_path / "ref"), str(tmp_path / "crashed")
    run_train(tiny_overrides(long_fmnist, ref, **extra))
    rng = random.Random(1234)
    kills = 0
    for attempt in range(8):
        proc = subprocess.Popen(train_cmd(tiny_overrides(long_fmnist, crashed, **extra)), env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # wait for a random number of progress lines (steps), then kill -9 without warning
            for _ in range(rng.randint(1, 9)):
                wait_for_output(proc, "/30")
            proc.kill()
            kills += 1
        except AssertionError:
            pass  # it finished before we struck
        proc.wait(timeout=120)
        if proc.returncode == 0 and len(read_jsonl(os.path.join(crashed, "log.jsonl"))) == 4:
            break
        last = os.path.join(crashed, "last.pth")
        if os.path.exists(last):
            torch.load(last, weights_only=True)  # loadable after every crash
    proc = subprocess.run(train_cmd(tiny_overrides(long_fmnist, crashed, **extra)), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert kills >= 2
    assert [r["epoch"] for r in read_jsonl(os.path.join(crashed, "log.jsonl"))] == [0, 1, 2, 3]
    assert_same_weights(final_weights(ref), final_weights(crashed))
    # TensorBoard: what a killed job logged past its checkpoint is purged, not shown twice
    from test_train import tb_scalars

    ref_loss, crashed_loss = tb_scalars(ref, "train/loss"), tb_scalars(crashed, "train/loss")
    assert [s for s, _ in crashed_loss] == [s for s, _ in ref_loss]
    assert all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(ref_loss, crashed_loss))


# ------------------------------------------------------------------ 3. stop signals, launchers, reruns

# 2 ranks x batch 8 = 30 steps an epoch; a log step (where a stop takes effect) every 5; workers > 0
# so that a signal to the process group reaches DataLoader workers too
SIGNAL_RUN = {"train.epochs": 2, "train.log_every": 5, "model.drop_path_rate": 0.1, "data.batch_size": 8,
              "data.workers": 2}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST")


def clean_env(**extra):
    return {**{k: v for k, v in ENV.items() if k not in LAUNCH_VARS}, **extra}


def torchrun_cmd(overrides):
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train_cmd(overrides)[1:]]


def launch(cmd, **kw):
    """Start ``cmd`` in a session of its own (a process group we can signal as a cluster does)."""
    return subprocess.Popen(cmd, env=kw.pop("env", clean_env()), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def finish(proc, lines=(), timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return "".join(lines) + out


def same_rows(a, b):
    """log.jsonl rows equal in every value but the measured throughput."""
    strip = [[{k: v for k, v in r.items() if k != "train_img_per_s"} for r in read_jsonl(os.path.join(d, "log.jsonl"))]
             for d in (a, b)]
    assert strip[0] and strip[0] == strip[1], strip


def assert_exact_resume(ref, resumed):
    a, b = final_weights(ref), final_weights(resumed)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in ("model", "model_ema"):
        for name, t in (a[key] or {}).items():
            assert torch.equal(b[key][name], t), f"{key}.{name}"
    same_rows(ref, resumed)


def assert_saved_mid_epoch(run_dir, out, epoch):
    ckpt = final_weights(run_dir)
    assert ckpt["epoch"] == epoch - 1 and 0 < ckpt["epoch_step"] < 30 and ckpt["epoch_step"] % 5 == 0, out[-3000:]
    assert ckpt["epoch_sums"]["good"] == ckpt["epoch_step"]   # the partial epoch's sums travel along
    assert "Exit 75" in out and "killed by signal" not in out and "Traceback (most recent call last):\n  File" \
        not in out.split("Exit 75")[0], out[-3000:]


@pytest.fixture(scope="module")
def two_rank_ref(long_fmnist, tmp_path_factory):
    """The uninterrupted two-rank run that every interrupted one must end up equal to."""
    out = str(tmp_path_factory.mktemp("ref2") / "run")
    proc = launch(torchrun_cmd(tiny_overrides(long_fmnist, out, **SIGNAL_RUN)))
    text = finish(proc)
    assert proc.returncode == 0, text[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target, sig", [("torchrun", signal.SIGTERM), ("process group", signal.SIGINT)])
def test_stop_signal_to_torchrun_saves_and_the_rerun_ends_exactly_as_uninterrupted(
        long_fmnist, tmp_path, two_rank_ref, target, sig):
    """SIGTERM to torchrun (it passes it on) or Ctrl-C's SIGINT to the whole process group (ranks and
    DataLoader workers): every rank agrees to stop at the next log step, the ranks gather their RNG
    states together, rank 0 saves a mid-epoch checkpoint, and each rank exits 75 (torchrun, signalled
    itself, reports its own failure). Rerunning the command ends with the weights and log rows
    of the uninterrupted run, bit for bit."""
    run = str(tmp_path / "run")
    cmd = torchrun_cmd(tiny_overrides(long_fmnist, run, **SIGNAL_RUN))
    proc = launch(cmd)
    lines = wait_for_output(proc, "epoch 1 10/30")
    os.kill(proc.pid, sig) if target == "torchrun" else os.killpg(proc.pid, sig)
    out = finish(proc, lines)
    assert proc.returncode != 0 and f"{signal.Signals(sig).name}: saved" in out, out[-3000:]
    assert_saved_mid_epoch(run, out, epoch=1)
    proc = launch(cmd)
    out = finish(proc)
    assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
    assert_exact_resume(two_rank_ref, run)


@pytest.mark.slow
def test_run_dir_lock_and_sigterm_to_the_process_group_of_one_process(long_fmnist, tmp_path):
    """One process with DataLoader workers, SIGTERM to its whole process group (``scancel``,
    ``timeout``): it saves and exits 75, the workers having outlived the save. While it runs, a second
    run on the same directory stops with one line naming the first's PID and host."""
    extra = {**SIGNAL_RUN, "data.batch_size": 16}   # one rank: 16 an optimizer step, 30 steps an epoch
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    proc = launch(train_cmd(tiny_overrides(long_fmnist, ref, **extra)))   # all runs alike: same threads, same bits
    assert finish(proc) and proc.returncode == 0
    cmd = train_cmd(tiny_overrides(long_fmnist, run, **extra))
    proc = launch(cmd)
    lines = wait_for_output(proc, "epoch 0 5/30")
    os.killpg(proc.pid, signal.SIGSTOP)  # holds it mid-epoch, its lock taken, while the second run tries
    try:
        err = one_line_error_of(train.main, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                             *tiny_overrides(long_fmnist, run, **extra)])
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    assert f"PID {proc.pid} on {socket.gethostname()}" in err and run in err
    lines += wait_for_output(proc, "epoch 1 10/30")
    os.killpg(proc.pid, signal.SIGTERM)
    out = finish(proc, lines)
    assert proc.returncode == 75, out[-3000:]
    assert "SIGTERM: saved" in out
    assert_saved_mid_epoch(run, out, epoch=1)
    proc = launch(cmd)
    out = finish(proc)
    assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
    assert_exact_resume(ref, run)
    assert not os.path.exists(os.path.join(run, ".lock"))   # released at the end


def _fake_slurm(tmp_path):
    """``srun`` that starts SLURM_NTASKS tasks as one job step (a process group whose id it writes to
    step.pgid, so a test signals the step as slurmstepd does: every process, workers included),
    honours --kill-on-bad-exit, and returns as srun does: the highest exit code of the tasks that
    exited, a signal only if none did. ``scontrol`` answers ``show hostnames`` and logs ``requeue``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{PY}\n" + textwrap.dedent("""
        import os, signal, subprocess, sys, time
        args, opts = sys.argv[1:], []
        while args and args[0].startswith("-"):
            opts.append(args.pop(0))
        state = os.environ["FAKE_SLURM_DIR"]
        with open(os.path.join(state, "srun.args"), "a") as f:
            f.write(" ".join(opts) + "\\n")
        n = int(os.environ["SLURM_NTASKS"])
        tasks = []
        for rank in range(n):
            env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0")
            tasks.append(subprocess.Popen(args, env=env, process_group=tasks[0].pid if tasks else 0))
        with open(os.path.join(state, "step.pgid"), "w") as f:
            f.write(str(tasks[0].pid))
        codes = {}
        while len(codes) < n:
            for i, t in enumerate(tasks):
                if i not in codes and t.poll() is not None:
                    codes[i] = t.returncode
                    if t.returncode != 0 and "--kill-on-bad-exit=1" in opts:
                        for other in tasks:
                            if other.poll() is None:
                                other.kill()
            time.sleep(0.05)
        exited = [c for c in codes.values() if c >= 0]
        sys.exit(max(exited) if exited else 128 - min(codes.values()))
    """))
    (bin_dir / "scontrol").write_text(f"#!{PY}\n" + textwrap.dedent("""
        import os, sys
        if sys.argv[1:3] == ["show", "hostnames"]:
            print("localhost")
        else:
            with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "scontrol.log"), "a") as f:
                f.write(" ".join(sys.argv[1:]) + "\\n")
    """))
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    state = tmp_path / "slurm"
    state.mkdir()
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(state), SLURM_JOB_ID="4242",
                    SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_CPUS_PER_TASK="1",
                    SLURM_SUBMIT_DIR=ROOT, PYTHON=PY, MASTER_PORT=str(_free_port()))
    return state, env


@pytest.mark.slow
def test_slurm_script_requeues_on_a_resumable_exit_and_only_then(long_fmnist, tmp_path, two_rank_ref):
    """scripts/slurm.sbatch under a fake srun/scontrol, 2 tasks: the script's own --signal reaches
    the step 120 s before the time limit; train.py saves and exits 75, the script requeues the job;
    the requeued job resumes exactly; a finished run or a user error is not requeued."""
    script = os.path.join(ROOT, "scripts", "slurm.sbatch")
    sig = signal.Signals["SIG" + re.search(r"#SBATCH --signal=(?:B:)?(\w+)@", open(script).read()).group(1)]
    state, env = _fake_slurm(tmp_path)
    run = str(tmp_path / "run")
    cmd = ["bash", script, os.path.join(ROOT, "configs", "quickstart.yaml"),
           *tiny_overrides(long_fmnist, run, **SIGNAL_RUN)]

    def requeues():
        log = state / "scontrol.log"
        return log.read_text().splitlines() if log.exists() else []

    proc = launch(cmd, env=env)
    lines = wait_for_output(proc, "epoch 1 10/30")
    os.killpg(int((state / "step.pgid").read_text()), sig)
    out = finish(proc, lines)
    assert proc.returncode == 75, out[-3000:]
    assert requeues() == ["requeue 4242"] and "requeueing job 4242" in out
    assert_saved_mid_epoch(run, out, epoch=1)
    assert "--cpus-per-task=1" in (state / "srun.args").read_text()

    proc = launch(cmd, env=env)   # the requeued job
    out = finish(proc)
    assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
    assert_exact_resume(two_rank_ref, run)
    proc = launch(cmd, env=env)   # requeued once too often: finished, says so, no requeue
    out = finish(proc)
    assert proc.returncode == 0 and "already finished at epoch 1" in out, out[-3000:]
    proc = launch([*cmd, "train.epochs=0"], env=env)
    out = finish(proc)
    assert proc.returncode == 2 and "train.epochs" in out, out[-3000:]
    assert requeues() == ["requeue 4242"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(d):
    """Every file under ``d`` with its size, modification time and bytes."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            path = os.path.join(root, f)
            st = os.stat(path)
            out[os.path.relpath(path, d)] = (st.st_size, st.st_mtime_ns, open(path, "rb").read())
    return out


def test_rerunning_a_finished_run_says_so_and_changes_nothing(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out))
    before = _tree(out)
    capsys.readouterr()
    run_train(tiny_overrides(fake_fmnist, out))
    assert "already finished at epoch 1 (train.epochs=2)" in capsys.readouterr().out
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "train.allow_config_change": "true"}))
    assert "already finished at epoch 1 (train.epochs=1)" in capsys.readouterr().out   # resume past the end
    assert _tree(out) == before


def test_resume_none_starts_the_logs_over_and_keeps_the_old_run_aside(fake_fmnist, tmp_path):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "optim.lr": 1e-3}))
    old_rows = read_jsonl(os.path.join(out, "log.jsonl"))
    run_train(tiny_overrides(fake_fmnist, out, **{"train.resume": "none"}))
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.jsonl"))] == [0, 1]
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    (previous,) = os.listdir(os.path.join(out, "previous"))
    kept = os.path.join(out, "previous", previous)
    assert read_jsonl(os.path.join(kept, "log.jsonl")) == old_rows
    assert {"last.pth", "config.yaml", "summary.csv", "topk.json"} <= set(os.listdir(kept))
    assert len(os.listdir(os.path.join(kept, "tensorboard"))) == 1
    assert torch.load(os.path.join(kept, "last.pth"), weights_only=True)["epoch"] == 0


def test_stale_lock_is_taken_over_and_a_live_one_refused_without_flock(tmp_path, monkeypatch):
    """flock dies with its process, so a dead run's lock file is simply taken over; where the file
    system has no flock, the PID and host inside decide."""
    from engine.distributed import DistInfo
    from engine.errors import UserError
    from engine.run import RunLock

    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    lock = tmp_path / RunLock.NAME
    lock.write_text(f"{dead.pid} {host}\n")
    with RunLock(str(tmp_path), info):
        assert lock.read_text() == f"{os.getpid()} {host}\n"
    assert not lock.exists()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock.write_text(f"{dead.pid} {host}\n")
    with RunLock(str(tmp_path), info):   # stale: taken over
        assert lock.read_text() == f"{os.getpid()} {host}\n"
    alive = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{alive.pid} {host}\n")
        with pytest.raises(UserError, match=f"in use by another training run \\(PID {alive.pid} on {host}\\)"):
            RunLock(str(tmp_path), info).__enter__()
        lock.write_text("77 other-node\n")
        with pytest.raises(UserError, match="PID 77 on other-node"):
            RunLock(str(tmp_path), info).__enter__()
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
def test_dataloader_workers_ignore_stop_signals(tmp_path):
    """A DataLoader worker set up by ``protect_workers`` and started by ``shielded_batches`` ignores
    SIGTERM, SIGINT and SIGUSR1 (with nothing left blocked) and goes on serving batches when it gets
    them, as it does when the whole process group is signalled; without them it dies."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        import torch
        from torch.utils.data import DataLoader
        from engine.signals import STOP_SIGNALS, protect_workers, shielded_batches

        class SelfSignalling(torch.utils.data.Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
                blocked = set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(STOP_SIGNALS)
                for sig in STOP_SIGNALS:
                    os.kill(os.getpid(), sig)
                time.sleep(0.02)
                return torch.tensor([ignored and not blocked])

        loader = DataLoader(SelfSignalling(), batch_size=2, num_workers=2)
        if sys.argv[1] == "protected":
            protect_workers(loader)
            batches = shielded_batches(loader)
        else:
            batches = iter(loader)
        print(torch.cat(list(batches)).flatten().tolist(), flush=True)
    """))
    for mode, ok in (("protected", True), ("plain", False)):
        proc = subprocess.run([PY, str(script), mode], env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        if ok:
            assert proc.returncode == 0 and proc.stdout.strip() == str([True] * 8), proc.stderr[-3000:]
        else:
            assert proc.returncode != 0 and "DataLoader worker" in proc.stderr, proc.stdout


def one_line_error_of(main, argv, rc=2):
    """Run an entry point's ``main``; it must fail with code ``rc`` and exactly one line on stderr."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == rc
    text = err.getvalue().strip()
    assert text.startswith("train.py: error:") and len(text.splitlines()) == 1, text
    return text



# ------------------------------------------------------------------ non-finite losses

def nan_loss_at(monkeypatch, bad_calls):
    """Make the criterion of in-process runs return NaN on the given (1-based) calls."""
    real, calls = train.build_criterion, []

    def build(*args):
        criterion = real(*args)

        def maybe_nan(logits, target):
            calls.append(1)
            loss = criterion(logits, target)
            return loss * float("nan") if bad_calls(len(calls)) else loss
        return maybe_nan
    monkeypatch.setattr(train, "build_criterion", build)  # the name train.py calls


def test_nonfinite_stop_leaves_last_good_checkpoint(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.stop_after_epochs": 1}))
    last = os.path.join(out, "last.pth")
    before = open(last, "rb").read()
    rc = train.main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                     *tiny_overrides(fake_fmnist, out, **{"optim.lr": 1e30, "train.allow_config_change": "true"})])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 1" in err and "step" in err
    assert open(last, "rb").read() == before


def test_nonfinite_skip_policy_skips_steps_and_counts_them_per_epoch(fake_fmnist, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    nan_loss_at(monkeypatch, lambda call: call in (3, 4))
    run_train(tiny_overrides(fake_fmnist, out, **{"train.nonfinite": "skip"}))
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["skipped_steps"] for r in rows] == [2, 0]
    assert all(torch.isfinite(t).all() for t in final_weights(out)["model"].values() if t.dtype.is_floating_point)


def test_a_wholly_skipped_epoch_stops_before_its_evaluation_and_checkpoint(fake_fmnist, tmp_path, monkeypatch,
                                                                          capsys):
    out = str(tmp_path / "run")
    nan_loss_at(monkeypatch, lambda call: call > 6)   # every step of epoch 1 (6 steps an epoch)
    rc = train.main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                     *tiny_overrides(fake_fmnist, out, **{"train.nonfinite": "skip"})])
    assert rc == 3 and "every optimizer step of epoch 1 was skipped" in capsys.readouterr().err
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.jsonl"))] == [0]
    assert final_weights(out)["epoch"] == 0


# ------------------------------------------------------------------ 4. bad inputs

def one_line_error(capsys, argv, rc=2):
    capsys.readouterr()
    assert train.main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_config_inputs_are_named_and_write_nothing(fake_fmnist, tmp_path, capsys):
    out = tmp_path / "never"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  name: [unclosed\n")
    assert "bad.yaml" in one_line_error(capsys, ["--config", str(bad_yaml), f"train.output_dir={out}"])
    base = ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), f"train.output_dir={out}"]
    assert "optim.lrr" in one_line_error(capsys, [*base, "optim.lrr=1"])
    assert "data.batch_size" in one_line_error(capsys, [*base, "data.batch_size=abc"])
    assert "optim.lr" in one_line_error(capsys, [*base, "optim.lr=-1"])
    assert "data.batch_size" in one_line_error(capsys, [*base, "data.batch_size=0"])
    assert "data.crop_pct" in one_line_error(capsys, [*base, "data.crop_pct=1.5"])
    assert "model.modulator_order" in one_line_error(capsys, [*base, "model.modulator_order=0"])
    assert str(tmp_path / "nodata") in one_line_error(
        capsys, [*base, "data.dataset=imagefolder", f"data.root={tmp_path / 'nodata'}"])
    assert not out.exists()


def test_run_dir_of_another_config_is_refused(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1}))
    before = open(os.path.join(out, "last.pth"), "rb").read()
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "model.modulator_order": 3})])
    assert "model.modulator_order" in err and "allow_config_change" in err
    assert open(os.path.join(out, "last.pth"), "rb").read() == before
    # a config.yaml written before a key existed lacks it: at its default that key is no change
    cfg_path = os.path.join(out, "config.yaml")
    with open(cfg_path) as f:
        text = f.read()
    assert "  pos_drop_rate: 0.0\n" in text
    with open(cfg_path, "w") as f:
        f.write(text.replace("  pos_drop_rate: 0.0\n", ""))
    capsys.readouterr()
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1}))
    assert "already finished" in capsys.readouterr().out
    # keys declared resumable (engine.config.key(..., resumable=True)) may change between jobs
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1, "train.log_every": 7, "data.workers": 1,
                                                  "model.attn_backend": "chunked"}))
    assert "already finished" in capsys.readouterr().out


def test_resume_checkpoint_of_another_model_or_truncated(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.epochs": 1}))
    other = str(tmp_path / "other")
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, other, **{"model.kwargs.depth": 3,
                                                                         "train.resume": f"{out}/last.pth"})])
    assert "last.pth" in err
    cut = tmp_path / "cut.pth"
    data = open(os.path.join(out, "last.pth"), "rb").read()
    cut.write_bytes(data[: len(data) // 3])
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, str(tmp_path / "o2"), **{"train.resume": str(cut)})])
    assert "truncated" in err


# ------------------------------------------------------------------ 5. disk

def test_disk_full_keeps_previous_checkpoint(fake_fmnist, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.stop_after_epochs": 1}))
    before = open(os.path.join(out, "last.pth"), "rb").read()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k) if not hasattr(f, "write") else f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, out)])
    assert "No space left" in err and "last.pth" in err
    assert open(os.path.join(out, "last.pth"), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_unwritable_run_dir(fake_fmnist, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = one_line_error(capsys, ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                  *tiny_overrides(fake_fmnist, str(blocker / "run"))])
    assert str(blocker / "run") in err


# ------------------------------------------------------------------ 6. dead workers

@pytest.mark.slow
def test_dead_ddp_worker_ends_the_job(long_fmnist, tmp_path):
    out = str(tmp_path / "run")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(tiny_overrides(long_fmnist, out, **{"train.epochs": 50, "data.batch_size": 8}))[1:]]
    proc = subprocess.Popen(cmd, env={**ENV, "MMVIT_DIST_TIMEOUT_S": "60"}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_output(proc, "epoch 0 5/")
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        os.kill(int(children[1]), signal.SIGKILL)
        start = time.time()
        proc.communicate(timeout=180)
        assert proc.returncode != 0
        assert time.time() - start < 180
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
