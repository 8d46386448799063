"""Where a process spends its time, by kind of work.

`timed("sampling")` around a piece of work adds its wall time to that category. Time
is exclusive: when timed blocks nest (evaluation calls decoding, the filter calls
scoring), the inner block's time counts for the inner category only. `totals()` reads
the counters, `reset()` clears them; the benchmark uses them for the per-phase
breakdown of a round. Cost: two perf_counter calls per block.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict

_TOTALS: dict[str, float] = defaultdict(float)
_STACK: list[list] = []  # [category, start, time spent in nested blocks]


@contextlib.contextmanager
def timed(category: str):
    frame = [category, time.perf_counter(), 0.0]
    _STACK.append(frame)
    try:
        yield
    finally:
        _STACK.pop()
        spent = time.perf_counter() - frame[1]
        _TOTALS[category] += spent - frame[2]
        if _STACK:
            _STACK[-1][2] += spent


def timed_fn(category: str):
    """Decorator form of `timed`."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with timed(category):
                return fn(*args, **kwargs)
        return inner
    return wrap


def totals() -> dict[str, float]:
    return dict(_TOTALS)


def reset() -> None:
    _TOTALS.clear()
