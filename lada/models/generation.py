"""Sampling reasoning paths and greedy evaluation.

Prompts are sorted by length (so a batch holds prompts of similar length), left-padded
and decoded by a lean loop over the model's forward pass (``_decode_batch``): the KV
cache is written in place instead of re-concatenated each step, a row is finished at
EOS or at the first newline after its answer marker (``####``; ``AnswerLineStop``
holds the per-vocabulary tables, so models that never learned to emit EOS also stop
early), finished rows leave the batch, and the batch ends when all rows have.

Greedy decoding picks, token for token, what ``model.generate`` picks (tests compare
the two). Sampling is temperature + nucleus (top-p), drawn by inverse CDF from one
counter-based uniform per (seed, prompt, path, step): the same distribution as
``generate(do_sample=True)``, and results that do not depend on batch size or on
which prompts share a batch. The returned text is cut after the answer line.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria
from transformers.cache_utils import DynamicCache, DynamicLayer

from lada.config import GenerationConfig
from lada.data.records import ANSWER_MARKER, Example, example_prompt
from lada.timing import timed_fn


def cut_after_answer(text: str) -> str:
    """Keep ``text`` up to the end of its first line containing the answer marker."""
    pos = text.find(ANSWER_MARKER)
    if pos < 0:
        return text
    end = text.find("\n", pos)
    return text if end < 0 else text[:end]


class AnswerLineStop(StoppingCriteria):
    """Per-sequence stop once a newline follows a ``#`` in the generated tokens.

    Token strings are classified once per vocabulary into three boolean tables (has
    ``#``, has a newline, has a newline after a ``#``); each step is then a lookup of
    the last token, with no Python loop over sequences.
    """

    _tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> tables

    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        key = tokenizer
        if key not in self._tables:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
            n = max(vocab_size, len(texts))
            has_hash, has_nl, hash_nl = (torch.zeros(n, dtype=torch.bool) for _ in range(3))
            for i, t in enumerate(texts):
                h = t.find("#")
                has_hash[i] = h >= 0
                has_nl[i] = "\n" in t
                hash_nl[i] = h >= 0 and "\n" in t[h:]
            self._tables[key] = (has_hash, has_nl, hash_nl)
        self.has_hash, self.has_nl, self.hash_nl = (t.to(device) for t in self._tables[key])
        self.seen_hash: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1]
        if self.seen_hash is None or self.seen_hash.shape[0] != last.shape[0]:
            self.seen_hash = torch.zeros_like(last, dtype=torch.bool)
        done = self.hash_nl[last] | (self.seen_hash & self.has_nl[last])
        self.seen_hash = self.seen_hash | self.has_hash[last]
        return done


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


@contextlib.contextmanager
def _left_padding(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


class _KVBuffer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once per batch.

    ``DynamicLayer`` concatenates every step's keys onto the whole cache (quadratic
    copying: for a batch of 128 it moved more bytes per step than the model computes
    with); this layer writes the step into place and hands out views. Rows can be
    dropped (``keep``) when their sequences finish.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, repeats allowed); copies the filled part only."""
        if self.is_initialized:
            k = self._k.new_empty((len(rows),) + self._k.shape[1:])
            v = self._v.new_empty((len(rows),) + self._v.shape[1:])
            torch.index_select(self._k[:, :, :self.length], 0, rows, out=k[:, :, :self.length])
            torch.index_select(self._v[:, :, :self.length], 0, rows, out=v[:, :, :self.length])
            self._k, self._v = k, v
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def _stop_tables(tokenizer, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stop = AnswerLineStop(tokenizer, vocab_size, device)
    return stop.has_hash, stop.has_nl, stop.hash_nl


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit hash of an integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _row_uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """One U[0, 1) number per row for decoding step ``step``: a hash of (row key, step).

    Counter-based, so a row's draws do not depend on which rows share its batch, the
    batch size or the order of batches: sampling is deterministic by seed alone."""
    with np.errstate(over="ignore"):
        z = keys + np.uint64((step + 1) * 0x9E3779B97F4A7C15 & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _sample_rows(scores: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature + nucleus (top-p) sampling with one uniform per row (inverse CDF).

    Same distribution as ``generate(do_sample=True, temperature, top_p, top_k=0)``: the
    kept set is the most likely tokens whose mass before them is below ``top_p`` (at
    least one), renormalised."""
    scores = scores / temperature
    vals, order = scores.sort(-1, descending=True)
    probs = vals.softmax(-1)
    cum = probs.cumsum(-1)
    if top_p < 1.0:
        probs = probs.masked_fill((cum - probs) >= top_p, 0.0)
        cum = probs.cumsum(-1)
    target = (u.to(cum.dtype) * cum[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[-1] - 1)
    # never land on a removed (zero-mass) tail token through rounding at the very top
    pick = torch.minimum(pick, (probs > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


def _decode_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_return: int,
                  max_new_tokens: int, row_keys: np.ndarray | None, temperature: float, top_p: float,
                  tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eos_id: int | None,
                  pad_id: int) -> torch.Tensor:
    """New tokens ``[B * num_return, T]`` for a left-padded batch of B prompts (pad
    after a row's end); rows ``i * num_return + r`` continue prompt i.

    A lean loop over the model's forward: the prompts are run once and their cache is
    repeated ``num_return`` times, the KV cache is written in place (``_KVBuffer``), a
    row stops at EOS or at the newline after its answer marker and is then dropped from
    the batch, and the loop ends when every row has. Greedy when ``row_keys`` is None
    (argmax: the same tokens ``model.generate`` picks), else sampled with the row's
    counter-based uniforms (``_row_uniforms``).
    """
    has_hash, has_nl, hash_nl = tables
    n_prompts, prompt_len = input_ids.shape
    n_rows = n_prompts * num_return
    device = input_ids.device
    layers = [_KVBuffer(prompt_len + max_new_tokens) for _ in range(model.config.get_text_config().num_hidden_layers)]
    cache = DynamicCache()
    cache.layers = layers
    out = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(n_rows, device=device)  # the output row of each live row
    mask = attention_mask
    position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    seen_hash = torch.zeros(n_rows, dtype=torch.bool, device=device)
    alive = torch.ones(n_rows, dtype=torch.bool, device=device)
    live_keys = row_keys
    step_input = input_ids
    for t in range(max_new_tokens):
        logits = model(input_ids=step_input, attention_mask=mask, position_ids=position, cache=cache,
                       use_cache=True, logits_to_keep=1).logits
        scores = logits[:, -1].to(dtype=torch.float32)
        if t == 0 and num_return > 1:  # the prompts ran once; now one row per continuation
            scores = scores.repeat_interleave(num_return, dim=0)
            mask, position = (x.repeat_interleave(num_return, dim=0) for x in (mask, position))
            for layer in layers:
                layer.keep(torch.arange(n_prompts, device=device).repeat_interleave(num_return))
        if live_keys is None:
            nxt = scores.argmax(-1)
        else:
            u = torch.from_numpy(_row_uniforms(live_keys, t)).to(device)
            nxt = _sample_rows(scores, u, temperature, top_p)
        nxt = torch.where(alive, nxt, pad_id)  # rows that finished but are still in the batch
        out[rows, t] = nxt
        done = hash_nl[nxt] | (seen_hash & has_nl[nxt])
        if eos_id is not None:
            done |= nxt == eos_id
        seen_hash = seen_hash | has_hash[nxt]
        alive = alive & ~done
        n_alive = int(alive.sum())
        if t == max_new_tokens - 1 or n_alive == 0:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        position = position[:, -1:] + 1
        step_input = nxt.unsqueeze(-1)
        # Drop finished rows once a quarter of the batch has finished: a smaller batch
        # computes less, but each drop copies the cache, so not at every step.
        if n_alive <= 0.75 * len(alive):
            live = alive.nonzero().squeeze(-1)
            rows, mask, position, step_input, seen_hash, alive = (
                x.index_select(0, live) for x in (rows, mask, position, step_input, seen_hash, alive))
            if live_keys is not None:
                live_keys = live_keys[live.cpu().numpy()]
            for layer in layers:
                layer.keep(live)
    return out


def _generate(lm, prompts: list[str], num_return: int, max_new_tokens: int, rows_per_batch: int,
              do_sample: bool, temperature: float, top_p: float, seed: int, progress: bool | None,
              desc: str) -> list[list[str]]:
    """Generate ``num_return`` continuations per prompt; texts cut after the answer line.

    Prompts are sorted by length and cut into batches of at most ``rows_per_batch``
    sequences (prompts x continuations), so a batch holds prompts of similar length.
    The output does not depend on the batching: greedy decoding is row-independent
    and sampling draws from a per-(seed, prompt, continuation, step) counter.
    """
    if not prompts:
        return []
    model, tok = lm.model, lm.tokenizer
    ids = tok(prompts, add_special_tokens=True)["input_ids"]
    limit = _max_positions(model)
    if limit is not None and limit <= max_new_tokens:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in a model "
                         f"with {limit} positions")
    if limit is not None:
        ids = [x[-(limit - max_new_tokens):] for x in ids]  # keep the question's end if too long
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    prompts_per_batch = max(1, rows_per_batch // num_return)
    out: list[list[str]] = [[] for _ in prompts]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else len(tok)
    tables = _stop_tables(tok, vocab, lm.device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    base = _mix64(_mix64(int(seed) & _MASK64) ^ 0x6C616461)  # "lada"
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not _show(progress), leave=False, dynamic_ncols=True)
    try:
        with torch.inference_mode(), _left_padding(tok):
            for start in range(0, len(order), prompts_per_batch):
                idx = order[start:start + prompts_per_batch]
                batch = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(lm.device)
                keys = None
                if do_sample:
                    keys = np.array([_mix64(base ^ (i * num_return + r)) for i in idx for r in range(num_return)],
                                    dtype=np.uint64)
                gen = _decode_batch(model, batch["input_ids"], batch["attention_mask"], num_return, max_new_tokens,
                                    keys, temperature, top_p, tables, tok.eos_token_id, pad_id)
                texts = tok.batch_decode(gen, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    out[i] = [cut_after_answer(t) for t in texts[j * num_return:(j + 1) * num_return]]
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


@timed_fn("sampling")
def sample_paths(lm, prompts: list[str], num_paths: int, gen_cfg: GenerationConfig, seed: int,
                 progress: bool | None = None) -> list[list[str]]:
    """``num_paths`` sampled continuations per prompt (temperature 0: greedy, and all
    paths equal). ``gen_cfg.batch_size`` counts sequences, so a batch holds
    ``batch_size // num_paths`` prompts. Deterministic for a given seed, whatever the
    batch size: path r of prompt i draws from its own counter-based stream."""
    if num_paths <= 0:
        raise ValueError(f"sample_paths: num_paths must be > 0, got {num_paths}")
    if gen_cfg.temperature > 0:
        return _generate(lm, prompts, num_paths, gen_cfg.max_new_tokens, gen_cfg.batch_size, True, gen_cfg.temperature, gen_cfg.top_p, seed, progress, "sample")
    greedy = _generate(lm, prompts, 1, gen_cfg.max_new_tokens, gen_cfg.batch_size, False, 1.0, 1.0, seed,
                       progress, "sample")
    return [p * num_paths for p in greedy]


def greedy_generate(lm, prompts: list[str], max_new_tokens: int, batch_size: int,
                    progress: bool | None = None) -> list[str]:
    """One greedy continuation per prompt, cut after the answer line."""
    return [p[0] for p in _generate(lm, prompts, 1, max_new_tokens, batch_size, False, 1.0, 1.0, 0, progress,
                                    "eval")]


@dataclass
class EvalResult:
    """Greedy evaluation: overall accuracy, per-example correctness and outputs (in
    input order), and accuracy grouped by the gold rationale's number of steps."""

    accuracy: float
    n: int
    correct: list[bool]
    outputs: list[str]
    by_steps: dict[int, float] = field(default_factory=dict)  # gold rationale steps -> accuracy
    # On a linked task (yes/no, choice: the answer follows from the chain's value), the
    # share of outputs whose chain reached the gold value; None on other tasks.
    chain_right: float | None = None


@timed_fn("evaluation")
def evaluate(lm, examples: list[Example], gen_cfg: GenerationConfig, max_new_tokens: int | None = None,
             progress: bool | None = None) -> EvalResult:
    """Greedy accuracy on ``examples`` (answers checked by ``lada.data.answers``)."""
    from lada.data.answers import chain_share, is_correct

    outputs = greedy_generate(lm, [example_prompt(ex) for ex in examples], max_new_tokens or gen_cfg.max_new_tokens,
                              gen_cfg.eval_batch_size, progress)
    correct = [bool(is_correct(o, ex.answer, ex.answer_type, options=ex.options))
               for o, ex in zip(outputs, examples)]
    groups: dict[int, list[bool]] = {}
    for ex, ok in zip(examples, correct):
        groups.setdefault(ex.num_steps, []).append(ok)
    by_steps = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    acc = sum(correct) / len(correct) if correct else 0.0
    return EvalResult(acc, len(examples), correct, outputs, by_steps, chain_share(outputs, examples))
