"""Options of every host (the ``[host]`` table), validated without importing torch or
any host code: ``lada.registry`` points at these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from lada.schema import check_choice, check_non_negative, check_positive, check_range

SELECTIONS = ("greater", "other")
METRICS = ("token", "sequence")
ADAPTER_DTYPES = ("float32", "float16")


@dataclass
class CoTConfig:
    check_steps: bool = True  # a path must get every <<expr=value>> step right, not only the answer
    # SLM -> LLM path distillation: clients send their verified paths on the public
    # questions and the LLM fine-tunes on them (with or without a plug-in).
    upward: bool = False
    up_novel_only: bool = True  # upward: only questions none of the LLM's own sampled paths solve
    up_questions: int = 0  # upward: public questions each client answers per round (0: all)
    up_replay: float = 1.0  # upward: LLM training examples mixed in per received path (against forgetting)

    def validate(self, where: str) -> None:
        check_non_negative(self, where, "up_questions", "up_replay")


@dataclass
class FedMKTConfig:
    top_k: int = 8  # distribution entries sent per position
    alpha: float = 0.9  # weight of the LM loss; the distillation loss gets 1 - alpha
    temperature: float = 1.0  # applied to the teacher's top-k log-probs
    selection: str = "greater"  # greater: lowest-CE distribution per example; other: always the other side's
    metric: str = "token"  # CE for selection: token = mean per token (as the reference code); sequence = total NLL
    local_train: bool = True  # clients fine-tune on private data before the transfer
    # Training form (docs/hosts.md, "Training form"): as the paper and FATE-LLM's reference,
    # LoRA adapters of rank 8 on the LLM and the SLMs and one epoch per phase. Measured on
    # the default testbed: full fine-tuning, not LoRA, is what pulled FedMKT below standalone.
    lora_r: int = 8  # SLMs: LoRA adapters of this rank when a client's model config has lora_r = 0 (0: all weights)
    llm_lora_r: int = 8  # the LLM: the same (0: all weights)
    epochs: float = 1.0  # passes over the distillation mix per transfer (0: train.transfer_epochs)

    def validate(self, where: str) -> None:
        check_positive(self, where, "top_k", "temperature")
        check_non_negative(self, where, "lora_r", "llm_lora_r", "epochs")
        check_range(self, where, "alpha", 0.0, 1.0)
        check_choice(self, where, "selection", SELECTIONS)
        check_choice(self, where, "metric", METRICS)


@dataclass
class FedCoLLMConfig:
    lora_r: int = 8  # adapter rank when the clients' model config has lora_r = 0
    top_k: int = 8  # distribution entries per position in the mutual distillation
    distill_lambda: float = 1.0  # loss = LM + distill_lambda * KD, in both directions
    temperature: float = 1.0  # applied to the teacher's top-k log-probs
    adapter_dtype: str = "float32"  # dtype of adapters on the wire
    # Training form (docs/hosts.md): parameter-efficient co-tuning, one epoch per phase as
    # FATE-LLM's reference runs it.
    llm_lora_r: int = 8  # the LLM: LoRA adapters of this rank when its model config has lora_r = 0 (0: all weights)
    epochs: float = 1.0  # passes over the public mix per server distillation (0: train.transfer_epochs)

    def validate(self, where: str) -> None:
        check_positive(self, where, "lora_r", "top_k", "temperature")
        check_non_negative(self, where, "llm_lora_r", "epochs")
        check_non_negative(self, where, "distill_lambda")
        check_choice(self, where, "adapter_dtype", ADAPTER_DTYPES)
