"""Supervised fine-tuning on (prompt, target) text pairs: the one training loop every
host, plug-in and warm-up uses.

Loss is next-token cross-entropy on the target tokens and the EOS after them; prompt
and padding positions carry label -100. Prompt and target are tokenised separately and
concatenated, exactly as ``lada.models.scoring`` does, so the token boundary (and hence
what is learned) matches what is scored and generated.

Learning rate: linear warm-up over the first 5% of steps (at most 20), then cosine
decay to 10% of the peak at the last step (``schedule="cosine"``, the default), or a
flat rate after the warm-up (``schedule="constant"``). Each call builds a fresh AdamW,
so a federated round's local training is self-contained.

Long calls (warm-ups: thousands of steps) can be resumed: with ``resume_file``, the
weights, optimizer moments, step, RNG and statistics are saved there every
``save_every_s`` seconds and at the end, and a call that finds a matching file goes on
from it; the result equals an uninterrupted call's (the batch stream is replayed to the
saved step, and the learning rate is a function of the step).

Non-finite numbers never reach the weights silently: a step whose loss or gradient is
not finite is skipped and counted; a call that skips more than half of its steps, or
ends with non-finite weights, raises `NonFiniteError` (the caller never saves them).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lada.config import TrainConfig
from lada.timing import timed_fn

IGNORE = -100
log = logging.getLogger("lada.training")

# Steps skipped for a non-finite loss or gradient in this process since the last
# `pop_nonfinite_steps()`; the protocol reports them in the participant's metrics row.
_NONFINITE_STEPS = 0


# A call that has to skip more than this share of its steps has diverged (a learning
# rate far too high, say): it fails instead of returning garbage weights as a result.
MAX_SKIPPED_FRACTION = 0.5
# How often a resumable call (``resume_file``) saves its state, in seconds of training.
SAVE_EVERY_S = 120.0
# Without a progress bar (stderr is not a terminal: a job writing to a log file) a
# training logs one line this often, so a long warm-up or bound shows that it moves.
LOG_EVERY_S = 120.0


class NonFiniteError(FloatingPointError):
    """Training left non-finite weights (the message says where and what to change)."""


def pop_nonfinite_steps() -> int:
    """Skipped non-finite steps since the last call (and reset the count)."""
    global _NONFINITE_STEPS
    n, _NONFINITE_STEPS = _NONFINITE_STEPS, 0
    return n


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of parameters holding a NaN or an infinity."""
    with torch.no_grad():
        return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
                 max_length: int) -> list[dict[str, list[int]]]:
    """Token ids and labels for each (prompt, target): ``prompt ids + target ids + EOS``
    with labels -100 on the prompt.

    Too-long pairs keep their target (cut on the right only if the target alone does
    not fit) and lose the start of the prompt.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; targets need one")
    if max_length < 2:
        raise ValueError(f"encode_pairs: max_length must be >= 2, got {max_length}")
    if not pairs:
        return []
    # Full-length encodings on purpose (cut below, keeping the target): no "longer than
    # model_max_length" warning.
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True, verbose=False)["input_ids"]
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for p, t in zip(prompts, targets):
        t = (t + [tokenizer.eos_token_id])[: max_length - 1]
        p = p[-(max_length - len(t)):] if p else p
        out.append({"input_ids": p + t, "labels": [IGNORE] * len(p) + t})
    return out


def collate(encoded: list[dict[str, list[int]]], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence (not to max_length)."""
    n = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's labelled tokens (computed in float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return F.cross_entropy(logits[:, :-1][keep].float(), labels[keep])


def lr_factor(step: int, total: int, schedule: str = "cosine") -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    warm = min(20, max(1, total // 20))
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'cosine' or 'constant'")
    progress = (step - warm) / max(1, total - warm - 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# Length buckets: a pool of this many batches is drawn from the shuffled stream, sorted
# by length and cut into batches, which are then visited in random order.
BUCKET_POOL_BATCHES = 16


def index_batches(n: int, batch_size: int, seed: int, lengths: list[int] | None = None):
    """Endless index batches drawn from shuffled epochs (an epoch boundary may fall
    inside a batch, so every batch is full).

    With ``lengths``, batches are length-bucketed: the same shuffled stream is taken
    ``BUCKET_POOL_BATCHES`` batches at a time, each pool sorted by length and cut into
    batches of similar lengths, in a random order. Every example is still seen once per
    epoch (up to the pool at an epoch boundary), but padding, which is about 40% of the
    tokens of random batches on the default task, nearly disappears."""
    gen = torch.Generator().manual_seed(seed)
    buf: list[int] = []
    if lengths is None:
        while True:
            while len(buf) < batch_size:
                buf.extend(torch.randperm(n, generator=gen).tolist())
            yield buf[:batch_size]
            buf = buf[batch_size:]
    pool = batch_size * BUCKET_POOL_BATCHES
    while True:
        while len(buf) < pool:
            buf.extend(torch.randperm(n, generator=gen).tolist())
        chunk, buf = sorted(buf[:pool], key=lambda i: lengths[i]), buf[pool:]
        for b in torch.randperm(BUCKET_POOL_BATCHES, generator=gen).tolist():
            yield chunk[b * batch_size:(b + 1) * batch_size]


@timed_fn("training")
def train_steps(lm, pairs: list[tuple[str, str]], steps: int, train_cfg: TrainConfig, seed: int,
                extra_loss: Callable[[int], torch.Tensor | None] | None = None, desc: str = "train",
                lr: float | None = None, batch_size: int | None = None, schedule: str = "cosine",
                progress: bool | None = None, resume_file: str | Path | None = None,
                save_every_s: float | None = None, save_final: bool = True) -> dict:
    """Run ``steps`` AdamW steps on batches of ``pairs`` (``lm`` is a LoadedModel).

    ``extra_loss(step)`` may return a scalar tensor that is added to the LM loss (for
    distillation terms); with no pairs, only that loss is optimised. Only parameters
    with ``requires_grad`` are updated, so LoRA models train their adapters only.
    Returns ``{"loss": mean loss of the last 10 steps, "first_loss", "steps",
    "seconds" (an interrupted earlier call's included), "seconds_before" (that earlier
    call's alone), "tokens": non-pad tokens processed, "target_tokens", "skipped":
    steps skipped for a non-finite loss or gradient}``; raises `NonFiniteError` if more
    than half of the steps were skipped or the weights are not finite at the end.
    ``resume_file``: save the training state there (see the module doc) and go on from
    it if it holds a state of this very call (same steps, seed, data size, lr, batch);
    ``save_final`` also saves the finished state (what a later stage resumes after).
    """
    global _NONFINITE_STEPS
    if steps <= 0:
        return {"loss": float("nan"), "first_loss": float("nan"), "steps": 0, "seconds": 0.0, "seconds_before": 0.0,
                "tokens": 0, "target_tokens": 0, "skipped": 0}
    if not pairs and extra_loss is None:
        raise ValueError(f"train_steps({desc!r}): no training pairs and no extra_loss")
    model, tok = lm.model, lm.tokenizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"train_steps({desc!r}): the model has no trainable parameters")
    peak = train_cfg.lr if lr is None else lr
    bs = batch_size or train_cfg.batch_size
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=train_cfg.weight_decay, betas=(0.9, 0.95))
    encoded = encode_pairs(tok, pairs, train_cfg.max_length)
    lengths = [len(e["input_ids"]) for e in encoded] if getattr(train_cfg, "length_buckets", False) else None
    batches = index_batches(len(encoded), bs, seed, lengths) if encoded else None
    losses: list[float] = []
    tokens = target_tokens = skipped = 0
    start, before = 0, 0.0  # steps and seconds of an earlier, interrupted call
    key = {"steps": steps, "seed": seed, "examples": len(encoded), "lr": peak, "batch_size": bs,
           "extra_loss": extra_loss is not None}
    if resume_file is not None and (state := _read_state(Path(resume_file), key, desc)):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, before, losses = state["step"], state["seconds"], state["losses"]
        tokens, target_tokens, skipped = state["tokens"], state["target_tokens"], state["skipped"]
        for _ in range(start if batches is not None else 0):
            next(batches)  # replay the batch stream to the saved step
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(start, steps), desc=desc, disable=not show, leave=False, dynamic_ncols=True,
               initial=start, total=steps)
    t0 = last_save = last_log = time.perf_counter()
    every = SAVE_EVERY_S if save_every_s is None else save_every_s
    log_lines = progress is None and not show  # an explicit progress=False stays silent

    def save(step: int) -> None:
        _write_state(Path(resume_file), {
            "key": key, "step": step, "seconds": before + time.perf_counter() - t0, "losses": losses,
            "tokens": tokens, "target_tokens": target_tokens, "skipped": skipped, "rng": torch.get_rng_state(),
            "model": model.state_dict(), "optimizer": opt.state_dict()})

    model.train()
    try:
        for step in bar:
            if resume_file is not None and time.perf_counter() - last_save >= every:
                save(step)  # the state before this step: `step` steps done
                last_save = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = peak * lr_factor(step, steps, schedule)
            loss = None
            if batches is not None:
                batch = collate([encoded[i] for i in next(batches)], tok.pad_token_id, lm.device)
                loss = lm_loss(model, batch)
                tokens += int(batch["attention_mask"].sum())
                target_tokens += int((batch["labels"] != IGNORE).sum())
            if extra_loss is not None:
                extra = extra_loss(step)
                if extra is not None:
                    loss = extra if loss is None else loss + extra
            if loss is None:
                continue  # extra_loss had nothing to add this step
            opt.zero_grad(set_to_none=True)
            if not bool(torch.isfinite(loss.detach())):
                skipped += 1  # a NaN/inf loss would turn every weight into NaN through AdamW
                continue
            loss.backward()
            # max_norm=inf only measures: the total norm is finite iff every gradient is
            norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf)
            if not bool(torch.isfinite(norm)):
                skipped += 1
                opt.zero_grad(set_to_none=True)
                continue
            opt.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if log_lines and (now := time.perf_counter()) - last_log >= LOG_EVERY_S:
                last_log, done = now, step + 1
                left = (steps - done) * (now - t0) / max(1, done - start)
                log.info("%s: step %d/%d, loss %.3f, %.0f s so far, about %.0f s left", desc, done, steps,
                         losses[-1], before + now - t0, left)
        if resume_file is not None and save_final and start < steps:
            save(steps)  # a finished call: a resumed multi-stage warm-up skips it
    finally:
        model.eval()
        bar.close()
        _NONFINITE_STEPS += skipped
    if skipped > MAX_SKIPPED_FRACTION * steps:
        raise NonFiniteError(f"{desc}: training diverged: {skipped} of {steps} step(s) had a non-finite loss or "
                             f"gradient at learning rate {peak:g}. Lower train.lr (or the warm-up lr).")
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(f"{desc}: the weights became non-finite (NaN or inf in {len(bad)} tensor(s), e.g. "
                             f"{bad[0]}) at learning rate {peak:g}; {skipped} of {steps} step(s) had a non-finite "
                             f"loss or gradient. Lower train.lr (or the warm-up lr) or set train.grad_clip.")
    tail = losses[-10:]
    return {"loss": sum(tail) / len(tail) if tail else float("nan"),
            "first_loss": losses[0] if losses else float("nan"), "steps": len(losses),
            "seconds": before + time.perf_counter() - t0, "seconds_before": before, "tokens": tokens,
            "target_tokens": target_tokens, "skipped": skipped}


def _read_state(path: Path, key: dict, desc: str) -> dict | None:
    """A saved training state of this very call, or None (no file, or another call's)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated file cannot happen (atomic replace), but a foreign one can
        log.warning("%s: cannot read the saved training state %s (%s); starting over", desc, path, e)
        return None
    if state.get("key") != key:
        log.warning("%s: %s holds the state of another training call (%s, not %s); starting over",
                    desc, path, state.get("key"), key)
        return None
    log.info("%s: resuming at step %d of %d from %s", desc, state["step"], key["steps"], path)
    return state


def _write_state(path: Path, state: dict) -> None:
    """Atomically: a crash while saving leaves the previous state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
