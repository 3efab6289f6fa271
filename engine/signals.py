"""Stop signals: a resumable checkpoint and exit 75, on every rank together, within a step or two.

SIGTERM (``scancel``, ``timeout``, torchrun passing it on), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
``--signal`` before the time limit) are handled by ``StopSignals`` from train.py's first line to
the process's exit, in three phases:

- **setup** (nothing of the run is written yet): a signal raises ``Interrupted`` at once; train.py
  says so in one line and exits 128 + the signal's number (130 for Ctrl-C).
- **training** (after ``defer``): a signal only sets a flag. Every rank adds its ``Halt`` to each
  optimizer step's loss all-reduce, so all ranks see every request and stop after the same step;
  the loop reads that agreement one step late, which never makes the host wait for the step the
  device is running. A failed write on rank 0 (``watch``) is a request too, which all ranks obey.
  Where nothing of this job is unsaved, an ``immediate`` window raises ``Interrupted`` again
  instead: the job's first step (under ``train.compile`` the compilation, minutes on a GPU) and
  evaluation, so that neither holds a stop past the launcher's grace time (torchrun and SLURM
  kill 30 s after their signal by default).
- **final** (``finish``, from the decision to exit on): the signals are ignored at the OS level,
  so none can change the exit code chosen while the process saves, tears down and exits.

Launchers and terminals signal the whole process group, so helper processes ignore these signals
and outlive the save (the main process shuts them down as usual): DataLoader workers
(``protect_workers``; they start with the signals blocked, ``shielded_batches``, and set them to
ignored from their first instruction on) and Inductor's compile workers (``start_compile_workers``:
started with the signals blocked, which they keep).
"""
from __future__ import annotations

import contextlib
import enum
import functools
import signal
from typing import Callable, Iterable, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """A stop signal where nothing needs saving. A BaseException, as KeyboardInterrupt, so that no
    ``except Exception`` on the way (torch.compile has some) takes it for an error to recover from."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


class Halt(enum.IntEnum):
    """Why training must stop now: a stop signal (save, exit 75) or a failed write (exit 2)."""

    NONE = 0
    SIGNAL = 1
    FAILURE = 2


class StopSignals:
    """The stop signals of one training process (see the module doc for the phases). ``received``:
    the first one's number. ``restore``: put the previous handlers back on leaving the block (a
    caller that goes on living); train.py run as a script keeps them, so that the final phase
    lasts through interpreter shutdown."""

    def __init__(self, restore: bool = True):
        self.received: Optional[int] = None
        self._restore = restore
        self._previous = {}
        self._immediate = False
        self._failed: Callable[[], bool] = lambda: False

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._immediate = True  # (one that came while the handlers went in is raised by ``defer``)
        return self

    def _handle(self, signum, frame) -> None:
        # only a flag (or the exception): printing here could re-enter a half-written stdout buffer
        if self.received is None:
            self.received = signum
        if self._immediate:
            raise Interrupted(signum)

    def defer(self) -> None:
        """End of setup: from now on a signal is a request to stop at the next safe point."""
        self._immediate = False
        if self.received is not None:
            raise Interrupted(self.received)

    def watch(self, failed: Callable[[], bool]) -> None:
        """Make ``failed()`` (a write that failed on this rank) a reason to stop too."""
        self._failed = failed

    def __call__(self) -> bool:
        return self.received is not None

    def halt(self) -> Halt:
        """This rank's request: a failed write outranks a signal (it must not end in a save)."""
        if self._failed():
            return Halt.FAILURE
        return Halt.SIGNAL if self.received is not None else Halt.NONE

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop signal"

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """A window where a signal (or one already received) raises ``Interrupted`` at once, and so
        does any error once one was received: another rank that stopped, a helper the same signal
        ended."""
        if self.received is not None:
            raise Interrupted(self.received)
        before, self._immediate = self._immediate, True
        try:
            yield
        except Exception:
            if self.received is not None:
                raise Interrupted(self.received) from None
            raise
        finally:
            self._immediate = before

    def finish(self) -> None:
        """The decision to exit is made: ignore the stop signals from now on (``SIG_IGN`` survives
        interpreter shutdown, which resets Python-level handlers to the default action)."""
        self._immediate = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        if self._restore:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # also discards one that arrived while blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if then is not None:
        then(worker_id)


def protect_workers(*loaders) -> None:
    """Make the workers of these DataLoaders ignore the stop signals (before any ``worker_init_fn``
    they already have)."""
    for loader in loaders:
        if getattr(loader.worker_init_fn, "func", None) is not _ignore_stop_signals:
            loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=loader.worker_init_fn)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_END = object()


def shielded_batches(loader: Iterable) -> Iterator:
    """The batches of ``loader``; its worker processes (started by the first ``next``) begin
    life with the stop signals blocked, so one sent to the process group just then cannot kill
    a worker before it has set them to ignored. A signal meanwhile waits for the main process."""
    with _stop_signals_blocked():
        batches = iter(loader)
        first = next(batches, _END)
    if first is _END:
        return
    yield first
    yield from batches


def start_compile_workers() -> None:
    """Start Inductor's compile worker processes now (where Inductor uses them: with Triton), with
    the stop signals blocked: the processes inherit the mask and keep it, so a signal to the
    process group leaves them alive for the compilations after it (evaluation) and for their
    orderly shutdown at exit."""
    with _stop_signals_blocked():
        from torch._inductor import async_compile  # some torch versions start the pool on this import

        warm = getattr(async_compile, "maybe_warm_pool", None)
        if warm is not None:
            warm()
