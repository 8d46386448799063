"""Models layer: tokenizers, tiny configs, build/save/load, LoRA, scoring, generation,
training and evaluation, all on d32 x 2-layer models built from an inline corpus."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lada.config import GenerationConfig, ModelConfig, TrainConfig  # noqa: E402
from lada.data.records import Example, format_prompt, format_target  # noqa: E402
from lada.models.generation import AnswerLineStop, cut_after_answer, evaluate, greedy_generate, sample_paths  # noqa: E402
from lada.models.loading import build_model, load_model, resolve_device, save_model  # noqa: E402
from lada.models.scoring import mean_nll, sequence_logprobs, token_logprobs  # noqa: E402
from lada.models.tiny import tiny_model_config  # noqa: E402
from lada.models.tokenizers import tokenizer_for, train_tokenizer  # noqa: E402
from lada.models.training import IGNORE, encode_pairs, lr_factor, train_steps  # noqa: E402
from helpers import arithmetic_examples

# peft calls a transformers method that is deprecated in 5.x; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


def _examples(n: int, seed: int = 0) -> list[Example]:
    return arithmetic_examples(n, seed, prefix="t")


EXAMPLES = _examples(8)
PAIRS = [(format_prompt(ex.question), format_target(ex.rationale, ex.answer)) for ex in EXAMPLES]
CORPUS = [t for p in PAIRS for t in p] * 3 + [format_prompt(ex.question) for ex in _examples(40, seed=1)]


def _cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, hidden_size=32, num_layers=2, num_heads=4, vocab_size=300, **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def models(cache):
    return {f: build_model(_cfg(f), CORPUS, seed=0, cache_dir=cache) for f in FAMILIES}


def _logits(lm, texts):
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return lm.model(**batch).logits


# ----------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trip(family):
    tok = train_tokenizer(CORPUS, family, 300)
    texts = [p + t for p, t in PAIRS] + ["3*4=<<3*4=12>>12", "  two  spaces\n\n#### 12 ", "héllo wörld ✓\ttab", ""]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok(PAIRS[0][0])["input_ids"][0] == tok.bos_token_id
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    # Digits are single tokens, so a number tokenises the same way everywhere.
    assert tok.tokenize("12") == ["1", "2"]


def test_families_tokenise_differently():
    text = "Question: 7 plus 5, doubled?\nAnswer:\n"
    pieces = {f: tuple(train_tokenizer(CORPUS, f, 300).tokenize(text)) for f in FAMILIES}
    assert len(set(pieces.values())) == len(FAMILIES)


def test_tokenizer_cache(tmp_path):
    a = tokenizer_for("tiny-llama", 300, CORPUS, tmp_path)
    b = tokenizer_for("tiny-llama", 300, CORPUS, tmp_path)
    tokenizer_for("tiny-llama", 300, CORPUS[:10], tmp_path)
    assert a.get_vocab() == b.get_vocab()
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
    with pytest.raises(ValueError, match="unknown tiny family"):
        train_tokenizer(CORPUS, "tiny-bert", 300)


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config(family, models):
    lm = models[family]
    cfg = tiny_model_config(_cfg(family), lm.tokenizer)
    assert cfg.vocab_size == len(lm.tokenizer)
    assert cfg.eos_token_id == lm.tokenizer.eos_token_id and cfg.pad_token_id == lm.tokenizer.pad_token_id
    assert cfg.tie_word_embeddings
    assert lm.model.get_input_embeddings().weight.data_ptr() == lm.model.get_output_embeddings().weight.data_ptr()


def test_build_is_deterministic_by_seed(cache):
    a = build_model(_cfg("tiny-llama"), CORPUS, seed=3, cache_dir=cache)
    b = build_model(_cfg("tiny-llama"), CORPUS, seed=3, cache_dir=cache)
    c = build_model(_cfg("tiny-llama"), CORPUS, seed=4, cache_dir=cache)
    assert torch.equal(_logits(a, [PAIRS[0][0]]), _logits(b, [PAIRS[0][0]]))
    assert not torch.equal(_logits(a, [PAIRS[0][0]]), _logits(c, [PAIRS[0][0]]))
    with pytest.raises(ValueError, match="corpus"):
        build_model(_cfg("tiny-llama"), None, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, models, tmp_path):
    lm = models[family]
    path = save_model(lm, tmp_path / family)
    back = load_model(_cfg(family), path)
    texts = [PAIRS[0][0] + PAIRS[0][1], PAIRS[1][0]]
    assert torch.equal(_logits(lm, texts), _logits(back, texts))
    assert back.tokenizer.get_vocab() == lm.tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="lada_model.json"):
        load_model(_cfg(family), tmp_path)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_lora_adapters_train_save_load(family, cache, tmp_path):
    lm = build_model(_cfg(family, lora_r=4), CORPUS, seed=0, cache_dir=cache)
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    train_steps(lm, PAIRS, 3, TrainConfig(lr=1e-2, batch_size=4), seed=0, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in lm.model.named_parameters() if not p.requires_grad)
    path = save_model(lm, tmp_path / "lora")
    assert (path / "adapter").is_dir()
    back = load_model(_cfg(family, lora_r=4), path)
    assert back.is_lora
    assert back.num_parameters(trainable_only=True) == lm.num_parameters(trainable_only=True)
    assert torch.allclose(_logits(lm, [PAIRS[0][0]]), _logits(back, [PAIRS[0][0]]), atol=1e-6)


def test_full_checkpoint_gets_fresh_lora_on_load(models, tmp_path):
    path = save_model(models["tiny-qwen2"], tmp_path / "full")
    lm = load_model(_cfg("tiny-qwen2", lora_r=2), path)
    assert lm.is_lora and 0 < lm.num_parameters(True) < lm.num_parameters()
    # LoRA starts as the identity: same outputs as the full model.
    assert torch.allclose(_logits(lm, [PAIRS[0][0]]), _logits(models["tiny-qwen2"], [PAIRS[0][0]]), atol=1e-6)


def test_pretrained_directory_loads_by_path(models, tmp_path):
    """A non-tiny name is a hub name or a local directory; a missing pad token is set."""
    lm = models["tiny-gpt2"]
    lm.model.save_pretrained(tmp_path)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=lm.tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    no_pad.save_pretrained(tmp_path)
    other = build_model(ModelConfig(name=str(tmp_path)), None, seed=0)
    assert other.tokenizer.pad_token_id == other.tokenizer.eos_token_id
    assert torch.equal(_logits(lm, [PAIRS[0][0]]), _logits(other, [PAIRS[0][0]]))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ----------------------------------------------------------------------------- scoring

def test_encode_pairs_labels_and_truncation(models):
    tok = models["tiny-llama"].tokenizer
    (enc,) = encode_pairs(tok, [PAIRS[0]], max_length=256)
    p = tok(PAIRS[0][0])["input_ids"]
    t = tok(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == p + t + [tok.eos_token_id]
    assert enc["labels"] == [IGNORE] * len(p) + t + [tok.eos_token_id]
    (short,) = encode_pairs(tok, [PAIRS[0]], max_length=len(t) + 3)
    assert len(short["input_ids"]) == len(t) + 3 and short["input_ids"][-len(t) - 1:] == t + [tok.eos_token_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_logprobs_matches_manual(family, models):
    lm = models[family]
    prompt, target = PAIRS[1]
    p = lm.tokenizer(prompt)["input_ids"]
    t = lm.tokenizer(target, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
    with torch.inference_mode():
        logp = lm.model(torch.tensor([p + t])).logits[0].log_softmax(-1)
    manual = sum(logp[len(p) - 1 + i, tok].item() for i, tok in enumerate(t))
    sums, counts = sequence_logprobs(lm, [prompt], [target])
    assert counts.tolist() == [len(t)]
    assert sums.item() == pytest.approx(manual, abs=1e-4)
    per_tok = token_logprobs(lm, [prompt], [target])[0]
    assert per_tok.shape == (len(t),) and per_tok.sum().item() == pytest.approx(manual, abs=1e-4)
    assert mean_nll(lm, [prompt], [target]).item() == pytest.approx(-manual / len(t), abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_logprobs_batch_invariant(family, models):
    lm = models[family]
    prompts, targets = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    one, n1 = sequence_logprobs(lm, prompts, targets, batch_size=1)
    four, n4 = sequence_logprobs(lm, prompts, targets, batch_size=4)
    assert torch.equal(n1, n4)
    assert torch.allclose(one, four, atol=1e-4)
    assert not one.requires_grad and one.device.type == "cpu"


def test_sequence_logprobs_grad(models):
    lm = models["tiny-llama"]
    sums, _ = sequence_logprobs(lm, [PAIRS[0][0], PAIRS[1][0]], [PAIRS[0][1], PAIRS[1][1]], batch_size=1, grad=True)
    assert sums.requires_grad
    sums.sum().backward()
    grads = [p.grad for p in lm.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    lm.model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- generation

def test_cut_after_answer():
    assert cut_after_answer("a\nb\n#### 12\nQuestion: more") == "a\nb\n#### 12"
    assert cut_after_answer("a\n#### 12") == "a\n#### 12"
    assert cut_after_answer("no marker\nat all") == "no marker\nat all"


def test_answer_line_stop_flags_each_sequence(models):
    tok = models["tiny-llama"].tokenizer
    stop = AnswerLineStop(tok, len(tok), torch.device("cpu"))
    seqs = ["1+1=<<1+1=2>>2\n#### 2\nQ", "1+1=<<1+1=2>>2\n1+", "#### 5 6 7 8 9 1 2 3"]
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in seqs]
    n = max(len(x) for x in ids)
    ids = torch.tensor([[tok.pad_token_id] * (n - len(x)) + x for x in ids])
    done = torch.zeros(3, dtype=torch.bool)
    for k in range(1, n + 1):
        done |= stop(ids[:, :k], None)
    assert done.tolist() == [True, False, False]


def test_sample_paths_shape_determinism_and_cut(models):
    lm = models["tiny-gpt2"]
    prompts = [p for p, _ in PAIRS[:3]]
    cfg = GenerationConfig(temperature=1.0, top_p=1.0, max_new_tokens=24, batch_size=6)
    a = sample_paths(lm, prompts, 3, cfg, seed=1)
    b = sample_paths(lm, prompts, 3, cfg, seed=1)
    c = sample_paths(lm, prompts, 3, cfg, seed=2)
    assert len(a) == 3 and all(len(paths) == 3 and all(isinstance(x, str) for x in paths) for paths in a)
    assert a == b and a != c
    for text in (x for paths in a + c for x in paths):
        assert "\n" not in text[text.find("####"):] if "####" in text else True
    greedy = sample_paths(lm, prompts, 2, GenerationConfig(temperature=0.0, max_new_tokens=24), seed=0)
    assert all(paths[0] == paths[1] for paths in greedy)


def test_greedy_generate_independent_of_batching(models):
    lm = models["tiny-qwen2"]
    prompts = [p for p, _ in PAIRS]
    assert greedy_generate(lm, prompts, 16, batch_size=1) == greedy_generate(lm, prompts, 16, batch_size=8)


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("family", FAMILIES)
def test_train_steps_memorises(family, cache):
    lm = build_model(_cfg(family), CORPUS, seed=0, cache_dir=cache)
    stats = train_steps(lm, PAIRS, 120, TrainConfig(lr=1e-2, batch_size=8), seed=0, progress=False)
    assert stats["steps"] == 120 and stats["tokens"] > stats["target_tokens"] > 0
    assert stats["loss"] < 0.25 * stats["first_loss"]
    assert not lm.model.training
    outputs = greedy_generate(lm, [p for p, _ in PAIRS], 40, batch_size=8)
    assert sum(o == t for o, (_, t) in zip(outputs, PAIRS)) >= 2
    res = evaluate(lm, EXAMPLES, GenerationConfig(max_new_tokens=40, eval_batch_size=4))
    assert res.n == len(EXAMPLES) and res.outputs == outputs
    assert 0.25 <= res.accuracy <= 1 and res.accuracy == sum(res.correct) / res.n
    assert set(res.by_steps) == {1, 2}


def test_train_steps_extra_loss_and_schedule(cache):
    lm = build_model(_cfg("tiny-llama"), CORPUS, seed=0, cache_dir=cache)
    calls = []

    def extra(step):
        calls.append(step)
        return None if step % 2 else torch.zeros((), requires_grad=True)

    stats = train_steps(lm, PAIRS[:2], 4, TrainConfig(batch_size=2), seed=0, extra_loss=extra, progress=False,
                        schedule="constant")
    assert calls == [0, 1, 2, 3] and stats["steps"] == 4
    assert train_steps(lm, PAIRS, 0, TrainConfig(), seed=0)["steps"] == 0
    assert lr_factor(0, 100) < lr_factor(5, 100) == pytest.approx(1.0)
    assert lr_factor(99, 100) == pytest.approx(0.1)
    assert lr_factor(99, 100, "constant") == 1.0


def test_evaluate_untrained_accuracy_in_range(models):
    res = evaluate(models["tiny-llama"], EXAMPLES[:4], GenerationConfig(max_new_tokens=8))
    assert 0.0 <= res.accuracy <= 1.0 and len(res.correct) == len(res.outputs) == 4


def test_index_batches_random_matches_epoch_queue():
    """Without lengths: the shuffled-epoch stream every host relied on (same draws)."""
    from lada.models.training import index_batches

    gen, queue, want = torch.Generator().manual_seed(5), [], []
    for _ in range(7):
        while len(queue) < 4:
            queue += torch.randperm(10, generator=gen).tolist()
        want.append(queue[:4])
        queue = queue[4:]
    it = index_batches(10, 4, 5)
    assert [next(it) for _ in range(7)] == want


def test_index_batches_length_buckets_cut_padding():
    from lada.models.training import BUCKET_POOL_BATCHES, index_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 180, (300,), generator=g).tolist()
    bs, pool = 8, 8 * BUCKET_POOL_BATCHES

    def padding(it):
        batches = [next(it) for _ in range(4 * BUCKET_POOL_BATCHES)]
        return batches, sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    bucketed, pad_b = padding(index_batches(300, bs, 1, lengths))
    _, pad_r = padding(index_batches(300, bs, 1))
    assert all(len(b) == bs for b in bucketed)
    assert pad_b < pad_r / 4
    # every batch comes from one pool of BUCKET_POOL_BATCHES batches of the shuffled stream
    for p in range(0, len(bucketed), BUCKET_POOL_BATCHES):
        flat = [i for b in bucketed[p:p + BUCKET_POOL_BATCHES] for i in b]
        assert len(flat) == pool
    # deterministic by seed
    again, _ = padding(index_batches(300, bs, 1, lengths))
    assert again == bucketed
