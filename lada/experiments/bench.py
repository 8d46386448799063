"""Benchmarks of the hot paths against this machine's limits, written to a JSON and a
Markdown file:

1. the limits: fp32 and bf16 matmul peak (GFLOP/s) and memory bandwidth, measured in
   the same run with the same threads;
2. every case (sampling, greedy evaluation, scoring, training fp32 and bf16, for the
   server model and a client model) as achieved GFLOP/s and % of the fp32 peak;
   2 x params x tokens for decoding and scoring, 6 x params x tokens for training
   (attention excluded, padding not counted), and against its shape ceiling: the
   same model's matrix products alone at the case's rows, timed without the framework;
   then where the LLM's sampling and training time goes by kind of operator (matmul,
   attention, the sampling sort, the rest), from torch's profiler;
3. one default round of cot+lada (inline engine) split into sampling, scoring,
   training, evaluation, filter, serialisation and engine/host overhead, with a lower
   bound on its seconds if every model case ran at its shape ceiling;
4. scaling: 3, 10 and 30 simulated clients (tiny-test models) through Flower's
   simulation runtime: seconds per round and peak resident memory per round.

    python -m lada.experiments.bench --out bench/results.json [--config configs/default.toml] [--skip-scaling]

Numbers depend on the machine and its load; the file records threads and CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ----------------------------------------------------------------------------- limits

def matmul_peak(dtype, n: int = 1024, seconds: float = 1.5) -> float:
    """GFLOP/s of a square matmul (the best of repeated runs)."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def cpu_description() -> str:
    """The CPU's model name and the vector extensions that decide the matmul peaks
    (bf16 is emulated, and slow, without avx512_bf16 or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(shown) or 'no avx2'})"


def memory_bandwidth(mb: int = 256) -> float:
    """GB/s of a large tensor copy (read + write)."""
    import torch

    src = torch.ones(mb * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    secs, _ = _timed(lambda: dst.copy_(src), repeat=5)
    return 2 * src.numel() * 4 / secs / 1e9


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every matrix product of a forward pass: torch Linear layers and
    GPT-2's Conv1D (weight stored [in, out]), the LM head included."""
    import torch

    shapes = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes.append((mod.in_features, mod.out_features))
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:
            shapes.append(tuple(mod.weight.shape))
    return shapes


def gemm_ceiling(shapes: list[tuple[int, int]], rows: int, backward: bool, seconds: float = 1.0) -> float:
    """GFLOP/s of the model's own matrix products at ``rows`` tokens, nothing else: the
    forward products ``x @ W.T`` and, with ``backward``, the two gradient products of
    each. No framework, no attention, no elementwise work: what the hot loop could
    reach if it were nothing but its matmuls at these (narrow) shapes."""
    import torch

    gen = torch.Generator().manual_seed(0)
    mats = [(torch.randn(rows, i, generator=gen), torch.randn(o, i, generator=gen), torch.randn(rows, o, generator=gen))
            for i, o in shapes]
    flops = sum(2 * rows * i * o * (3 if backward else 1) for i, o in shapes)

    def once() -> None:
        for x, w, g in mats:
            x @ w.T
            if backward:
                g @ w
                g.T @ x

    once()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


# ----------------------------------------------------------------------------- cases

def _case(cases: dict, name: str, seconds: float, flops: float, peak: float, ceiling: float | None = None,
          **extra) -> None:
    rate = flops / seconds / 1e9
    cases[name] = {"seconds": seconds, "gflops": rate, "pct_of_fp32_peak": 100 * rate / peak, **extra}
    if ceiling is not None:  # the same model's matmuls alone at the case's shapes
        cases[name].update(shape_ceiling_gflops=ceiling, pct_of_shape_ceiling=100 * rate / ceiling)


def bench_cases(cfg, peak: float, bf16: bool = True) -> tuple[dict, dict]:
    """Every model case, and where the LLM's sampling and training time goes
    (``op_profile``); ``bf16=False`` skips the bf16 training cases (emulated bf16 is
    tens of times slower than fp32 and says nothing about a real run)."""
    import torch

    from lada.data import build_federated_data
    from lada.data.records import example_prompt, example_target
    from lada.models.generation import evaluate, sample_paths
    from lada.models.loading import load_model
    from lada.models.scoring import sequence_logprobs
    from lada.models.training import encode_pairs, train_steps
    from lada.plugin.filter import FilterConfig, LadaFilter
    from lada.protocol.node import participant_checkpoint

    fed = build_federated_data(cfg.data, cfg.data.seed)
    gen = cfg.generation
    cases: dict = {}
    shares: dict = {}
    for who, mcfg in [("llm", cfg.server), ("client-0", cfg.clients[0])]:
        lm = load_model(mcfg, participant_checkpoint(cfg, who, progress=True))
        params = sum(p.numel() for p in lm.model.parameters())
        shapes = linear_shapes(lm.model)
        prompts = [example_prompt(ex) for ex in fed.public]
        secs, paths = _timed(lambda: sample_paths(lm, prompts, gen.paths_per_question, gen, seed=0, progress=False))
        new = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for ps in paths for t in ps)
        _case(cases, f"{who} ({params / 1e6:.2f}M): sample {len(prompts)}x{gen.paths_per_question} paths, "
                     f"batch {gen.batch_size}", secs, 2 * params * new, peak,
              gemm_ceiling(shapes, gen.batch_size, backward=False), new_tokens_per_s=new / secs)
        test = fed.server_test if who == "llm" else fed.clients[0].test
        secs, res = _timed(lambda: evaluate(lm, test, gen, progress=False))
        new = sum(len(lm.tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in res.outputs)
        _case(cases, f"{who}: greedy eval of {len(test)}, batch {gen.eval_batch_size}", secs, 2 * params * new, peak,
              gemm_ceiling(shapes, min(gen.eval_batch_size, len(test)), backward=False),
              new_tokens_per_s=new / secs, accuracy=res.accuracy)
        pairs = [(example_prompt(ex), example_target(ex)) for ex in fed.public[:256]]
        tokens = sum(len(e["input_ids"]) for e in encode_pairs(lm.tokenizer, pairs, cfg.train.max_length))
        secs, _ = _timed(lambda: sequence_logprobs(lm, [p for p, _ in pairs], [t for _, t in pairs], batch_size=64),
                         repeat=2)
        _case(cases, f"{who}: score {len(pairs)} paths, batch 64", secs, 2 * params * tokens, peak,
              gemm_ceiling(shapes, 64 * tokens // len(pairs), backward=False), tokens_per_s=tokens / secs)
        steps = 20
        for precision in ("fp32", "bf16") if bf16 else ("fp32",):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            start = {k: v.clone() for k, v in lm.model.state_dict().items()}
            with ctx:
                secs, stats = _timed(lambda: train_steps(lm, pairs, steps, cfg.train, seed=0, progress=False))
            lm.model.load_state_dict(start)
            _case(cases, f"{who}: train {steps} steps @ batch {cfg.train.batch_size}, {precision}", secs,
                  6 * params * stats["tokens"], peak,
                  gemm_ceiling(shapes, stats["tokens"] // steps, backward=True) if precision == "fp32" else None,
                  tokens_per_s=stats["tokens"] / secs, loss=stats["loss"])
        if who == "llm":
            shares = op_profile(lm, fed.public, cfg)
    d = cfg.server.hidden_size + 4
    x = torch.randn(cfg.data.public_size * gen.paths_per_question, d, generator=torch.Generator().manual_seed(0))
    filt = LadaFilter(FilterConfig(seed=0))
    secs, idx = _timed(lambda: filt.select(x, len(x) // 2))
    cases[f"filter: cold-start select of {len(x)} contexts (k-means)"] = {"seconds": secs}
    secs, _ = _timed(lambda: filt.update(x[idx], torch.rand(len(idx))))
    cases[f"filter: update on {len(idx)} rewards ({filt.cfg.epochs} epochs)"] = {"seconds": secs}
    secs, _ = _timed(lambda: filt.select(x, len(x) // 2))
    cases[f"filter: bandit select of {len(x)} contexts"] = {"seconds": secs}
    return cases, shares


# ----------------------------------------------------------------------------- where a case's time goes

OP_GROUPS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
             ("attention", ("scaled_dot_product",)),
             ("sampling sort", ("aten::sort",)))


def op_shares(fn) -> dict[str, float]:
    """Share of self CPU time (%) of ``fn`` by kind of operator (``OP_GROUPS``, the
    rest as "other"), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals = {name: 0.0 for name, _ in OP_GROUPS} | {"other": 0.0}
    for ev in prof.key_averages():
        group = next((name for name, keys in OP_GROUPS if any(k in ev.key for k in keys)), "other")
        totals[group] += ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: 100 * v / whole for k, v in totals.items()}


def op_profile(lm, public: list, cfg) -> dict[str, dict[str, float]]:
    """Where the LLM's sampling and training time goes (a smaller slice of the cases:
    128 public questions, 10 steps)."""
    from lada.data.records import example_prompt, example_target
    from lada.models.generation import sample_paths
    from lada.models.training import train_steps

    prompts = [example_prompt(ex) for ex in public[:128]]
    pairs = [(example_prompt(ex), example_target(ex)) for ex in public[:256]]
    gen = cfg.generation
    return {
        f"llm: sample 128x{gen.paths_per_question} paths": op_shares(
            lambda: sample_paths(lm, prompts, gen.paths_per_question, gen, seed=0, progress=False)),
        "llm: train 10 steps, fp32": op_shares(lambda: train_steps(lm, pairs, 10, cfg.train, seed=0, progress=False)),
    }


# ----------------------------------------------------------------------------- one round, by kind of work

CATEGORIES = ("sampling", "scoring", "training", "evaluation", "filter", "serialisation")


def _instrument() -> None:
    """Attribute FedMKT's top-k forwards to scoring. Everything else is timed where it
    runs (lada.timing categories in the models package and the LaDa plug-in, whose
    transfer lifecycle times its own work as "filter")."""
    from lada.timing import timed_fn
    import lada.hosts.fedmkt as fedmkt

    if not hasattr(fedmkt.compute_topk, "__wrapped__"):
        fedmkt.compute_topk = timed_fn("scoring")(fedmkt.compute_topk)


def round_breakdown(config: str, method: str, work: Path) -> dict:
    """Round 1 of ``method`` on ``config`` in one process (inline engine), by category."""
    from lada import timing
    from lada.config import load_config
    from lada.experiments.grid import apply_method
    from lada.experiments.runner import run

    _instrument()
    cfg = load_config(config, ["rounds=1", f'run_dir="{work / method.replace("+", "-")}"'])
    apply_method(cfg, method)
    timing.reset()
    rows = run(cfg, engine="inline", overwrite=True)
    totals = timing.totals()
    llm0 = next(r for r in rows if r["round"] == 0 and r["participant"] == "llm")
    llm1 = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    eval0 = llm0["eval_seconds"] + llm0.get("clients_eval_seconds", 0.0)
    eval1 = llm1["eval_seconds"] + llm1.get("clients_eval_seconds", 0.0)
    round_s = llm1["seconds"] + eval1
    parts = {c: totals.get(c, 0.0) for c in CATEGORIES}
    # round 0 (evaluation only) ran too: its evaluation is not part of round 1
    parts["evaluation"] = max(0.0, parts["evaluation"] - eval0)
    parts["engine and host overhead"] = max(0.0, round_s - sum(parts.values()))
    return {"method": method, "round_seconds": round_s,
            "phases": {k: llm1[k] for k in llm1 if k.startswith("phase_")},
            "parts": {k: {"seconds": v, "pct": 100 * v / round_s} for k, v in parts.items()},
            "accuracy": {r["participant"]: r["accuracy"] for r in rows if r["round"] == 1}}


# ----------------------------------------------------------------------------- scaling

def _scale_config(n: int, run_dir: Path):
    import tomllib

    from lada.config import config_from_dict

    path = Path(__file__).resolve().parents[2] / "configs" / "scale-30.toml"
    data = tomllib.loads(path.read_text())
    data["clients"] = data["clients"][:n]
    data["data"]["num_clients"] = n
    data["run_dir"] = str(run_dir)
    return config_from_dict(data, f"{path} cut to {n} clients")


class _RssSampler(threading.Thread):
    """Peak resident memory (sum over this process's descendants: SuperLink, ServerApp,
    Ray workers) per round, the round read from the metrics file's length."""

    def __init__(self, metrics: Path) -> None:
        super().__init__(daemon=True)
        self.metrics = metrics
        self.peak: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.25):
            rss = 0
            for p in me.children(recursive=True):
                try:
                    rss += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            done = set()
            if self.metrics.exists():
                for line in self.metrics.read_text().splitlines():
                    try:
                        done.add(int(json.loads(line)["round"]))
                    except (ValueError, KeyError):
                        pass
            rnd = max(done) + 1 if done else 0
            self.peak[rnd] = max(self.peak.get(rnd, 0.0), rss / 2 ** 20)


def scaling(work: Path, sizes=(3, 10, 30)) -> list[dict]:
    from lada.experiments.report import read_metrics
    from lada.experiments.runner import run

    out = []
    for n in sizes:
        run_dir = work / f"scale-{n}"
        cfg = _scale_config(n, run_dir)
        from lada.experiments.runner import warm_up_all

        warm_up_all(cfg)  # warm-ups are cached; not part of the rounds
        sampler = _RssSampler(run_dir / "metrics.jsonl")
        t0 = time.perf_counter()
        sampler.start()
        try:
            run(cfg, engine="simulation", overwrite=True)
        finally:
            sampler.stop.set()
            sampler.join()
        rows = read_metrics(run_dir / "metrics.jsonl")
        llm = {r["round"]: r for r in rows if r["participant"] == "llm"}
        per_round = [llm[r]["seconds"] + llm[r].get("eval_seconds", 0) + llm[r].get("clients_eval_seconds", 0)
                     for r in sorted(llm) if r > 0]
        out.append({"clients": n, "rounds": cfg.rounds, "wall_seconds": time.perf_counter() - t0,
                    "seconds_per_round": per_round,
                    "peak_rss_mb_per_round": [sampler.peak.get(r, 0.0) for r in range(1, cfg.rounds + 1)],
                    "client_accuracy_last_round": sum(r["accuracy"] or 0 for r in rows
                                                      if r["round"] == cfg.rounds and r["participant"] != "llm") / n})
    return out


# ----------------------------------------------------------------------------- report

_CASE_OF_PART = {"sampling": ": sample ", "evaluation": ": greedy eval ", "scoring": ": score ", "training": ": train "}


def round_bound(breakdown: dict, cases: dict) -> float | None:
    """Seconds of the round if each kind of model work ran at its shape ceiling: the
    part's seconds times the lowest achieved/ceiling ratio among the cases of that kind
    (the most room either model leaves). A lower bound on the round, so an upper bound
    on any fp32 speed-up that keeps the models and the work unchanged."""
    total = 0.0
    for part, v in breakdown["parts"].items():
        key = _CASE_OF_PART.get(part)
        ratios = [c["pct_of_shape_ceiling"] / 100 for name, c in cases.items()
                  if key and key in name and "pct_of_shape_ceiling" in c]
        if key and not ratios:
            return None
        total += v["seconds"] * min([1.0, *ratios])
    return total


def to_markdown(results: dict) -> str:
    lim = results["limits"]
    lines = [f"CPU: {results.get('cpu', '?')}. Threads: {results['torch_threads']} of {results['cpus']} CPUs; "
             f"torch {results['torch']}; "
             f"config `{results['config']}`.", "",
             f"Measured limits: fp32 matmul peak **{lim['fp32_matmul_gflops']:.0f} GFLOP/s**, bf16 matmul "
             f"**{lim['bf16_matmul_gflops']:.0f} GFLOP/s**, memory copy {lim['memory_gb_per_s']:.1f} GB/s."
             + ("" if results.get("bf16_cases", True) else " bf16 is emulated on this CPU (below half the fp32 "
                "peak): the bf16 training cases are skipped."), "",
             "The shape ceiling is the same model's matrix products alone, at the case's rows (batch x tokens), "
             "timed without the framework: a bound on what that case can reach on this CPU (it differs from the "
             "square-matmul peak in both directions, with the cache and the matrices' widths).", "",
             "| case | seconds | GFLOP/s | % of fp32 peak | shape ceiling (GFLOP/s) | % of ceiling | throughput |",
             "|---|---|---|---|---|---|---|"]
    shown = ("seconds", "gflops", "pct_of_fp32_peak", "shape_ceiling_gflops", "pct_of_shape_ceiling")
    for name, r in results["cases"].items():
        extra = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in shown)
        g = f"{r['gflops']:.1f}" if "gflops" in r else "-"
        pct = f"{r['pct_of_fp32_peak']:.0f}%" if "pct_of_fp32_peak" in r else "-"
        ceil = f"{r['shape_ceiling_gflops']:.0f}" if "shape_ceiling_gflops" in r else "-"
        pct_ceil = f"{r['pct_of_shape_ceiling']:.0f}%" if "pct_of_shape_ceiling" in r else "-"
        lines.append(f"| {name} | {r['seconds']:.2f} | {g} | {pct} | {ceil} | {pct_ceil} | {extra} |")
    if results.get("op_shares"):
        groups = list(next(iter(results["op_shares"].values())))
        lines += ["", "Where the time goes (share of self CPU time by kind of operator, torch profiler):", "",
                  "| case | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, shares in results["op_shares"].items():
            lines.append(f"| {name} | " + " | ".join(f"{shares[g]:.0f}%" for g in groups) + " |")
    for bd in results.get("rounds", []):
        lines += ["", f"One round of {bd['method']} on `{results['config']}` (inline engine, round 1): "
                      f"**{bd['round_seconds']:.1f} s**.", "", "| work | seconds | % |", "|---|---|---|"]
        for k, v in bd["parts"].items():
            lines.append(f"| {k} | {v['seconds']:.1f} | {v['pct']:.0f}% |")
        bound = round_bound(bd, results["cases"])
        if bound is not None:
            lines += ["", f"At the shape ceilings (every sampling, scoring, training and evaluation second shrunk "
                          f"by its case's % of ceiling, the most favourable of the two models; the rest unchanged) "
                          f"this round would take at least **{bound:.1f} s**: at most "
                          f"**{bd['round_seconds'] / bound:.1f}x** faster at these shapes in fp32."]
    if results.get("scaling"):
        lines += ["", "Scaling through the simulation runtime (tiny-test models, `configs/scale-30.toml` cut to N "
                      "clients, clients beyond the three named domains on generated ones):", "",
                  "| clients | seconds per round | peak RSS per round (MB, all processes) | wall (s) |",
                  "|---|---|---|---|"]
        for s in results["scaling"]:
            lines.append(f"| {s['clients']} | {', '.join(f'{x:.1f}' for x in s['seconds_per_round'])} | "
                         f"{', '.join(f'{x:.0f}' for x in s['peak_rss_mb_per_round'])} | {s['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lada.experiments.bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--methods", default="cot+lada,fedmkt", help="methods of the per-round breakdown")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lada.config import load_config
    from lada.threads import fit_threads

    fit_threads()
    cfg = load_config(args.config)
    limits = {"fp32_matmul_gflops": matmul_peak(torch.float32), "bf16_matmul_gflops": matmul_peak(torch.bfloat16),
              "memory_gb_per_s": memory_bandwidth()}
    results: dict = {"config": args.config, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "cpu": cpu_description(),
                     "python": platform.python_version(), "torch": torch.__version__, "limits": limits}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> str:  # after every section, so a late failure keeps the earlier numbers
        out.write_text(json.dumps(results, indent=1) + "\n")
        md = to_markdown(results)
        out.with_suffix(".md").write_text(md)
        return md

    # Without avx512_bf16 or AMX, torch emulates bf16 matmuls (about 1 GFLOP/s measured
    # on an AVX2-only CPU): the bf16 training cases would only take minutes.
    bf16 = limits["bf16_matmul_gflops"] >= 0.5 * limits["fp32_matmul_gflops"]
    results["bf16_cases"] = bf16
    results["cases"], results["op_shares"] = bench_cases(cfg, limits["fp32_matmul_gflops"], bf16)
    save()
    work = Path(tempfile.mkdtemp(prefix="lada-bench-"))
    results["rounds"] = []
    for m in (m for m in args.methods.split(",") if m):
        results["rounds"].append(round_breakdown(args.config, m, work))
        save()
    if not args.skip_scaling:
        results["scaling"] = scaling(work)
    print(save())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
