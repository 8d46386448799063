"""Reasoning paths as they move between participants: the typed candidate a receiver
(and the LaDa filter) sees, how a sender samples and verifies them, and their wire form.

Only text and scalars cross the wire; the receiver rebuilds each prompt from the public
set it already holds, and re-scores the text with its own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lada.data.answers import check_steps, is_correct, verify_path
from lada.data.records import Example, example_prompt
from lada.protocol.payload import Payload

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.models.loading import LoadedModel


@dataclass(frozen=True)
class Candidate:
    """One sender reasoning path for one public question."""

    question_id: str
    prompt: str  # the question as every model sees it (format_prompt), rebuilt by the receiver
    text: str  # the sender's path: steps, then the answer line
    sender_logprob: float  # the sender's sequence log-prob of the path (its own tokenizer, EOS included)
    n_tokens: int  # the sender's token count of the path (EOS included)
    steps: int  # reasoning lines before the answer line
    verified: bool  # right answer (and, when checked, every calculator step right)


def sample_paths_verified(cfg: "RunConfig", lm: "LoadedModel", examples: list[Example], seed: int,
                          check_steps_too: bool = True, keep_wrong: bool = False) -> list[Candidate]:
    """Sample ``generation.paths_per_question`` paths per example, check each against the
    gold answer (and every calculator step when ``check_steps_too``), and score it under
    the sampling model. One candidate per distinct path; only verified ones unless
    ``keep_wrong``."""
    from lada.models.generation import sample_paths
    from lada.models.scoring import sequence_logprobs

    prompts = [example_prompt(ex) for ex in examples]
    paths = sample_paths(lm, prompts, cfg.generation.paths_per_question, cfg.generation, seed)
    kept: list[tuple[Example, str, str, bool]] = []
    for ex, prompt, texts in zip(examples, prompts, paths):
        seen: set[str] = set()
        for text in texts:
            if not text.strip() or text in seen:
                continue
            seen.add(text)
            ok = verify_path(text, ex) if check_steps_too else is_correct(text, ex.answer, ex.answer_type, ex.options)
            if ok or keep_wrong:
                kept.append((ex, prompt, text, bool(ok)))
    if not kept:
        return []
    logp, ntok = sequence_logprobs(lm, [p for _, p, _, _ in kept], [t for _, _, t, _ in kept],
                                   batch_size=cfg.generation.batch_size)
    return [Candidate(ex.id, prompt, text, float(lp), int(n), check_steps(text).n_steps, ok)
            for (ex, prompt, text, ok), lp, n in zip(kept, logp.tolist(), ntok.tolist())]


def paths_to_payload(cands: list[Candidate], prefix: str = "") -> Payload:
    """The wire form of candidates; ``prefix`` namespaces the keys (a plug-in's paths
    riding on a host's message use ``"lada/"``, so their bytes are counted apart)."""
    return {
        prefix + "example_ids": [c.question_id for c in cands],
        prefix + "texts": [c.text for c in cands],
        prefix + "correct": np.array([c.verified for c in cands], dtype=np.bool_),
        prefix + "sender_logprob": np.array([c.sender_logprob for c in cands], dtype=np.float32),
        prefix + "n_tokens": np.array([c.n_tokens for c in cands], dtype=np.int32),
    }


def paths_from_payload(payload: Payload, examples: list[Example], prefix: str = "",
                       where: str = "payload") -> list[Candidate]:
    """Candidates back from their wire form; every id must be a known public example."""
    key = prefix + "example_ids"
    ids = list(payload.get(key, []))
    if not ids:
        return []
    fields = [prefix + f for f in ("texts", "correct", "sender_logprob", "n_tokens")]
    missing = [f for f in fields if f not in payload]
    if missing:
        raise ValueError(f"{where}: paths without field(s) {missing}")
    texts, correct, logp, ntok = (payload[f] for f in fields)
    if not len(texts) == len(correct) == len(logp) == len(ntok) == len(ids):
        raise ValueError(f"{where}: {len(ids)} path ids but {len(texts)} texts, {len(correct)} flags, "
                         f"{len(logp)} log-probs, {len(ntok)} token counts")
    by_id = {ex.id: ex for ex in examples}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(f"{where}: names {len(unknown)} unknown public example id(s), e.g. {unknown[:3]}")
    return [Candidate(i, example_prompt(by_id[i]), t, float(lp), int(n), check_steps(t).n_steps, bool(c))
            for i, t, c, lp, n in zip(ids, texts, correct, logp, ntok)]
