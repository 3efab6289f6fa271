"""Errors that mean "the user asked for something that cannot work" (bad config, missing path,
mismatched checkpoint, a disk that cannot take a write). Entry scripts print these as one line and
exit non-zero; everything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A mistake in the user's input, with a message that names the file, key or path."""


class NonFiniteLossError(RuntimeError):
    """Training diverged (on any rank): a non-finite loss under ``train.nonfinite=stop``, a whole
    epoch of skipped steps, or ``train.max_consecutive_skips`` skipped steps in a row."""


_MAX_REASON = 160  # longer library messages are left out rather than cut mid-sentence


def one_line_reason(e: BaseException) -> str:
    """The library's own words, whole: its first line, else that line's first sentence when
    the line is long, else only the exception type (never a sentence cut off)."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > _MAX_REASON:
        text = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text}" if text and len(text) <= _MAX_REASON else type(e).__name__


def write_error(path: str, e: OSError) -> UserError:
    """A failed write to ``path`` (disk full, read-only file system, ...) as a UserError naming it."""
    return UserError(f"cannot write {path}: {e.strerror or e} (is the disk full or the directory read-only?); "
                     "what it held before is left intact")


# Exit codes of the entry scripts, for launchers and requeue logic (documented in docs/STOPPING.md).
EXIT_OK = 0             # finished (train.py: every epoch done; eval.py: every checkpoint evaluated)
EXIT_USER_ERROR = 2     # a UserError: bad config, path or checkpoint, a failed write; nothing was lost
EXIT_NONFINITE = 3      # train.py: non-finite loss/gradients under train.nonfinite=stop; eval.py: a
                        # checkpoint's loss is not finite (its result is written, with a warning)
EXIT_RESUMABLE = 75     # train.py: stopped (a signal, train.stop_after_epochs) with a resumable checkpoint
                        # on disk: rerun to continue (sysexits' EX_TEMPFAIL)
EXIT_SIGNAL_BASE = 128  # train.py: a stop signal before training began exits 128 + its number (Ctrl-C: 130)
