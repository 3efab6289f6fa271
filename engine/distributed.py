"""Process-group plumbing for one process, ``torchrun`` and SLURM (``srun``) launches.

``init_distributed`` reads the launcher's environment and returns a ``DistInfo``; every helper
below is a no-op (or the identity) when there is a single process, so the training loop calls
them unconditionally. The process group gets a bounded timeout (``MMVIT_DIST_TIMEOUT_S``,
default 30 min): a collective that waits on a dead worker raises instead of hanging forever.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as tdist

from .errors import UserError

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``distributed`` is False for a single process
    (then there is no process group and ``backend`` is ``"none"``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: str
    distributed: bool


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout and rendezvous address that a launcher put in the environment."""

    launcher: str          # torchrun | slurm
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list, e.g. ``"gpu[07-09,12],cpu1"`` → ``"gpu07"``; asks
    ``scontrol show hostnames`` when it is installed, else expands the first entry itself."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to parsing the list ourselves
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"cannot read the first host of SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is part of the name: keep it
    return prefix + first


def detect_launch(env: Mapping[str, str]) -> Optional[LaunchEnv]:
    """The launch described by ``env``: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), a SLURM
    task started by ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, with a step id),
    or None for a single process. torchrun wins inside SLURM (``srun torchrun ...``). A shell of
    a multi-task allocation (``salloc -n 4``, no ``srun``) has no step id and runs alone, instead of
    waiting for peers that were never started."""
    port = _env_int(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"),
                         _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                         env.get("MASTER_ADDR", "127.0.0.1"), port)
    has_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and has_step:
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _env_int(env, ntasks_key)
        if world <= 1:
            return None
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise UserError("SLURM launch without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master host")
            addr = first_host(nodelist)
        return LaunchEnv("slurm", _env_int(env, "SLURM_PROCID"), world,
                         _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, addr, port)
    return None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        visible = torch.cuda.device_count()
        if visible == 1:  # a task bound to its own GPU (srun --gpus-per-task, CUDA_VISIBLE_DEVICES) sees cuda:0
            return torch.device("cuda", 0)
        if local_rank >= visible:
            raise UserError(f"train.device=auto: local rank {local_rank} needs a GPU of its own but only {visible} "
                            "are visible on this node; start at most one process per GPU")
        return torch.device("cuda", local_rank)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"train.device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device={device}: CUDA is not available on this machine (use auto or cpu)")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device={device}: GPU {index} requested (local rank {local_rank}) but only "
                            f"{torch.cuda.device_count()} visible")
        dev = torch.device("cuda", index)
    return dev


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"train.dist_backend=nccl needs CUDA devices, but the device is {device}; use gloo or auto")
    if not tdist.is_backend_available(backend):
        raise UserError(f"train.dist_backend={backend!r} is not available in this PyTorch build (use auto, nccl or gloo)")
    return backend


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("MMVIT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UserError(f"MMVIT_DIST_TIMEOUT_S={raw!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group described by the environment (if any) and pick this rank's device.

    ``device``: auto (``cuda:LOCAL_RANK`` when CUDA is available, ``cuda:0`` when the process sees
    a single GPU, else cpu) | cpu | cuda | cuda:N.
    ``backend``: auto (nccl on CUDA, gloo on CPU) | nccl | gloo. Calling it again after the group
    exists returns the same layout without re-initialising."""
    launch = detect_launch(os.environ)
    if launch is None or launch.world_size == 1:
        dev = _pick_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, 0, dev, True, "none", False)
    if not 0 <= launch.rank < launch.world_size:
        raise UserError(f"{launch.launcher}: rank {launch.rank} is outside world size {launch.world_size}")
    dev = _pick_device(device, launch.local_rank)
    name = _pick_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        # env:// rendezvous reads these; SLURM does not set them
        os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                          LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=launch.master_addr,
                          MASTER_PORT=str(launch.master_port))
        tdist.init_process_group(backend=name, init_method="env://", rank=launch.rank,
                                 world_size=launch.world_size, timeout=_timeout())
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, dev, launch.rank == 0,
                    tdist.get_backend(), True)


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0 of the process group, and in a process without one."""
    return not _active() or tdist.get_rank() == 0


def cleanup() -> None:
    """Leave the process group (safe to call when there is none)."""
    if _active():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank."""
    if _active():
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it (unchanged with one process). With nccl
    the tensor must live on this rank's GPU."""
    if _active():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled between our own processes only)."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
