"""Distillation losses of the LaDa plug-in, in pure torch.

``contrastive_loss`` aligns the joint (sequence) probabilities of reasoning paths in a
DPO-like way: the receiver is pushed to raise the likelihood of a selected sender path
y+ relative to its own path y-, both measured against a frozen reference (the receiver
at round start). It needs only per-example summed log-probs, so each model scores text
with its own tokenizer and no vocabulary alignment is needed across families.

``distillm2_loss`` is the token-level alternative in the spirit of DistiLLM-2
(arXiv 2503.07067): a skewed KL on teacher-generated paths (pull the student toward
the teacher) and a skewed reverse KL on student-generated paths (push the student's
own mass toward the teacher's). It compares full next-token distributions, so it is
usable only when sender and receiver share a tokenizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_same_shape(where: str, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: inputs must have one shape, got {shapes}")


def contrastive_loss(policy_pos: Tensor, policy_neg: Tensor, ref_pos: Tensor, ref_neg: Tensor,
                     beta: float = 0.1, pos_len: Tensor | None = None, neg_len: Tensor | None = None,
                     length_normalize: bool = False) -> Tensor:
    """Sequence-level contrastive distillation loss, averaged over the batch.

    Inputs are per-example SUM log-probs (shape ``[B]``) of y+ and y- under the
    receiver being trained (``policy_*``, with grad) and under the frozen reference
    (``ref_*``, treated as constants). With ``length_normalize`` each log-ratio is
    divided by its path's token count (``pos_len`` / ``neg_len``), which removes the
    preference for short paths that summed log-probs carry when y+ and y- differ much
    in length (paths of two tokenizers do).

        L = -log sigmoid(beta * ((pp - rp) - (pn - rn)))
    """
    if beta <= 0:
        raise ValueError(f"contrastive_loss: beta must be > 0, got {beta}")
    _check_same_shape("contrastive_loss", policy_pos=policy_pos, policy_neg=policy_neg, ref_pos=ref_pos, ref_neg=ref_neg)
    ratio_pos = policy_pos - ref_pos.detach()
    ratio_neg = policy_neg - ref_neg.detach()
    if length_normalize:
        if pos_len is None or neg_len is None:
            raise ValueError("contrastive_loss: length_normalize=True needs pos_len and neg_len")
        _check_same_shape("contrastive_loss", policy_pos=policy_pos, pos_len=pos_len, neg_len=neg_len)
        ratio_pos = ratio_pos / pos_len.to(ratio_pos.dtype).clamp_min(1)
        ratio_neg = ratio_neg / neg_len.to(ratio_neg.dtype).clamp_min(1)
    # logsigmoid is stable for margins of any magnitude (no exp overflow).
    return -F.logsigmoid(beta * (ratio_pos - ratio_neg)).mean()


def contrastive_margin(policy_pos: Tensor, policy_neg: Tensor, ref_pos: Tensor, ref_neg: Tensor) -> Tensor:
    """The (unscaled) log-ratio margin per example, for logging."""
    return (policy_pos - ref_pos) - (policy_neg - ref_neg)


def sequence_logprob_from_logits(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Sum over unmasked positions of log p(labels[b, t] | logits[b, t]) -> ``[B]``.

    ``logits[:, t]`` must already be the prediction for ``labels[:, t]`` (shifted by the
    caller). Masked positions may hold any label (e.g. -100) and any logit, including
    inf/NaN: they are excluded with ``where``, not multiplied by zero.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(f"sequence_logprob_from_logits: expected logits [B,T,V], labels and mask [B,T]; "
                         f"got {tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}")
    keep = mask.bool()
    safe_logits = torch.where(keep.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    token_lp = torch.log_softmax(safe_logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, token_lp, torch.zeros_like(token_lp)).sum(-1)


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    values = torch.where(keep, values, torch.zeros_like(values))
    return values.sum() / keep.sum().clamp_min(1)


def _safe_logprobs(logits: Tensor, keep: Tensor) -> Tensor:
    """log_softmax with masked positions replaced by a uniform row (finite everywhere)."""
    zeros = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.log_softmax(torch.where(keep.unsqueeze(-1), logits, zeros).float(), dim=-1)


def skew_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """Per-position KL(p || alpha * p + (1 - alpha) * q) over the last (vocab) axis.

    Computed in log space with logsumexp; alpha = 0 gives KL(p || q). Inputs are
    log-probabilities; the result has the shape of the inputs without the last axis."""
    log_mix = torch.logsumexp(torch.stack([log_p + math.log(alpha) if alpha > 0 else torch.full_like(log_p, -math.inf),
                                           log_q + math.log1p(-alpha)]), dim=0)
    p = log_p.exp()
    # 0 * log 0 terms vanish: where p == 0 the product is 0 regardless of log_p.
    return torch.where(p > 0, p * (log_p - log_mix), torch.zeros_like(p)).sum(-1)


def distillm2_loss(student_logits_pos: Tensor, teacher_logits_pos: Tensor, student_logits_neg: Tensor,
                   teacher_logits_neg: Tensor, mask_pos: Tensor, mask_neg: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM-2 style contrastive token-level loss (same tokenizer on both sides).

    On teacher-generated paths (``*_pos``): skewed KL, KL(p_T || a p_T + (1-a) q_S),
    which raises the student's probability where the teacher puts mass. On
    student-generated paths (``*_neg``): skewed reverse KL, KL(q_S || (1-a) p_T + a q_S),
    which removes the student's mass where the teacher has little. Logits are
    ``[B, T, V]`` already aligned with their targets; masks ``[B, T]`` mark real target
    tokens (padding excluded, whatever its values). Each term is a mean over its real
    tokens; the loss is their sum. Teacher logits are constants.
    """
    if not 0 <= alpha < 1:
        raise ValueError(f"distillm2_loss: alpha must be in [0, 1), got {alpha}")
    for side, s, t, m in (("pos", student_logits_pos, teacher_logits_pos, mask_pos),
                          ("neg", student_logits_neg, teacher_logits_neg, mask_neg)):
        if s.shape != t.shape or s.dim() != 3 or m.shape != s.shape[:2]:
            raise ValueError(f"distillm2_loss ({side}): expected student/teacher logits [B,T,V] of one shape and "
                             f"mask [B,T]; got {tuple(s.shape)}, {tuple(t.shape)}, {tuple(m.shape)}")
    keep_pos, keep_neg = mask_pos.bool(), mask_neg.bool()
    s_pos = _safe_logprobs(student_logits_pos, keep_pos)
    t_pos = _safe_logprobs(teacher_logits_pos.detach(), keep_pos)
    s_neg = _safe_logprobs(student_logits_neg, keep_neg)
    t_neg = _safe_logprobs(teacher_logits_neg.detach(), keep_neg)
    skl = _masked_mean(skew_kl(t_pos, s_pos, alpha), keep_pos)
    srkl = _masked_mean(skew_kl(s_neg, t_neg, alpha), keep_neg)
    return skl + srkl
