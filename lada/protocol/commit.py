"""Commits per round: a participant's state advances only when its round commits.

Every node (server or client) works in its workspace folder. When it finishes a round
(its evaluation), it copies that state to ``commits/round-<r>``; the server then
commits the round for the run by writing ``<run_dir>/commit.json`` (after the metrics
rows), naming for each client the last round it completed. Every later message to a
client carries that round as ``_base``: a client whose working state is not that
committed state (it failed or was cut off mid-round, or the server resumed from an
earlier round) first restores it. So a client that comes back rejoins from its last
committed state, and `lada run --resume` continues from the last committed round.

Model directories are written once and replaced by renaming (see `Node.save_model`),
so snapshots hard-link their files instead of copying weights; everything else (small
JSON, filter states, token maps) is copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMMITS = "commits"
WORKING = "working.json"
COMMIT_FILE = "commit.json"
# Not part of a node's state: the config the server sends with 'setup' (written again
# on every setup), the snapshots themselves and the marker of what the working state is.
_KEEP = {COMMITS, WORKING, "config.toml"}
INITIAL = -1  # "round" of the state before anything happened: an empty workspace


class CommitError(RuntimeError):
    """A committed state that should exist does not."""


def _copy_entry(src: Path, dst: Path, link: bool = False) -> None:
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _copy_entry(child, dst / child.name, link or child.name == "model")
    elif src.is_file():
        if link:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass  # another file system: copy
        shutil.copy2(src, dst)


def _state_entries(ws: Path) -> list[Path]:
    return [p for p in ws.iterdir() if p.name not in _KEEP and not p.name.endswith(".tmp")] if ws.exists() else []


def _clear(ws: Path) -> None:
    for p in _state_entries(ws):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def snapshot(ws: Path, rnd: int) -> None:
    """Copy the workspace's state to ``commits/round-<rnd>`` (atomically replaced)."""
    ws = Path(ws)
    root = ws / COMMITS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".round-{rnd}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for p in _state_entries(ws):
        _copy_entry(p, tmp / p.name, link=p.name == "model")
    dst = root / f"round-{rnd}"
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    _write_json(ws / WORKING, {"snap": rnd})


def restore(ws: Path, rnd: int) -> None:
    """Make the workspace's state that of committed round ``rnd`` (``INITIAL``: empty)."""
    ws = Path(ws)
    src = ws / COMMITS / f"round-{rnd}"
    if rnd != INITIAL and not src.is_dir():
        raise CommitError(f"{ws}: no committed state of round {rnd} to continue from "
                          f"(have {sorted(p.name for p in (ws / COMMITS).glob('round-*'))})")
    _clear(ws)
    if rnd != INITIAL:
        for p in src.iterdir():
            _copy_entry(p, ws / p.name, link=p.name == "model")
    _forget_cached_model(ws)
    _write_json(ws / WORKING, {"snap": rnd})


def prune(ws: Path, keep_from: int) -> None:
    """Drop snapshots of rounds before ``keep_from`` (never needed again)."""
    for p in (Path(ws) / COMMITS).glob("round-*"):
        try:
            r = int(p.name.split("-", 1)[1])
        except ValueError:
            continue
        if r < keep_from:
            shutil.rmtree(p, ignore_errors=True)


def sync_working(ws: Path, base: int, rnd: int, phase: str, attempt: str = "") -> None:
    """Before a client handles ``phase`` of round ``rnd``: make sure its working state
    is committed round ``base`` plus only the earlier phases of this attempt at round
    ``rnd`` (``attempt`` names the server process running it)."""
    ws = Path(ws)
    w = _read_json(ws / WORKING)
    tag = {"base": base, "round": rnd, "attempt": attempt}
    if w != tag and w != {"snap": base}:
        restore(ws, base)  # cut off mid-round, failed, or the server went back
    prune(ws, base)
    if phase != "setup":  # setup changes no state
        _write_json(ws / WORKING, tag)


def _forget_cached_model(ws: Path) -> None:
    from lada.protocol import node

    node._MODEL_CACHE.pop(str(ws.resolve()), None)


# ----------------------------------------------------------------------------- the run's commit record

def read_commit(run_dir: Path) -> dict[str, Any] | None:
    """``{"run_id", "round", "clients": {"<k>": last completed round}}`` or None."""
    return _read_json(Path(run_dir) / COMMIT_FILE)


def write_commit(run_dir: Path, record: dict[str, Any]) -> None:
    _write_json(Path(run_dir) / COMMIT_FILE, record)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)
