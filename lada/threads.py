"""How many torch threads each lada process uses.

torch defaults to one thread per core in every process. Two processes that each do
that on the same cores do not share them: each thread of a parallel region waits for
the slowest one, which is descheduled half the time, and both jobs run 5-10x slower
instead of 2x. So every process that computes asks `fit_threads` for its share:

    cores of this process (its CPU affinity)
    / lada runs active on the machine (each `lada run` registers itself while it lives)
    / processes of this run that compute at the same time (client actors in the
      simulation runtime; SuperNodes of a local deployment via ``LADA_WORKERS``)

``LADA_THREADS=N`` fixes the count; ``LADA_WORKERS=N`` says N processes of this run
work at once. The share is re-read at every phase, so a run that started alone hands
cores back when a second one starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_REGISTRY = Path(os.environ.get("LADA_RUN_REGISTRY") or Path(tempfile.gettempdir()) / "lada-active-runs")


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def active_runs() -> int:
    """Registered lada runs whose process is alive (stale entries are removed); at least 1."""
    n = 0
    if _REGISTRY.is_dir():
        for entry in _REGISTRY.iterdir():
            try:
                pid = int(entry.name)
            except ValueError:
                continue
            if _alive(pid):
                n += 1
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
    return max(1, n)


@contextlib.contextmanager
def registered_run():
    """Count this process as an active run while the block runs."""
    _REGISTRY.mkdir(parents=True, exist_ok=True)
    entry = _REGISTRY / str(os.getpid())
    entry.write_text("")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            entry.unlink()


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"environment variable {name}={raw!r}: expected a positive integer")
    return value


def thread_share(workers: int = 1) -> int:
    """Threads for one of ``workers`` processes of a run that compute at the same time."""
    fixed = _env_int("LADA_THREADS")
    if fixed is not None:
        return fixed
    workers = max(1, workers) * (_env_int("LADA_WORKERS") or 1)
    return max(1, available_cores() // (active_runs() * workers))


def client_workers(cfg) -> int:
    """How many of a run's clients compute at the same time in this runtime."""
    kind = getattr(getattr(cfg, "engine", None), "kind", "inline")
    if kind != "simulation":
        return 1  # inline: one after the other; deployment: LADA_WORKERS says
    cpus = max(1, round(float(cfg.engine.cpus_per_client)))
    return max(1, min(len(cfg.clients), available_cores() // cpus))


def fit_threads(workers: int = 1) -> int:
    """Set torch's thread count to this process's share; returns it."""
    import torch

    n = thread_share(workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
