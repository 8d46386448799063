"""Models: loading (Hugging Face or tiny-from-config), tokenizers, generation, scoring,
training and warm-up. See docs/models.md.

Names are imported lazily, so ``import lada.models.warmup`` (or the config layer) does
not pay for importing torch and transformers until a model is actually used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoadedModel": "loading", "build_model": "loading", "load_model": "loading", "save_model": "loading",
    "train_tokenizer": "tokenizers", "tokenizer_for": "tokenizers",
    "tiny_model_config": "tiny",
    "sample_paths": "generation", "greedy_generate": "generation", "evaluate": "generation",
    "EvalResult": "generation",
    "sequence_logprobs": "scoring", "token_logprobs": "scoring", "mean_nll": "scoring",
    "encode_pairs": "training", "train_steps": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lada.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lada.models' has no attribute {name!r}")
