"""Pieces several hosts share: private-data training pairs, the transfer training
budget, and replay of the LLM's own training data."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from lada.data.records import Example, example_prompt, example_target

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.models.loading import LoadedModel
    from lada.protocol.node import Node
    from lada.protocol.paths import Candidate


def private_pairs(examples: list[Example]) -> list[tuple[str, str]]:
    return [(example_prompt(ex), example_target(ex)) for ex in examples]


def path_pairs(items: list["Candidate"]) -> list[tuple[str, str]]:
    return [(c.prompt, c.text) for c in items]


def transfer_steps(cfg: "RunConfig", n_examples: int, epochs: float = 0.0) -> int:
    """The training budget of one transfer: ``epochs`` passes (0: ``train.transfer_epochs``)
    over its training mix of ``n_examples`` (what was received plus what the host mixes
    in; a plug-in's selected paths are part of the mix, so they get the host's budget).
    Every filter and ablation thus sees each example equally often; a smaller
    selection trains fewer steps, not more epochs."""
    if n_examples <= 0:
        return 0
    passes = epochs if epochs > 0 else cfg.train.transfer_epochs
    return max(1, math.ceil(passes * n_examples / cfg.train.batch_size))


def lora_model(node: "Node", r: int) -> "LoadedModel":
    """The node's current model, with LoRA adapters of rank ``r`` added when it has none
    yet (``r = 0``: the model as it is, all weights trainable). A model whose config sets
    ``lora_r`` already has its adapters. Once saved, the node's model carries the
    adapters, so later rounds train the same adapters on the same frozen base."""
    import dataclasses

    from lada.models.loading import load_model

    lm = node.model()
    if r <= 0 or lm.is_lora:
        return lm
    path = node.model_dir if node.model_dir.exists() else node.initial_checkpoint()
    return load_model(dataclasses.replace(node.model_cfg, lora_r=r), path, seed=node.seed)


def replay_pairs(examples: list[Example], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` of a participant's own training examples, drawn afresh each round: a few
    dozen received paths alone would make the receiver forget its general reasoning."""
    if n <= 0 or not examples:
        return []
    idx = random.Random(seed).sample(range(len(examples)), min(n, len(examples)))
    return private_pairs([examples[i] for i in idx])
