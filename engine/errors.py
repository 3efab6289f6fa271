"""Errors that mean "the user asked for something that cannot work" (bad config, missing path,
mismatched checkpoint). Entry scripts print these as one line and exit non-zero; everything
else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A mistake in the user's input, with a message that names the file, key or path."""
