"""Pieces several hosts share: private-data training pairs, the transfer training
budget, and replay of the LLM's own training data."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from lada.data.records import Example, example_prompt, example_target

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.protocol.paths import Candidate


def private_pairs(examples: list[Example]) -> list[tuple[str, str]]:
    return [(example_prompt(ex), example_target(ex)) for ex in examples]


def path_pairs(items: list["Candidate"]) -> list[tuple[str, str]]:
    return [(c.prompt, c.text) for c in items]


def transfer_steps(cfg: "RunConfig", n_examples: int) -> int:
    """The training budget of one transfer: ``train.transfer_epochs`` passes over its
    training mix of ``n_examples`` (what was received plus what the host mixes in).
    Every filter and ablation thus sees each example equally often; a smaller
    selection trains fewer steps, not more epochs."""
    if n_examples <= 0:
        return 0
    return max(1, math.ceil(cfg.train.transfer_epochs * n_examples / cfg.train.batch_size))


def replay_pairs(examples: list[Example], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` of a participant's own training examples, drawn afresh each round: a few
    dozen received paths alone would make the receiver forget its general reasoning."""
    if n <= 0 or not examples:
        return []
    idx = random.Random(seed).sample(range(len(examples)), min(n, len(examples)))
    return private_pairs([examples[i] for i in idx])
