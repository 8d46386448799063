"""Warm-up checkpoints: cached by fingerprint, trained once, shipped ones found first."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lada.config import ModelConfig, TrainConfig
from lada.data.synthetic import generate
from lada.models import warmup as wu
from lada.models.warmup import find_shipped_checkpoint, read_meta, warmup_checkpoint, warmup_fingerprint
from helpers import stop_training_at

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


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def test_a_stopped_warmup_goes_on_from_its_saved_state_and_ends_as_an_unbroken_one(tmp_path, monkeypatch):
    """Two stages; the first attempt is stopped (Ctrl-C) at step 3 of stage 2. The second
    attempt resumes there, not from scratch, and its checkpoint equals an unbroken warm-up's
    bit for bit; the partial state is gone afterwards."""
    from lada.models import training

    monkeypatch.setattr(training, "SAVE_EVERY_S", 0.0)  # save before every step
    stages = [(generate("general", 12, seed=0, max_steps=2), 4), (generate("shop", 10, seed=1, max_steps=2), 6)]
    cfg = _cfg(name="tiny-gpt2")
    unbroken = warmup_checkpoint(cfg, [], CORPUS, 0, tmp_path / "a", train_cfg=TRAIN, progress=False,
                                 stages=stages, use_shipped=False)
    steps = stop_training_at(monkeypatch, 4 + 3)  # stage 1's 4 steps, then stage 2's 3rd
    with pytest.raises(KeyboardInterrupt):
        warmup_checkpoint(cfg, [], CORPUS, 0, tmp_path / "b", train_cfg=TRAIN, progress=False, stages=stages,
                          use_shipped=False)
    partial = tmp_path / "b" / "warmup" / f"{unbroken.name}.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["stage0.pt", "stage1.pt"]
    steps.update(calls=0, stop_at=None)
    resumed = warmup_checkpoint(cfg, [], CORPUS, 0, tmp_path / "b", train_cfg=TRAIN, progress=False,
                                stages=stages, use_shipped=False)
    assert steps["calls"] == 6 - 2  # stage 2's steps 3-6 only: stage 1 and two steps of stage 2 were saved
    assert resumed.name == unbroken.name and not partial.exists()
    a, b = _weights(unbroken), _weights(resumed)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    meta_a, meta_b = read_meta(unbroken), read_meta(resumed)
    assert [s["steps"] for s in meta_b["stages"]] == [4, 6]
    assert meta_b["final_loss"] == meta_a["final_loss"]
    # the seconds count the stopped attempt's training too
    assert meta_b["seconds"] >= sum(s["seconds"] for s in meta_b["stages"]) - 0.2


def test_a_saved_state_of_another_call_is_not_resumed(tmp_path, monkeypatch, caplog):
    from lada.models import training
    from lada.models.loading import build_model

    monkeypatch.setattr(training, "SAVE_EVERY_S", 0.0)
    pairs = [(f"Question: {i}+1?\nAnswer:\n", f"#### {i + 1}") for i in range(8)]
    state = tmp_path / "state.pt"
    lm = build_model(_cfg(), CORPUS, 0, tmp_path)
    training.train_steps(lm, pairs, 3, TRAIN, 0, resume_file=state, progress=False)
    lm2 = build_model(_cfg(), CORPUS, 0, tmp_path)
    with caplog.at_level("WARNING", logger="lada.training"):
        stats = training.train_steps(lm2, pairs, 5, TRAIN, 0, resume_file=state, progress=False)  # 5 steps, not 3
    assert stats["steps"] == 5 and "holds the state of another training call" in caplog.text


def test_warmup_cli_takes_the_run_seed_and_overrides(tmp_path, capsys):
    """`lada warmup CONFIG --seed N` trains the warm-ups `lada run --seed N` looks up: with
    [data] seed unset, N also draws the split (client k's model seed is data seed + 1 + k)."""
    from pathlib import Path

    from lada.cli import main

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs/tiny-test.toml").read_text().replace("seed = 0  # pinned", "# unpinned", 1)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main(["warmup", str(cfg), "--seed", "4", "--only", "client1", "--set", "clients.1.warmup_steps=3",
                 "--set", f"cache_dir={str(tmp_path / 'cache')!r}"]) == 0
    out = capsys.readouterr()
    assert "client1" in out.out and "server" not in out.out.split("|---")[-1]
    meta = read_meta(next((tmp_path / "cache" / "warmup").iterdir()))
    assert meta["inputs"]["seed"] == 4 + 1 + 1 and meta["steps"] == 3


def test_a_training_without_a_bar_logs_its_progress_and_an_explicitly_silent_one_does_not(tmp_path, monkeypatch,
                                                                                          caplog):
    from lada.models import training
    from lada.models.loading import build_model

    monkeypatch.setattr(training, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(training.sys.stderr, "isatty", lambda: False, raising=False)
    pairs = [(f"Question: {i}+1?\nAnswer:\n", f"#### {i + 1}") for i in range(8)]
    lm = build_model(_cfg(), CORPUS, 0, tmp_path)
    with caplog.at_level("INFO", logger="lada.training"):
        training.train_steps(lm, pairs, 3, TRAIN, 0, desc="warm-up x")  # progress=None: no terminal, so lines
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up x: step")]
    assert [ln.split(",")[0] for ln in lines] == ["warm-up x: step 1/3", "warm-up x: step 2/3", "warm-up x: step 3/3"]
    assert "s left" in lines[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="lada.training"):
        training.train_steps(lm, pairs, 3, TRAIN, 0, desc="warm-up x", progress=False)
    assert not [r for r in caplog.records if "step" in r.getMessage()]
