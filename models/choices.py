"""The values the model's knobs take, and the one check of a value against such a list: the
model layer checks its constructor arguments with ``check_choice``, ``engine.config`` a
config's keys with ``choice_problem``, so both say the same."""
from __future__ import annotations

import difflib
from typing import Any, Optional, Sequence

NORMALIZERS = ("softmax", "multimax", "sparsemax", "entmax15", "evsoftmax")  # attention normalizers
OUT_NORMALIZERS = ("softmax", "multimax")                                     # output layer
MODULATOR_INITS = ("trunc_normal", "zeros")
ATTN_BACKENDS = ("auto", "sdpa", "explicit", "flex", "chunked")


def choice_problem(value: Any, choices: Sequence[Any]) -> Optional[str]:
    """What is wrong with ``value`` as one of ``choices``, completing "<name> = <value> ...", with
    the closest choice as a suggestion; None if it is one."""
    if value in choices:
        return None
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"is not one of {' | '.join(map(str, choices))}{hint}"


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """A ValueError "<name> = <value> is not one of ..." unless ``value`` is one of ``choices``."""
    problem = choice_problem(value, choices)
    if problem:
        raise ValueError(f"{name} = {value!r} {problem}")


__all__ = ["NORMALIZERS", "OUT_NORMALIZERS", "MODULATOR_INITS", "ATTN_BACKENDS", "choice_problem", "check_choice"]
