"""Model configs for the tiny families, built from a ``ModelConfig`` and a tokenizer.

The three families differ the way real small LMs do: Llama (RMSNorm, SwiGLU, RoPE),
Qwen2 (as Llama plus qkv biases and grouped-query attention with half as many KV
heads) and GPT-2 (LayerNorm, GELU MLP, learned positions). Dropout is off: the tiny
models are trained for few steps, where dropout only slows learning.
"""

from __future__ import annotations

from transformers import GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase, Qwen2Config

from lada.config import TINY_FAMILIES, ModelConfig

MAX_POSITIONS = 512


def _gated_mlp_width(hidden: int) -> int:
    """~2.7x hidden, rounded to a multiple of 16 (the SwiGLU MLP has three matrices,
    so this matches the parameter count of a 4x two-matrix MLP)."""
    return max(16, int(round(2.7 * hidden / 16)) * 16)


def tiny_model_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config for tiny family ``model_cfg.name``, with the vocabulary
    and special-token ids of ``tokenizer``."""
    h, n_layers, n_heads = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_heads
    if h % n_heads:
        raise ValueError(f"model {model_cfg.name!r}: hidden_size {h} is not divisible by num_heads {n_heads}")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               tie_word_embeddings=True)
    if model_cfg.name == "tiny-llama":
        return LlamaConfig(hidden_size=h, intermediate_size=_gated_mlp_width(h), num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_heads,
                           max_position_embeddings=MAX_POSITIONS, **ids)
    if model_cfg.name == "tiny-qwen2":
        kv_heads = n_heads // 2 if n_heads % 2 == 0 else n_heads
        return Qwen2Config(hidden_size=h, intermediate_size=_gated_mlp_width(h), num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=MAX_POSITIONS, use_sliding_window=False, **ids)
    if model_cfg.name == "tiny-gpt2":
        return GPT2Config(n_embd=h, n_layer=n_layers, n_head=n_heads, n_inner=4 * h, n_positions=MAX_POSITIONS,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    raise ValueError(f"tiny_model_config: unknown tiny family {model_cfg.name!r}; expected one of {TINY_FAMILIES}")
