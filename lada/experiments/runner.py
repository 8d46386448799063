"""One run end to end: prepare the run directory, warm up participants, launch the
engine, then write the table and plot. The run directory holds everything:
config.toml (resolved), metrics.jsonl, run.log, accuracy.png, summary.md and the
participants' checkpoints under nodes/<participant>/model."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from lada.config import RunConfig
from lada.threads import fit_threads, registered_run
from lada.experiments.report import accuracy_table, markdown_table, plot_accuracy, print_table, read_metrics

log = logging.getLogger("lada")


class RunDirError(RuntimeError):
    pass


def prepare_run_dir(cfg: RunConfig, overwrite: bool = False) -> Path:
    """Make ``cfg.run_dir`` absolute, create it and write the resolved config."""
    run_dir = cfg.resolved_run_dir().absolute()
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run; pass --overwrite or choose another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return run_dir


def warm_up_all(cfg: RunConfig) -> None:
    """Warm up (or find cached) every participant's starting model before the
    federation starts, so progress is visible here and nodes start fast."""
    from lada.protocol.node import participant_checkpoint

    for participant in ["llm"] + [f"client-{k}" for k in range(len(cfg.clients))]:
        t0 = time.perf_counter()
        path = participant_checkpoint(cfg, participant, progress=True)
        log.info("warm-up %s: %s (%.1fs)", participant, path, time.perf_counter() - t0)


RUN_FILE = "run.json"


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run stops like on Ctrl-C: everything
    it started is stopped and the run directory is marked incomplete."""


def read_run_state(run_dir: Path) -> dict | None:
    """``<run_dir>/run.json``: run id, engine and status (running | done |
    interrupted | failed), or None for run directories from older versions."""
    import json

    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_run_state(run_dir: Path, **fields) -> dict:
    import json

    state = dict(read_run_state(run_dir) or {}, **fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = Path(run_dir) / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    tmp.replace(Path(run_dir) / RUN_FILE)
    return state


class _TermAsInterrupt:
    """While active (main thread only), SIGTERM raises `Interrupted` and SIGINT
    raises KeyboardInterrupt, even where SIGINT was ignored (a background job of a
    script), so a run asked to stop always stops what it started."""

    def __enter__(self):
        import signal
        import threading

        self.old: dict = {}
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
                raise Interrupted(f"signal {signum}")

            self.old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
            self.old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def run(cfg: RunConfig, engine: str | None = None, superlink: str | None = None, overwrite: bool = False,
        warmup: bool = True) -> list[dict]:
    """Run a federation to completion and return its metric rows."""
    from lada.engines.launch import new_run_id

    engine = engine or cfg.engine.kind
    cfg.engine.kind = engine
    run_dir = prepare_run_dir(cfg, overwrite)
    write_run_state(run_dir, run_id=new_run_id(cfg.name), engine=engine, status="running", rounds=cfg.rounds)
    return _execute(cfg, run_dir, engine, superlink, warmup, resume=False)


def resume(run_dir: str | Path, engine: str | None = None, superlink: str | None = None,
           warmup: bool = True) -> list[dict]:
    """Continue an incomplete run after its last committed round (same config, same
    run id, so clients find their state); the result equals an unbroken run's."""
    from lada.config import load_config
    from lada.protocol.commit import read_commit

    run_dir = Path(run_dir).absolute()
    state = read_run_state(run_dir)
    if state is None or not (run_dir / "config.toml").exists():
        raise RunDirError(f"{run_dir}: not a run directory this version can resume (no {RUN_FILE} or config.toml)")
    if state.get("status") == "done" and (run_dir / "DONE").exists():
        raise RunDirError(f"{run_dir}: the run is complete; nothing to resume")
    if read_commit(run_dir) is None:
        raise RunDirError(f"{run_dir}: no round was committed yet; start it again with --overwrite")
    cfg = load_config(run_dir / "config.toml")
    cfg.run_dir = str(run_dir)
    engine = engine or state.get("engine") or cfg.engine.kind
    cfg.engine.kind = engine
    write_run_state(run_dir, engine=engine, status="running", resumed=int(state.get("resumed", 0)) + 1)
    return _execute(cfg, run_dir, engine, superlink, warmup, resume=True)


def _execute(cfg: RunConfig, run_dir: Path, engine: str, superlink: str | None, warmup: bool,
             resume: bool) -> list[dict]:
    from lada.engines.launch import run_engine

    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    run_id = read_run_state(run_dir)["run_id"]
    try:
        with _TermAsInterrupt():
            t0 = time.perf_counter()
            log.info("%s %s: host=%s plugin=%s engine=%s seed=%d rounds=%d -> %s", "resume" if resume else "run",
                     cfg.name, cfg.host_name, cfg.plugin_name, engine, cfg.seed, cfg.rounds, run_dir)
            with registered_run():  # other runs on this machine leave it its share of the cores
                fit_threads()
                if warmup and not (engine == "deployment" and (superlink or cfg.engine.superlink)):
                    warm_up_all(cfg)
                run_engine(cfg, engine, run_dir / "run.log", superlink=superlink, run_id=run_id, resume=resume)
            rows = read_metrics(run_dir / "metrics.jsonl")
            write_run_state(run_dir, status="done")
            finish_run(run_dir, rows, title=f"{cfg.name}: host={cfg.host_name} plugin={cfg.plugin_name}")
            log.info("run finished in %.1fs", time.perf_counter() - t0)
            return rows
    except KeyboardInterrupt as e:
        _mark_incomplete(run_dir, "interrupted", "SIGTERM" if isinstance(e, Interrupted) else "SIGINT (Ctrl-C)")
        raise
    except BaseException as e:
        _mark_incomplete(run_dir, "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _mark_incomplete(run_dir: Path, status: str, reason: str) -> None:
    from lada.protocol.commit import read_commit

    commit = read_commit(run_dir) or {}
    state = write_run_state(run_dir, status=status, reason=reason, committed_round=commit.get("round"))
    msg = f"run {status}: {reason}. " + (
        f"Rounds up to {commit['round']} are committed; continue with: lada run --resume {run_dir}"
        if commit else "No round was committed.")
    log.warning(msg)
    try:
        rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        if rows:
            finish_run(run_dir, rows, title=f"{run_dir.name} (INCOMPLETE: {state['status']})", incomplete=msg)
    except Exception:  # noqa: BLE001 - the summary is a courtesy; the original error matters
        pass


def finish_run(run_dir: Path, rows: list[dict], title: str, incomplete: str = "") -> None:
    header, body = accuracy_table(rows)
    note = f"**Incomplete run.** {incomplete}\n\n" if incomplete else ""
    (run_dir / "summary.md").write_text(f"# {title}\n\n{note}Test accuracy per round.\n\n" + markdown_table(header, body))
    plot_accuracy(rows, run_dir / "accuracy.png", title)
    print_table(rows, title)
