"""Tokenizers for the tiny model families, trained locally on the task corpus.

A federation is only heterogeneous if its members really see different token
sequences for the same text, so every tiny family gets its own tokenizer recipe:

=============  =====================  =================================================
family         model                  pre-tokenisation
=============  =====================  =================================================
tiny-llama     byte-level BPE         digits split, then the GPT-2 byte-level regex
                                      (a word keeps its leading space: ``" apples"``)
tiny-qwen2     byte-level BPE         digits split, words, spaces and punctuation each
                                      isolated (``" "`` and ``"apples"`` are separate)
tiny-gpt2      byte-level BPE         digits split, a word keeps its trailing space
                                      (``"apples "``); tokens at most 6 characters
=============  =====================  =================================================

All three split numbers into single digits, so ``128`` is tokenised the same way
wherever it appears (otherwise a model must learn each number twice). All are
byte-level, so any text round-trips exactly: ``decode(encode(x)) == x``.

Special tokens are ``<s>`` (BOS, prepended when ``add_special_tokens=True``),
``</s>`` (EOS, which models learn to emit after the answer line) and ``<pad>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lada.config import TINY_FAMILIES

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3 in every tiny vocabulary

# tiny-qwen2 isolates words, single spaces/newlines, digits and punctuation runs;
# tiny-gpt2 attaches one trailing space to a word or punctuation run.
_SPLITS = {
    "tiny-qwen2": Regex(r"[A-Za-z]+|\d|[^\sA-Za-z\d]+|\s"),
    "tiny-gpt2": Regex(r"[A-Za-z]+ ?|\d|[^\sA-Za-z\d]+ ?|\s"),
}
_MAX_TOKEN_LENGTH = {"tiny-llama": None, "tiny-qwen2": None, "tiny-gpt2": 6}


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    digits = pre_tokenizers.Digits(individual_digits=True)
    if family in _SPLITS:
        split = pre_tokenizers.Split(_SPLITS[family], behavior="isolated")
        return pre_tokenizers.Sequence([digits, split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def train_tokenizer(corpus: list[str], family: str, vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the tokenizer of a tiny ``family`` on ``corpus``.

    The vocabulary may come out smaller than ``vocab_size`` when the corpus has fewer
    pairs worth merging (a pair must occur twice). ``seed`` only shuffles the order
    the corpus is fed in; BPE training is deterministic.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"train_tokenizer: unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")
    if not corpus:
        raise ValueError(f"train_tokenizer: empty corpus for {family!r}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIALS):
        raise ValueError(f"train_tokenizer: vocab_size {vocab_size} is below the byte alphabet "
                         f"({len(alphabet)}) plus {len(SPECIALS)} special tokens")
    texts = list(corpus)
    random.Random(seed).shuffle(texts)

    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False, min_frequency=2, max_token_length=_MAX_TOKEN_LENGTH[family])
    tok.pre_tokenizer = _pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=512,
    )


def corpus_fingerprint(family: str, vocab_size: int, corpus: list[str], seed: int = 0) -> str:
    h = hashlib.sha256(json.dumps([family, vocab_size, seed]).encode())
    for text in corpus:
        h.update(len(text).to_bytes(8, "little"))  # length prefix: no ambiguity between texts
        h.update(text.encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LADA_CACHE") or Path.home() / ".cache" / "lada")


def tokenizer_for(family: str, vocab_size: int, corpus: list[str], cache_dir: str | Path | None = None,
                  seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the tokenizer, or load it from ``cache_dir/tokenizers`` if this exact
    (family, vocab_size, corpus, seed) was trained before."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "tokenizers" / f"{family}-v{vocab_size}-{corpus_fingerprint(family, vocab_size, corpus, seed)}"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = train_tokenizer(corpus, family, vocab_size, seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(path)  # atomic: concurrent nodes never read a half-written tokenizer
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "tokenizer.json").is_file():
            raise
    return tok
