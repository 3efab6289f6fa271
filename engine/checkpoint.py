"""Checkpoints that survive crashes and never execute code when loaded.

The format (``FORMAT_VERSION`` 1; written by ``engine.run.training_state``) is a plain dict:

    model              the model's state dict (unwrapped: no ``module.`` / ``_orig_mod.`` prefixes)
    model_ema          the EMA weights' state dict, or None without ``train.ema``
    optimizer          AdamW's state dict
    scaler             the fp16 GradScaler's state dict, or None
    epoch              the last completed epoch (0-based, as in log.jsonl)
    step               optimizer steps done in all, skipped ones included (the lr is a function of it)
    epoch_step         0, or for a mid-epoch checkpoint (written on a stop signal) the optimizer
                       steps of epoch ``epoch + 1`` already done
    epoch_sums         with epoch_step > 0: that epoch's running sums so far (loss, grad_norm,
                       good, skipped, ... steps; ``engine.loop.EpochSums``), so that its log row
                       averages over all its steps; else None
    consecutive_skips  skipped optimizer steps in a row so far (``train.max_consecutive_skips``)
    best               {"metric", "value", "epoch"} of the best evaluation so far
    rng                {"ranks": [one python/numpy/torch/CUDA RNG state per rank]} (``capture_rng_state``;
                       CUDA: the state of the rank's own device)
    config             the run's config as YAML text (``engine.config.dump_config``)
    classes            the training set's class names by label, or None when it has none
    format_version     ``FORMAT_VERSION``

Every leaf is a tensor or a plain python value, so ``torch.load(path, weights_only=True)``
reads it. ``load_checkpoint`` is the one reader of checkpoint files and URLs, ours and others'
(DeiT's, the paper's code's, safetensors); the ``model`` key is the one DeiT's and the paper's
code use too, so their weights go into a model through the same door (``models.load_weights``).

Writes are atomic: a temp file in the same directory, fsync, ``os.replace``, fsync of the
directory. A crash or a full disk at any moment leaves the previous file whole.

Run directory layout kept by ``CheckpointManager``::

    last.pth                     every epoch (the resume point)
    best.pth                     the epoch with the best metric so far
    checkpoint-epoch0007.pth     the top-k epochs by metric
    topk.json                    metric of every epoch, best entry, top-k list (rebuilds the manager on resume)

best/top-k files are hard links to the ``last.pth`` written in the same call when the file
system allows it (no extra I/O or space), else byte copies.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import threading
import warnings
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import UserError, one_line_reason, write_error

FORMAT_VERSION = 1
LAST = "last.pth"
BEST = "best.pth"
INDEX = "topk.json"
_EPOCH_RE = re.compile(r"^checkpoint-epoch(\d+)\.pth$")
_TMP_RE = re.compile(r"^\.(.+)\.tmp-(\d+)$")

PathLike = Union[str, "os.PathLike[str]"]


def epoch_filename(epoch: int) -> str:
    return f"checkpoint-epoch{epoch:04d}.pth"


# ---------------------------------------------------------------- RNG state

def capture_rng_state() -> Dict[str, Any]:
    """python, numpy and torch CPU generator states, and that of this process's current CUDA device
    when it has used CUDA, as tensors and plain values only (``weights_only``-loadable). Only its
    own device: a rank's stream must follow the rank, whichever device index a later job binds it
    to, and touching the other GPUs would put a context of this process on each."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``: later draws equal the draws after the capture. Parts
    missing from ``state`` are left alone; the CUDA state goes to the current device."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = npy["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        device = torch.cuda.current_device()
        # one state: this rank's own; several: every GPU the process saw, by index
        own = cuda_states[device] if 1 < len(cuda_states) and device < len(cuda_states) else cuda_states[0]
        torch.cuda.set_rng_state(own.cpu(), device)


# ---------------------------------------------------------------- atomic writes

_PLAIN = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the entry if ``obj`` holds anything ``weights_only`` loading
    refuses (numpy arrays/scalars, custom classes, ...). A bug caught here costs nothing;
    caught at resume time it costs the checkpoint."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}; "
                    "only tensors and plain python values load with weights_only=True")


class _Sink:
    """File wrapper for ``torch.save`` that remembers the OS error of a failed write (torch
    reports it as an opaque RuntimeError otherwise)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _tmp_path(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    """Make a rename durable; some file systems cannot fsync a directory, which is fine."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write(file)`` into a temp file next to ``path``, fsync it, rename it onto ``path``.
    On failure the temp file is removed, ``path`` keeps its old content, and an OSError becomes
    a UserError naming ``path`` and the OS reason."""
    path = os.path.abspath(path)
    tmp = _tmp_path(path)
    try:
        _remove_quietly(tmp)  # a stale temp may be a hard link to a live file: never write through it
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise write_error(path, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Write ``state`` to ``path`` atomically (see module doc); raises TypeError before writing
    anything if ``state`` would not load with ``weights_only=True``."""
    check_plain(state)
    path = os.fspath(path)

    def write(f: BinaryIO) -> None:
        sink = _Sink(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise

    _atomic_write(path, write)


def _write_json(path: str, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    _atomic_write(path, lambda f: f.write(data))


def _replicate(src: str, dst: str) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically: a hard link when the file system allows,
    else a copy."""
    tmp = _tmp_path(os.path.abspath(dst))
    _remove_quietly(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        def copy(f: BinaryIO) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 16 << 20)
        _atomic_write(dst, copy)
        return
    try:
        os.replace(tmp, dst)
    except OSError as e:
        _remove_quietly(tmp)
        raise write_error(dst, e) from None
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


# ---------------------------------------------------------------- loading

# The one non-tensor class checkpoints may hold: DeiT's main.py saves its argparse arguments.
SAFE_GLOBALS = (argparse.Namespace,)


def load_checkpoint(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """The checkpoint dict at ``path``, a file or a URL (``download_checkpoint``), never executing
    pickled code: ``.pth``/``.pt`` with ``torch.load(weights_only=True)``, with one class allowed
    besides tensors and plain values, ``argparse.Namespace`` (DeiT's ``main.py``, which the paper's
    code uses, stores its ``args`` in every checkpoint), for that load only; ``.safetensors`` as
    ``{"model": state_dict[, "config": metadata["config"]]}``. ``mmap`` maps tensors lazily (cheap
    inspection of a big file). Every failure is a one-line UserError naming the path: missing, a
    directory, truncated or corrupt, not a dict, or holding pickled objects."""
    path = os.fspath(path)
    if is_url(path):
        path = download_checkpoint(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory, not a file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, map_location)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        # a refused class/function means real pickled objects; an odd opcode means junk bytes
        if refused or re.search(r"Unsupported (global|class)|unrecognized function|Can only build", str(e)):
            what = f" ({refused.group(1)})" if refused else ""
            raise UserError(
                f"{path} holds pickled Python objects{what} that loading would execute; refused (a checkpoint "
                "may hold tensors, plain values and argparse.Namespace): re-save its weights from the program "
                "that wrote it, e.g. torch.save({'model': model.state_dict()}, path)") from None
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({one_line_reason(e)})") from None
    except RuntimeError as e:
        if mmap and "mmap can only be used" in str(e):  # legacy (non-zip) format: read it whole
            return load_checkpoint(path, map_location)
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({one_line_reason(e)})") from None
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or one_line_reason(e)}") from None
    except (EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({one_line_reason(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _read_safetensors(path: str, map_location: Any) -> Dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or not a safetensors file ({one_line_reason(e)})") from None
    out: Dict[str, Any] = {"model": state_dict}
    if "config" in metadata:
        out["config"] = metadata["config"]
    return out


def is_url(path: str) -> bool:
    return re.match(r"^(https?|file)://", str(path)) is not None


def download_checkpoint(url: str) -> str:
    """The local file a checkpoint URL names. A ``file://`` URL is read in place; an http(s) one is
    downloaded once into torch.hub's cache, in a folder of its own named by a hash of the whole URL
    (``$TORCH_HOME/hub/checkpoints/<URL hash>/<file name>``): two URLs with one file name never
    share a copy. A file name with a hash part (``name-<sha256 prefix>.pth``, as DeiT's releases)
    is checked; a download that fails, fails that check or does not load as a checkpoint leaves
    nothing in the cache. Under DDP the main rank downloads while the others wait, then reuse its
    copy."""
    from urllib.parse import unquote, urlparse

    from .distributed import barrier, is_main_process

    parsed = urlparse(url)
    name = os.path.basename(unquote(parsed.path))
    if not name:
        raise UserError(f"{url}: the URL names no file")
    match = torch.hub.HASH_REGEX.search(name)
    hash_prefix = match.group(1) if match else None
    if parsed.scheme == "file":
        return _file_url_path(url, hash_prefix)
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", url_hash, name)
    main = is_main_process()
    if not main:
        barrier()
    try:
        if main and not os.path.isfile(path):
            _download(url, path, hash_prefix)
    finally:
        if main:
            barrier()
    if not os.path.isfile(path):  # another rank's download failed and said why
        raise UserError(f"cannot download {url}: the main process could not")
    return path


def _file_url_path(url: str, hash_prefix: Optional[str]) -> str:
    """The path a ``file://`` URL names, checked against the hash part of its name."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise UserError(f"{url}: a file URL names an absolute path on this machine, e.g. file:///runs/x/last.pth")
    path = url2pathname(parsed.path)
    if not os.path.isfile(path):
        raise UserError(f"{url}: no such file {path}")
    if hash_prefix:
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        if not digest.startswith(hash_prefix):
            raise UserError(f"{url}: the file's SHA-256 ({digest[:16]}...) does not start with {hash_prefix}, the hash "
                            "in its name: it is not the file the name promises")
    return path


def _download(url: str, path: str, hash_prefix: Optional[str]) -> None:
    """``url`` into ``path`` through a temp file beside it, kept only when it passes the hash check
    and loads as a checkpoint."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.getpid()}.{os.path.basename(path)}")  # the suffix decides how it is read
    try:
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, tmp, hash_prefix, progress=False)
        load_checkpoint(tmp, mmap=True)
        os.replace(tmp, path)
    except UserError as e:  # the download does not load as a checkpoint
        raise UserError(f"{str(e).replace(tmp, url)}; nothing was kept in the cache") from None
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise UserError(f"cannot download {url}: {one_line_reason(e)}") from None
    finally:
        _remove_quietly(tmp)
        with contextlib.suppress(OSError):  # the URL's folder, unless it holds the checkpoint
            os.rmdir(folder)


def _probe(path: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """(mmap-loaded checkpoint, "") if ``path`` loads, else (None, the reason)."""
    try:
        return load_checkpoint(path, mmap=True), ""
    except UserError as e:
        return None, str(e)


# ---------------------------------------------------------------- run directory

class CheckpointManager:
    """Keeps ``last.pth``, ``best.pth`` and the top-k epoch checkpoints of one run directory.

    Only the main rank writes (``is_main``); on the others every method is a no-op. The metric
    of every epoch, the best entry and the top-k list live in ``topk.json``, so a manager built
    on a resumed run directory continues the same ranking. Epoch files whose metric is not in
    ``topk.json`` (e.g. copied in by hand) are never deleted."""

    def __init__(self, run_dir: PathLike, keep_top_k: int, metric: str = "val_top1", mode: str = "max",
                 is_main: bool = True):
        if mode not in ("max", "min"):
            raise UserError(f"checkpoint metric mode must be 'max' or 'min', got {mode!r}")
        self.run_dir = os.fspath(run_dir)
        self.keep_top_k = keep_top_k
        self.metric = metric
        self.mode = mode
        self.is_main = is_main
        self.history: Dict[int, float] = {}  # epoch -> metric value
        self.best: Optional[Dict[str, Any]] = None
        self._writer: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        if is_main:
            self._read_index()
            self._remove_stale_temps()

    # -- persistence
    def _index_path(self) -> str:
        return os.path.join(self.run_dir, INDEX)

    def _read_index(self) -> None:
        path = self._index_path()
        if not os.path.isfile(path):
            return
        try:
            with open(path) as f:
                index = json.load(f)
            if index.get("metric") != self.metric or index.get("mode") != self.mode:
                warnings.warn(f"{path} ranks by {index.get('metric')} ({index.get('mode')}), not {self.metric} "
                              f"({self.mode}); starting a new ranking (existing epoch files are kept)")
                return
            self.history = {int(k): float(v) for k, v in index["history"].items()}
            self.best = index.get("best")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.history, self.best = {}, None
            warnings.warn(f"{path} is unreadable ({one_line_reason(e)}); starting a new top-k ranking "
                          "(existing epoch files are kept)")

    def _write_index(self) -> None:
        _write_json(self._index_path(), {
            "metric": self.metric, "mode": self.mode, "best": self.best, "top_k": self.top_k_epochs(),
            "history": {str(e): v for e, v in sorted(self.history.items())},
        })

    def _remove_stale_temps(self) -> None:
        """Temp files of writers killed mid-write (e.g. ``kill -9``) would fill the disk."""
        if not os.path.isdir(self.run_dir):
            return
        for name in os.listdir(self.run_dir):
            m = _TMP_RE.match(name)
            if m and not pid_alive(int(m.group(2))):
                _remove_quietly(os.path.join(self.run_dir, name))

    # -- ranking
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def top_k_epochs(self) -> List[int]:
        """Epochs in the top k by metric, best first (a newer epoch wins a tie)."""
        sign = 1.0 if self.mode == "max" else -1.0
        ranked = sorted(self.history.items(), key=lambda ev: (sign * ev[1], ev[0]), reverse=True)
        return [e for e, _ in ranked[: self.keep_top_k]]

    def _prior_best(self, state: Dict[str, Any], epoch: int) -> Optional[Dict[str, Any]]:
        """The best of earlier epochs, from ``topk.json`` or from the resumed state (the better one:
        a crash between writing last.pth and topk.json leaves the newer best only in the state)."""
        found = None
        for cand in (self.best, state.get("best")):
            if (isinstance(cand, dict) and cand.get("metric") == self.metric and cand.get("value") is not None
                    and cand.get("epoch") is not None and cand["epoch"] < epoch
                    and (found is None or self._better(cand["value"], found["value"]))):
                found = dict(cand)
        return found

    # -- public
    def save(self, state: Dict[str, Any], epoch: int, metric_value: Optional[float] = None) -> None:
        """Write ``last.pth``; ``best.pth`` if ``metric_value`` beats the best so far (``state["best"]``
        is set to the new best first); ``checkpoint-epoch{E:04d}.pth`` if the epoch is in the top k,
        deleting the ones that drop out. ``metric_value`` None (no eval this epoch) writes only
        ``last.pth``. Epochs after ``epoch`` (a run rewound to an older checkpoint) are forgotten."""
        if not self.is_main:
            return
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run dir {self.run_dir}: {e.strerror or e}") from None
        if metric_value is not None and not math.isfinite(metric_value):
            metric_value = None  # a NaN metric cannot be ranked
        prior = self._prior_best(state, epoch)
        improved = metric_value is not None and (prior is None or self._better(float(metric_value), prior["value"]))
        best = {"metric": self.metric, "value": float(metric_value), "epoch": int(epoch)} if improved else prior
        if best is not None:
            state["best"] = dict(best)

        last = os.path.join(self.run_dir, LAST)
        save_checkpoint(state, last)
        if improved:
            _replicate(last, os.path.join(self.run_dir, BEST))
        self.best = best
        stale = sorted(e for e in self.history if e > epoch)
        for e in stale:
            del self.history[e]
        if metric_value is None and not stale:
            return
        if metric_value is not None:
            self.history[int(epoch)] = float(metric_value)
        keep = set(self.top_k_epochs())
        # index first: a crash before the file is written costs one missing file, never an
        # epoch file that no ranking knows about
        self._write_index()
        if epoch in keep and metric_value is not None:
            _replicate(last, os.path.join(self.run_dir, epoch_filename(epoch)))
        self._delete_unkept(keep, stale)

    def _delete_unkept(self, keep: set, stale: List[int]) -> None:
        """Remove epoch files of forgotten epochs and, with top-k on, of ranked epochs outside it."""
        for name in os.listdir(self.run_dir):
            m = _EPOCH_RE.match(name)
            if not m:
                continue
            e = int(m.group(1))
            if e in stale or (self.keep_top_k > 0 and e in self.history and e not in keep):
                _remove_quietly(os.path.join(self.run_dir, name))

    def save_in_background(self, state: Dict[str, Any], epoch: int, metric_value: Optional[float] = None) -> None:
        """``save`` in a thread, from a copy of ``state`` taken now (tensors copied to the CPU), so
        that the other ranks do not wait for rank 0's disk: training goes on while the file is
        written. One write at a time: a second call first waits for the previous one. ``failed``
        tells at once whether the write has failed; ``wait`` joins it and raises its error (disk
        full, ...), if any."""
        if not self.is_main:
            return
        self.wait()
        snapshot = _cpu_copy(state)

        def write() -> None:
            try:
                self.save(snapshot, epoch, metric_value)
            except BaseException as e:  # handed to the main thread by wait()
                self._error = e

        self._writer = threading.Thread(target=write, name="checkpoint-writer")
        self._writer.start()

    def failed(self) -> bool:
        """Whether a background write has failed (without waiting for one still running)."""
        return self._error is not None

    def wait(self) -> None:
        """Wait for a ``save_in_background`` to finish; raise the error it met."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU (lists, tuples and dicts rebuilt, the rest shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_resume_checkpoint(resume: str, run_dir: PathLike) -> Optional[str]:
    """Which checkpoint ``train.resume`` means.

    ``none`` → None. A path → that file (a directory means its ``last.pth``); it must exist.
    ``auto`` → ``run_dir/last.pth`` if it loads; if it is missing or unreadable, the newest
    loadable ``checkpoint-epoch*.pth``/``best.pth`` with a warning; None for a fresh run dir.
    An unreadable ``last.pth`` with nothing to fall back on is a UserError (restarting from
    scratch silently would overwrite the run)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = os.path.join(resume, LAST) if os.path.isdir(resume) else resume
        if not os.path.isfile(path):
            raise UserError(f"train.resume: {path} does not exist (use auto, none or a checkpoint path)")
        return path
    run_dir = os.fspath(run_dir)
    last = os.path.join(run_dir, LAST)
    if os.path.isfile(last):
        ckpt, problem = _probe(last)
        if ckpt is not None:
            return last
    else:
        problem = f"{last} is missing"
    if not os.path.isdir(run_dir):
        return None
    found: List[Tuple[int, str]] = []
    for name in os.listdir(run_dir):
        if _EPOCH_RE.match(name) or name == BEST:
            ckpt, _ = _probe(os.path.join(run_dir, name))
            if ckpt is not None and isinstance(ckpt.get("epoch"), int):
                found.append((ckpt["epoch"], os.path.join(run_dir, name)))
    if not found:
        if os.path.isfile(last):
            raise UserError(f"{problem}; no other checkpoint in {run_dir} loads. Move the run dir away or pass "
                            "train.resume=none to start over")
        return None
    epoch, path = max(found)
    warnings.warn(f"{problem}; resuming from {path} (epoch {epoch}) instead")
    return path
