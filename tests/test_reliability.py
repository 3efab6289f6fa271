"""Nothing lost, nothing executed, every bad input named: crashes, stop signals under every launcher,
reruns, the run-directory lock, non-finite losses, bad inputs, full disks, dead workers."""
import builtins
import errno
import fcntl
import io
import os
import random
import re
import shutil
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
from helpers import (
    ROOT, assert_exact_resume, criterion_hook, final_weights, run_train, signal_at_call, tiny_overrides,
)

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def long_fmnist(tmp_path_factory):
    """Enough images for 30 steps an epoch, so that signals land mid-training."""
    return write_idx_dataset(str(tmp_path_factory.mktemp("long")), n_train=480, n_test=40, seed=1)


def train_cmd(overrides):
    return [PY, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            *overrides]


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

# 2 ranks x batch 8 = 30 steps an epoch; a log step every 5 (the test waits for their lines); workers > 0
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


def assert_saved_mid_epoch(run_dir, out, epoch, after_step=10):
    """A mid-epoch last.pth of ``epoch``, saved after the step at which the test signalled."""
    ckpt = final_weights(run_dir)
    assert ckpt["epoch"] == epoch - 1 and after_step <= ckpt["epoch_step"] < 30, out[-3000:]
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
    DataLoader workers): every rank stops after the same step, a step or two later, the ranks gather
    their RNG states together, rank 0 saves a mid-epoch checkpoint, and each rank exits 75 (torchrun, signalled
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


@pytest.fixture(scope="module")
def big_fmnist(tmp_path_factory):
    """2400 images: 1200 steps of batch 2 an epoch, a few seconds or more of training."""
    return write_idx_dataset(str(tmp_path_factory.mktemp("big")), n_train=2400, n_test=20, seed=2)


@pytest.mark.slow
def test_signal_to_exit_time_with_log_steps_far_apart(big_fmnist, tmp_path):
    """With train.log_every far beyond the epoch (no log step to wait for), SIGTERM to the process
    group mid-epoch ends the run with a mid-epoch checkpoint and exit 75 within seconds: the stop
    is honoured a step or two after the signal, well inside a launcher's 30 s grace time."""
    steps = 2400 // 2
    run = str(tmp_path / "run")
    proc = launch(train_cmd(tiny_overrides(big_fmnist, run, **{"data.batch_size": 2, "train.log_every": 10 ** 6,
                                                                "train.epochs": 2, "data.workers": 2})))
    lines = wait_for_output(proc, "run dir")
    time.sleep(3)   # into epoch 0 (its first step done)
    assert proc.poll() is None, "".join(lines)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    out = finish(proc, lines)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 75 and "SIGTERM: saved" in out, out[-3000:]
    ckpt = final_weights(run)
    assert ckpt["epoch"] == -1 and 0 < ckpt["epoch_step"] < steps // 2, (ckpt["epoch_step"], out[-2000:])
    assert elapsed < 15, f"signal to exit took {elapsed:.1f} s"


SHUTDOWN_RUN = {**SIGNAL_RUN, "data.batch_size": 16}   # one process: 30 steps an epoch, 2 epochs


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["TERM after the save message", "TERM TERM 50 ms apart", "INT TERM INT",
                                      "INT to the group after the last epoch"])
def test_signals_during_shutdown_cannot_change_the_exit_code(long_fmnist, tmp_path, scenario):
    """From the decision to stop (or the end of training) to the process's exit, more signals change
    nothing: 75 after a resumable save, 0 after a finished run; no traceback, no 130/143."""
    run = str(tmp_path / "run")
    proc = launch(train_cmd(tiny_overrides(long_fmnist, run, **SHUTDOWN_RUN)))
    group = lambda sig: os.killpg(proc.pid, sig)   # noqa: E731  (a terminal's Ctrl-C, scancel: the whole group)
    if scenario == "INT to the group after the last epoch":
        lines = wait_for_output(proc, "epoch 1 | step")
        group(signal.SIGINT)
        expected = 0
    else:
        lines = wait_for_output(proc, "epoch 0 10/30")
        first, *more = {"TERM after the save message": [signal.SIGTERM],
                        "TERM TERM 50 ms apart": [signal.SIGTERM, signal.SIGTERM],
                        "INT TERM INT": [signal.SIGINT, signal.SIGTERM, signal.SIGINT]}[scenario]
        group(first)
        for sig in more:
            time.sleep(0.05)
            group(sig)
        if scenario == "TERM after the save message":
            lines += wait_for_output(proc, ": saved")
            group(signal.SIGTERM)
        expected = 75
    out = finish(proc, lines)
    assert proc.returncode == expected, out[-3000:]
    assert "Traceback" not in out and "error" not in out, out[-3000:]
    if expected == 75:
        assert_saved_mid_epoch(run, out, epoch=0)
    else:
        assert [r["epoch"] for r in read_jsonl(os.path.join(run, "log.jsonl"))] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_first_seconds_is_one_line_and_128_plus_its_number(fake_fmnist, tmp_path, sig, rc):
    """Ctrl-C (or SIGTERM) while train.py is still importing torch: one line, exit 128 + the signal
    (130 for Ctrl-C), nothing written."""
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_overrides(fake_fmnist, str(run))), env=clean_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while "libtorch" not in open(f"/proc/{proc.pid}/maps").read():   # torch is being imported
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert err.strip() == f"train.py: error: interrupted by {sig.name} during setup; nothing was written", err
    assert not run.exists()


@pytest.mark.slow
def test_inductor_compile_workers_are_shielded_from_stop_signals(tmp_path):
    """Inductor's compile worker processes (where Inductor runs them: with Triton) start with the
    stop signals blocked, so a signal to the process group leaves them alive for later compilations
    and their orderly shutdown. Triton is faked as present so that the pool starts on CPU too."""
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        import torch._inductor.async_compile as ac
        from torch._inductor import config
        from engine.signals import STOP_SIGNALS, start_compile_workers

        config.compile_threads = 2
        ac.has_triton_package = lambda: True
        start_compile_workers()
        sidecar = ac.AsyncCompile.process_pool().process.pid
        status = dict(line.split(":", 1) for line in open(f"/proc/{sidecar}/status"))
        blocked = int(status["SigBlk"], 16)
        os.kill(sidecar, signal.SIGTERM)
        time.sleep(0.5)
        print(all(blocked >> (s - 1) & 1 for s in STOP_SIGNALS), os.waitpid(sidecar, os.WNOHANG) == (0, 0))
        print(signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(STOP_SIGNALS) == set())
        ac.shutdown_compile_workers()
    """))
    proc = subprocess.run([PY, str(script)], env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True", "True"], proc.stdout + proc.stderr[-3000:]


FAKE_SRUN = r'''
import os, signal, subprocess, sys, threading, time
args, opts = sys.argv[1:], []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
state = os.environ["FAKE_SLURM_DIR"]
with open(os.path.join(state, "srun.args"), "a") as f:
    f.write(" ".join(opts) + "\n")
kill_on_bad_exit = os.environ.get("FAKE_SLURM_KILL_ON_BAD_EXIT", "0")   # slurm.conf's KillOnBadExit
for opt in opts:
    if opt.startswith("--kill-on-bad-exit"):
        kill_on_bad_exit = opt.partition("=")[2] or "1"
kill_wait = float(os.environ.get("FAKE_SLURM_KILL_WAIT", "30"))       # slurm.conf's KillWait
teardown = os.environ.get("FAKE_SLURM_TEARDOWN", "0").split(",")     # seconds, per rank
# a task: the command, then its teardown (NCCL, CUDA contexts) under whatever signal handling it left
TASK = ("import runpy, sys, time\n"
        "pause = float(sys.argv[1]); sys.argv = sys.argv[2:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__'); code = 0\n"
        "except SystemExit as e:\n    code = e.code if isinstance(e.code, int) else int(e.code is not None)\n"
        "time.sleep(pause)\nsys.exit(code)\n")
n = int(os.environ["SLURM_NTASKS"])
tasks = []
for rank in range(n):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0")
    pause = teardown[rank % len(teardown)]
    tasks.append(subprocess.Popen([args[0], "-c", TASK, pause, *args[1:]], env=env,
                                  process_group=tasks[0].pid if tasks else 0))
step = tasks[0].pid
with open(os.path.join(state, "step.pgid"), "w") as f:
    f.write(str(step))


def signal_step(sig):
    try:
        os.killpg(step, sig)
    except ProcessLookupError:
        pass


def terminate_step():   # slurmstepd's SIG_TERM_KILL: SIGCONT and SIGTERM to the step, SIGKILL after KillWait
    signal_step(signal.SIGCONT)
    signal_step(signal.SIGTERM)
    time.sleep(kill_wait)
    signal_step(signal.SIGKILL)


rc, ended, killing = None, set(), False   # rc: ("exit", code) or ("signal", number), as _task_finish keeps it
while len(ended) < n:
    for rank, task in enumerate(tasks):
        if rank in ended or task.poll() is None:
            continue
        ended.add(rank)
        with open(os.path.join(state, "tasks.log"), "a") as f:
            f.write(f"{rank} {task.returncode}\n")
        if task.returncode < 0:   # a signal outranks any exit code, and a higher signal a lower one
            if rc is None or rc[0] == "exit" or -task.returncode > rc[1]:
                rc = ("signal", -task.returncode)
        elif rc is None or (rc[0] == "exit" and task.returncode > rc[1]):
            rc = ("exit", task.returncode)
        if task.returncode != 0 and kill_on_bad_exit == "1" and not killing:
            killing = True
            threading.Thread(target=terminate_step, daemon=True).start()
    time.sleep(0.02)
code = 128 + rc[1] if rc[0] == "signal" else rc[1]
with open(os.path.join(state, "srun.rc"), "w") as f:
    f.write(str(code))
sys.exit(code)
'''

FAKE_SCONTROL = r'''
import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("localhost")
else:
    with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "scontrol.log"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
'''


def _fake_slurm(tmp_path, teardown="0", kill_wait=30):
    """``srun`` that follows Slurm's rules as src/srun/launch.c (``_task_finish``) and slurmstepd
    state them, for the tasks of one job step on this machine:

    - the tasks form one process group (the step), whose id goes to step.pgid, so that a test
      signals the step as slurmstepd does (every process, DataLoader workers included);
    - kill on bad exit (``--kill-on-bad-exit``, else slurm.conf's KillOnBadExit: 0): the first task
      to exit non-zero or by a signal makes srun send SIGCONT and SIGTERM to the step, and SIGKILL
      ``kill_wait`` seconds (KillWait) later;
    - srun's exit code: once a task has ended by a signal, 128 + the highest such signal, whatever
      the others exit with; otherwise the largest exit code;
    - every task takes ``teardown`` seconds ("a,b": per rank) to tear down after train.py returns, as
      GPU processes do, under whatever signal handling train.py left in place.

    ``scontrol`` answers ``show hostnames`` and logs ``requeue``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, code in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / tool).write_text(f"#!{PY}\n" + code)
        os.chmod(bin_dir / tool, 0o755)
    state = tmp_path / "slurm"
    state.mkdir()
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(state), SLURM_JOB_ID="4242",
                    SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_CPUS_PER_TASK="1",
                    SLURM_SUBMIT_DIR=ROOT, PYTHON=PY, MASTER_PORT=str(_free_port()),
                    MMVIT_EXIT_CODE_FILE=str(state / "exitcode"),   # not the default: in the checkout
                    FAKE_SLURM_TEARDOWN=teardown, FAKE_SLURM_KILL_WAIT=str(kill_wait))
    return state, env


def sbatch_cmd(data_root, run, **extra):
    return ["bash", os.path.join(ROOT, "scripts", "slurm.sbatch"), os.path.join(ROOT, "configs", "quickstart.yaml"),
            *tiny_overrides(data_root, run, **{**SIGNAL_RUN, **extra})]


def time_limit_signal():
    """The signal the script's ``#SBATCH --signal`` asks for before the time limit."""
    text = open(os.path.join(ROOT, "scripts", "slurm.sbatch")).read()
    return signal.Signals["SIG" + re.search(r"#SBATCH --signal=(?:B:)?(\w+)@", text).group(1)]


@pytest.mark.slow
@pytest.mark.parametrize("teardown, kill_wait, srun_rc", [
    ("2,0", 10, 75),    # rank 1 exits 75 first; srun's SIGTERM finds rank 0 tearing down, which ends in time
    ("0,2", 1, 137),    # rank 0 first; rank 1 outlives KillWait: SIGKILL, and srun's code is 137 for good
])
def test_slurm_script_requeues_on_slurms_rules_and_the_requeued_job_resumes_exactly(
        long_fmnist, tmp_path, two_rank_ref, teardown, kill_wait, srun_rc):
    """scripts/slurm.sbatch under a fake srun that follows Slurm's rules (``_fake_slurm``), 2 tasks
    that take seconds to tear down, ending in either order: the time-limit signal (the script's own
    --signal) reaches the step mid-epoch; rank 0 saves, both exit 75, srun kills the slower task's
    teardown or not and returns what Slurm would; the script requeues either way, and the requeued
    job ends with the weights and log rows of the uninterrupted run."""
    state, env = _fake_slurm(tmp_path, teardown=teardown, kill_wait=kill_wait)
    run = str(tmp_path / "run")
    cmd = sbatch_cmd(long_fmnist, run)
    proc = launch(cmd, env=env)
    lines = wait_for_output(proc, "epoch 1 10/30")
    os.killpg(int((state / "step.pgid").read_text()), time_limit_signal())
    out = finish(proc, lines)
    assert proc.returncode == 75, out[-3000:]
    assert (state / "srun.rc").read_text() == str(srun_rc), (state / "tasks.log").read_text()
    assert (state / "scontrol.log").read_text() == "requeue 4242\n" and "requeueing job 4242" in out
    assert not (state / "exitcode").exists()   # read and removed
    assert_saved_mid_epoch(run, out, epoch=1)
    assert "--kill-on-bad-exit=1 --cpus-per-task=1" in (state / "srun.args").read_text()

    proc = launch(cmd, env=env)   # the requeued job
    out = finish(proc)
    assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
    assert_exact_resume(two_rank_ref, run)
    assert (state / "scontrol.log").read_text() == "requeue 4242\n"


@pytest.mark.slow
def test_slurm_script_ends_a_finished_run_and_a_user_error_without_requeue(long_fmnist, tmp_path):
    """Exit 0 (done) and 2 (a user error) end the job, under the same rules: the
    script exits with the code train.py chose, also where srun's is a signal's (the first task to
    fail kills the other in its setup, and its teardown outlives KillWait)."""
    state, env = _fake_slurm(tmp_path, teardown="0,2", kill_wait=1)
    cmd = sbatch_cmd(long_fmnist, str(tmp_path / "run"), **{"train.epochs": 1, "train.max_steps_per_epoch": 3})
    for extra, rc, needle in (([], 0, "epoch 0 |"), (["train.epochs=0"], 2, "train.epochs")):
        proc = launch([*cmd, *extra], env=env)
        out = finish(proc)
        assert proc.returncode == rc and needle in out, out[-3000:]
    assert not (state / "scontrol.log").exists()


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
    """flock dies with its process, so a dead run's lock file is simply taken over. Where the file
    system has no flock, the content decides: on this host the PID; from another host the
    heartbeat, which the holder rewrites every HEARTBEAT_S: a lock whose content stays the same
    for STALE_S (a job killed on another node) is taken over, one whose heartbeat moves is refused."""
    import threading

    from engine.distributed import DistInfo
    from engine.errors import UserError
    from engine.run import RunLock

    info = DistInfo(0, 1, 0, torch.device("cpu"), True, "none", False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    lock = tmp_path / RunLock.NAME

    def holder():
        pid, holder_host, beat = lock.read_text().split()
        return int(pid), holder_host, float(beat)

    lock.write_text(f"{dead.pid} {host}\n")
    with RunLock(str(tmp_path), info):
        assert holder()[:2] == (os.getpid(), host)
    assert not lock.exists()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(RunLock, "STALE_S", 1.0)
    lock.write_text(f"{dead.pid} {host} {time.time():.0f}\n")
    with RunLock(str(tmp_path), info):   # a dead PID on this host: taken over at once
        first = holder()
        assert first[:2] == (os.getpid(), host)
        time.sleep(1.5)
        assert holder()[2] > first[2]    # its own heartbeat goes on
    alive = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{alive.pid} {host} {time.time():.0f}\n")
        with pytest.raises(UserError, match=f"in use by another training run \\(PID {alive.pid} on {host}\\)"):
            RunLock(str(tmp_path), info).__enter__()
    finally:
        alive.kill()
        alive.wait()

    lock.write_text(f"77 other-node {time.time():.0f}\n")   # another host's run, killed: no heartbeat
    t0 = time.monotonic()
    with RunLock(str(tmp_path), info):
        assert holder()[:2] == (os.getpid(), host)
    assert 1.0 <= time.monotonic() - t0 < 10

    lock.write_text(f"77 other-node {time.time():.0f}\n")   # another host's live run: its heartbeat moves
    beating = threading.Event()

    def beat():
        while not beating.wait(0.1):
            lock.write_text(f"77 other-node {time.time():.3f}\n")

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(UserError, match="PID 77 on other-node"):
            RunLock(str(tmp_path), info).__enter__()
    finally:
        beating.set()
        thread.join()
    lock.write_text(f"77 other-node {time.time() - 3600:.0f}\n")   # a heartbeat an hour old: stale at once
    t0 = time.monotonic()
    with RunLock(str(tmp_path), info):
        pass
    assert time.monotonic() - t0 < 1.0


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

def test_nonfinite_stop_leaves_last_good_checkpoint(fake_fmnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out, **{"train.stop_after_epochs": 1}), rc=75)
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
    criterion_hook(monkeypatch, lambda call: call in (3, 4))
    run_train(tiny_overrides(fake_fmnist, out, **{"train.nonfinite": "skip"}))
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["skipped_steps"] for r in rows] == [2, 0]
    assert all(torch.isfinite(t).all() for t in final_weights(out)["model"].values() if t.dtype.is_floating_point)


def test_a_wholly_skipped_epoch_stops_before_its_evaluation_and_checkpoint(fake_fmnist, tmp_path, monkeypatch,
                                                                          capsys):
    out = str(tmp_path / "run")
    criterion_hook(monkeypatch, lambda call: call > 6)   # every step of epoch 1 (6 steps an epoch)
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


# ------------------------------------------------------------------ stop signals within this process

def test_a_signal_during_evaluation_saves_the_trained_epoch_and_the_rerun_evaluates_it(
        fake_fmnist, tmp_path, monkeypatch, capsys):
    """Evaluation is no place to wait for (on ImageNet it takes a while, and it compiles under
    train.compile): a signal there ends it at once, and the epoch, trained to its last step but not
    evaluated, is saved as a mid-epoch checkpoint; the rerun evaluates it and ends as the
    uninterrupted run, log rows and weights."""
    import engine.loop

    extra = {"train.ema": "true", "train.ema_decay": 0.9, "model.drop_path_rate": 0.1}
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, ref, **extra))
    real_sums, calls = engine.loop._batch_sums, []

    def batch_sums(logits, target):
        calls.append(1)
        if len(calls) == 2:   # epoch 0's evaluation, its first batch's EMA forward done
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sums(logits, target)

    monkeypatch.setattr(engine.loop, "_batch_sums", batch_sums)
    capsys.readouterr()
    run_train(tiny_overrides(fake_fmnist, run, **extra), rc=75)
    out = capsys.readouterr().out
    assert "SIGTERM: saved" in out and "step 6 of 6" in out, out
    assert len(calls) == 2   # the rest of the evaluation never ran
    ckpt = final_weights(run)
    assert ckpt["epoch"] == -1 and ckpt["epoch_step"] == 6 and read_jsonl(os.path.join(run, "log.jsonl")) == []
    monkeypatch.undo()
    run_train(tiny_overrides(fake_fmnist, run, **extra))
    assert_exact_resume(ref, run)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_signal_in_the_jobs_first_step_exits_75_at_once_and_writes_nothing(
        fake_fmnist, tmp_path, monkeypatch, capsys, resumed):
    """The job's first step (under train.compile: minutes of compilation on a GPU) is not waited
    for: a signal there ends the job at once with exit 75, writing nothing; last.pth stays as the
    job found it (or there is none), and the rerun goes on from there."""
    run = str(tmp_path / "run")
    if resumed:
        run_train(tiny_overrides(fake_fmnist, run, **{"train.stop_after_epochs": 1}), rc=75)
    before = _files(run) if resumed else {}
    signal_at_call(monkeypatch, 1)
    capsys.readouterr()
    run_train(tiny_overrides(fake_fmnist, run), rc=75)
    out = capsys.readouterr().out
    assert "SIGTERM: stopped in this job's first step" in out, out
    after = _files(run)
    assert {k: v for k, v in after.items() if k.endswith(".pth")} == {k: v for k, v in before.items()
                                                                       if k.endswith(".pth")}
    assert [r["epoch"] for r in read_jsonl(os.path.join(run, "log.jsonl"))] == ([0] if resumed else [])


def test_train_resume_with_a_checkpoint_of_another_model_is_refused_also_past_its_epochs(
        fake_fmnist, tmp_path, capsys):
    """train.resume=<a checkpoint of another model> is refused whatever train.epochs is, also when
    the checkpoint's epoch is past it (it is not "already finished")."""
    out = str(tmp_path / "run")
    run_train(tiny_overrides(fake_fmnist, out))
    for epochs in (3, 2, 1):
        err = one_line_error(capsys, ["--config", QUICKSTART, *tiny_overrides(
            fake_fmnist, str(tmp_path / f"other{epochs}"),
            **{"model.kwargs.depth": 3, "train.epochs": epochs, "train.resume": f"{out}/last.pth"})])
        assert "does not match this model" in err and "last.pth" in err, err


# ------------------------------------------------------------------ 5. disk

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


class DiskFault:
    """Writes to files whose path contains ``target`` fail once ``armed``: as on a full disk (the
    write fails: ENOSPC) or a read-only file system (the open fails: EROFS). Every open in this
    process goes through it: ours, torch.save's file, TensorBoard's event file (``io.open``).
    ``first_hit``: ``clock()`` at the first failed write."""

    def __init__(self, monkeypatch, target, mode, clock=lambda: None):
        self.target, self.mode, self.armed, self.first_hit = target, mode, False, None
        real = builtins.open

        def fault_open(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
            if not (self.armed and writing and self.target in name):
                return real(file, mode, *args, **kwargs)
            if self.first_hit is None:
                self.first_hit = clock()
            if self.mode == "read-only":
                raise OSError(errno.EROFS, "Read-only file system", name)
            return _FullFile(real(file, mode, *args, **kwargs))

        monkeypatch.setattr(builtins, "open", fault_open)
        monkeypatch.setattr(io, "open", fault_open)


class _FullFile:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


DISK_RUN = {"train.epochs": 3, "data.batch_size": 4, "train.plot_modulators": "true"}   # 24 steps an epoch


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, fake_fmnist):
    """A run directory after epoch 0 of 3 (stopped by train.stop_after_epochs)."""
    out = str(tmp_path_factory.mktemp("one_epoch") / "run")
    run_train(tiny_overrides(fake_fmnist, out, **DISK_RUN, **{"train.stop_after_epochs": 1}), rc=75)
    return out


def _files(run_dir):
    """Every file of a run directory with its bytes."""
    return {os.path.relpath(os.path.join(root, f), run_dir): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(run_dir) for f in files}


def _whole(path):
    """Whether a run directory's file parses as a whole file of its kind."""
    import csv
    import json

    import yaml

    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".pth"):
        torch.load(io.BytesIO(data), weights_only=True)
    elif path.endswith(".json"):
        json.loads(data)
    elif path.endswith(".jsonl"):
        [json.loads(line) for line in data.decode().splitlines()]
    elif path.endswith(".csv"):
        assert len({len(row) for row in csv.reader(data.decode().splitlines())}) == 1
    elif path.endswith(".yaml"):
        yaml.safe_load(data)
    else:
        return False
    return True


@pytest.mark.parametrize("mode", ["full", "read-only"])
@pytest.mark.parametrize("target, named, steps_after", [
    ("last.pth", "last.pth", 3),      # written in the background while epoch 2 trains: noticed within a step or two
    ("topk.json", "topk.json", 3),
    ("log.jsonl", "log.jsonl", 0),    # written by the main process at the end of epoch 1: epoch 2 never starts
    ("summary.csv", "summary.csv", 0),
    ("tfevents", "tensorboard", 3),   # TensorBoard (scalars, modulator parameters and figures), its writer thread
])
def test_a_failed_write_anywhere_is_one_line_exit_2_and_loses_nothing(
        one_epoch_run, fake_fmnist, tmp_path, monkeypatch, capsys, target, named, steps_after, mode):
    """A full disk or a read-only file system at any of training's write sites, from the resumed
    run's epoch 1 on: one line naming the file, exit 2, training stopped at once (a write of another
    thread: within a step or two), every file written before intact or replaced whole, and the same
    command resumes once there is space."""
    import engine.loop

    run = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, run)
    before = _files(run)
    steps = []
    fault = DiskFault(monkeypatch, target, mode, clock=lambda: len(steps))
    real_train = engine.loop.Trainer.train_one_epoch

    def train_one_epoch(self, *args, **kwargs):
        fault.armed = True
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(engine.loop.Trainer, "train_one_epoch", train_one_epoch)
    criterion_hook(monkeypatch, lambda call: steps.append(call) and False)
    err = one_line_error(capsys, ["--config", QUICKSTART, *tiny_overrides(fake_fmnist, run, **DISK_RUN)])
    assert fault.first_hit is not None and "cannot write" in err and named in err, err
    assert ("No space left" if mode == "full" else "Read-only") in err
    assert len(steps) - fault.first_hit <= steps_after, (fault.first_hit, len(steps))
    after = _files(run)
    assert not [f for f in after if ".tmp" in f]
    for name, data in before.items():   # each file as it was, or (written before the failure) whole and newer
        assert after[name] == data or (target not in name and _whole(os.path.join(run, name))), name
    assert torch.load(os.path.join(run, "last.pth"), weights_only=True)["epoch"] in (0, 1)
    assert read_jsonl(os.path.join(run, "log.jsonl"))[0] == read_jsonl(os.path.join(one_epoch_run, "log.jsonl"))[0]
    monkeypatch.undo()
    run_train(tiny_overrides(fake_fmnist, run, **DISK_RUN))   # space again: the same command resumes
    assert [r["epoch"] for r in read_jsonl(os.path.join(run, "log.jsonl"))] == [0, 1, 2]


def test_a_failed_mid_epoch_save_is_exit_2_not_75(one_epoch_run, fake_fmnist, tmp_path, monkeypatch, capsys):
    """A stop signal whose save meets a full disk: one line, exit 2 (a rerun would not resume from
    it), the previous last.pth intact."""
    run = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, run)
    before = _files(run)
    fault = DiskFault(monkeypatch, "last.pth", "full")

    def signal_at_step_5(call):
        if call == 5:
            fault.armed = True
            os.kill(os.getpid(), signal.SIGTERM)

    criterion_hook(monkeypatch, signal_at_step_5)
    err = one_line_error(capsys, ["--config", QUICKSTART, *tiny_overrides(fake_fmnist, run, **DISK_RUN)])
    assert "last.pth" in err and "No space left" in err
    assert _files(run)["last.pth"] == before["last.pth"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs takes root")
def test_a_real_full_and_read_only_file_system(fake_fmnist, tmp_path, capsys):
    """The same on a real file system: a small tmpfs filled up after epoch 0 (ENOSPC at epoch 1's
    checkpoint), then remounted read-only (EROFS at the run lock): one line, exit 2 each time, the
    epoch-0 files intact; with space again the run resumes."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = str(mnt / "run")
        args = ["--config", QUICKSTART, *tiny_overrides(fake_fmnist, run, **DISK_RUN)]
        run_train(tiny_overrides(fake_fmnist, run, **DISK_RUN, **{"train.stop_after_epochs": 1}), rc=75)
        before = _files(run)
        ballast = mnt / "ballast"
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        ballast.write_bytes(b"\0" * (free - len(before["last.pth"]) // 2))
        err = one_line_error(capsys, args)
        assert "No space left" in err and "last.pth" in err, err
        after = _files(run)
        assert after["last.pth"] == before["last.pth"] and all(_whole(os.path.join(run, name)) for name in after
                                                               if "tfevents" not in name), after.keys()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        err = one_line_error(capsys, args)
        assert "Read-only" in err and run in err, err
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        ballast.unlink()
        run_train(tiny_overrides(fake_fmnist, run, **DISK_RUN))
        assert [r["epoch"] for r in read_jsonl(os.path.join(run, "log.jsonl"))] == [0, 1, 2]
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


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
