"""Run logging: console progress, ``log.jsonl`` (one line per epoch), ``summary.csv``, TensorBoard.

Only the main process writes; on other ranks every method is a no-op.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from .errors import UserError, write_error

if TYPE_CHECKING:  # a type hint only: importing this module (read_jsonl) needs no torch
    import torch.nn as nn


def console(msg: str, is_main: bool = True) -> None:
    if is_main:
        print(msg, flush=True)


class Progress:
    """Progress of one epoch with ETA and img/s: a live bar on a TTY, a plain line otherwise (logs
    of batch jobs stay readable). The caller counts images every step and shows a line when it
    wants one; ``start`` is the step a resumed epoch starts after."""

    def __init__(self, total: int, desc: str, is_main: bool, start: int = 0):
        self.total, self.desc, self.is_main, self.start = total, desc, is_main, start
        self.tty = is_main and sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self.images = 0

    def count(self, images: int) -> None:
        """``images`` processed in one step (all ranks)."""
        self.images += images

    def show(self, step: int, **metrics: float) -> None:
        """Print where the epoch is at ``step`` (1-based), with ``metrics``."""
        if not self.is_main:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step - self.start) * (self.total - step)
        stats = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = f"{self.desc} {step}/{self.total} {stats} {self.images_per_second:.0f} img/s eta {_hms(eta)}"
        if self.tty:
            filled = int(20 * step / max(1, self.total))
            print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {line}", end="\n" if step == self.total else "", flush=True)
        else:
            print(line, flush=True)

    @property
    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.images / elapsed if elapsed > 0 else 0.0


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLogger:
    """Writes the run directory's logs. ``log_epoch`` appends one JSON line and rewrites
    ``summary.csv``; scalars and modulator parameters also go to TensorBoard. A resumed run passes
    ``purge_step`` (its first step): TensorBoard hides what an earlier job logged from there on,
    which the resumed run logs again.

    No method raises for a failed write (disk full, read-only): the first failure is kept as a
    one-line UserError naming the path (``failed``, ``check``) and nothing more is written, so
    that train.py stops every rank together at its next step (``engine.signals``)."""

    def __init__(self, run_dir: str, is_main: bool, tensorboard: bool = True, purge_step: Optional[int] = None):
        self.run_dir, self.is_main = run_dir, is_main
        self.jsonl = os.path.join(run_dir, "log.jsonl")
        self.csv = os.path.join(run_dir, "summary.csv")
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self.tb = None
        self.error: Optional[UserError] = None
        self._excepthook = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._excepthook = threading.excepthook
            threading.excepthook = _quiet_tensorboard_thread(self._excepthook)
            with self._writing(self.tb_dir):
                self.tb = SummaryWriter(log_dir=self.tb_dir, purge_step=purge_step)

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if self.error is None:
                self.error = write_error(path, e)

    def failed(self) -> bool:
        return self.error is not None

    def check(self) -> None:
        """Raise the write failure met so far, if any."""
        if self.error is not None:
            raise self.error

    def log_epoch(self, record: Dict[str, Any], step: int) -> None:
        if not self.is_main or self.error:
            return
        with self._writing(self.jsonl):
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        with self._writing(self.csv):
            self._write_summary()
        self.scalars({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, step)
        with self._writing(self.tb_dir):
            if self.tb is not None and not self.error:
                self.tb.flush()  # the epoch's events on disk, and a failed background write reported now

    def _write_summary(self) -> None:
        rows = read_jsonl(self.jsonl)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        tmp = self.csv + ".tmp"
        try:
            with open(tmp, "w", newline="") as f:
                f.write(buf.getvalue())
            os.replace(tmp, self.csv)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def scalars(self, values: Dict[str, Any], step: int) -> None:
        if self.tb is None or self.error:
            return
        with self._writing(self.tb_dir):
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def modulators(self, mods: Dict[str, nn.Module], step: int, figure: bool = False) -> None:
        """Every SegLU's ``ranges``/``ts`` entries as scalars (and optionally σ curves as a figure)."""
        if self.tb is None or self.error or not mods:
            return
        # imported here: importing this module (read_jsonl) needs no torch
        from models.multimax import ModulatorParams

        params = {name: ModulatorParams.of(mod) for name, mod in mods.items()}
        with self._writing(self.tb_dir):
            for name, p in params.items():
                for pname in ("ranges", "ts"):
                    for i, v in enumerate(getattr(p, pname).tolist()):
                        self.tb.add_scalar(f"modulators/{name}/{pname}[{i}]", v, step)
            if figure:
                from .plots import modulator_figure

                self.tb.add_figure("modulators/curves", modulator_figure(params), step)

    def text(self, tag: str, text: str) -> None:
        if self.tb is not None and not self.error:
            with self._writing(self.tb_dir):
                self.tb.add_text(tag, text)

    def close(self) -> None:
        """Flush and close TensorBoard (a failure is kept, as any other)."""
        if self.tb is not None:
            with self._writing(self.tb_dir):
                if not self.error:
                    self.tb.flush()
            with self._writing(self.tb_dir):
                self.tb.close()
            self.tb = None
        if self._excepthook is not None:
            threading.excepthook, self._excepthook = self._excepthook, None


def _quiet_tensorboard_thread(previous):
    """A ``threading.excepthook`` that leaves out the traceback of TensorBoard's writer thread
    failing to write: TensorBoard raises the error again in the main thread at its next call,
    where ``RunLogger`` reports it in one line."""
    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            return
        previous(args)
    return hook


def read_jsonl(path: str, problems: Optional[List[str]] = None) -> list:
    """The records (JSON objects) of a ``log.jsonl``; a last line cut by a crash is ignored. Other
    lines that are not records are skipped, and a file that cannot be read has none; with a
    ``problems`` list, each such finding is added to it (without, an unreadable file raises OSError)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, errors="replace") as f:
            lines = f.read().split("\n")  # the last piece is "" or a line cut by a crash
    except OSError as e:
        if problems is None:
            raise
        problems.append(f"{path}: unreadable ({e.strerror or e})")
        return []
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            rows.append(record)
        elif line.strip() and number < len(lines):
            bad.append(number)
    if bad and problems is not None:
        problems.append(f"{path}: {len(bad)} line(s) are not JSON records (line {', '.join(map(str, bad[:5]))}"
                        f"{' ...' if len(bad) > 5 else ''}), skipped")
    return rows


def truncate_jsonl(path: str, last_epoch: int) -> None:
    """On resume, drop the records of epochs after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_jsonl(path) if r.get("epoch", -1) <= last_epoch]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
