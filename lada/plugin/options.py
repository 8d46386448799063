"""Options of the LaDa plug-in (the ``[plugin]`` table, filter options in
``[plugin.filter]``), validated without importing torch: ``lada.registry`` points here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lada.schema import ConfigError, check_choice, check_non_negative, check_positive, check_range

FILTER_KINDS = ("none", "random", "loss", "lada")
REWARDS = ("gain", "relative", "paper", "receiver")
ATTRIBUTIONS = ("gradient", "share")


@dataclass
class FilterConfig:
    """Options of one data filter (``[plugin.filter]``)."""

    kind: str = "lada"  # none | random | loss | lada
    alpha: float = 1.0  # exploration weight: score = f1 + alpha * f2
    threshold: float = 0.5  # keep candidates whose min-max normalised score is >= this
    budget_fraction: float = 0.5  # budget = ceil(fraction * candidates) ...
    max_budget: int = 0  # ... capped at this (0: no cap)
    epochs: int = 10  # passes over the replay history per update
    hidden: int = 64  # width of f1 and f2
    lr: float = 1e-3
    history_size: int = 5000  # replay history (FIFO)
    num_clusters: int = 8  # k-means clusters for the cold start
    seed: int = 0
    nll_column: int = -4  # context column holding the receiver's per-token NLL (loss filter)
    block_size: int = 2  # f2 input: f1's hidden activations averaged over blocks of this many units
    batch_size: int = 64  # minibatch of the filter nets' training

    def validate(self, where: str = "filter") -> None:
        check_choice(self, where, "kind", FILTER_KINDS)
        check_range(self, where, "budget_fraction", 0.0, 1.0, lo_open=True)
        check_range(self, where, "threshold", 0.0, 1.0)
        check_non_negative(self, where, "alpha", "max_budget")
        check_positive(self, where, "epochs", "hidden", "history_size", "num_clusters", "block_size", "batch_size",
                       "lr")

    def budget_for(self, n_candidates: int) -> int:
        """How many of ``n_candidates`` a round may keep."""
        b = math.ceil(self.budget_fraction * n_candidates)
        if self.max_budget > 0:
            b = min(b, self.max_budget)
        return min(b, n_candidates)


@dataclass
class LadaConfig:
    """Options of the ``lada`` plug-in."""

    filter: FilterConfig = field(default_factory=FilterConfig)
    distill: str = "contrastive"  # sft: train on the selected paths only | contrastive: + lambda_ * L_cd
    variant: str = "dpo"  # sequence-level DPO-like loss (the only one the protocol can carry; see docs/lada.md)
    lambda_: float = 0.1  # weight of the contrastive loss next to the (mean token) SFT loss; see docs/lada.md
    beta: float = 0.1  # DPO temperature on the log-ratio margin
    length_normalize: bool = False  # divide each log-ratio by its token count
    pair_batch: int = 4  # (y+, y-) pairs per optimizer step
    negative_paths: int = 2  # receiver paths sampled per question to find y-
    score_batch_size: int = 16  # sequences per forward pass when computing contexts
    # The filter's feedback: receiver | gain | relative | paper (docs/lada.md, "Reward").
    # receiver (chosen on the paper testbed's seeds 0-2): the receiver's likelihood gain on
    # its own held-out examples. A client holds out the last reward_val_size examples of
    # its private train shard (never trained on, never sent); the LLM the last
    # reward_val_size public questions (never candidates).
    reward: str = "receiver"
    # at most a fifth of a participant's examples is held out (smaller shards hold out less)
    reward_val_size: int = 50
    reward_attribution: str = "gradient"  # receiver: gradient (LM-head gradient alignment) | share (equal shares)

    def validate(self, where: str = "[plugin]") -> None:
        if self.distill not in ("sft", "contrastive"):
            raise ConfigError(f"{where}.distill: must be 'sft' or 'contrastive', got {self.distill!r}")
        if self.variant == "distillm2":
            raise ConfigError(
                f"{where}.variant: 'distillm2' needs the sender's per-token distributions over a shared "
                "vocabulary, which no host transfers (only text and scalars cross the wire); the loss is "
                "available as lada.plugin.losses.distillm2_loss. Use 'dpo'.")
        check_choice(self, where, "reward", REWARDS)
        check_choice(self, where, "reward_attribution", ATTRIBUTIONS)
        check_positive(self, where, "reward_val_size")
        if self.variant != "dpo":
            raise ConfigError(f"{where}.variant: must be 'dpo', got {self.variant!r}")
        check_non_negative(self, where, "lambda_")
        check_positive(self, where, "beta", "pair_batch", "negative_paths", "score_batch_size")
        self.filter.validate(f"{where}.filter")

    def holdout_size(self) -> int:
        """Examples of each participant's data the plug-in keeps out of training for its own
        measurements (``lada.protocol.node``): only the receiver reward needs any. The
        ablations keep it too (rewards are still measured and logged; an ablation changes
        one part only)."""
        return self.reward_val_size if self.reward == "receiver" else 0
