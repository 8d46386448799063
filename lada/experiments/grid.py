"""Method x seed grids: run every method on one base config with several seeds, then
write a Markdown table of final accuracies (mean +- std over seeds) and a plot of
accuracy per round per method.

A method is a name that says which host, plug-in and ablations to run (see
``apply_method``). Finished runs (their DONE marker) are reused, so an interrupted
grid resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

from lada.config import RunConfig, load_config
from lada.experiments.report import read_metrics

log = logging.getLogger("lada.grid")


# A method's name says what it runs: ``<host>[+lada[-<ablation>...]]``, e.g. ``cot``,
# ``fedmkt+lada``, ``fedmkt+lada-no-contrastive``. Each ablation edits the plug-in's options.
ABLATIONS: dict[str, Callable[[dict], None]] = {
    "no-filter": lambda p: p.setdefault("filter", {}).update(kind="none"),
    "random-filter": lambda p: p.setdefault("filter", {}).update(kind="random"),
    "loss-filter": lambda p: p.setdefault("filter", {}).update(kind="loss"),
    "no-contrastive": lambda p: p.update(distill="sft"),
    "relative-reward": lambda p: p.update(reward="relative"),
}
# `--methods all`: standalone, every host with and without LaDa, and the ablations on cot.
ALL_METHODS = ("standalone", "cot", "cot+lada", "fedmkt", "fedmkt+lada", "fedcollm", "fedcollm+lada",
               "cot+lada-no-filter", "cot+lada-random-filter", "cot+lada-no-contrastive")


def apply_method(cfg: RunConfig, method: str) -> None:
    """Edit ``cfg`` (host, plug-in, ablation switches) to run ``method``; ValueError
    naming the bad part otherwise."""
    from lada.hosts import HOSTS

    host, _, rest = method.partition("+")
    if host not in HOSTS:
        raise ValueError(f"method {method!r}: unknown host {host!r}; hosts: {sorted(HOSTS)}")
    plugin: dict = {"name": "none"}
    if rest:
        name, *ablations = rest.split("-", 1)
        if name != "lada":
            raise ValueError(f"method {method!r}: unknown plug-in {name!r}; plug-ins: ['lada']")
        plugin = {"name": "lada"}
        for ablation in _split_ablations(method, ablations[0] if ablations else ""):
            ABLATIONS[ablation](plugin)
        if host == "standalone":
            raise ValueError(f"method {method!r}: standalone has no collaboration for a plug-in to act on")
    cfg.host = {"name": host}
    cfg.plugin = plugin
    if host == "fedcollm":  # FedCoLLM needs one SLM architecture: client 0's, everywhere
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


def method_config(base: Path, method: str, seed: int, out_dir: Path, overrides: list[str]) -> RunConfig:
    cfg = load_config(base, overrides)
    apply_method(cfg, method)
    cfg.seed = seed
    cfg.name = f"{method}-seed{seed}"
    cfg.run_dir = str((out_dir / method / f"seed{seed}").absolute())
    cfg.validate(f"{base} (method {method})")
    return cfg


def parse_methods(spec: str) -> list[str]:
    """A comma-separated list in which ``all`` stands for ``ALL_METHODS`` (e.g.
    ``all,fedmkt+lada-relative-reward``); duplicates dropped, every name checked before
    anything runs."""
    names: list[str] = []
    for m in (m.strip() for m in spec.split(",")):
        for name in (ALL_METHODS if m == "all" else [m] if m else []):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--methods: no method given")
    probe = RunConfig()
    for name in names:
        apply_method(probe, name)
    return names


def run_grid(base: Path, methods: list[str], seeds: list[int], out_dir: Path, engine: str | None = None,
             overrides: list[str] | None = None) -> dict[str, dict[int, list[dict]]]:
    """Run (or reuse) every method x seed; returns metric rows by method and seed."""
    from lada.experiments.runner import run

    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, list[dict]]] = {}
    total = len(methods) * len(seeds)
    for i, (method, seed) in enumerate(((m, s) for m in methods for s in seeds), 1):
        cfg = method_config(base, method, seed, out_dir, overrides or [])
        cfg.engine.kind = engine or cfg.engine.kind  # as the runner will write it
        run_dir = Path(cfg.run_dir)
        if (run_dir / "DONE").exists() and (run_dir / "config.toml").read_text() == cfg.to_toml():
            log.info("[%d/%d] %s seed %d: reusing %s", i, total, method, seed, run_dir)
        else:
            log.info("[%d/%d] %s seed %d", i, total, method, seed)
            run(cfg, engine=engine, overwrite=True)
        results.setdefault(method, {})[seed] = read_metrics(run_dir / "metrics.jsonl")
    write_report(results, out_dir, base, seeds)
    return results


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def summarise(rows_by_seed: dict[int, list[dict]]) -> dict:
    """Final-round accuracies and per-round costs of one method, over seeds."""
    finals: dict[str, list[float]] = {}
    slm_mean, mb, secs, filt = [], [], [], []
    for rows in rows_by_seed.values():
        last = max(r["round"] for r in rows)
        final = [r for r in rows if r["round"] == last]
        final = [r for r in final if r.get("accuracy") is not None]  # a client that failed that round has none
        for r in final:
            finals.setdefault(r["participant"], []).append(r["accuracy"])
        slm = [r["accuracy"] for r in final if r["participant"] != "llm"]
        slm_mean.append(sum(slm) / len(slm) if slm else float("nan"))
        llm_rows = [r for r in rows if r["participant"] == "llm" and r["round"] > 0]
        if llm_rows:
            mb.append(statistics.fmean((r["bytes_up"] + r["bytes_down"]) / 1e6 for r in llm_rows))
            secs.append(statistics.fmean(r["seconds"] for r in llm_rows))
        f = [sum(v or 0.0 for k, v in r.items() if k.endswith("filter_seconds")) for r in rows if r["round"] > 0]
        if any(f) and llm_rows:
            filt.append(sum(f) / len(llm_rows))
    return {"finals": finals, "slm_mean": slm_mean, "mb_per_round": mb, "seconds_per_round": secs,
            "filter_seconds_per_round": filt}


def write_report(results: dict[str, dict[int, list[dict]]], out_dir: Path, base: Path, seeds: list[int]) -> Path:
    parts = sorted({p for rs in results.values() for rows in rs.values() for p in (r["participant"] for r in rows)
                    if p != "llm"})
    header = ["method", *(f"{p}" for p in parts), "SLM mean", "LLM", "MB/round", "s/round", "filter s/round"]
    lines = [f"Final-round test accuracy (%), mean ± std over seeds {seeds}; base config `{base}`.", "",
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
            method, *(_mean_std(s["finals"].get(p, [])) for p in parts), _mean_std(s["slm_mean"]),
            _mean_std(s["finals"].get("llm", [])),
            f"{statistics.fmean(s['mb_per_round']):.2f}" if s["mb_per_round"] else "-",
            f"{statistics.fmean(s['seconds_per_round']):.0f}" if s["seconds_per_round"] else "-", f_share]) + " |")
    table = out_dir / "results.md"
    table.write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    plot_grid(results, out_dir / "accuracy.png")
    return table


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


def main_grid(base: str, methods: str, seeds: list[int], out: str, engine: str | None, overrides: list[str]) -> int:
    try:
        names = parse_methods(methods)
    except ValueError as e:
        raise SystemExit(f"lada grid: {e}") from None
    t0 = time.perf_counter()
    run_grid(Path(base), names, seeds, Path(out), engine, overrides)
    print(Path(out, "results.md").read_text())
    print(f"grid finished in {time.perf_counter() - t0:.0f}s; table {out}/results.md, plot {out}/accuracy.png")
    return 0
