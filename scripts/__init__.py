"""Command-line tools, run as files (``python scripts/<name>.py``). What several of them share lives
in the ``_``-prefixed modules here; a script imports them as ``scripts._<name>`` with the
repository root on ``sys.path``, as it imports ``engine``."""
