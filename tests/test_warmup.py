"""Warm-up checkpoints: cached by fingerprint, trained once, shipped ones found first."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lada.config import ModelConfig, TrainConfig
from lada.data.synthetic import generate
from lada.models import warmup as wu
from lada.models.warmup import find_shipped_checkpoint, read_meta, warmup_checkpoint, warmup_fingerprint

CORPUS = [f"Question: {ex.question}\nAnswer:\n{ex.rationale}\n#### {ex.answer}" for ex in generate("general", 60, 5)]
TRAIN = TrainConfig(max_length=128)


def _cfg(**kw) -> ModelConfig:
    base = dict(name="tiny-llama", hidden_size=32, num_layers=2, num_heads=2, vocab_size=300,
                warmup_steps=5, warmup_batch_size=4)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def counted(monkeypatch):
    """Count real training runs."""
    calls = []
    real = wu._train

    def spy(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(wu, "_train", spy)
    return calls


def test_warmup_trains_once_then_returns_the_cached_path(tmp_path, counted):
    examples = generate("general", 12, seed=0, max_steps=2)
    cfg = _cfg()
    path = warmup_checkpoint(cfg, examples, CORPUS, 0, tmp_path, train_cfg=TRAIN, progress=False, use_shipped=False)
    meta = read_meta(path)
    assert counted == ["tiny-llama"]
    assert meta["steps"] == 5 and meta["fingerprint"] == path.name and meta["final_loss"] > 0
    assert meta["inputs"]["seed"] == 0 and meta["inputs"]["stages"] == [{"examples": 12, "steps": 5}]
    assert path.parent == tmp_path / "warmup"
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # temp dir was renamed away
    mtime = (path / "meta.json").stat().st_mtime_ns
    again = warmup_checkpoint(cfg, examples, CORPUS, 0, tmp_path, train_cfg=TRAIN, progress=False, use_shipped=False)
    assert again == path and counted == ["tiny-llama"]
    assert (path / "meta.json").stat().st_mtime_ns == mtime
    from lada.models.loading import load_model
    lm = load_model(cfg, path)
    assert lm.num_parameters() == meta["params"]


def test_fingerprint_changes_with_what_shapes_the_warmup():
    ex = generate("general", 6, seed=0)
    stages = [(ex, 5)]
    fp = warmup_fingerprint(_cfg(), stages, CORPUS, 0)
    assert fp == warmup_fingerprint(_cfg(), [(list(ex), 5)], list(CORPUS), 0)
    assert fp == warmup_fingerprint(_cfg(device="cuda", lora_r=4), stages, CORPUS, 0)  # not shaping warm-up
    changed = [
        warmup_fingerprint(_cfg(hidden_size=48), stages, CORPUS, 0),
        warmup_fingerprint(_cfg(vocab_size=320), stages, CORPUS, 0),
        warmup_fingerprint(_cfg(warmup_lr=1e-3), stages, CORPUS, 0),
        warmup_fingerprint(_cfg(), [(ex[:5], 5)], CORPUS, 0),
        warmup_fingerprint(_cfg(), [(ex, 6)], CORPUS, 0),
        warmup_fingerprint(_cfg(), stages, CORPUS + ["more text"], 0),
        warmup_fingerprint(_cfg(), stages, CORPUS, 1),
        warmup_fingerprint(_cfg(), stages, CORPUS, 0, TrainConfig(max_length=64)),
    ]
    assert fp not in changed and len(set(changed)) == len(changed)


def test_explicit_checkpoint_and_shipped_checkpoint_win(tmp_path, monkeypatch, counted):
    ex = generate("general", 6, seed=0)
    own = tmp_path / "mine"
    own.mkdir()
    assert warmup_checkpoint(_cfg(checkpoint=str(own)), ex, CORPUS, 0, tmp_path) == own
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        warmup_checkpoint(_cfg(checkpoint=str(tmp_path / "missing")), ex, CORPUS, 0, tmp_path)
    shipped_root = tmp_path / "shipped"
    fp = warmup_fingerprint(_cfg(), [(ex, 5)], CORPUS, 0, TRAIN)
    (shipped_root / fp).mkdir(parents=True)
    (shipped_root / fp / "meta.json").write_text(json.dumps({"fingerprint": fp}))
    monkeypatch.setattr(wu, "REPO_CHECKPOINTS", shipped_root)
    assert find_shipped_checkpoint(fp) == shipped_root / fp
    assert find_shipped_checkpoint("nope") is None
    assert warmup_checkpoint(_cfg(), ex, CORPUS, 0, tmp_path / "cache", train_cfg=TRAIN) == shipped_root / fp
    assert counted == []


def test_stages_and_examples_are_exclusive(tmp_path):
    ex = generate("general", 4, seed=0)
    with pytest.raises(ValueError, match="either examples"):
        warmup_checkpoint(_cfg(), ex, CORPUS, 0, tmp_path, stages=[(ex, 2)])
    with pytest.raises(ValueError, match="no examples"):
        warmup_checkpoint(_cfg(), [], CORPUS, 0, tmp_path, use_shipped=False)


def test_ship_checkpoint_writes_float16_copy_that_loads(tmp_path):
    import torch

    from lada.models.loading import load_model

    cfg = _cfg(warmup_steps=2)
    path = warmup_checkpoint(cfg, generate("general", 8, seed=0), CORPUS, 0, tmp_path, train_cfg=TRAIN,
                             progress=False, use_shipped=False)
    shipped = wu.ship_checkpoint(cfg, path, root=tmp_path / "ship")
    assert shipped == tmp_path / "ship" / path.name
    assert read_meta(shipped)["shipped_dtype"] == "float16"
    assert (shipped / "model.safetensors").stat().st_size < (path / "model.safetensors").stat().st_size
    a, b = load_model(cfg, path), load_model(cfg, shipped)
    wa, wb = a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight
    assert wb.dtype == torch.float32 and torch.allclose(wa, wb, atol=1e-2)


def test_the_shared_slm_base_warms_up_on_all_of_the_servers_general_data_and_nothing_private():
    """FedCoLLM's broadcast base: the server's whole general training set (not only the
    short problems every client gets), with the clients' model config."""
    from pathlib import Path

    from lada.config import load_config
    from lada.data.split import client_general, participant_data

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-test.toml")
    server = participant_data(cfg, "server")
    [(examples, steps)] = wu.participant_stages(cfg, server, "shared-slm")
    assert [ex.id for ex in examples] == [ex.id for ex in server.train] and steps == cfg.clients[0].warmup_steps
    assert len(examples) > len(client_general(server.train))  # longer problems too
    private = {ex.id for k in range(len(cfg.clients)) for ex in participant_data(cfg, f"client{k}").train}
    assert private and not private & {ex.id for ex in examples}
