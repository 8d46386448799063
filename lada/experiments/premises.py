"""Premises of a testbed: can it show a transfer benefit at all, before any method runs?

For one config and a few seeds this measures, on the test sets the grid tables report
(each client's private test set; the LLM's ``server_test``):

* **down headroom**: client k fine-tuned on its private data plus *all* of the LLM's
  verified public paths, against the same optimizer steps (same batch size) on its
  private data alone;
* **up headroom**: the LLM fine-tuned on all clients' verified paths on the public
  questions of their domains, plus as many replayed examples of its own data (the cot
  host's ``up_replay = 1``), against the same steps on its own data alone;
* **learnability gap**: client k trained on the LLM's verified paths of 1-2, 3-4 and
  5-6 steps only, at an equal token budget per bucket;
* **bounds**: the control of the down/up headroom is the standalone lower bound (own
  data, same compute); the centralised upper bound trains each participant's model on
  the pooled data (every client's private train set, the public set with its gold
  rationales, and for the LLM as many of its own examples).

Every training starts from the participant's warm-up (shipped, cached or trained, as
a run would) and uses the project's own pieces: the cot host's sampling and
verification of paths (``lada.protocol.paths``), ``train_steps``, greedy ``evaluate``.
The budget of every training is ``epochs`` passes over its training mix (default
``train.transfer_epochs * rounds``: what a run's transfers spend over all rounds).

Each measured cell is written to ``<out>/seed<s>/<cell>.json`` as it finishes and is
reused on restart when its inputs are unchanged, so a stopped measurement resumes.
``<out>/premises.json`` and ``<out>/premises.md`` hold the results and the table.

Noise: an accuracy p on n test problems has a binomial standard error
sqrt(p(1-p)/n); a difference of two of them on the same test set is taken as
sqrt(se1^2 + se2^2) (conservative: the pairing is ignored). A headroom counts as
clearly above noise when it exceeds twice that, and, with several seeds, when its mean
also exceeds twice its standard error over seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lada.config import RunConfig, config_matches, load_config

BUCKETS = ((1, 2), (3, 4), (5, 6))  # learnability: LLM paths by their number of steps
FORMAT = 1  # bump when a cell's meaning changes, so old cells are not reused


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` problems."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def diff_se(p1: float, p2: float, n: int) -> float:
    """Standard error of ``p1 - p2`` measured on the same ``n`` problems (unpaired bound)."""
    return math.sqrt(binomial_se(p1, n) ** 2 + binomial_se(p2, n) ** 2)


def clearly_above(diffs: list[float], ses: list[float]) -> bool:
    """The noise rule: every seed's gain above twice its binomial SE and, with several
    seeds, the mean gain above twice its standard error over seeds."""
    if not diffs:
        return False
    if any(d <= 2 * se for d, se in zip(diffs, ses)):
        return False
    if len(diffs) > 1:
        return statistics.fmean(diffs) > 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return True


def bucket_of(steps: int) -> str:
    for lo, hi in BUCKETS:
        if lo <= steps <= hi:
            return f"{lo}-{hi}"
    return ""


# ----------------------------------------------------------------------------- cells

@dataclasses.dataclass
class Context:
    """What the cells of one seed share: the config, every participant's view, models."""

    cfg: RunConfig
    seed: int
    epochs: float
    out: Path
    views: dict  # who -> ParticipantData
    _paths: dict = dataclasses.field(default_factory=dict)
    # the cell being measured (run_cell sets it): its trainings save their state under
    # its name, and the training seconds of a stopped attempt they went on from
    _cell: tuple[str, str] | None = None  # (name, key)
    _seconds_before: float = 0.0

    @property
    def clients(self) -> list[int]:
        return list(range(len(self.cfg.clients)))

    def model(self, who: str):
        """A fresh copy of ``who``'s warm-up (``server`` or ``client<k>``)."""
        from lada.models.loading import load_model
        from lada.models.warmup import participant_config
        from lada.protocol.node import participant_checkpoint

        participant = "llm" if who == "server" else f"client-{who.removeprefix('client')}"
        path = participant_checkpoint(self.cfg, participant, progress=True)
        return load_model(participant_config(self.cfg, who), path, seed=self.seed)

    def test_set(self, who: str) -> list:
        return list(self.views[who].test)


def _eval(ctx: Context, lm, who: str) -> dict:
    from lada.data.answers import chain_share
    from lada.models.generation import evaluate

    examples = ctx.test_set(who)
    res = evaluate(lm, examples, ctx.cfg.generation, progress=False)
    out = {"accuracy": res.accuracy, "n": res.n, "by_steps": {str(k): v for k, v in res.by_steps.items()}}
    by_domain: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_domain.setdefault(ex.domain, []).append(i)

    def part(idx: list[int]) -> dict:
        r = {"accuracy": sum(res.correct[i] for i in idx) / len(idx), "n": len(idx)}
        chain = chain_share([res.outputs[i] for i in idx], [examples[i] for i in idx])
        return r if chain is None else {**r, "chain_right": chain}

    if res.chain_right is not None:
        out["chain_right"] = res.chain_right
    if who == "server":  # the LLM's test set mixes general and every client domain
        dom = [i for d, idx in by_domain.items() if d != "general" for i in idx]
        measured = part(dom) if dom else {"accuracy": float("nan")}
        out["domain_accuracy"] = measured["accuracy"]
        out["domain_n"] = len(dom)
        if "chain_right" in measured:
            out["domain_chain_right"] = measured["chain_right"]
    if len(by_domain) > 1:  # a mixed test set (the LLM's; a client's with general_share)
        out["by_domain"] = {d: part(idx) for d, idx in sorted(by_domain.items())}
    return out


def _train_eval(ctx: Context, who: str, pairs: list[tuple[str, str]], steps: int, seed: int, desc: str) -> dict:
    from lada.models.training import train_steps

    lm = ctx.model(who)
    # a long cell (the LLM's centralised bound: about an hour on a 2-core CPU) saves its training
    # state every few minutes and logs progress, so a stopped measurement loses minutes
    stats = train_steps(lm, pairs, steps, ctx.cfg.train, seed=seed, desc=desc, resume_file=_partial(ctx, seed))
    ctx._seconds_before += stats["seconds_before"]
    return {**_eval(ctx, lm, who), "train_steps": stats["steps"], "train_tokens": stats["tokens"],
            "train_loss": stats["loss"], "train_examples": len(pairs)}


def _candidates(ctx: Context, who: str) -> list[dict]:
    """Verified paths of ``who`` on the public questions it would answer in a run: the
    LLM on every public question; client k on the public questions of its own domain
    (what it can be right about and the LLM lacks). Cached as their own cell."""
    if who in ctx._paths:
        return ctx._paths[who]
    cell = f"paths-{who}"

    def measure() -> dict:
        from lada.protocol.paths import sample_paths_verified

        public = list(ctx.views[who].public)
        if who != "server":
            from lada.models.warmup import _client_domain

            dom = _client_domain(ctx.cfg, int(who.removeprefix("client")))
            public = [ex for ex in public if ex.domain == dom]
        lm = ctx.model(who)
        cands = sample_paths_verified(ctx.cfg, lm, public, seed=ctx.seed * 1009 + 17)
        by_id = {ex.id: ex for ex in public}
        return {"questions": len(public), "sampled": len(public) * ctx.cfg.generation.paths_per_question,
                "paths": [{"id": c.question_id, "prompt": c.prompt, "text": c.text, "steps": c.steps,
                           "domain": by_id[c.question_id].domain} for c in cands]}

    ctx._paths[who] = run_cell(ctx, cell, measure)["paths"]
    return ctx._paths[who]


def _pairs(paths: list[dict]) -> list[tuple[str, str]]:
    return [(p["prompt"], p["text"]) for p in paths]


def _own_pairs(ctx: Context, who: str) -> list[tuple[str, str]]:
    from lada.hosts.common import private_pairs

    return private_pairs(ctx.views[who].train)


def cell_base(ctx: Context, who: str) -> dict:
    return _eval(ctx, ctx.model(who), who)


def cell_down(ctx: Context, k: int, control: bool) -> dict:
    from lada.hosts.common import transfer_steps

    who = f"client{k}"
    own, paths = _own_pairs(ctx, who), _pairs(_candidates(ctx, "server"))
    steps = transfer_steps(ctx.cfg, len(own) + len(paths), ctx.epochs)
    return _train_eval(ctx, who, own if control else own + paths, steps, ctx.seed * 101 + k,
                       f"{who} {'own only' if control else 'own + LLM paths'}")


def _client_domain_paths(ctx: Context) -> list[dict]:
    return [p for k in ctx.clients for p in _candidates(ctx, f"client{k}")]


def cell_up(ctx: Context, control: bool) -> dict:
    from lada.hosts.common import replay_pairs, transfer_steps

    paths = _pairs(_client_domain_paths(ctx))
    train = ctx.views["server"].train
    n = 2 * len(paths)
    # treated: the paths plus as many replayed own examples; control: own examples only
    pairs = replay_pairs(train, n, seed=ctx.seed * 31) if control else \
        paths + replay_pairs(train, len(paths), seed=ctx.seed * 31)
    steps = transfer_steps(ctx.cfg, n, ctx.epochs)
    return _train_eval(ctx, "server", pairs, steps, ctx.seed * 101 + 99,
                       "llm own only" if control else "llm own + client paths")


def _bucket_token_budget(ctx: Context, k: int) -> tuple[dict[str, list[dict]], int, Any]:
    from lada.models.training import encode_pairs

    paths = _candidates(ctx, "server")
    buckets = {f"{lo}-{hi}": [p for p in paths if lo <= p["steps"] <= hi] for lo, hi in BUCKETS}
    lm = ctx.model(f"client{k}")
    tokens = {b: sum(len(e["input_ids"]) for e in encode_pairs(lm.tokenizer, _pairs(ps), ctx.cfg.train.max_length))
              for b, ps in buckets.items()}
    nonempty = [t for t in tokens.values() if t]
    budget = int(ctx.epochs * min(nonempty)) if nonempty else 0  # the smallest bucket gets `epochs` passes
    return buckets, budget, tokens


def cell_learn(ctx: Context, k: int, bucket: str) -> dict:
    """Client k on the LLM's paths of one length bucket only, at the same token budget
    for every bucket (steps x batch x the bucket's mean tokens per path)."""
    buckets, budget, tokens = _bucket_token_budget(ctx, k)
    paths = buckets[bucket]
    who = f"client{k}"
    if not paths:
        return {"skipped": f"no verified LLM path of {bucket} steps", "paths": 0}
    mean_tok = tokens[bucket] / len(paths)
    steps = max(1, round(budget / (mean_tok * ctx.cfg.train.batch_size)))
    out = _train_eval(ctx, who, _pairs(paths), steps, ctx.seed * 101 + 50 + k, f"{who} LLM paths {bucket}")
    return {**out, "paths": len(paths), "token_budget": budget, "mean_path_tokens": mean_tok}


def cell_central(ctx: Context, who: str) -> dict:
    """Upper bound: ``who``'s model trained on the pooled data of the federation."""
    from lada.hosts.common import private_pairs, replay_pairs, transfer_steps

    pooled = [p for k in ctx.clients for p in private_pairs(ctx.views[f"client{k}"].train)]
    pooled += private_pairs(ctx.views["server"].public)  # public questions with their gold rationales
    if who == "server":
        pooled += replay_pairs(ctx.views["server"].train, len(pooled), seed=ctx.seed * 37)
    steps = transfer_steps(ctx.cfg, len(pooled), ctx.epochs)
    return _train_eval(ctx, who, pooled, steps, ctx.seed * 101 + 77, f"{who} centralised")


def cells(ctx: Context, parts: tuple[str, ...] = ("base", "down", "up", "learn", "central")) -> list[tuple[str, Callable[[], dict]]]:
    """Every cell of one seed, in the order they run (cheap ones first)."""
    out: list[tuple[str, Callable[[], dict]]] = []
    whos = ["server", *(f"client{k}" for k in ctx.clients)]
    if "base" in parts:
        out += [(f"base-{w}", (lambda w=w: cell_base(ctx, w))) for w in whos]
    if "down" in parts:
        for k in ctx.clients:
            out += [(f"down-client{k}", lambda k=k: cell_down(ctx, k, control=False)),
                    (f"control-client{k}", lambda k=k: cell_down(ctx, k, control=True))]
    if "up" in parts:
        out += [("up-server", lambda: cell_up(ctx, control=False)), ("control-server", lambda: cell_up(ctx, control=True))]
    if "learn" in parts:
        out += [(f"learn-client{k}-{lo}-{hi}", lambda k=k, b=f"{lo}-{hi}": cell_learn(ctx, k, b))
                for k in ctx.clients for lo, hi in BUCKETS]
    if "central" in parts:
        out += [(f"central-{w}", lambda w=w: cell_central(ctx, w)) for w in whos]
    return out


def _cell_config(cfg: RunConfig) -> dict:
    """The config as a cell records it. Where the models ran (cpu, cuda) is not part of
    what a cell measures: cells measured on a GPU machine are reused, and summarised,
    anywhere."""
    d = cfg.to_dict()
    for model in [d.get("server", {}), *d.get("clients", [])]:
        model.pop("device", None)
    return d


def _cell_key(ctx: Context, name: str) -> str:
    blob = json.dumps([FORMAT, name, _cell_config(ctx.cfg), ctx.seed, ctx.epochs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]




def _partial(ctx: Context, seed: int) -> Path | None:
    """Where a training of the current cell keeps its state until the cell is stored (one
    file per training seed; the cell's key in the name, so a changed cell never loads it)."""
    if ctx._cell is None:
        return None
    name, key = ctx._cell
    return ctx.out / f"seed{ctx.seed}" / f"{name}.{key}.{seed}.partial.pt"


def _drop_partials(ctx: Context, name: str, keep_key: str | None = None) -> None:
    for p in (ctx.out / f"seed{ctx.seed}").glob(f"{name}.*.partial.pt"):
        if keep_key is None or p.name[len(name) + 1:].split(".")[0] != keep_key:
            p.unlink(missing_ok=True)


def _write_cell(path: Path, record: dict) -> None:
    """Store a cell's record atomically (a stopped job never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def run_cell(ctx: Context, name: str, measure: Callable[[], dict], log: Callable[[str], None] | None = None) -> dict:
    """The cell's stored result if its inputs are unchanged, else measure and store it."""
    from lada import timing

    path = ctx.out / f"seed{ctx.seed}" / f"{name}.json"
    key = _cell_key(ctx, name)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key or (stored.get("cell") == name and stored.get("seed") == ctx.seed
                                            and stored.get("epochs") == ctx.epochs and stored.get("format") == FORMAT
                                            and config_matches(stored.get("config"), ctx.cfg)):
                return stored["result"]
        except (OSError, ValueError):
            pass
    timing.reset()
    _drop_partials(ctx, name, keep_key=key)  # states of this cell under other inputs
    outer = ctx._cell, ctx._seconds_before  # a cell may measure another (the paths it trains on)
    ctx._cell, ctx._seconds_before = (name, key), 0.0
    t0 = time.perf_counter()
    try:
        result = measure()
        seconds = time.perf_counter() - t0 + ctx._seconds_before
    finally:
        ctx._cell, ctx._seconds_before = outer
    record = {"key": key, "cell": name, "seed": ctx.seed, "seconds": round(seconds, 1),
              "devices": sorted({m.device for m in [ctx.cfg.server, *ctx.cfg.clients]}),
              "format": FORMAT, "epochs": ctx.epochs, "config": _cell_config(ctx.cfg),
              "time_by_kind": {k: round(v, 1) for k, v in timing.totals().items()}, "result": result}
    _write_cell(path, record)
    _drop_partials(ctx, name)
    if log:
        log(f"seed {ctx.seed} {name}: {_brief(result)} ({record['seconds']:.0f}s)")
    return result


# What a centralised cell does not depend on: no host, plug-in or engine takes part in it.
_NOT_IN_CENTRAL = ("host", "plugin", "engine")


def adopt_cell(ctx: Context, name: str, source: Path) -> str:
    """Take cell ``name`` of this seed from another measurement folder ``source`` (a
    premises ``--out``) when it measured the same thing, so that it is not trained twice;
    returns "" when adopted, else why not. Only ``central-*`` cells qualify: they depend on
    the data, models and training budget, not on the host, plug-in or engine, so a grid's
    centralised bound and the premises' bound of the same base config are one measurement.
    The adopted record keeps its seconds and names its source (``reused_from``)."""
    if not name.startswith("central-"):
        return f"{name} is not a centralised cell"
    path = Path(source) / f"seed{ctx.seed}" / f"{name}.json"
    if not path.is_file():
        return f"{path} does not exist"
    try:
        stored = json.loads(path.read_text())
        meta = (stored["cell"], stored["seed"], stored["epochs"], stored["format"])
        if "result" not in stored:
            raise KeyError("result")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is not a readable cell ({e})"
    if meta != (name, ctx.seed, ctx.epochs, FORMAT):
        return f"{path} measured cell/seed/epochs/format {meta}, this one needs {(name, ctx.seed, ctx.epochs, FORMAT)}"
    current = _cell_config(ctx.cfg)
    config = {**stored.get("config", {}), **{k: current[k] for k in _NOT_IN_CENTRAL}}
    if not config_matches(config, ctx.cfg):
        return f"{path} was measured under another config (data, models or training differ)"
    _write_cell(ctx.out / f"seed{ctx.seed}" / f"{name}.json",
                {**stored, "key": _cell_key(ctx, name), "config": current, "reused_from": str(path.absolute())})
    return ""


def _brief(result: dict) -> str:
    if "accuracy" in result:
        extra = f", domain {100 * result['domain_accuracy']:.1f}%" if "domain_accuracy" in result else ""
        steps = f", {result['train_steps']} steps" if "train_steps" in result else ""
        chain = f", chain right {100 * result['chain_right']:.1f}%" if "chain_right" in result else ""
        return f"{100 * result['accuracy']:.1f}% of {result['n']}{extra}{chain}{steps}"
    return ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, (list, dict)))


def context(cfg_path: str | Path, seed: int, out: Path, overrides: list[str] | None = None,
            epochs: float | None = None) -> Context:
    from lada.data import build_federated_data
    from lada.data.split import views

    cfg = load_config(cfg_path, [*(overrides or []), f"seed={seed}"])
    fed = build_federated_data(cfg.data, cfg.data.seed)  # the data owner's view: every participant's sets
    eps = float(epochs) if epochs else cfg.train.transfer_epochs * cfg.rounds
    return Context(cfg=cfg, seed=seed, epochs=eps, out=out, views=views(fed))


def measure(cfg_path: str | Path, out: str | Path, seeds: list[int], overrides: list[str] | None = None,
            epochs: float | None = None, parts: tuple[str, ...] = ("base", "down", "up", "learn", "central"),
            log: Callable[[str], None] | None = None) -> dict:
    """Measure (or reuse) every cell for every seed; write premises.json and premises.md."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, dict]] = {}
    ctx = None
    for seed in seeds:
        ctx = context(cfg_path, seed, out, overrides, epochs)
        todo = cells(ctx, parts)
        results[seed] = {}
        for i, (name, fn) in enumerate(todo, 1):
            results[seed][name] = run_cell(ctx, name, fn, log=lambda m, i=i, n=len(todo): log(f"[{i}/{n}] {m}"))
        for who in ["server", *(f"client{k}" for k in ctx.clients)]:  # what the transfers trained on
            if who in ctx._paths or (out / f"seed{seed}" / f"paths-{who}.json").is_file():
                cands = _candidates(ctx, who)  # stored: read back, not sampled again
                results[seed][f"paths-{who}"] = {"verified": len(cands), "by_steps": _count(cands, "steps"),
                                                 "by_domain": _count(cands, "domain")}
    summary = summarise(results, ctx)
    chains = summarise(results, ctx, "chain_right")
    (out / "premises.json").write_text(json.dumps({"config": str(cfg_path), "overrides": overrides or [],
                                                   "seeds": seeds, "epochs": ctx.epochs if ctx else None,
                                                   "summary": summary, "summary_chain_right": chains,
                                                   "cells": results}, indent=1, sort_keys=True))
    (out / "premises.md").write_text(format_tables(summary, str(cfg_path), seeds, ctx.epochs if ctx else 0, chains))
    return summary


def _count(paths: list[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in paths:
        out[str(p[key])] = out.get(str(p[key]), 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- summary

def summarise(results: dict[int, dict[str, dict]], ctx: Context | None, metric: str = "accuracy") -> dict:
    """Per participant: ``metric`` (mean over seeds), headroom with its noise, bounds.
    ``metric`` is a cell's accuracy, or on a linked task its chain_right (``chain_share``);
    both are shares of the same n test problems, so the same binomial noise applies."""
    if ctx:
        clients = [f"client{k}" for k in ctx.clients]
    else:  # from the cells themselves (summaries of stored measurements)
        clients = sorted({c.split("-")[1] for r in results.values() for c in r
                          if c.startswith(("base-client", "control-client"))}, key=lambda w: int(w[6:]))
    out: dict[str, dict] = {}
    for who in ["server", *clients]:
        treated, control = _treated_control(who)
        row: dict[str, Any] = {}
        for label, cell in _row_cells(who, treated, control):
            accs = [r[cell][metric] for r in results.values() if cell in r and metric in r[cell]]
            if accs:
                row[label] = accs
            if who == "server":
                doms = [r[cell][f"domain_{metric}"] for r in results.values()
                        if cell in r and f"domain_{metric}" in r[cell]]
                if doms:
                    row[f"{label}_domain"] = doms
        n = next((r[control]["n"] for r in results.values() if control in r), 0)
        row["n"] = n
        _add_headroom(row, n, _paired(results, treated, control, lambda c: c.get(metric)))
        if who == "server" and row.get("treated_domain") and row.get("control_domain"):
            _add_headroom(row, next(r[control]["domain_n"] for r in results.values() if control in r),
                          _paired(results, treated, control, lambda c: c.get(f"domain_{metric}")), "_domain")
        if who != "server":
            row["parts"] = _parts(results, who, treated, control, metric)
            for lo, hi in BUCKETS:
                cell = f"learn-{who}-{lo}-{hi}"
                accs = [r[cell][metric] for r in results.values() if cell in r and metric in r[cell]]
                if accs:
                    row[f"learn_{lo}-{hi}"] = accs
        out[who] = row
    if len(clients) > 1:
        out["slm-mean"] = _slm_mean(results, out, clients, metric)
    return out


def _treated_control(who: str) -> tuple[str, str]:
    """Cell names of a participant's transfer (the LLM: up; a client: down) and its control."""
    return ("up-server" if who == "server" else f"down-{who}"), f"control-{who}"


def _row_cells(who: str, treated: str, control: str) -> tuple[tuple[str, str], ...]:
    """(label, cell name) of the columns of a participant's row."""
    return (("warmup", f"base-{who}"), ("control", control), ("treated", treated), ("central", f"central-{who}"))


def _paired(results: dict[int, dict[str, dict]], treated: str, control: str, get) -> list[tuple[float, float]]:
    """(treated, control) values of the seeds that have both cells: a headroom is a
    difference within one seed, never across seeds."""
    pairs = []
    for r in results.values():
        t, c = (get(r[cell]) if cell in r else None for cell in (treated, control))
        if t is not None and c is not None:
            pairs.append((t, c))
    return pairs


def _add_headroom(row: dict, n: int, pairs: list[tuple[float, float]], suffix: str = "") -> None:
    """treated - control per seed, its binomial noise on ``n`` problems and the verdict."""
    if pairs:
        row[f"headroom{suffix}"] = [a - b for a, b in pairs]
        row[f"headroom{suffix}_se"] = [diff_se(a, b, n) for a, b in pairs]
        row[f"headroom{suffix}_clear"] = clearly_above(row[f"headroom{suffix}"], row[f"headroom{suffix}_se"])


def _slm_mean(results: dict[int, dict[str, dict]], rows: dict[str, dict], clients: list[str],
              metric: str = "accuracy") -> dict:
    """The clients' mean accuracy per seed (what the grid tables report as "SLM mean"),
    over the seeds on which every client has the cell; its headroom's standard error
    combines the clients' independent ones: sqrt(sum se^2) / K."""
    mean: dict[str, Any] = {"n": sum(rows[w].get("n", 0) for w in clients)}
    for label in ("warmup", "control", "treated", "central"):
        cells = [dict(_row_cells(w, *_treated_control(w)))[label] for w in clients]
        per_seed = [[r[c][metric] for c in cells] for r in results.values()
                    if all(metric in r.get(c, {}) for c in cells)]
        if per_seed:
            mean[label] = [statistics.fmean(v) for v in per_seed]
    names = {w: _treated_control(w) for w in clients}
    pairs = [[(r[t][metric], r[c][metric], rows[w]["n"]) for w, (t, c) in names.items()]
             for r in results.values()
             if all(metric in r.get(cell, {}) for t, c in names.values() for cell in (t, c))]
    if pairs:
        mean["headroom"] = [statistics.fmean(t for t, _, _ in seed) - statistics.fmean(c for _, c, _ in seed)
                            for seed in pairs]
        mean["headroom_se"] = [math.sqrt(sum(diff_se(t, c, n) ** 2 for t, c, n in seed)) / len(clients)
                               for seed in pairs]
        mean["headroom_clear"] = clearly_above(mean["headroom"], mean["headroom_se"])
    return mean


def _parts(results: dict[int, dict[str, dict]], who: str, treated: str, control: str,
           metric: str = "accuracy") -> dict[str, dict]:
    """Rows per domain of a mixed client test set (own domain and general problems)."""
    doms = sorted({d for r in results.values() if control in r for d in r[control].get("by_domain", {})})
    parts: dict[str, dict] = {}
    for d in doms:
        sub: dict[str, Any] = {}
        for label, cell in _row_cells(who, treated, control):
            accs = [r[cell]["by_domain"][d][metric] for r in results.values()
                    if metric in r.get(cell, {}).get("by_domain", {}).get(d, {})]
            if accs:
                sub[label] = accs
        sub["n"] = next(r[control]["by_domain"][d]["n"] for r in results.values() if control in r)
        _add_headroom(sub, sub["n"], _paired(results, treated, control,
                                             lambda c, d=d: c.get("by_domain", {}).get(d, {}).get(metric)))
        parts[d] = sub
    return parts


def _pct(xs: list[float] | None) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def _head(row: dict, suffix: str = "") -> str:
    d = row.get(f"headroom{suffix}")
    if not d:
        return "-"
    se = statistics.fmean(row[f"headroom{suffix}_se"])
    verdict = "clear" if row[f"headroom{suffix}_clear"] else "within noise"
    return f"{_pct(d).replace(' ± ', ' ± ')} (2se {200 * se:.1f}; {verdict})"


def format_tables(summary: dict, config: str, seeds: list[int], epochs: float, chains: dict | None = None) -> str:
    lines = [f"Premises of `{config}`, seeds {seeds}; every training: {epochs:g} passes over its mix, "
             "control = the same steps on own data only. Accuracy (%) on the test sets the grid reports "
             "(mean ± std over seeds); headroom = treated - control, 2se = twice the binomial standard error "
             "of that difference.", "", *_participant_table(summary)]
    if chains and any(k in row for row in chains.values() for k in ("warmup", "control", "treated")):
        lines += ["", "Chains right (a linked task: the answer line follows from the chain's value): the share "
                  "(%) of test outputs whose chain reached the gold value, on the same test sets, cells and noise "
                  "rule. A yes/no answer is right half the time after a wrong chain, so accuracy moves by about "
                  "half of what the chains gain.", "", *_participant_table(chains)]
    clients = [w for w in summary if w not in ("server", "slm-mean")]
    if any(any(k.startswith("learn_") for k in summary[w]) for w in clients):
        head = [f"LLM paths of {lo}-{hi} steps" for lo, hi in BUCKETS]
        lines += ["", "Learnability: client trained on the LLM's verified paths of one length bucket only, at an "
                  "equal token budget per bucket; accuracy (%) on its test set.", "",
                  "| participant | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for w in clients:
            lines.append(f"| {w} | " + " | ".join(_pct(summary[w].get(f"learn_{lo}-{hi}")) for lo, hi in BUCKETS) + " |")
    return "\n".join(lines) + "\n"


def _participant_table(summary: dict) -> list[str]:
    """One row per participant (and per part of a mixed test set): warm-up, control,
    treated, headroom with its verdict, centralised."""
    lines = ["| participant | test n | warm-up | standalone (own data) | + transfer (oracle) | headroom | "
             "centralised (upper) |", "|---|---|---|---|---|---|---|"]
    for who, row in summary.items():
        name = {"server": "LLM (all domains)", "slm-mean": "SLM mean"}.get(who, who)
        lines.append(f"| {name} | {row.get('n', '-')} | {_pct(row.get('warmup'))} | {_pct(row.get('control'))} | "
                     f"{_pct(row.get('treated'))} | {_head(row)} | {_pct(row.get('central'))} |")
        for dom, sub in row.get("parts", {}).items():
            lines.append(f"| {name}: {dom} part | {sub.get('n', '-')} | {_pct(sub.get('warmup'))} | "
                         f"{_pct(sub.get('control'))} | {_pct(sub.get('treated'))} | {_head(sub)} | "
                         f"{_pct(sub.get('central'))} |")
        if who == "server" and row.get("treated_domain"):
            lines.append(f"| LLM (client domains only) | - | {_pct(row.get('warmup_domain'))} | "
                         f"{_pct(row.get('control_domain'))} | {_pct(row.get('treated_domain'))} | "
                         f"{_head(row, '_domain')} | {_pct(row.get('central_domain'))} |")
    return lines


def main_premises(config: str, out: str, seeds: list[int], overrides: list[str], epochs: float | None,
                  parts: str = "") -> int:
    from lada.threads import fit_threads, registered_run

    chosen = tuple(p.strip() for p in parts.split(",") if p.strip()) or ("base", "down", "up", "learn", "central")
    unknown = [p for p in chosen if p not in ("base", "down", "up", "learn", "central")]
    if unknown:
        raise SystemExit(f"lada premises: --parts: unknown {unknown}; known: base, down, up, learn, central")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise SystemExit(f"lada premises: --epochs: must be a finite number > 0, got {epochs:g}")
    with registered_run():
        fit_threads()
        measure(config, out, seeds, overrides, epochs, chosen)
    print(Path(out, "premises.md").read_text())
    return 0
