"""Warm-up: train a participant's tiny model on its starting data before round 1.

From-scratch tiny models need on the order of a thousand optimizer steps before they
reason at all (loss drops sharply between steps 500 and 1000), which is longer than a
whole demo federation. So a warm-up is budgeted in optimizer steps, not seconds, and
cached under a fingerprint of everything that determines it: the model config, the
training data ids, the tokenizer corpus and the seed. The default config's warm-ups are
shipped in the repo's ``checkpoints/`` folder, so a fresh clone never trains them.

Lookup order in :func:`warmup_checkpoint`: ``model_cfg.checkpoint`` if set, then the
shipped ``checkpoints/<fingerprint>``, then ``<cache_dir>/warmup/<fingerprint>``, else
train (into a temporary directory that is renamed into place when complete, so a
crashed or concurrent warm-up never leaves a half-written checkpoint). While it trains,
its state is saved every two minutes under ``<cache_dir>/warmup/<fingerprint>.partial``,
so a warm-up that is stopped (Ctrl-C, a killed job) goes on from there the next time it
is asked for, with the result an unbroken warm-up gives.

Regenerate the shipped checkpoints and print the calibration table with::

    lada warmup configs/default.toml --ship
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lada.config import LINKED_TASKS, ModelConfig, RunConfig, TrainConfig
from lada.data.records import Example, example_prompt, example_target
from lada.data.split import CLIENT_GENERAL_EXAMPLES, CLIENT_GENERAL_MAX_STEPS  # noqa: F401

if TYPE_CHECKING:
    from lada.data.partition import FederatedData
    from lada.data.split import ParticipantData

RECIPE_VERSION = 1  # bump when the warm-up procedure changes, so old caches are not reused
REPO_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
META = "meta.json"

# A warm-up stage: train `steps` optimizer steps on these examples.
Stage = tuple[list[Example], int]

# ModelConfig fields that shape a warm-up. Device is left out (same result anywhere, up
# to float noise), and so are the LoRA fields: warm-up always trains the full model in
# float32; adapters, if any, are added fresh when the checkpoint is loaded.
_MODEL_KEYS = ("name", "hidden_size", "num_layers", "num_heads", "vocab_size",
               "warmup_steps", "warmup_lr", "warmup_batch_size")
_TRAIN_KEYS = ("max_length", "weight_decay", "grad_clip")


def corpus_hash(corpus: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in corpus:
        h.update(len(text).to_bytes(8, "little"))  # length prefix: texts cannot run together
        h.update(text.encode())
    return h.hexdigest()[:16]


def fingerprint_inputs(model_cfg: ModelConfig, stages: Sequence[Stage], corpus: Sequence[str], seed: int,
                       train_cfg: TrainConfig | None = None) -> dict:
    """Everything a warm-up depends on, as plain JSON (also written into meta.json)."""
    train_cfg = train_cfg or TrainConfig()
    ids = hashlib.sha256()
    for examples, _ in stages:
        ids.update(json.dumps([ex.id for ex in examples]).encode())
    return {
        "recipe": RECIPE_VERSION,
        "model": {k: getattr(model_cfg, k) for k in _MODEL_KEYS},
        "train": {k: getattr(train_cfg, k) for k in _TRAIN_KEYS},
        "stages": [{"examples": len(ex), "steps": steps} for ex, steps in stages],
        "example_ids": ids.hexdigest()[:16],
        "corpus": corpus_hash(corpus),
        "seed": seed,
    }


def warmup_fingerprint(model_cfg: ModelConfig, stages: Sequence[Stage], corpus: Sequence[str], seed: int,
                       train_cfg: TrainConfig | None = None) -> str:
    inputs = fingerprint_inputs(model_cfg, stages, corpus, seed, train_cfg)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_cfg.name}-d{model_cfg.hidden_size}x{model_cfg.num_layers}-{digest}"


def find_shipped_checkpoint(fingerprint: str, root: str | Path | None = None) -> Path | None:
    """The shipped checkpoint with this fingerprint (repo-root ``checkpoints/``), if any."""
    path = Path(root or REPO_CHECKPOINTS) / fingerprint
    return path if (path / META).is_file() else None


def _stages(model_cfg: ModelConfig, examples: list[Example], stages: Sequence[Stage] | None) -> list[Stage]:
    if stages is None:
        return [(list(examples), model_cfg.warmup_steps)]
    if examples:
        raise ValueError("warmup_checkpoint: pass either examples (one stage of warmup_steps) or stages, not both")
    return [(list(ex), int(steps)) for ex, steps in stages]


def warmup_checkpoint(model_cfg: ModelConfig, examples: list[Example], corpus: list[str], seed: int,
                      cache_dir: str | Path, train_cfg: TrainConfig | None = None, progress: bool = True,
                      stages: Sequence[Stage] | None = None, use_shipped: bool = True) -> Path:
    """The directory of this participant's warmed-up model, training it if needed.

    Without ``stages``: ``model_cfg.warmup_steps`` steps on ``examples``. With
    ``stages`` (and empty ``examples``): each (examples, steps) stage in turn, e.g. a
    general stage then a short domain specialisation. Learning rate and batch size are
    ``model_cfg.warmup_lr`` / ``warmup_batch_size``; the rest of ``train_cfg`` applies.
    """
    if model_cfg.checkpoint:
        path = Path(model_cfg.checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"model checkpoint {model_cfg.checkpoint!r} (model {model_cfg.name!r}) is not a directory")
        return path
    plan = _stages(model_cfg, examples, stages)
    for i, (ex, steps) in enumerate(plan):
        if steps > 0 and not ex:
            raise ValueError(f"warm-up of {model_cfg.name!r}: stage {i} has {steps} steps but no examples")
    fp = warmup_fingerprint(model_cfg, plan, corpus, seed, train_cfg)
    if use_shipped and (shipped := find_shipped_checkpoint(fp)):
        return shipped
    final = Path(cache_dir) / "warmup" / fp
    if (final / META).is_file():
        return final
    tmp = final.with_name(f"{fp}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    partial = final.with_name(f"{fp}.partial")
    meta = _train(model_cfg, plan, corpus, seed, cache_dir, train_cfg, progress, tmp, partial)
    meta.update(fingerprint=fp, inputs=fingerprint_inputs(model_cfg, plan, corpus, seed, train_cfg))
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same warm-up first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / META).is_file():
            raise
    shutil.rmtree(partial, ignore_errors=True)
    return final


def _train(model_cfg: ModelConfig, plan: list[Stage], corpus: list[str], seed: int, cache_dir: str | Path,
           train_cfg: TrainConfig | None, progress: bool, out: Path, partial: Path | None = None) -> dict:
    from lada.models.loading import build_model, save_model
    from lada.models.training import train_steps

    cfg = dataclasses.replace(model_cfg, lora_r=0, dtype="float32", checkpoint="")
    # random batches, whatever the run uses: the fingerprint does not cover the batching
    tcfg = dataclasses.replace(train_cfg or TrainConfig(), length_buckets=False)
    start = time.perf_counter()
    lm = build_model(cfg, corpus, seed, cache_dir)
    stage_meta = []
    earlier = 0.0
    for i, (examples, steps) in enumerate(plan):
        if steps <= 0:
            continue
        pairs = [(example_prompt(ex), example_target(ex)) for ex in examples]
        stats = train_steps(lm, pairs, steps, tcfg, seed + i, desc=f"warm-up {cfg.name} stage {i + 1}",
                            lr=model_cfg.warmup_lr, batch_size=model_cfg.warmup_batch_size,
                            progress=None if progress else False,
                            resume_file=partial / f"stage{i}.pt" if partial else None,
                            save_final=i < len(plan) - 1)  # a stage that is not the last one
        earlier += stats.pop("seconds_before")  # training time of a stopped attempt this one went on from
        stage_meta.append({"steps": steps, "examples": len(examples),
                           **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
                           "seconds": round(stats["seconds"], 1)})
    seconds = time.perf_counter() - start + earlier
    save_model(lm, out)
    last = stage_meta[-1] if stage_meta else {}
    return {"steps": sum(s for _, s in plan), "seconds": round(seconds, 1),
            "final_loss": last.get("loss"), "stages": stage_meta, "device": str(lm.device),
            "params": lm.num_parameters()}


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META).read_text())


# ----------------------------------------------------------------------------- participants

# Each client's warm-up mixes its own training shard with short general problems of
# the server's general pool (lada.data.split.client_general, handed to each client with
# its split): a stand-in for the generic pre-training every real SLM has, and it teaches
# number copying on more varied questions than 300 domain problems can. The server pool
# is disjoint from every other set, so no client sees the public or test questions.


def participant_seed(cfg: RunConfig, who: str) -> int:
    """Model-init seed of a participant: ``server``, ``client<k>`` or ``shared-slm``."""
    if who == "server":
        return cfg.data.seed
    if who == "shared-slm":
        return cfg.data.seed + 997
    return cfg.data.seed + 1 + int(who.removeprefix("client"))


def participant_stages(cfg: RunConfig, view: "ParticipantData", who: str) -> list[Stage]:
    """The warm-up data of ``server`` (its general training data), ``client<k>`` (its
    private training shard plus the general problems of its split) or ``shared-slm``
    (FedCoLLM's common SLM base, trained by the server on all of its general training
    data, the LLM's warm-up data: no client's private data shapes what every client
    receives, and the base is as strong on general problems as the server can make it)."""
    if who == "server":
        return [(list(view.train), cfg.server.warmup_steps)]
    if who == "shared-slm":
        return [(list(view.train), cfg.clients[0].warmup_steps)]
    k = int(who.removeprefix("client"))
    return [(list(view.train) + list(view.general), cfg.clients[k].warmup_steps)]


def _client_domain(cfg: RunConfig, k: int) -> str:
    """Client k's synthetic domain (a generated one beyond ``data.domains``)."""
    if cfg.data.source != "synthetic":
        return cfg.data.domains[k] if k < len(cfg.data.domains) else ""
    from lada.data.synthetic import client_domains

    return client_domains(cfg.data)[k]


def participant_config(cfg: RunConfig, who: str) -> ModelConfig:
    if who == "shared-slm":
        return cfg.clients[0]
    return cfg.server if who == "server" else cfg.clients[int(who.removeprefix("client"))]


def participants(cfg: RunConfig) -> list[str]:
    return ["server", *(f"client{k}" for k in range(len(cfg.clients)))]


def warmup_participant(cfg: RunConfig, view: "ParticipantData", corpus: list[str], who: str,
                       cache_dir: str | Path, progress: bool = True, use_shipped: bool = True) -> Path:
    """Warm-up checkpoint of one participant of a run (what the round driver loads),
    from that participant's view of the data (the server's for ``shared-slm``)."""
    return warmup_checkpoint(participant_config(cfg, who), [], corpus, participant_seed(cfg, who), cache_dir,
                             train_cfg=cfg.train, progress=progress, stages=participant_stages(cfg, view, who),
                             use_shipped=use_shipped)


# ----------------------------------------------------------------------------- calibration table

def calibration_sets(cfg: RunConfig, fed: "FederatedData", n: int = 100) -> dict[str, list[Example]]:
    """Held-out sets for the warm-up table: short (1-3 step) and long (4-6 step) general
    problems drawn fresh (no question shared with any federation set), and each client
    domain's test shard. Synthetic data only."""
    from lada.data.synthetic import generate

    seen = {ex.question for xs in fed.named_sets().values() for ex in xs}
    stream = cfg.data.seed + 2_000_003  # a seed no federation set is drawn from
    task = cfg.data.task
    sets = {"general 1-3": generate("general", n, stream, 1, 3, step_weights=[1, 1, 1], exclude=seen, task=task),
            "general 4-6": generate("general", n, stream, 4, 6, step_weights=[1, 1, 1], exclude=seen, task=task)}
    for k, shard in enumerate(fed.clients):
        sets[_client_domain(cfg, k)] = list(shard.test)
    return sets


def evaluate_participant(cfg: RunConfig, path: Path, who: str, sets: dict[str, list[Example]]) -> dict[str, float]:
    """Accuracy on each calibration set; on the yes/no and choice tasks also, over all of them
    pooled, ``chain right`` (the chain reached the right value) and ``answer if chain right``
    (and then the right answer followed: the parity or option lookup; lada.data.answers.final_step)."""
    from lada.data.answers import final_step
    from lada.models.generation import evaluate
    from lada.models.loading import load_model

    lm = load_model(dataclasses.replace(participant_config(cfg, who), lora_r=0), path)
    acc, linked = {}, [0, 0, 0]
    for name, xs in sets.items():
        res = evaluate(lm, xs, cfg.generation, progress=False)
        acc[name] = res.accuracy
        if cfg.data.task in LINKED_TASKS:
            linked = [a + b for a, b in zip(linked, final_step(res.outputs, xs))]
    n, chain, answer = linked
    if n:
        acc["chain right"] = chain / n
        if chain:
            acc["answer if chain right"] = answer / chain
    return acc


def format_table(cfg: RunConfig, rows: list[dict]) -> str:
    """Markdown table: participant, model, params, steps, seconds, accuracies."""
    doms = [_client_domain(cfg, k) for k in range(len(cfg.clients))] if cfg.data.source == "synthetic" \
        else list(cfg.data.domains)
    lookup = ["chain right", "answer if chain right"] if cfg.data.task in LINKED_TASKS else []
    head = ["participant", "model", "params", "warm-up steps", "seconds", "own domain", "general 1-3",
            "general 4-6", *doms, *lookup]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r.get("accuracy", {})
        pct = lambda key: f"{100 * acc[key]:.0f}%" if key in acc else "-"
        own = pct(r["domain"]) if r["domain"] else "-"
        m = r["model"]
        lines.append("| " + " | ".join([r["who"], f"{m.name} d{m.hidden_size}x{m.num_layers} v{m.vocab_size}",
                                         f"{r['params'] / 1e6:.2f}M", str(r["steps"]), f"{r['seconds']:.0f}", own,
                                         pct("general 1-3"), pct("general 4-6"), *(pct(d) for d in doms),
                                         *(pct(k) for k in lookup)]) + " |")
    return "\n".join(lines)


def ship_checkpoint(model_cfg: ModelConfig, path: Path, root: Path | None = None) -> Path:
    """Copy a warm-up into the repo's ``checkpoints/`` with float16 weights (half the
    bytes; loading casts back to the config's dtype). Written to a temp dir, then renamed."""
    import torch

    from lada.models.loading import load_model

    root = root or REPO_CHECKPOINTS
    dest, tmp = root / path.name, root / f"{path.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    lm = load_model(dataclasses.replace(model_cfg, lora_r=0, dtype="float32", device="cpu"), path)
    lm.model.to(dtype=torch.float16).save_pretrained(str(tmp))
    meta = read_meta(tmp)
    meta["shipped_dtype"] = "float16"
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Warm up (or reuse) the chosen participants, evaluate them, print the table."""
    import torch

    from lada.config import load_config
    from lada.data import build_federated_data
    from lada.data.split import participant_corpus, views
    from lada.models.tokenizers import default_cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.set) + ([f"seed={args.seed}"] if args.seed is not None else []))
    cache = Path(args.cache_dir or cfg.cache_dir or default_cache_dir())
    fed = build_federated_data(cfg.data, cfg.data.seed)  # the data owner's tool: every participant's view
    all_views = views(fed)
    who_all = participants(cfg)
    chosen = [w.strip() for w in args.only.split(",") if w.strip()] or who_all
    for w in chosen:
        if w not in who_all:
            parser.error(f"--only: unknown participant {w!r}; this config has {who_all}")
    sets = None if args.no_eval or cfg.data.source != "synthetic" else calibration_sets(cfg, fed)
    rows = []
    for who in chosen:
        view = all_views[who]
        path = warmup_participant(cfg, view, participant_corpus(cfg.data, view, cfg.data.seed), who, cache,
                                  progress=True, use_shipped=not args.ship)
        meta = read_meta(path)
        if args.ship and path.parent != REPO_CHECKPOINTS:
            path = ship_checkpoint(participant_config(cfg, who), path)
            print(f"{who}: shipped {path}", file=sys.stderr)
        row = {"who": who, "model": participant_config(cfg, who), "params": meta["params"], "steps": meta["steps"],
               "seconds": meta["seconds"], "path": str(path),
               "domain": "" if who == "server" else _client_domain(cfg, int(who.removeprefix("client")))}
        if sets:
            row["accuracy"] = evaluate_participant(cfg, path, who, sets)
        print(f"{who}: {path} ({meta['steps']} steps, {meta['seconds']:.0f} s, loss {meta['final_loss']:.3f})"
              + (f" {json.dumps({k: round(v, 3) for k, v in row['accuracy'].items()})}" if sets else ""),
              file=sys.stderr, flush=True)
        rows.append(row)
    print(format_table(cfg, rows))
    return 0

