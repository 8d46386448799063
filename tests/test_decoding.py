"""The lean decoding loop against Hugging Face ``generate`` (the implementation it
replaced), and its sampler against the nucleus distribution it stands for."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GenerationConfig as HFGenerationConfig  # noqa: E402
from transformers import StoppingCriteriaList, TemperatureLogitsWarper, TopPLogitsWarper  # noqa: E402

from lada.config import GenerationConfig, ModelConfig, TrainConfig  # noqa: E402
from lada.data.records import format_prompt, format_target  # noqa: E402
from lada.models.generation import (AnswerLineStop, _row_uniforms, _sample_rows, cut_after_answer,  # noqa: E402
                                    greedy_generate, sample_paths)
from lada.models.loading import build_model  # noqa: E402
from lada.models.training import train_steps  # noqa: E402
from helpers import arithmetic_examples  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]
EXAMPLES = arithmetic_examples(12, seed=3, prefix="d")
PAIRS = [(format_prompt(ex.question), format_target(ex.rationale, ex.answer)) for ex in EXAMPLES]
CORPUS = [t for p in PAIRS for t in p] * 3


def hf_reference(lm, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding as lada did it before the lean loop: ``model.generate`` on
    left-padded, length-sorted batches, stopped per row by ``AnswerLineStop``."""
    model, tok = lm.model, lm.tokenizer
    ids = tok(prompts, add_special_tokens=True)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    cfg = HFGenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id)
    vocab = model.get_output_embeddings().weight.shape[0]
    out = [""] * len(prompts)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                batch = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
                stop = StoppingCriteriaList([AnswerLineStop(tok, vocab, lm.device)])
                gen = model.generate(**batch, generation_config=cfg, stopping_criteria=stop)
                texts = tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for j, i in enumerate(idx):
                    out[i] = cut_after_answer(texts[j])
    finally:
        tok.padding_side = side
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One model per family, trained until some rows stop early and others run on."""
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for family in FAMILIES:
        lm = build_model(ModelConfig(name=family, hidden_size=32, num_layers=2, num_heads=4, vocab_size=300),
                         CORPUS, seed=0, cache_dir=cache)
        train_steps(lm, PAIRS[:8], 60, TrainConfig(lr=1e-2, batch_size=8), seed=0, progress=False)
        out[family] = lm
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_token_for_token_what_generate_gives(trained, family):
    lm = trained[family]
    prompts = [p for p, _ in PAIRS] + ["Question: 7 plus 2, doubled, then doubled?\nAnswer:"]
    want = hf_reference(lm, prompts, 30, batch_size=5)
    assert any("####" in w for w in want) and any("####" not in w for w in want)  # both kinds of row
    assert greedy_generate(lm, prompts, 30, batch_size=5) == want
    assert greedy_generate(lm, prompts, 30, batch_size=64) == want  # one batch: rows finish at different steps
    assert greedy_generate(lm, prompts, 30, batch_size=1) == want


def test_sampling_does_not_depend_on_batching(trained):
    lm = trained["tiny-llama"]
    prompts = [p for p, _ in PAIRS]
    runs = [sample_paths(lm, prompts, 3, GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=20,
                                                          batch_size=bs), seed=5) for bs in (1, 4, 64)]
    assert runs[0] == runs[1] == runs[2]
    other = sample_paths(lm, prompts, 3, GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=20), seed=6)
    assert other != runs[0]
    assert any(len(set(paths)) > 1 for paths in runs[0])  # paths of one prompt differ


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.95), (1.3, 0.5)])
def test_sampler_draws_the_nucleus_distribution(temperature, top_p):
    """Inverse-CDF sampling on an evenly spaced grid of uniforms hits every token as
    often as its probability under generate's temperature + top-p warpers (to 1/N)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=g) * 2
    want = scores.clone()
    want = TemperatureLogitsWarper(temperature)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    want = want.softmax(-1)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in range(3):
        picks = _sample_rows(scores[row:row + 1].expand(n, -1), u, temperature, top_p)
        freq = torch.bincount(picks, minlength=40).double() / n
        assert torch.allclose(freq, want[row].double(), atol=2.0 / n), (freq - want[row]).abs().max()


def test_row_uniforms_are_uniform_and_keyed():
    keys = np.arange(5000, dtype=np.uint64) * np.uint64(7919)
    u0, u1 = _row_uniforms(keys, 0), _row_uniforms(keys, 1)
    assert ((u0 >= 0) & (u0 < 1)).all() and abs(u0.mean() - 0.5) < 0.02 and abs(u0.std() - 12 ** -0.5) < 0.02
    assert not np.allclose(u0, u1)
    assert np.array_equal(_row_uniforms(keys[::-1].copy(), 0), u0[::-1])  # a row's draw ignores its neighbours
