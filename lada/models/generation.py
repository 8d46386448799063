"""Sampling reasoning paths and greedy evaluation.

Prompts are left-padded, sorted by length and generated in batches with the KV cache.
A sequence is finished at EOS or at the first newline after its answer marker
(``####``); ``AnswerLineStop`` tracks this with tensor ops on the whole batch, so
models that never learned to emit EOS (pretrained LMs) also stop early. The returned
text is cut after the answer line in any case.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig
from transformers import StoppingCriteria, StoppingCriteriaList

from lada.config import GenerationConfig
from lada.data.records import ANSWER_MARKER, Example, example_prompt


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


def _generate(lm, prompts: list[str], num_return: int, max_new_tokens: int, prompts_per_batch: int,
              do_sample: bool, temperature: float, top_p: float, seed: int, progress: bool | None,
              desc: str) -> list[list[str]]:
    """Generate ``num_return`` continuations per prompt; texts cut after the answer line."""
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
    hf_cfg = HFGenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return, use_cache=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **({"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}),
    )
    out: list[list[str]] = [[] for _ in prompts]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else len(tok)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not _show(progress), leave=False, dynamic_ncols=True)
    try:
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []), \
                torch.inference_mode(), _left_padding(tok):
            torch.manual_seed(seed)
            for start in range(0, len(order), prompts_per_batch):
                idx = order[start:start + prompts_per_batch]
                batch = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(lm.device)
                stop = StoppingCriteriaList([AnswerLineStop(tok, vocab, lm.device)])
                gen = model.generate(**batch, generation_config=hf_cfg, stopping_criteria=stop)
                texts = tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for j, i in enumerate(idx):
                    out[i] = [cut_after_answer(t) for t in texts[j * num_return:(j + 1) * num_return]]
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


def sample_paths(lm, prompts: list[str], num_paths: int, gen_cfg: GenerationConfig, seed: int,
                 progress: bool | None = None) -> list[list[str]]:
    """``num_paths`` sampled continuations per prompt (temperature 0: greedy, and all
    paths equal). ``gen_cfg.batch_size`` counts sequences, so a batch holds
    ``batch_size // num_paths`` prompts. Deterministic for a given seed and batch size."""
    if num_paths <= 0:
        raise ValueError(f"sample_paths: num_paths must be > 0, got {num_paths}")
    if gen_cfg.temperature > 0:
        return _generate(lm, prompts, num_paths, gen_cfg.max_new_tokens, max(1, gen_cfg.batch_size // num_paths),
                         True, gen_cfg.temperature, gen_cfg.top_p, seed, progress, "sample")
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


def evaluate(lm, examples: list[Example], gen_cfg: GenerationConfig, max_new_tokens: int | None = None,
             progress: bool | None = None) -> EvalResult:
    """Greedy accuracy on ``examples`` (answers checked by ``lada.data.answers``)."""
    from lada.data.answers import is_correct

    outputs = greedy_generate(lm, [example_prompt(ex) for ex in examples], max_new_tokens or gen_cfg.max_new_tokens,
                              gen_cfg.eval_batch_size, progress)
    correct = [bool(is_correct(o, ex.answer, ex.answer_type, options=ex.options))
               for o, ex in zip(outputs, examples)]
    groups: dict[int, list[bool]] = {}
    for ex, ok in zip(examples, correct):
        groups.setdefault(ex.num_steps, []).append(ok)
    by_steps = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    acc = sum(correct) / len(correct) if correct else 0.0
    return EvalResult(acc, len(examples), correct, outputs, by_steps)
