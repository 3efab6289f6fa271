#!/usr/bin/env python
"""Run a sweep: every (variant, seed) of a sweep file is trained with train.py in its own run
directory, then its final checkpoint is evaluated with ``eval.py --attn-stats --patch-similarity``.
Rerunning the same command skips finished runs, resumes interrupted ones (train.py's auto-resume)
and retries failed ones; ``scripts/report.py`` turns the sweep directory into tables and figures.

    python scripts/sweep.py configs/sweeps/fashion_mnist_normalizers.yaml
    python scripts/sweep.py configs/sweeps/fashion_mnist_normalizers.yaml --parallel 2 --dry-run
    python scripts/sweep.py configs/sweeps/deit_small_ablations.yaml --gpus 0,1,2,3,4,5,6,7 data.root=/data/imagenet
    python scripts/sweep.py configs/sweeps/deit_small_ablations.yaml --launcher slurm --partition gpu \\
        data.root=/data/imagenet

A sweep file (YAML; paths of config files are relative to it, ``output_dir`` to the working
directory):

    base: ../quickstart.yaml            # the config of every run ...
    output_dir: runs/sweeps/example     # ... in <output_dir>/<variant>/seed<S>/
    seeds: [0, 1, 2]
    overrides: [train.epochs=10]        # for every run (optional)
    variants:
      softmax: [model.attn_normalizer=softmax, model.out_normalizer=softmax]   # overrides of base
      attention_only: ../ablations/attention_only.yaml                       # a config file instead
      sparse_fast: {config: ../ablations/sparsemax.yaml, overrides: [optim.lr=1e-3]}
    eval: [--attn-stats-batches, 20]    # more eval.py arguments (optional)
    gpus_per_run: 8                     # processes per run (optional, default 1)

A run's config is its file ← ``overrides`` ← the variant's overrides ← overrides given to this
script ← ``train.seed`` and ``train.output_dir``, which the sweep sets.

Where runs go:
- this machine (default): one run after another, or ``--parallel N`` at once. With GPUs
  (``--gpus``, default CUDA_VISIBLE_DEVICES or what ``nvidia-smi -L`` lists) each run gets
  ``gpus_per_run`` of them through CUDA_VISIBLE_DEVICES; more than one process per run is a
  ``torchrun`` (on a CPU-only machine: that many gloo processes). The CPU threads are split
  between the runs at once (OMP_NUM_THREADS).
- ``--launcher slurm``: one SLURM job array through submitit, each run a job of ``--nodes``
  nodes × ``gpus_per_run`` GPUs (one task per GPU). A preempted or timed-out job saves and is
  requeued; ``--wait`` waits for the array and summarises it.

Each run's output goes to ``train.log`` and ``eval.log`` in its directory. Exit status: 0 every
run done, 1 some run failed (the others went on), 2 a bad sweep file or argument, 75
interrupted (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from engine.config import CLI, load_config, parse_yaml  # noqa: E402
from engine.errors import EXIT_OK, EXIT_RESUMABLE, EXIT_USER_ERROR, UserError  # noqa: E402
from engine.logger import read_jsonl  # noqa: E402
from scripts._sweep_files import (  # noqa: E402
    EVAL_JSON, EVAL_LOG, MANIFEST, TRAIN_LOG, call_end, call_start, eval_is_current, read_call)

EXIT_FAILED = 1
TRAIN = os.path.join(REPO, "train.py")
EVAL = os.path.join(REPO, "eval.py")
SWEEP_KEYS = ("base", "output_dir", "seeds", "overrides", "variants", "eval", "gpus_per_run")
VARIANT_KEYS = ("config", "overrides")
SET_BY_SWEEP = ("train.seed", "train.output_dir")
EVAL_SET_BY_SWEEP = ("--checkpoint", "--output", "--attn-stats", "--patch-similarity")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# How long a preempted SLURM job waits for train.py to save (SLURM kills it signal_delay_s after the signal).
SLURM_SIGNAL_DELAY_S = 120


# ---------------------------------------------------------------- the sweep file

@dataclass(frozen=True)
class Run:
    """One (variant, seed): the train.py arguments and where its results go."""

    variant: str
    seed: int
    run_dir: str                   # absolute
    config: str                    # the config file given to train.py
    overrides: Tuple[str, ...]     # after --config, ending with train.seed and train.output_dir
    epochs: int
    eval_args: Tuple[str, ...]
    nproc: int                     # processes (GPUs) of the run

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    def train_command(self, torchrun: bool) -> List[str]:
        """``python train.py ...``, or under torchrun with ``nproc`` processes on this node."""
        launcher = [sys.executable]
        if torchrun and self.nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
        return [*launcher, TRAIN, "--config", self.config, *self.overrides]

    def eval_command(self) -> List[str]:
        return [sys.executable, EVAL, "--checkpoint", os.path.join(self.run_dir, "last.pth"), "--attn-stats",
                "--output", os.path.join(self.run_dir, EVAL_JSON), "--patch-similarity", *self.eval_args]


@dataclass
class Sweep:
    path: str
    output_dir: str                # absolute
    variants: Dict[str, Dict[str, Any]]   # name → {"config": path, "overrides": [...]}
    seeds: List[int]
    runs: List[Run] = field(default_factory=list)


def _key_error(path: str, key: str, message: str) -> UserError:
    return UserError(f"{path}: {key}: {message}")


def _string_list(path: str, key: str, value: Any) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _key_error(path, key, f"must be a list of strings, got {value!r}")
    return list(value)


def _overrides(path: str, key: str, value: Any) -> List[str]:
    items = _string_list(path, key, value)
    for item in items:
        name, sep, _ = item.partition("=")
        if not sep or not name.strip():
            raise _key_error(path, key, f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        if name.strip() in SET_BY_SWEEP:
            raise _key_error(path, key, f"{name.strip()} is set by the sweep (seeds:, output_dir:)")
    return items


def _config_file(path: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _key_error(path, key, f"must be the path of a config file, got {value!r}")
    config = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(value)))
    if not os.path.isfile(config):
        raise _key_error(path, key, f"config file not found: {config}")
    return config


def _without_source(message: str) -> str:
    """A config error about overrides of the sweep file, which engine.config attributes to the command line."""
    return message.replace(f"{CLI}: ", "", 1).replace(f" (set on the {CLI})", "")


def _checked_config(path: str, key: str, config: str, overrides: Sequence[str]):
    try:
        return load_config(config, overrides)
    except UserError as e:
        raise _key_error(path, key, _without_source(str(e))) from None


def _variant(path: str, key: str, spec: Any, base: Optional[str]) -> Tuple[str, List[str]]:
    """(config file, overrides) of one variant: a list of overrides of ``base``, a config file, or
    a mapping with ``config`` and/or ``overrides``."""
    if not _NAME.match(key.split(".", 1)[1]):
        raise _key_error(path, key, "a variant name is a directory name: letters, digits, _ . + -")
    if isinstance(spec, dict):
        for sub in spec:
            if sub not in VARIANT_KEYS:
                raise _key_error(path, f"{key}.{sub}", f"unknown key (known: {', '.join(VARIANT_KEYS)})")
        config = _config_file(path, f"{key}.config", spec["config"]) if "config" in spec else base
        overrides = _overrides(path, f"{key}.overrides", spec.get("overrides", []))
    elif isinstance(spec, str):
        config, overrides = _config_file(path, key, spec), []
    else:
        config, overrides = base, _overrides(path, key, spec)
    if config is None:
        raise _key_error(path, key, "names no config file and the sweep has no 'base'")
    return config, overrides


def load_sweep(path: str, cli_overrides: Sequence[str] = (), gpus_per_run: Optional[int] = None) -> Sweep:
    """Read and check a sweep file and expand it into runs (seed-major: every variant of the first
    seed comes first, so a sweep stopped half-way has whole comparisons). Every run's config is
    loaded and checked here; a mistake is a UserError naming the sweep file and key."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read sweep file {path}: {getattr(e, 'strerror', None) or e}") from None
    data = parse_yaml(text, path)  # malformed YAML and duplicate keys are refused as in configs
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in data:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(SWEEP_KEYS)})"
            raise UserError(f"{path}: unknown key '{key}'{hint}")
    for key in ("output_dir", "seeds", "variants"):
        if key not in data:
            raise UserError(f"{path}: missing key '{key}'")

    output_dir = data["output_dir"]
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise _key_error(path, "output_dir", f"must be a directory path, got {output_dir!r}")
    seeds = data["seeds"]
    if (not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise _key_error(path, "seeds", f"must be a list of distinct integers >= 0, got {seeds!r}")
    common = _overrides(path, "overrides", data.get("overrides", []))
    eval_spec = data.get("eval", [])
    if not isinstance(eval_spec, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                  for a in eval_spec):
        raise _key_error(path, "eval", f"must be a list of eval.py arguments, got {eval_spec!r}")
    eval_args = [str(a) for a in eval_spec]
    taken = [a for a in eval_args if a.split("=")[0] in EVAL_SET_BY_SWEEP]
    if taken:
        raise _key_error(path, "eval", f"{taken[0]} is set by the sweep")
    nproc = data.get("gpus_per_run", 1) if gpus_per_run is None else gpus_per_run
    if type(nproc) is not int or nproc < 1:
        raise _key_error(path, "gpus_per_run", f"must be an integer >= 1, got {nproc!r}")
    base = _config_file(path, "base", data["base"]) if "base" in data else None

    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise _key_error(path, "variants", "must be a mapping of variant names to overrides or a config file")
    expanded: Dict[str, Dict[str, Any]] = {}
    configs = {}
    for item in cli_overrides:
        if item.partition("=")[0].strip() in SET_BY_SWEEP:
            raise UserError(f"{CLI}: {item.partition('=')[0].strip()} is set by the sweep (seeds:, output_dir:)")
    for name, spec in variants.items():
        name, key = str(name), f"variants.{name}"
        config, overrides = _variant(path, key, spec, base)
        try:
            cfg = load_config(config, [*common, *overrides, *cli_overrides])
        except UserError as e:
            # name the culprit: the sweep's overrides, the variant's, or else the command line's
            _checked_config(path, "overrides", config, common)
            _checked_config(path, key, config, [*common, *overrides])
            raise UserError(f"{CLI} (variant {name}): {_without_source(str(e))}") from None
        if cfg.train.resume != "auto":
            raise _key_error(path, key, f"train.resume = {cfg.train.resume!r}: a sweep resumes runs, keep it auto")
        expanded[name] = {"config": config, "overrides": [*common, *overrides]}
        configs[name] = cfg

    sweep = Sweep(path, os.path.abspath(output_dir), expanded, list(seeds))
    for seed in seeds:
        for name, spec in expanded.items():
            run_dir = os.path.join(sweep.output_dir, name, f"seed{seed}")
            overrides = (*spec["overrides"], *cli_overrides, f"train.seed={seed}", f"train.output_dir={run_dir}")
            sweep.runs.append(Run(name, seed, run_dir, spec["config"], overrides, configs[name].train.epochs,
                                  tuple(eval_args), nproc))
    return sweep


def write_manifest(sweep: Sweep) -> None:
    """``<output_dir>/sweep.json``: the variants and runs, so report.py knows runs not started yet.
    An output_dir that is a file or cannot be created or written is a UserError."""
    manifest = {
        "sweep_file": os.path.abspath(sweep.path),
        "seeds": sweep.seeds,
        "variants": sweep.variants,
        "runs": [{"variant": r.variant, "seed": r.seed, "run_dir": os.path.relpath(r.run_dir, sweep.output_dir)}
                 for r in sweep.runs],
    }
    target = os.path.join(sweep.output_dir, MANIFEST)
    try:
        os.makedirs(sweep.output_dir, exist_ok=True)
        with open(target + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(target + ".tmp", target)
    except OSError as e:
        problem = "is not a directory" if os.path.exists(sweep.output_dir) and not os.path.isdir(sweep.output_dir) \
            else f"cannot be written ({e.filename}: {e.strerror or e})"
        raise _key_error(sweep.path, "output_dir", f"{sweep.output_dir} {problem}") from None


# ---------------------------------------------------------------- the state of a run

def _last_logged_epoch(run_dir: str) -> Optional[int]:
    """The epoch of the last complete line of log.jsonl (a line cut by a crash does not count)."""
    last = None
    for record in read_jsonl(os.path.join(run_dir, "log.jsonl")):
        if isinstance(record, dict):
            last = record.get("epoch", last)
    return last


def run_state(run: Run) -> str:
    """From the run directory: 'done' (trained, last.pth evaluated), 'trained' (to evaluate),
    'partial' (to resume) or 'new'."""
    last = os.path.join(run.run_dir, "last.pth")
    epoch = _last_logged_epoch(run.run_dir)
    if epoch is None and not os.path.exists(last):
        return "new"
    if epoch != run.epochs - 1 or not os.path.exists(last):
        return "partial"
    return "done" if eval_is_current(run.run_dir) else "trained"


# ---------------------------------------------------------------- running one run

@dataclass
class Outcome:
    status: str          # done | skipped (done before) | interrupted | failed
    detail: str = ""
    seconds: float = 0.0


class RunFailed(RuntimeError):
    """A SLURM job's run did not finish (failed, or interrupted without a requeue)."""


def _ignoring(signum: int):
    """A ``preexec_fn`` for a child that must ignore ``signum``: under a submitit job the preemption
    signal is the job's business (it asks train.py to save with SIGTERM), while its default action
    would kill train.py unsaved. Looked up before the fork: nothing is imported in the child."""
    return lambda: signal.signal(signum, signal.SIG_IGN)


def _preemption_signal() -> int:
    import submitit

    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


class RunJob:
    """Train one run (resuming what is there), then evaluate its final checkpoint, in child
    processes; the unit of work of both launchers (a submitit job calls it with the Run).

    ``stop()`` asks the running child to stop: train.py saves a resumable checkpoint on SIGTERM.
    ``slurm``: the job is a SLURM task (of several when the run has several GPUs): train.py finds
    its rank in SLURM's environment, only global rank 0 evaluates, and ``checkpoint`` (submitit's
    hook on preemption/timeout) stops train.py, waits for its checkpoint and requeues the run."""

    def __init__(self, env: Optional[Dict[str, str]] = None, slurm: bool = False):
        self.env, self.slurm = dict(env or {}), slurm
        self._proc: Optional[subprocess.Popen] = None
        self._waiter: Optional[threading.Thread] = None
        self._stopping = False

    def __getstate__(self) -> Dict[str, Any]:
        return {"env": self.env, "slurm": self.slurm}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self, run: Run) -> str:
        """The submitit entry: the outcome, or RunFailed (so the job shows as failed)."""
        outcome = self.execute(run)
        if outcome.status not in ("done", "skipped"):
            raise RunFailed(f"{run.name}: {outcome.status}: {outcome.detail}")
        return f"{run.name}: {outcome.status}"

    def checkpoint(self, run: Run):
        import submitit

        self.stop(wait_s=SLURM_SIGNAL_DELAY_S - 20)
        return submitit.helpers.DelayedSubmission(RunJob(self.env, self.slurm), run)

    def stop(self, wait_s: Optional[float] = None) -> None:
        """SIGTERM to the running child (train.py saves and exits); with ``wait_s``, wait that long for it."""
        self._stopping = True
        proc, waiter = self._proc, self._waiter
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        if wait_s is not None and waiter is not None:
            waiter.join(wait_s)

    def _environment(self, evaluating: bool) -> Dict[str, str]:
        env = {**os.environ, **self.env}
        if self.slurm:
            # one port per job: array jobs sharing a node must not meet at one rendezvous
            env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
            env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
            if evaluating:  # without a step id train.py/eval.py run as one process (engine.distributed)
                env.pop("SLURM_STEP_ID", None)
                env.pop("SLURM_STEPID", None)
        return env

    def _run_child(self, command: List[str], log_path: str, env: Dict[str, str]) -> Tuple[int, str]:
        """Run ``command`` with its output appended to ``log_path``, between ``call_start`` and
        ``call_end`` lines; its exit code (negative: killed by a signal) and the line that explains
        it, from what this call wrote (``read_call``)."""
        with open(log_path, "a") as log:
            offset = log.tell()
            log.write(call_start(command))
            log.flush()
            # a session of its own: a Ctrl-C meant for the sweep reaches train.py as the sweep's SIGTERM
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True,
                                    preexec_fn=_ignoring(_preemption_signal()) if self.slurm else None)
        # waiting in a thread leaves the main thread free for signal handlers that wait for the child too
        waiter = threading.Thread(target=proc.wait, daemon=True)
        waiter.start()
        self._proc, self._waiter = proc, waiter
        if self._stopping:
            proc.send_signal(signal.SIGTERM)
        waiter.join()
        self._proc = self._waiter = None
        with open(log_path, "a") as log:
            log.write(call_end(proc.returncode))
        return proc.returncode, read_call(log_path, offset)[1]

    @property
    def _is_main(self) -> bool:
        return not self.slurm or int(os.environ.get("SLURM_PROCID", "0")) == 0

    def execute(self, run: Run) -> Outcome:
        start = time.perf_counter()
        state = run_state(run)
        if state == "done":
            return Outcome("skipped", "done before")
        try:
            os.makedirs(run.run_dir, exist_ok=True)
        except OSError as e:
            return Outcome("failed", f"cannot create the run directory {run.run_dir}: {e.strerror or e}")
        if state != "trained":
            log = os.path.join(run.run_dir, TRAIN_LOG)
            rc, why = self._run_child(run.train_command(torchrun=not self.slurm), log, self._environment(False))
            state = run_state(run)
            if state != "trained" or self._stopping:
                if rc in (EXIT_OK, EXIT_RESUMABLE) or self._stopping:
                    return Outcome("interrupted", f"{_progress(run)}, resumes on the next call",
                                   time.perf_counter() - start)
                return Outcome("failed", f"train.py exit {rc}: {why} (log: {log})",
                               time.perf_counter() - start)
        if not self._is_main:
            return Outcome("done", "trained (rank 0 evaluates)", time.perf_counter() - start)
        log = os.path.join(run.run_dir, EVAL_LOG)
        rc, why = self._run_child(run.eval_command(), log, self._environment(True))
        if self._stopping:
            return Outcome("interrupted", "trained; evaluates on the next call", time.perf_counter() - start)
        if rc != 0 or run_state(run) != "done":
            return Outcome("failed", f"eval.py exit {rc}: {why} (log: {log})",
                           time.perf_counter() - start)
        return Outcome("done", _result_line(run), time.perf_counter() - start)


def _progress(run: Run) -> str:
    epoch = _last_logged_epoch(run.run_dir)
    return f"{0 if epoch is None else epoch + 1} of {run.epochs} epochs done"


def _result_line(run: Run) -> str:
    try:
        with open(os.path.join(run.run_dir, EVAL_JSON)) as f:
            result = json.load(f)
        return f"top-1 {result['top1']:.2f}, top-5 {result['top5']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# ---------------------------------------------------------------- this machine

def detect_gpus() -> List[str]:
    """CUDA_VISIBLE_DEVICES if set, else the GPUs ``nvidia-smi -L`` lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
    return []


def local_slots(gpus: Sequence[str], nproc: int, parallel: Optional[int]) -> List[Dict[str, str]]:
    """The environment of each run slot: its GPUs (``nproc`` each) and its share of the CPU threads."""
    if gpus:
        if len(gpus) < nproc:
            raise UserError(f"gpus_per_run {nproc} needs at least {nproc} GPUs, have {len(gpus)} ({','.join(gpus)})")
        groups = [list(gpus[i:i + nproc]) for i in range(0, len(gpus) - nproc + 1, nproc)]
        groups = groups[:parallel] if parallel else groups
    else:
        groups = [[] for _ in range(parallel or 1)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // (len(groups) * nproc))
    return [{"OMP_NUM_THREADS": str(threads), **({"CUDA_VISIBLE_DEVICES": ",".join(g)} if g else {})}
            for g in groups]


class Console:
    """Status lines from several slot threads, one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self._lock:
            print(msg, flush=True)


def run_local(runs: Sequence[Run], slots: Sequence[Dict[str, str]], say: Console) -> Dict[str, Outcome]:
    """Every run in ``runs`` on this machine, one per slot at a time. SIGINT/SIGTERM/SIGUSR1 stop
    the sweep: the running train.py processes save and exit, no further run starts."""
    outcomes: Dict[str, Outcome] = {}
    pending = list(runs)
    lock = threading.Lock()
    jobs = [RunJob(env) for env in slots]
    stopping = threading.Event()

    def slot(job: RunJob) -> None:
        while not stopping.is_set():
            with lock:
                if not pending:
                    return
                run = pending.pop(0)
                index = len(runs) - len(pending)
            state = run_state(run)
            if state != "done":
                action = {"new": "training", "partial": "resuming", "trained": "evaluating"}[state]
                say(f"[{index}/{len(runs)}] {run.name}: {action} (log: {run.run_dir}/"
                    f"{EVAL_LOG if state == 'trained' else TRAIN_LOG})")
            outcome = job.execute(run)
            outcomes[run.name] = outcome
            if outcome.status != "skipped":
                say(f"[{index}/{len(runs)}] {run.name}: {outcome.status} in {_duration(outcome.seconds)}"
                    + (f": {outcome.detail}" if outcome.detail else ""))

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            say(f"sweep: {signal.Signals(signum).name}: stopping; running trainings save a resumable checkpoint")
        stopping.set()
        for job in jobs:
            job.stop()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        threads = [threading.Thread(target=slot, args=(job,), daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return {run.name: outcomes.get(run.name, Outcome("interrupted", "not started")) for run in runs}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- SLURM (submitit)

def check_slurm(cluster: str) -> None:
    """Refuse ``--launcher slurm`` (with submitit's slurm executor) where SLURM's tools are missing."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None] if cluster == "slurm" else []
    if missing:
        raise UserError(f"--launcher slurm: no SLURM on this machine ({' and '.join(missing)} not found on PATH); "
                        "run the sweep on a login node of the cluster, or use --launcher local")


def slurm_executor(sweep: Sweep, args: argparse.Namespace, nproc: int):
    """A submitit executor for one job per run: ``--nodes`` nodes × ``nproc`` tasks/GPUs each."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(sweep.output_dir, "slurm", "%j"), cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_requeues)
    extra = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm {item!r} must look like KEY=VALUE (an sbatch option, e.g. qos=high)")
        extra[key] = value
    executor.update_parameters(
        name=f"sweep-{os.path.basename(sweep.output_dir)}", timeout_min=args.timeout_min, nodes=args.nodes,
        tasks_per_node=nproc, gpus_per_node=nproc, cpus_per_task=args.cpus_per_task,
        slurm_partition=args.partition, slurm_signal_delay_s=SLURM_SIGNAL_DELAY_S,
        slurm_array_parallelism=args.array_parallelism, slurm_additional_parameters=extra or None,
    )
    return executor


def run_slurm(sweep: Sweep, runs: Sequence[Run], args: argparse.Namespace, say: Console) -> Dict[str, Outcome]:
    """Submit ``runs`` as one job array; with ``--wait`` (always for submitit's local/debug
    executors) wait for it and collect the outcomes, else report them as submitted."""
    import cloudpickle  # submitit's pickler
    import engine.logger
    import scripts._sweep_files

    # submitit pickles RunJob and this script's functions by value, but imported modules' by
    # reference, and a job process need not find the repository (its cwd is where the sweep was
    # started): the modules of run_state's helpers go by value too
    for module in (engine.logger, scripts._sweep_files):
        cloudpickle.register_pickle_by_value(module)
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = slurm_executor(sweep, args, runs[0].nproc)
    try:
        jobs = executor.map_array(RunJob(slurm=True), list(runs))
    except (FailedJobError, FailedSubmissionError) as e:  # sbatch refused the array (its stderr is printed)
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise UserError(f"--launcher slurm: the job array was not submitted: {lines[-1]}") from None
    for run, job in zip(runs, jobs):
        say(f"{run.name}: job {job.job_id} (logs: {job.paths.stdout})")
    if not (args.wait or args.cluster in ("local", "debug")):
        return {run.name: Outcome("submitted", f"job {job.job_id}") for run, job in zip(runs, jobs)}
    outcomes = {}
    for run, job in zip(runs, jobs):
        try:
            job.result()
            outcomes[run.name] = Outcome("done", _result_line(run))
        except Exception as e:  # the job's exception (RunFailed) or submitit's account of a dead job
            lines = [line for line in str(e).splitlines() if line.strip()]
            outcomes[run.name] = Outcome("failed", lines[-1] if lines else type(e).__name__)
        say(f"{run.name}: {outcomes[run.name].status}: {outcomes[run.name].detail}")
    return outcomes


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. data.root=/data/imagenet")
    p.add_argument("--dry-run", action="store_true", help="print each run's state and commands, run nothing")
    p.add_argument("--only", help="comma-separated variants to run (default: all)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--gpus-per-run", type=int, help="GPUs (processes) per run (default: the sweep file's, else 1)")
    local = p.add_argument_group("this machine")
    local.add_argument("--parallel", type=int, help="runs at once (default: as many as the GPUs allow, 1 on CPU)")
    local.add_argument("--gpus", help="comma-separated GPU ids (default: CUDA_VISIBLE_DEVICES or nvidia-smi -L)")
    slurm = p.add_argument_group("SLURM (--launcher slurm)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    slurm.add_argument("--timeout-min", type=int, default=72 * 60, help="time limit of a job (default 72 h)")
    slurm.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per GPU task (default 10)")
    slurm.add_argument("--array-parallelism", type=int, default=256, help="jobs of the array running at once")
    slurm.add_argument("--max-requeues", type=int, default=20, help="requeues after a time-out (default 20)")
    slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="another sbatch option, e.g. --slurm account=abc --slurm qos=high")
    slurm.add_argument("--wait", action="store_true", help="wait for the jobs and summarise them")
    slurm.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                       help="submitit executor: slurm, or local/debug to try the jobs on this machine")
    args = p.parse_intermixed_args(argv)  # overrides may follow options
    for name in ("parallel", "gpus_per_run", "nodes", "timeout_min", "cpus_per_task", "array_parallelism"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def select_runs(sweep: Sweep, only: Optional[str]) -> List[Run]:
    if not only:
        return list(sweep.runs)
    names = [n.strip() for n in only.split(",") if n.strip()]
    for name in names:
        if name not in sweep.variants:
            close = difflib.get_close_matches(name, sweep.variants, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (variants: {', '.join(sweep.variants)})"
            raise UserError(f"--only: {sweep.path} has no variant '{name}'{hint}")
    return [r for r in sweep.runs if r.variant in names]


def dry_run(runs: Sequence[Run], args: argparse.Namespace, slots: Sequence[Dict[str, str]]) -> None:
    if args.launcher == "slurm":
        print(f"# one SLURM job array of {len(runs)} jobs, each {args.nodes} node(s) x {runs[0].nproc} GPU task(s); "
              "each task runs:")
    else:
        print(f"# {len(slots)} run(s) at once; each run takes the next free slot (its environment below is an example)")
    for i, run in enumerate(runs):
        env = {} if args.launcher == "slurm" else slots[i % len(slots)]
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        prefix = prefix + " " if prefix else ""
        print(f"# {run.name} ({run_state(run)})")
        print(prefix + shlex.join(run.train_command(args.launcher == "local")))
        print(prefix + shlex.join(run.eval_command()))


def summarise(outcomes: Dict[str, Outcome], say: Console) -> int:
    counts: Dict[str, int] = {}
    for o in outcomes.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    say(f"sweep: {len(outcomes)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    for name, o in outcomes.items():
        if o.status in ("failed", "interrupted"):
            say(f"  {o.status}: {name}: {o.detail}")
    if counts.get("failed"):
        return EXIT_FAILED
    return EXIT_RESUMABLE if counts.get("interrupted") else EXIT_OK


def main(argv=None) -> int:
    args = parse_args(argv)
    say = Console()
    try:
        sweep = load_sweep(args.sweep, args.overrides, args.gpus_per_run)
        runs = select_runs(sweep, args.only)
        nproc = runs[0].nproc
        slots = []
        if args.launcher == "local":
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus is not None else detect_gpus()
            slots = local_slots(gpus, nproc, args.parallel)
        if args.dry_run:
            dry_run(runs, args, slots)
            return EXIT_OK
        if args.launcher == "slurm":
            check_slurm(args.cluster)
        write_manifest(sweep)
        todo = [r for r in runs if run_state(r) != "done"]
        say(f"sweep {sweep.path}: {len(runs)} runs ({len(runs) - len(todo)} done before) in {sweep.output_dir}")
        if args.launcher == "slurm":
            outcomes = {r.name: Outcome("skipped", "done before") for r in runs if r not in todo}
            if todo:
                outcomes.update(run_slurm(sweep, todo, args, say))
        else:
            outcomes = run_local(runs, slots, say)
        return summarise(outcomes, say)
    except UserError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
