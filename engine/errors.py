"""Errors that mean "the user asked for something that cannot work" (bad config, missing path,
mismatched checkpoint). Entry scripts print these as one line and exit non-zero; everything
else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A mistake in the user's input, with a message that names the file, key or path."""


# Exit codes of the entry scripts, for launchers and requeue logic (documented in README.md).
EXIT_OK = 0             # finished (train.py: every epoch done; eval.py: every checkpoint evaluated)
EXIT_USER_ERROR = 2     # a UserError: bad config, path or checkpoint; nothing was lost
EXIT_NONFINITE = 3      # train.py: non-finite loss/gradients under train.nonfinite=stop; eval.py: a
                        # checkpoint's loss is not finite (its result is written, with a warning)
EXIT_RESUMABLE = 75     # train.py: interrupted (signal), saved a resumable checkpoint (sysexits' EX_TEMPFAIL)
