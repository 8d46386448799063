"""Method x seed grids: run every method on one base config with several seeds, then
write a Markdown table of final accuracies (mean +- std over seeds) and a plot of
accuracy per round per method.

A method is a name that says which host, plug-in and ablations to run (see
``apply_method``); host and plug-in names come from ``lada.registry`` and what a host
can do from its declared ``Capabilities``, so this module names no host. Finished runs
(their DONE marker) are reused and an interrupted run continues after its last committed
round, so a grid can be stopped and resumed any number of times. ``--export DIR``
copies each finished cell's small files (config, metrics, summary, plot) into DIR as it
finishes, so a grid run in a scratch folder publishes into a results folder cell by
cell, without checkpoints or logs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import statistics
import time
import tomllib
from pathlib import Path
from typing import Callable

from lada import registry
from lada.config import ConfigError, RunConfig, apply_override, config_matches, load_config
from lada.experiments.report import read_metrics
from lada.experiments.runner import resume, run
from lada.protocol.commit import read_commit

log = logging.getLogger("lada.grid")


# A method's name says what it runs: ``<host>[+<plug-in>[-<ablation>...]]``, e.g. the
# host alone, ``<host>+lada`` or ``<host>+lada-no-contrastive``. Each ablation edits the
# plug-in's options.
ABLATIONS: dict[str, Callable[[dict], None]] = {
    "no-filter": lambda p: p.setdefault("filter", {}).update(kind="none"),
    "random-filter": lambda p: p.setdefault("filter", {}).update(kind="random"),
    "loss-filter": lambda p: p.setdefault("filter", {}).update(kind="loss"),
    "no-contrastive": lambda p: p.update(distill="sft"),
    "gain-reward": lambda p: p.update(reward="gain"),
    "relative-reward": lambda p: p.update(reward="relative"),
    "paper-reward": lambda p: p.update(reward="paper"),
    "receiver-reward": lambda p: p.update(reward="receiver"),  # the default reward, gradient attribution
    "receiver-share-reward": lambda p: p.update(reward="receiver", reward_attribution="share"),
}
# `--methods all` adds these ablations of the plug-in on the base config's host.
ALL_ABLATIONS = ("no-filter", "random-filter", "no-contrastive")
PLUGIN = "lada"  # the plug-in the grid's method names add
# The upper bound as a row: every participant's model trained on the pooled data of the
# federation (lada.experiments.premises.cell_central), no federation. The lower bound is
# the `standalone` host.
CENTRALISED = "centralised"


def all_methods(base_host: str) -> list[str]:
    """`--methods all`: the centralised upper bound, every registered host alone (the
    `standalone` host is the lower bound), every collaborative host with the plug-in,
    and ``ALL_ABLATIONS`` of the plug-in on ``base_host`` (the base config's)."""
    out: list[str] = [CENTRALISED]
    for host in registry.HOSTS:
        out.append(host)
        if registry.host_class(host).capabilities.collaborative:
            out.append(f"{host}+{PLUGIN}")
    if registry.host_class(base_host).capabilities.collaborative:
        out += [f"{base_host}+{PLUGIN}-{a}" for a in ALL_ABLATIONS]
    return out


def apply_method(cfg: RunConfig, method: str) -> None:
    """Edit ``cfg`` (host, plug-in, ablation switches) to run ``method``; ValueError
    naming the bad part otherwise.

    The host keeps the base config's ``[host]`` options when the base config names the
    same host (so ``<host>`` and ``<host>+lada`` run the same transfers, e.g. the base
    config's upward path distillation), else it runs with its defaults. A host that
    needs one SLM on every client (``Capabilities.shared_slm``) gets client 0's model
    everywhere."""
    if method == CENTRALISED:  # trains on the base config's data and models; no host runs
        cfg.plugin = {"name": "none"}
        return
    host, _, rest = method.partition("+")
    if host not in registry.HOSTS:
        raise ValueError(f"method {method!r}: unknown host {host!r}; hosts: {sorted(registry.HOSTS)}")
    caps = registry.host_class(host).capabilities
    plugin: dict = {"name": "none"}
    if rest:
        name, *ablations = rest.split("-", 1)
        plugins = sorted(p for p in registry.PLUGINS if p != "none")
        if name not in plugins:
            raise ValueError(f"method {method!r}: unknown plug-in {name!r}; plug-ins: {plugins}")
        plugin = {"name": name}
        for ablation in _split_ablations(method, ablations[0] if ablations else ""):
            ABLATIONS[ablation](plugin)
        if not caps.collaborative:
            raise ValueError(f"method {method!r}: host {host!r} has no collaboration for a plug-in to act on")
    cfg.host = dict(cfg.host) if cfg.host_name == host else {"name": host}
    cfg.plugin = plugin
    if caps.shared_slm:
        cfg.clients = [copy.deepcopy(cfg.clients[0]) for _ in cfg.clients]


def _split_ablations(method: str, text: str) -> list[str]:
    """"no-filter-no-contrastive" -> ["no-filter", "no-contrastive"] (names contain dashes)."""
    out: list[str] = []
    while text:
        match = next((a for a in ABLATIONS if text == a or text.startswith(a + "-")), None)
        if match is None:
            raise ValueError(f"method {method!r}: unknown ablation {text!r}; ablations: {sorted(ABLATIONS)}")
        out.append(match)
        text = text[len(match) + 1:]
    return out


def split_plugin_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides of the base config, ``plugin.*`` overrides). The method decides the
    plug-in, so ``plugin.*`` settings are applied on top of it (to every method that has
    one; they win over its ablation switches), never to the base config, whose
    ``[plugin]`` the method replaces."""
    base, plugin = [], []
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if key in ("plugin", "plugin.name"):
            raise ConfigError(f"--set {ov!r}: in a grid the method names the plug-in (e.g. cot+lada); "
                              "set its options with plugin.<key>=...")
        (plugin if key.startswith("plugin.") else base).append(ov)
    return base, plugin


def method_config(base: Path, method: str, seed: int, out_dir: Path, overrides: list[str]) -> RunConfig:
    base_overrides, plugin_overrides = split_plugin_overrides(overrides)
    # the run seed as an override, so a config without [data] seed draws its data from it too
    cfg = load_config(base, [*base_overrides, f"seed={seed}"])
    apply_method(cfg, method)
    if cfg.plugin_name != "none":
        holder = {"plugin": cfg.plugin}
        for ov in plugin_overrides:
            apply_override(holder, ov, f"--set (method {method})")
        cfg.plugin = holder["plugin"]
    cfg.name = f"{method}-seed{seed}"
    cfg.run_dir = str((out_dir / method / f"seed{seed}").absolute())
    cfg.validate(f"{base} (method {method})")
    return cfg


def parse_methods(spec: str, base_host: str | None = None) -> list[str]:
    """A comma-separated list in which ``all`` stands for ``all_methods(base_host)``
    (e.g. ``all,<host>+lada-relative-reward``); duplicates dropped, every name checked
    before anything runs."""
    base_host = base_host or RunConfig().host_name
    names: list[str] = []
    for m in (m.strip() for m in spec.split(",")):
        for name in (all_methods(base_host) if m == "all" else [m] if m else []):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--methods: no method given")
    probe = RunConfig()
    for name in names:
        apply_method(probe, name)
    return names


def _same_config(path: Path, cfg: RunConfig) -> bool:
    """A finished run is reused when its config matches (an option added since counts as
    matching at its default), so a grid resumed after an upgrade does not start over."""
    try:
        return config_matches(tomllib.loads(path.read_text()), cfg)
    except (OSError, tomllib.TOMLDecodeError):
        return False


def _finished(run_dir: Path, cfg: RunConfig) -> bool:
    return (run_dir / "DONE").exists() and _same_config(run_dir / "config.toml", cfg)


def _resumable(run_dir: Path, cfg: RunConfig) -> bool:
    """An interrupted run of this very config with a committed round: the grid continues
    it after that round (``lada run --resume``; the result equals an unbroken run's)
    instead of starting it over, so a grid of long runs can be stopped at any time."""
    return not (run_dir / "DONE").exists() and read_commit(run_dir) is not None \
        and _same_config(run_dir / "config.toml", cfg)


def grid_cells(base: Path, methods: list[str], seeds: list[int], out_dir: Path, engine: str | None = None,
               overrides: list[str] | None = None) -> list[tuple[str, int, RunConfig]]:
    """(method, seed, config as the runner will write it: the engine is part of it) for
    every cell of the grid."""
    cells = []
    for method in methods:
        for seed in seeds:
            cfg = method_config(base, method, seed, out_dir, overrides or [])
            cfg.engine.kind = engine or cfg.engine.kind
            cells.append((method, seed, cfg))
    return cells


def cell_state(method: str, cfg: RunConfig) -> str:
    """Where one method x seed cell stands, for ``lada grid --status``: ``done``, how far
    a stopped or running run got (it resumes from there), ``-`` (not started), or
    ``other config`` (a run of another config is in the way: the grid will redo it)."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.toml").is_file():
        return "-"
    if not _same_config(run_dir / "config.toml", cfg):
        return "other config"
    if (run_dir / "DONE").exists():
        return "done"
    if method == CENTRALISED:
        n = len(list((run_dir / "cells").glob("seed*/central-*.json")))
        return f"{n}/{len(cfg.clients) + 1} participants"
    commit = read_commit(run_dir)
    return f"round {commit['round']}/{cfg.rounds}" if commit else f"round 0/{cfg.rounds}"


def format_status(states: dict[str, dict[int, str]], seeds: list[int]) -> str:
    """A method x seed table of ``cell_state``s and a count of the finished cells."""
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    lines += [f"| {m} | " + " | ".join(row[s] for s in seeds) + " |" for m, row in states.items()]
    done = sum(v == "done" for row in states.values() for v in row.values())
    total = sum(len(row) for row in states.values())
    return "\n".join(lines) + f"\n\n{done} of {total} cell(s) done\n"


# What ``--export`` copies of a finished cell: enough for ``--report-only`` and a reader.
# DONE goes last, so a copy cut short is not taken for a finished cell.
EXPORT_FILES = ("config.toml", "metrics.jsonl", "summary.md", "accuracy.png", "DONE")


def export_cell(run_dir: Path, dest: Path, cfg: RunConfig) -> bool:
    """Copy finished ``run_dir``'s ``EXPORT_FILES`` into ``dest`` (made if missing);
    False when ``dest`` already holds this very cell (same config and metrics: nothing to
    do). A finished cell of another config there is replaced, with a warning."""
    if run_dir.resolve() == dest.resolve():
        return False
    finished = _finished(dest, cfg)
    if finished and (dest / "metrics.jsonl").is_file() \
            and (dest / "metrics.jsonl").read_bytes() == (run_dir / "metrics.jsonl").read_bytes():
        return False
    if (dest / "DONE").exists() and not finished:
        log.warning("export: replacing %s (a finished run of another config)", dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "DONE").unlink(missing_ok=True)
    for name in EXPORT_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, dest / name)
        else:
            (dest / name).unlink(missing_ok=True)  # e.g. no plot: no stale one from another run
    return True


class GridIncomplete(Exception):
    """``report_only`` found method x seed cells without a finished run of their config."""


def run_grid(base: Path, methods: list[str], seeds: list[int], out_dir: Path, engine: str | None = None,
             overrides: list[str] | None = None, report_only: bool = False,
             tag: str = "", premises: Path | None = None,
             export: Path | None = None) -> dict[str, dict[int, list[dict]]]:
    """Run (or reuse) every method x seed; returns metric rows by method and seed.
    ``report_only``: run nothing; rebuild the table from finished runs, or raise
    ``GridIncomplete`` naming every cell that has none (before writing anything).
    ``tag``: name the report files ``results-<tag>.md`` etc. (see ``report_paths``).
    ``premises``: take the centralised bound's cells from this premises folder where they
    match (``run_centralised``). ``export``: copy each finished cell into
    ``export/<method>/seed<N>`` (``export_cell``). No report is written there: a results
    folder keeps reports of other seed subsets, which ``--report-only --tag`` rebuilds."""
    cells = grid_cells(base, methods, seeds, out_dir, engine, overrides)
    if report_only:
        missing = [f"{m} seed {s} ({cfg.run_dir})" for m, s, cfg in cells if not _finished(Path(cfg.run_dir), cfg)]
        if missing:
            raise GridIncomplete(f"{len(missing)} of {len(cells)} cell(s) have no finished run "
                                 "of their config: " + "; ".join(missing))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, list[dict]]] = {}
    total = len(cells)
    budget = ""
    host_notes: dict[str, str] = {}
    for i, (method, seed, cfg) in enumerate(cells, 1):
        budget = budget_note(cfg)
        host_notes.setdefault(cfg.host_name, host_budget_note(cfg))
        run_dir = Path(cfg.run_dir)
        if _finished(run_dir, cfg):
            log.info("[%d/%d] %s seed %d: reusing %s", i, total, method, seed, run_dir)
        elif method == CENTRALISED:
            log.info("[%d/%d] %s seed %d", i, total, method, seed)
            run_centralised(cfg, premises)
        elif _resumable(run_dir, cfg):
            log.info("[%d/%d] %s seed %d: resuming %s after round %d", i, total, method, seed, run_dir,
                     read_commit(run_dir)["round"])
            resume(run_dir, engine=engine)
        else:
            log.info("[%d/%d] %s seed %d", i, total, method, seed)
            run(cfg, engine=engine, overwrite=True)
        results.setdefault(method, {})[seed] = read_metrics(run_dir / "metrics.jsonl")
        if export is not None and export_cell(run_dir, dest := export / method / f"seed{seed}", cfg):
            log.info("[%d/%d] %s seed %d: exported to %s", i, total, method, seed, dest)
    budget = " ".join([budget, *(n for n in host_notes.values() if n)])
    write_report(results, out_dir, base, seeds, budget, tag)
    return results


def run_centralised(cfg: RunConfig, premises: Path | None = None) -> Path:
    """The upper-bound row of a grid: each participant's warm-up trained on the pooled
    data (``premises.cell_central``, ``train.transfer_epochs x rounds`` passes), written
    as a run directory (config.toml, metrics.jsonl with one final-round row per
    participant, DONE) so the grid reads and reuses it like any run. Each participant's
    result is stored under ``cells/`` as it finishes, so a stopped bound goes on with the
    participants it has not trained yet (one stopped mid-training from its saved state).
    ``premises``: a ``lada premises --out`` folder of the same base config whose ``central-*``
    cells are taken instead of training again (``premises.adopt_cell``); a cell that does not
    match is trained, with the reason logged."""
    from lada.experiments.premises import Context, adopt_cell, cell_central, run_cell
    from lada.data import build_federated_data
    from lada.data.split import views

    from lada.experiments.runner import prepare_run_dir

    run_dir = Path(cfg.run_dir).absolute()
    if (run_dir / "cells").is_dir() and not (run_dir / "DONE").exists() and _same_config(run_dir / "config.toml", cfg):
        cfg.run_dir = str(run_dir)
        log.info("centralised: going on with the participants %s has not finished", run_dir)
    else:
        run_dir = prepare_run_dir(cfg, overwrite=True)
    ctx = Context(cfg=cfg, seed=cfg.seed, epochs=cfg.train.transfer_epochs * cfg.rounds, out=run_dir / "cells",
                  views=views(build_federated_data(cfg.data, cfg.data.seed)))
    rows = []
    for who in ["server", *(f"client{k}" for k in ctx.clients)]:
        name = f"central-{who}"
        if premises is not None and not (ctx.out / f"seed{ctx.seed}" / f"{name}.json").is_file():
            why = adopt_cell(ctx, name, premises)
            if why:
                log.warning("centralised: training %s here: not taken from --premises: %s", who, why)
            else:
                log.info("centralised: %s taken from %s", who, premises)
        r = run_cell(ctx, name, lambda who=who: cell_central(ctx, who))
        seconds = json.loads((ctx.out / f"seed{ctx.seed}" / f"central-{who}.json").read_text())["seconds"]
        rows.append({"round": cfg.rounds, "participant": "llm" if who == "server" else f"client-{who[6:]}",
                     "accuracy": r["accuracy"], "n_test": r["n"], "train_steps": r["train_steps"],
                     "bytes_up": 0, "bytes_down": 0, "lada_bytes_up": 0, "lada_bytes_down": 0,
                     "seconds": seconds, **({"chain_right": r["chain_right"]} if "chain_right" in r else {}),
                     **{f"acc_{d}": v["accuracy"] for d, v in r.get("by_domain", {}).items()}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "DONE").write_text("centralised upper bound\n")
    return run_dir


def budget_note(cfg: RunConfig) -> str:
    """The training budget every method of the grid ran with, for the table's header."""
    t = cfg.train
    return (f"Training budget: every transfer trains `train.transfer_epochs = {t.transfer_epochs:g}` passes over "
            f"its training mix (received items kept by the filter, plus what the host mixes in), batch "
            f"{t.batch_size}; local training on private data {t.local_steps} steps per round.")


def host_budget_note(cfg: RunConfig) -> str:
    """A host's own training form where it has one (FedMKT and FedCoLLM train as their
    papers do: ``[host] epochs`` passes, LoRA), or ""."""
    opts = registry.host_options(cfg)
    epochs = getattr(opts, "epochs", 0)
    if not epochs:
        return ""
    lora = [f"{key} = {getattr(opts, key)}" for key in ("lora_r", "llm_lora_r") if hasattr(opts, key)]
    return (f"{cfg.host_name} (with or without a plug-in) distils with its own `[host] epochs = {epochs:g}` "
            f"passes{' and ' + ', '.join(lora) if lora else ''} (0 = full fine-tuning).")


def mean_std(xs: list[float], sign: str = "") -> str:
    """Percent (or signed points, with ``sign="+"``), mean ± std over seeds; the value
    alone for one seed (no spread to show)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{100 * xs[0]:{sign}.1f}"
    return f"{100 * statistics.fmean(xs):{sign}.1f} ± {100 * statistics.stdev(xs):.1f}"


# Two-sided 95% quantiles of Student's t by degrees of freedom (the row's seeds minus one).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(a: dict[int, float], b: dict[int, float], seeds: list[int]) -> list[float]:
    """b - a per seed, on the seeds both have."""
    return [b[s] - a[s] for s in seeds if s in a and s in b]


def judge(diffs: list[float]) -> str:
    """ahead / behind / within noise by a paired t-test over seeds; one seed: not judged."""
    n = len(diffs)
    if n < 2:
        return "one seed, not judged" if n == 1 else "no finished seed"
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(n)
    t = T975.get(n - 1, 1.96 if n > 30 else 2.2)
    if se == 0.0:
        return "ahead" if mean > 0 else "behind" if mean < 0 else "within noise"
    return "ahead" if mean > t * se else "behind" if mean < -t * se else "within noise"


def llm_domain_accuracy(row: dict) -> float | None:
    """The LLM's accuracy on its client-domain test questions (the mean over domains of
    ``acc_<domain>``; the synthetic test set holds equal shares), or None when its test set
    is not split by domain. Up-transfer can only show there: docs/testbed.md, "Premises"."""
    doms = [v for k, v in row.items() if k.startswith("acc_") and k != "acc_general" and v is not None]
    return statistics.fmean(doms) if doms else None


def summarise(rows_by_seed: dict[int, list[dict]]) -> dict:
    """Final-round accuracies and per-round costs of one method, over seeds."""
    finals: dict[str, list[float]] = {}
    slm_mean, mb, secs, filt, lada_kb = [], [], [], [], []
    chains: dict[str, list[float]] = {}  # linked tasks: "slm-mean" and "llm" chain-right shares by seed
    for rows in rows_by_seed.values():
        last = max(r["round"] for r in rows)
        final = [r for r in rows if r["round"] == last]
        final = [r for r in final if r.get("accuracy") is not None]  # a client that failed that round has none
        for r in final:
            finals.setdefault(r["participant"], []).append(r["accuracy"])
            if r["participant"] == "llm" and (dom := llm_domain_accuracy(r)) is not None:
                finals.setdefault("llm-domains", []).append(dom)
        slm = [r["accuracy"] for r in final if r["participant"] != "llm"]
        slm_mean.append(sum(slm) / len(slm) if slm else float("nan"))
        slm_chain = [r["chain_right"] for r in final if r["participant"] != "llm" and r.get("chain_right") is not None]
        if slm_chain and len(slm_chain) == len(slm):
            chains.setdefault("slm-mean", []).append(statistics.fmean(slm_chain))
        chains.setdefault("llm", []).extend(r["chain_right"] for r in final
                                            if r["participant"] == "llm" and r.get("chain_right") is not None)
        llm_rows = [r for r in rows if r["participant"] == "llm" and r["round"] > 0]
        if llm_rows:
            mb.append(statistics.fmean((r["bytes_up"] + r["bytes_down"] - r.get("lada_bytes_up", 0)
                                        - r.get("lada_bytes_down", 0)) / 1e6 for r in llm_rows))
            lada_kb.append(statistics.fmean((r.get("lada_bytes_up", 0) + r.get("lada_bytes_down", 0)) / 1e3
                                            for r in llm_rows))
            secs.append(statistics.fmean(r["seconds"] for r in llm_rows))
        f = [sum(v or 0.0 for k, v in r.items() if k.endswith("filter_seconds")) for r in rows if r["round"] > 0]
        if any(f) and llm_rows:
            filt.append(sum(f) / len(llm_rows))
    return {"finals": finals, "slm_mean": slm_mean, "mb_per_round": mb, "seconds_per_round": secs,
            "filter_seconds_per_round": filt, "lada_kb_per_round": lada_kb,
            "chain_right": {k: v for k, v in chains.items() if v}}


def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """(method, reference) pairs of a grid's paired differences: a host with a plug-in
    against the host alone; an ablation against the full plug-in on that host and against
    the host alone (each where the grid has it)."""
    out = []
    for m in methods:
        host, plus, rest = m.partition("+")
        if not plus:
            continue
        full = f"{host}+{rest.split('-', 1)[0]}"
        out += [(m, ref) for ref in dict.fromkeys([full, host]) if ref != m and ref in methods]
    return out


def per_seed(by_seed: dict[int, list[dict]]) -> dict[str, dict[int, float]]:
    """One method's final-round SLM mean (``slm``) and LLM accuracy (``llm``), its host
    MB (``mb``) and LaDa KB (``lada_kb``) per round and, on a linked task, the SLM mean's
    and the LLM's chains right (``slm_chain``, ``llm_chain``), each by seed (a seed
    without the value is left out), for comparisons paired by seed."""
    out: dict[str, dict[int, float]] = {"slm": {}, "llm": {}, "mb": {}, "lada_kb": {}, "slm_chain": {},
                                        "llm_chain": {}}
    for seed, rows in by_seed.items():
        s = summarise({seed: rows})
        out["slm"][seed] = s["slm_mean"][0]
        if s["finals"].get("llm"):
            out["llm"][seed] = s["finals"]["llm"][0]
        for key, who in (("slm_chain", "slm-mean"), ("llm_chain", "llm")):
            if s["chain_right"].get(who):
                out[key][seed] = s["chain_right"][who][0]
        if s["mb_per_round"]:
            out["mb"][seed] = s["mb_per_round"][0]
            out["lada_kb"][seed] = s["lada_kb_per_round"][0]
    return out


def paired_table(results: dict[str, dict[int, list[dict]]], seeds: list[int]) -> list[str]:
    """Lines of the grid report's paired differences (``comparisons``), or none."""
    pairs = comparisons(list(results))
    if not pairs:
        return []
    per = {m: per_seed(results[m]) for m in {x for p in pairs for x in p}}

    def cell(d: list[float]) -> str:
        return "-" if not d else mean_std(d, "+") + (f" ({judge(d)})" if len(d) > 1 else "")

    lines = ["", "Paired differences (points): the method minus the reference on each seed both finished "
             "(same data split and warm-ups), mean ± std over those seeds, with a paired t-test verdict "
             "(95%; one seed is not judged).", "",
             "| method | minus | seeds | Δ SLM mean | Δ LLM |", "|---|---|---|---|---|"]
    for m, ref in pairs:
        d_slm = paired(per[ref]["slm"], per[m]["slm"], seeds)
        d_llm = paired(per[ref]["llm"], per[m]["llm"], seeds)
        lines.append(f"| {m} | {ref} | {len(d_slm)} | {cell(d_slm)} | {cell(d_llm)} |")
    return lines


def report_paths(out_dir: Path, tag: str = "") -> tuple[Path, Path, Path]:
    """(table, summary, plot) of a grid report: ``results.md``, ``summary.json``,
    ``accuracy.png``, or with a tag ``results-<tag>.md`` ... so several reports (a
    subset of seeds or methods) live side by side in one grid folder."""
    suffix = f"-{tag}" if tag else ""
    return out_dir / f"results{suffix}.md", out_dir / f"summary{suffix}.json", out_dir / f"accuracy{suffix}.png"


def write_report(results: dict[str, dict[int, list[dict]]], out_dir: Path, base: Path, seeds: list[int],
                 budget: str = "", tag: str = "") -> Path:
    parts = sorted({p for rs in results.values() for rows in rs.values() for p in (r["participant"] for r in rows)
                    if p != "llm"})
    header = ["method", *(f"{p}" for p in parts), "SLM mean", "LLM", "LLM client domains", "host MB/round",
              "LaDa KB/round", "s/round", "filter s/round"]
    lines = [f"Final-round test accuracy (%), mean ± std over seeds {seeds}; base config `{base}`.",
             *([budget] if budget else []), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary = {}
    for method, by_seed in results.items():
        s = summarise(by_seed)
        summary[method] = s
        f_share = "-"
        if s["filter_seconds_per_round"] and s["seconds_per_round"]:
            fs, rs = statistics.fmean(s["filter_seconds_per_round"]), statistics.fmean(s["seconds_per_round"])
            f_share = f"{fs:.1f} ({100 * fs / rs:.0f}%)"
        lines.append("| " + " | ".join([
            method, *(mean_std(s["finals"].get(p, [])) for p in parts), mean_std(s["slm_mean"]),
            mean_std(s["finals"].get("llm", [])), mean_std(s["finals"].get("llm-domains", [])),
            f"{statistics.fmean(s['mb_per_round']):.2f}" if s["mb_per_round"] else "-",
            f"{statistics.fmean(s['lada_kb_per_round']):.1f}" if s["lada_kb_per_round"] else "-",
            # the bound has no rounds: its rows' seconds are whole trainings, not a round's
            f"{statistics.fmean(s['seconds_per_round']):.0f}" if s["seconds_per_round"] and method != CENTRALISED
            else "-", f_share]) + " |")
    lines += chain_table(summary)
    lines += paired_table(results, seeds)
    table, summary_path, plot = report_paths(out_dir, tag)
    table.write_text("\n".join(lines) + "\n")
    summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True))
    plot_grid(results, plot)
    return table


def chain_table(summary: dict[str, dict]) -> list[str]:
    """Lines of the chains-right table of a linked task (``EvalResult.chain_right``), or
    none when no method's runs report chains (the arithmetic task, GSM8K)."""
    rows = [(m, s["chain_right"]) for m, s in summary.items() if s.get("chain_right")]
    if not rows:
        return []
    lines = ["", "Chains right (%), final round: the share of test outputs whose chain reached the gold value "
             "(the answer line follows from it). A yes/no answer is right half the time after a wrong chain, "
             "so accuracy moves by about half of what the chains gain.", "",
             "| method | SLM mean | LLM |", "|---|---|---|"]
    return lines + [f"| {m} | {mean_std(c.get('slm-mean', []))} | {mean_std(c.get('llm', []))} |" for m, c in rows]


def plot_grid(results: dict[str, dict[int, list[dict]]], out: Path) -> Path:
    """Two panels: mean SLM accuracy and LLM accuracy per round, one line per method
    (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharex=True)
    cmap = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")  # one colour per method
    for i, (method, by_seed) in enumerate(results.items()):
        rounds = sorted({r["round"] for rows in by_seed.values() for r in rows})
        slm, llm = [], []
        for rnd in rounds:
            s_vals, l_vals = [], []
            for rows in by_seed.values():
                accs = [r["accuracy"] for r in rows if r["round"] == rnd and r["participant"] != "llm"
                        and r.get("accuracy") is not None]
                if accs:
                    s_vals.append(sum(accs) / len(accs))
                l_vals += [r["accuracy"] for r in rows if r["round"] == rnd and r["participant"] == "llm"]
            slm.append(statistics.fmean(s_vals) if s_vals else float("nan"))
            llm.append(statistics.fmean(l_vals) if l_vals else float("nan"))
        style = "-" if "lada" in method else "--"
        axes[0].plot(rounds, slm, style, marker="o", label=method, color=cmap(i % cmap.N))
        axes[1].plot(rounds, llm, style, marker="o", label=method, color=cmap(i % cmap.N))
    axes[0].set_title("mean SLM test accuracy")
    axes[1].set_title("LLM test accuracy")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: lines stay visible
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main_grid(base: str, methods: str, seeds: list[int], out: str, engine: str | None, overrides: list[str],
              report_only: bool = False, tag: str = "", premises: str | None = None, status: bool = False,
              export: str | None = None) -> int:
    try:
        names = parse_methods(methods, load_config(base, split_plugin_overrides(overrides)[0]).host_name)
    except ValueError as e:
        raise SystemExit(f"lada grid: {e}") from None
    t0 = time.perf_counter()
    try:
        if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
            raise ConfigError(f"--tag: letters, digits, '.', '_' and '-' only (it names files), got {tag!r}")
        if premises and not Path(premises).is_dir():
            raise ConfigError(f"--premises: {premises} is not a folder (give a `lada premises --out` folder)")
        if status:
            states: dict[str, dict[int, str]] = {}
            for method, seed, cfg in grid_cells(Path(base), names, seeds, Path(out), engine, overrides):
                states.setdefault(method, {})[seed] = cell_state(method, cfg)
            print(format_status(states, seeds), end="")
            return 0
        if export and Path(export).exists() and not Path(export).is_dir():
            raise ConfigError(f"--export: {export} is not a folder")
        run_grid(Path(base), names, seeds, Path(out), engine, overrides, report_only, tag,
                 Path(premises) if premises else None, Path(export) if export else None)
    except GridIncomplete as e:
        raise SystemExit(f"lada grid --report-only: {e}. Run the grid without --report-only to complete them "
                         "(the engine is part of a run's config: give the one the runs were made with).") from None
    table, _, plot = report_paths(Path(out), tag)
    print(table.read_text())
    print(f"grid finished in {time.perf_counter() - t0:.0f}s; table {table}, plot {plot}")
    return 0
