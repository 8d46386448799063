"""Log-probabilities of target texts under a model, given their prompts.

This is how any model judges a reasoning path written by another model with a
different tokenizer: the path is re-tokenised with the judge's own tokenizer and scored
as ``log p(target + EOS | prompt)``. Prompt and target are tokenised separately (see
``training.encode_pairs``) so the boundary is the same whoever wrote the text.

Sequences are right-padded and sorted by length for batching; only target positions
go through the softmax, which keeps memory low for large vocabularies.
"""

from __future__ import annotations

import contextlib

import torch

from lada.models.training import IGNORE, collate, encode_pairs
from lada.timing import timed


def _max_length(lm) -> int:
    cfg = getattr(lm.model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else 2048


@contextlib.contextmanager
def _scoring_mode(model: torch.nn.Module, grad: bool):
    """No-grad scoring runs in eval mode under inference_mode; with grad the caller's
    mode (train or eval) is kept."""
    if grad:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def token_logprobs(lm, prompts: list[str], targets: list[str], batch_size: int = 32, grad: bool = False,
                   max_length: int | None = None) -> list[torch.Tensor]:
    """Per-token log-probs of each target (its tokens, then EOS) given its prompt.

    Returns one 1-D tensor per pair, in input order: detached CPU float32 tensors when
    ``grad`` is False, tensors on the model's device that keep the graph otherwise.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"token_logprobs: {len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    with contextlib.nullcontext() if grad else timed("scoring"):  # with grad it is part of a training step
        return _token_logprobs(lm, prompts, targets, batch_size, grad, max_length)


def _token_logprobs(lm, prompts, targets, batch_size, grad, max_length) -> list[torch.Tensor]:
    encoded = encode_pairs(lm.tokenizer, list(zip(prompts, targets)), max_length or _max_length(lm))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out: list[torch.Tensor | None] = [None] * len(encoded)
    with _scoring_mode(lm.model, grad):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([encoded[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
            logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE
            sel = logits[:, :-1][keep].float()  # [n_target_tokens, vocab]
            logp = sel.log_softmax(-1).gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
            counts = keep.sum(1).tolist()
            for i, chunk in zip(idx, logp.split(counts)):
                out[i] = chunk if grad else chunk.detach().cpu()
    return out  # type: ignore[return-value]


def sequence_logprobs(lm, prompts: list[str], targets: list[str], batch_size: int = 32, grad: bool = False,
                      max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of target log-probs, number of target tokens)`` per pair, EOS included.

    With ``grad=True`` the sums keep the autograd graph (for distillation losses).
    """
    per_token = token_logprobs(lm, prompts, targets, batch_size=batch_size, grad=grad, max_length=max_length)
    if not per_token:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    sums = torch.stack([t.sum() for t in per_token])
    counts = torch.tensor([t.numel() for t in per_token], dtype=torch.long, device=sums.device)
    return sums, counts


def mean_nll(lm, prompts: list[str], targets: list[str], batch_size: int = 32) -> torch.Tensor:
    """Per-example mean negative log-likelihood per target token (CPU, no grad)."""
    sums, counts = sequence_logprobs(lm, prompts, targets, batch_size=batch_size)
    return -sums / counts.clamp(min=1)
