"""Build, save and load a participant's model (tiny family or any Hugging Face causal LM).

``build_model`` starts a model: a tiny family gets a tokenizer trained on the task
corpus and random weights from ``torch.manual_seed(seed)``; any other name is passed to
``from_pretrained`` (hub name or local directory; the hub cache is used offline when
``HF_HUB_OFFLINE=1``). ``save_model`` / ``load_model`` write and read one directory
holding the tokenizer, the base weights and, with LoRA, the adapter.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

from lada.config import ModelConfig
from lada.models.tiny import tiny_model_config
from lada.models.tokenizers import tokenizer_for
from lada.timing import timed_fn

META_FILE = "lada_model.json"
ADAPTER_DIR = "adapter"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LoRA targets: the attention and MLP projections of each architecture.
_LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class LoadedModel:
    """A model with its tokenizer and the config it was built from."""

    model: PreTrainedModel  # a peft.PeftModel when config.lora_r > 0
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda if available, else cpu)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"model device {device!r} was requested but CUDA is not available; "
                               "use device = 'cpu' or 'auto'")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"model device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if device != "cpu":
        raise ValueError(f"model device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return torch.device("cpu")


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"model dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' per-file progress bars (one per save/load per round is noise)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _ensure_pad(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Many pretrained LMs ship without a pad token; padding is always masked, so EOS serves."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _add_lora(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    targets = _LORA_TARGETS.get(model_type, "all-linear")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=model_type == "gpt2")
    return get_peft_model(model, lora)


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> LoadedModel:
    _ensure_pad(tokenizer, model)
    model.to(device=resolve_device(cfg.device), dtype=resolve_dtype(cfg.dtype))
    model.eval()
    return LoadedModel(model, tokenizer, cfg)


def build_model(model_cfg: ModelConfig, corpus: list[str] | None, seed: int,
                cache_dir: str | Path | None = None) -> LoadedModel:
    """A fresh model for ``model_cfg``: tiny families are trained-tokenizer + random
    init (needs ``corpus``); other names load pretrained weights. LoRA adapters are
    added when ``model_cfg.lora_r > 0``."""
    if model_cfg.is_tiny:
        if not corpus:
            raise ValueError(f"build_model: tiny model {model_cfg.name!r} needs a tokenizer corpus, got none")
        tokenizer = tokenizer_for(model_cfg.name, model_cfg.vocab_size, corpus, cache_dir)
        config = tiny_model_config(model_cfg, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.name)
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(model_cfg.name, dtype=resolve_dtype(model_cfg.dtype))
    if model_cfg.lora_r > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = _add_lora(model, model_cfg)
    return _finish(model, tokenizer, model_cfg)


def _clean_base_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights without LoRA layers, under their original names."""
    base = peft_model.get_base_model()
    out = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


@timed_fn("serialisation")
def save_model(lm: LoadedModel, path: str | Path) -> Path:
    """Write tokenizer, model and (with LoRA) the adapter to directory ``path``.

    With LoRA on a pretrained (non-tiny) model only the adapter is written; the base
    weights are read again from ``config.name`` on load. Tiny bases are saved, since
    their random init exists nowhere else.
    """
    from lada.models.training import NonFiniteError, nonfinite_parameters

    bad = nonfinite_parameters(lm.model)
    if bad:  # a NaN checkpoint would poison every later round and evaluation silently
        raise NonFiniteError(f"refusing to save {lm.config.name!r} to {path}: non-finite weights in "
                             f"{len(bad)} tensor(s), e.g. {bad[0]}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm.tokenizer.save_pretrained(str(path))
    save_base = lm.config.is_tiny or not lm.is_lora
    with _quiet_progress():
        if lm.is_lora:
            if save_base:
                base = lm.model.get_base_model()
                base.save_pretrained(str(path), state_dict=_clean_base_state(lm.model))
            lm.model.save_pretrained(str(path / ADAPTER_DIR))
        else:
            lm.model.save_pretrained(str(path))
    meta = {"name": lm.config.name, "tiny": lm.config.is_tiny, "lora": lm.is_lora, "base_in_dir": save_base}
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


@timed_fn("serialisation")
def load_model(model_cfg: ModelConfig, path: str | Path, seed: int = 0) -> LoadedModel:
    """Read a directory written by ``save_model``. dtype and device come from
    ``model_cfg``; a saved adapter is loaded trainable. A directory without an adapter
    gets fresh LoRA adapters (initialised from ``seed``) if ``model_cfg.lora_r > 0``."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not a saved lada model directory (missing {META_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("tiny", False):
        # Read tokenizer.json verbatim: AutoTokenizer would pick a family class (e.g.
        # Qwen2Tokenizer) from config.json that may rebuild the pre-tokenizer.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    base_src = str(path) if meta.get("base_in_dir", True) else meta["name"]
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(base_src, dtype=resolve_dtype(model_cfg.dtype))
        if meta.get("lora"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path / ADAPTER_DIR), is_trainable=True)
    if not meta.get("lora") and model_cfg.lora_r > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = _add_lora(model, model_cfg)
    return _finish(model, tokenizer, model_cfg)
