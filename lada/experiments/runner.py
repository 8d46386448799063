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


def run(cfg: RunConfig, engine: str | None = None, superlink: str | None = None, overwrite: bool = False,
        warmup: bool = True) -> list[dict]:
    """Run a federation to completion and return its metric rows."""
    from lada.engines.launch import run_engine

    engine = engine or cfg.engine.kind
    cfg.engine.kind = engine
    run_dir = prepare_run_dir(cfg, overwrite)
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        t0 = time.perf_counter()
        log.info("run %s: host=%s plugin=%s engine=%s seed=%d rounds=%d -> %s", cfg.name, cfg.host_name,
                 cfg.plugin_name, engine, cfg.seed, cfg.rounds, run_dir)
        if warmup and not (engine == "deployment" and (superlink or cfg.engine.superlink)):
            warm_up_all(cfg)
        run_engine(cfg, engine, run_dir / "run.log", superlink=superlink)
        rows = read_metrics(run_dir / "metrics.jsonl")
        finish_run(run_dir, rows, title=f"{cfg.name}: host={cfg.host_name} plugin={cfg.plugin_name}")
        log.info("run finished in %.1fs", time.perf_counter() - t0)
        return rows
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def finish_run(run_dir: Path, rows: list[dict], title: str) -> None:
    header, body = accuracy_table(rows)
    (run_dir / "summary.md").write_text(f"# {title}\n\nTest accuracy per round.\n\n" + markdown_table(header, body))
    plot_accuracy(rows, run_dir / "accuracy.png", title)
    print_table(rows, title)
