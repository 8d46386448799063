"""Pieces several hosts share: turning public examples and sampled paths into
transfer items, and the private-data training pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lada.data.records import Example, example_prompt, example_target
from lada.protocol.payload import Payload

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.models.loading import LoadedModel


def private_pairs(examples: list[Example]) -> list[tuple[str, str]]:
    return [(example_prompt(ex), example_target(ex)) for ex in examples]


def sample_verified_paths(cfg: "RunConfig", lm: "LoadedModel", examples: list[Example], seed: int,
                          check_steps: bool = True, keep_wrong: bool = False) -> list[dict]:
    """Sample ``paths_per_question`` reasoning paths per example, check each against the
    gold answer (and every calculator step when ``check_steps``), and score it under the
    sampling model. Returns one item per path (only correct ones unless ``keep_wrong``)."""
    from lada.data.answers import is_correct, verify_path
    from lada.models.generation import sample_paths
    from lada.models.scoring import sequence_logprobs

    prompts = [example_prompt(ex) for ex in examples]
    paths = sample_paths(lm, prompts, cfg.generation.paths_per_question, cfg.generation, seed)
    items: list[dict] = []
    for ex, prompt, texts in zip(examples, prompts, paths):
        seen: set[str] = set()
        for text in texts:
            if not text.strip() or text in seen:
                continue
            seen.add(text)
            ok = verify_path(text, ex) if check_steps else is_correct(text, ex.answer, ex.answer_type)
            if ok or keep_wrong:
                items.append({"example_id": ex.id, "prompt": prompt, "text": text, "correct": bool(ok)})
    if items:
        logp, ntok = sequence_logprobs(lm, [it["prompt"] for it in items], [it["text"] for it in items],
                                       batch_size=cfg.generation.batch_size)
        for it, lp, n in zip(items, logp.tolist(), ntok.tolist()):
            it["sender_logprob"] = float(lp)
            it["n_tokens"] = int(n)
    return items


def items_to_payload(items: list[dict]) -> Payload:
    """Only text and scalars cross the wire; the receiver rebuilds prompts from the
    public set it already holds."""
    return {
        "example_ids": [it["example_id"] for it in items],
        "texts": [it["text"] for it in items],
        "correct": np.array([it["correct"] for it in items], dtype=np.bool_),
        "sender_logprob": np.array([it["sender_logprob"] for it in items], dtype=np.float32),
        "n_tokens": np.array([it["n_tokens"] for it in items], dtype=np.int32),
    }


def items_from_payload(payload: Payload, examples: list[Example]) -> list[dict]:
    by_id = {ex.id: ex for ex in examples}
    ids = payload.get("example_ids", [])
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(f"payload names {len(unknown)} unknown public example id(s), e.g. {unknown[:3]}")
    return [
        {"example_id": i, "prompt": example_prompt(by_id[i]), "text": t, "correct": bool(c),
         "sender_logprob": float(lp), "n_tokens": int(n)}
        for i, t, c, lp, n in zip(ids, payload.get("texts", []), payload["correct"], payload["sender_logprob"],
                                  payload["n_tokens"])
    ] if ids else []
