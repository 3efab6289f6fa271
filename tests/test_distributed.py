"""Process-group plumbing: launcher detection, the single-process path, a real 2-process gloo
job under torchrun, and a SLURM-style job whose worker dies (the survivor must exit, not hang)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as tdist

from engine import distributed as dist
from engine.errors import UserError
from engine.loop import agree
from engine.signals import Halt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST",
               "SLURM_STEP_NODELIST", "SLURM_NODELIST")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_detect_launch_torchrun_slurm_and_single(monkeypatch):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)  # no scontrol: parse the node list ourselves
    assert dist.detect_launch({}) is None
    tr = dist.detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                             "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})
    assert tr == dist.LaunchEnv("torchrun", 3, 8, 1, "n1", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1"}
    assert dist.detect_launch(slurm) == dist.LaunchEnv("slurm", 5, 8, 1, "gpu07", dist.DEFAULT_MASTER_PORT)
    assert dist.detect_launch({**slurm, "MASTER_ADDR": "head"}).master_addr == "head"
    # a shell inside a multi-task allocation (no srun step) or a one-task step runs alone
    assert dist.detect_launch({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}) is None
    assert dist.detect_launch({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None
    with pytest.raises(UserError, match="RANK='x'"):
        dist.detect_launch({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("a[001-004]", "a001"), ("b[3,5-6],c2", "b3"),
                                            ("x-1,x-2", "x-1")])
def test_first_host(monkeypatch, nodelist, host):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)
    assert dist.first_host(nodelist) == host


def test_single_process_has_no_process_group(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    info = dist.init_distributed("cpu", "auto")
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.distributed) == (0, 1, 0, True, False)
    assert info.device == torch.device("cpu") and info.backend == "none"
    assert not tdist.is_initialized()
    t = torch.tensor([2.0])
    assert dist.all_reduce_sum(t) is t and t.item() == 2.0
    assert [agree(h, info) for h in Halt] == list(Halt)
    obj = {"a": 1}
    assert dist.broadcast_object(obj) is obj
    dist.barrier()
    dist.cleanup()
    if not torch.cuda.is_available():
        assert dist.init_distributed("auto").device == torch.device("cpu")
        with pytest.raises(UserError, match="train.device=cuda: CUDA is not available"):
            dist.init_distributed("cuda")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        dist.init_distributed("gpu")


def test_bad_timeout_env_is_a_user_error(monkeypatch):
    monkeypatch.setenv("MMVIT_DIST_TIMEOUT_S", "soon")
    with pytest.raises(UserError, match="MMVIT_DIST_TIMEOUT_S='soon'"):
        dist._timeout()
    monkeypatch.setenv("MMVIT_DIST_TIMEOUT_S", "90")
    assert dist._timeout().total_seconds() == 90


def test_auto_device_respects_the_gpus_a_task_sees(monkeypatch):
    """train.device=auto: cuda:LOCAL_RANK when every GPU of the node is visible, cuda:0 for a task
    bound to one GPU (it sees only that one), an error when ranks outnumber the GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist._pick_device("auto", 3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert dist._pick_device("auto", 3) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="local rank 5 needs a GPU of its own but only 4"):
        dist._pick_device("auto", 5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist._pick_device("auto", 3) == torch.device("cpu")


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from engine import distributed as dist
    from engine.loop import agree
    from engine.signals import Halt

    out = sys.argv[1]
    info = dist.init_distributed("cpu", "auto")
    total = dist.all_reduce_sum(torch.tensor([info.rank + 1.0])).item()
    flagged = agree(Halt.SIGNAL if info.rank == 1 else Halt.NONE, info).name   # only rank 1 got a signal
    failed = agree(Halt.FAILURE if info.rank == 0 else Halt.SIGNAL, info).name  # a failed write outranks it
    calm = agree(Halt.NONE, info).name
    got = dist.broadcast_object({"seed": 1234, "from": info.rank} if info.rank == 0 else None)
    dist.barrier()
    with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
        json.dump({"rank": info.rank, "world": info.world_size, "local": info.local_rank, "main": info.is_main,
                   "backend": info.backend, "distributed": info.distributed, "total": total,
                   "flagged": flagged, "failed": failed, "calm": calm, "got": got}, f)
    dist.cleanup()
""")


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["local"], res["main"]) == (r, 2, r, r == 0)
        assert res["backend"] == "gloo" and res["distributed"]
        assert res["total"] == 3.0
        assert (res["flagged"], res["failed"], res["calm"]) == ("SIGNAL", "FAILURE", "NONE")
        assert res["got"] == {"seed": 1234, "from": 0}


DYING = textwrap.dedent("""
    import os, sys, time
    import torch
    from engine import distributed as dist

    info = dist.init_distributed("cpu", "auto")
    print("joined", info.rank, info.world_size, flush=True)
    dist.all_reduce_sum(torch.ones(1))
    if info.rank == 1:
        if sys.argv[1] == "hangs":
            time.sleep(300)                # stuck, its sockets still open: only the timeout helps
        os._exit(17)                       # dies without a word
    dist.all_reduce_sum(torch.ones(1))     # the survivor must fail, not wait forever
    print("unreachable", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_slurm_launch_and_lost_worker_ends_the_survivor_in_bounded_time(tmp_path, failure):
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    port = str(_free_port())
    procs = []
    start = time.monotonic()
    for rank in range(2):
        env = _clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                         SLURM_JOB_NODELIST="localhost", MASTER_PORT=port, MMVIT_DIST_TIMEOUT_S="8")
        procs.append(subprocess.Popen([sys.executable, str(script), failure], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        out0, err0 = procs[0].communicate(timeout=90)
        assert time.monotonic() - start < 60     # startup + at most one 8 s timeout
        assert procs[0].returncode != 0 and "unreachable" not in out0, (out0, err0)
        assert "joined 0 2" in out0, err0
        if failure == "hangs":
            assert "Timed out" in err0 or "timeout" in err0.lower(), err0[-2000:]
            assert procs[1].poll() is None       # the survivor gave up while its peer still hung
        else:
            assert procs[1].wait(timeout=30) == 17
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
