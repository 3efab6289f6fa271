"""The files of the sweep tools: scripts/sweep.py writes them, scripts/report.py reads them. Plain
Python (no torch), so that the report runs anywhere the run directories can be read.

Each run directory holds ``TRAIN_LOG`` and ``EVAL_LOG``: the output of every train.py / eval.py call
on it, each between a ``call_start`` and a ``call_end`` line (``read_call`` finds a call's outcome);
``EVAL_JSON``, eval.py's result for ``last.pth`` (``eval_is_current``). The sweep's output directory
holds ``MANIFEST``, the sweep file's runs.
"""
from __future__ import annotations

import os
import re
import shlex
import time
from typing import List, Optional, Tuple

MANIFEST = "sweep.json"     # in the sweep's output_dir: the sweep file's runs
EVAL_JSON = "eval.json"     # in each run directory: eval.py's result for last.pth
TRAIN_LOG = "train.log"     # in each run directory: the output of every train.py call, and
EVAL_LOG = "eval.log"       # of every eval.py call, each between a call_start and a call_end line
_CALL_END = re.compile(r"^=== \S+ exit (-?\d+)$")
_EXPLAINS = re.compile(r"^\w+\.py: (error|warning): ")


def call_start(command: List[str]) -> str:
    """The line that opens a call's output in ``TRAIN_LOG``/``EVAL_LOG``."""
    return f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(command)}\n"


def call_end(status: int) -> str:
    """The line that closes it, with the exit status (negative: killed by that signal)."""
    return f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} exit {status}\n"


def read_call(path: str, offset: Optional[int] = None) -> Tuple[Optional[int], str]:
    """The exit status of the last call in a ``TRAIN_LOG``/``EVAL_LOG`` (None: not ended, or no log)
    and the line that explains it: its last ``<script>.py: error:``/``warning:`` line, else its
    last line. ``offset``: everything written from there on is the call (another process may
    have written into the log meanwhile)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset or 0)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None, ""
    if offset is None:
        starts = [i for i, line in enumerate(lines) if line.startswith("=== ") and not _CALL_END.match(line)]
        lines = lines[starts[-1]:] if starts else lines
    status, said = None, [line for line in lines if not line.startswith("=== ")]
    for line in lines:
        end = _CALL_END.match(line)
        if end:
            status = int(end.group(1))
    explained = [line for line in said if _EXPLAINS.match(line)]
    return status, ((explained or said or [""])[-1])[:300]


def eval_is_current(run_dir: str) -> bool:
    """Whether ``run_dir`` holds an ``eval.json`` no older than its ``last.pth`` (or without one)."""
    result, last = os.path.join(run_dir, EVAL_JSON), os.path.join(run_dir, "last.pth")
    return os.path.isfile(result) and (not os.path.exists(last) or os.path.getmtime(result) >= os.path.getmtime(last))
