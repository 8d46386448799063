"""Micro-benchmarks of the hot paths, written to a JSON and a Markdown file:
batched sampling (vs one prompt at a time), greedy evaluation, path scoring, training
throughput, and the LaDa filter's select/update cost.

    python -m lada.experiments.bench --out bench/results.json [--config configs/default.toml]

Numbers depend on the machine and its load; the file records threads and CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(config: str, n_prompts: int = 64) -> dict:
    import torch

    from lada.config import load_config
    from lada.data import build_federated_data
    from lada.data.records import example_prompt, example_target
    from lada.models.generation import evaluate, sample_paths
    from lada.models.loading import load_model
    from lada.models.scoring import sequence_logprobs
    from lada.models.training import train_steps
    from lada.plugin.filter import FilterConfig, LadaFilter
    from lada.protocol.node import participant_checkpoint

    cfg = load_config(config)
    fed = build_federated_data(cfg.data, cfg.data.seed)
    results: dict = {"config": config, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "torch": torch.__version__, "cases": {}}
    cases = results["cases"]
    for who, mcfg in [("llm", cfg.server), ("client-0", cfg.clients[0])]:
        lm = load_model(mcfg, participant_checkpoint(cfg, who, progress=True))
        prompts = [example_prompt(ex) for ex in fed.public[:n_prompts]]
        gen = cfg.generation
        secs, paths = _timed(lambda: sample_paths(lm, prompts, gen.paths_per_question, gen, seed=0, progress=False))
        n_paths = sum(len(p) for p in paths)
        tokens = sum(len(lm.tokenizer(t)["input_ids"]) for ps in paths for t in ps)
        cases[f"{who}: sample {n_paths} paths (batched)"] = {"seconds": secs, "paths_per_s": n_paths / secs,
                                                             "new_tokens_per_s": tokens / secs}
        one = prompts[:8]
        from dataclasses import replace

        secs1, _ = _timed(lambda: sample_paths(lm, one, gen.paths_per_question,
                                               replace(gen, batch_size=gen.paths_per_question), seed=0, progress=False))
        cases[f"{who}: sample {len(one) * gen.paths_per_question} paths, one prompt per batch"] = {
            "seconds": secs1, "paths_per_s": len(one) * gen.paths_per_question / secs1}
        test = fed.server_test if who == "llm" else fed.clients[0].test
        secs, res = _timed(lambda: evaluate(lm, test, gen, progress=False))
        cases[f"{who}: greedy eval of {len(test)}"] = {"seconds": secs, "examples_per_s": len(test) / secs,
                                                       "accuracy": res.accuracy}
        pairs = [(example_prompt(ex), example_target(ex)) for ex in fed.public[:256]]
        secs, _ = _timed(lambda: sequence_logprobs(lm, [p for p, _ in pairs], [t for _, t in pairs], batch_size=64),
                         repeat=2)
        cases[f"{who}: score {len(pairs)} paths"] = {"seconds": secs, "paths_per_s": len(pairs) / secs}
        steps = 20
        secs, stats = _timed(lambda: train_steps(lm, pairs, steps, cfg.train, seed=0, progress=False))
        cases[f"{who}: train {steps} steps @ batch {cfg.train.batch_size}"] = {
            "seconds": secs, "steps_per_s": steps / secs, "tokens_per_s": stats["tokens"] / secs}
    d = cfg.server.hidden_size + 4
    x = torch.randn(cfg.data.public_size * cfg.generation.paths_per_question, d, generator=torch.Generator().manual_seed(0))
    filt = LadaFilter(FilterConfig(seed=0))
    secs, idx = _timed(lambda: filt.select(x, len(x) // 2))
    cases[f"filter: cold-start select of {len(x)} contexts (k-means)"] = {"seconds": secs}
    secs, _ = _timed(lambda: filt.update(x[idx], torch.rand(len(idx))))
    cases[f"filter: update on {len(idx)} rewards ({filt.cfg.epochs} epochs)"] = {"seconds": secs}
    secs, _ = _timed(lambda: filt.select(x, len(x) // 2))
    cases[f"filter: bandit select of {len(x)} contexts"] = {"seconds": secs}
    return results


def to_markdown(results: dict) -> str:
    lines = [f"Threads: {results['torch_threads']} of {results['cpus']} CPUs; torch {results['torch']}; "
             f"config `{results['config']}`.", "", "| case | seconds | throughput |", "|---|---|---|"]
    for name, r in results["cases"].items():
        extra = ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "seconds")
        lines.append(f"| {name} | {r['seconds']:.2f} | {extra} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lada.experiments.bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--out", default="bench/results.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = bench(args.config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    md = to_markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
