"""Fault handling: non-finite numbers never pass as results, config floats are finite,
metrics stay strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lada.config import ConfigError, ModelConfig, TrainConfig, load_config
from lada.data.records import format_prompt, format_target
from lada.models.loading import build_model, save_model
from lada.models.training import NonFiniteError, pop_nonfinite_steps, train_steps
from lada.protocol.driver import strict_json_row
from helpers import arithmetic_examples

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-test.toml"
EXAMPLES = arithmetic_examples(8)
PAIRS = [(format_prompt(ex.question), format_target(ex.rationale, ex.answer)) for ex in EXAMPLES]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    cfg = ModelConfig(name="tiny-llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=300)
    corpus = [t for p in PAIRS for t in p] * 4
    return build_model(cfg, corpus, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nonfinite_loss_steps_are_skipped_and_counted(lm):
    pop_nonfinite_steps()
    before = [p.detach().clone() for p in lm.model.parameters()]
    nan_on = {1, 3}

    def extra(step):
        return torch.tensor(float("nan")) if step in nan_on else None

    out = train_steps(lm, PAIRS, 5, TrainConfig(lr=1e-3, batch_size=4), seed=0, extra_loss=extra, progress=False)
    assert out["skipped"] == 2 and out["steps"] == 3
    assert math.isfinite(out["loss"]) and _finite(lm.model)
    assert any(not torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))  # finite steps did train
    assert pop_nonfinite_steps() == 2 and pop_nonfinite_steps() == 0


def test_nonfinite_gradient_is_skipped(lm):
    weight = next(p for p in lm.model.parameters() if p.requires_grad)

    def extra(step):  # a finite loss (0) whose gradient is not: d sqrt(u)/du at u = 0
        return (weight * 0).sum().sqrt() if step == 0 else None

    out = train_steps(lm, PAIRS, 3, TrainConfig(lr=1e-3, batch_size=4), seed=0, extra_loss=extra, progress=False)
    assert out["skipped"] == 1 and out["steps"] == 2 and _finite(lm.model)
    pop_nonfinite_steps()


def test_diverging_training_fails_instead_of_returning_garbage(lm):
    saved = [p.detach().clone() for p in lm.model.parameters()]
    try:
        with pytest.raises(NonFiniteError, match=r"diverged: [2-4] of 4 step"):
            train_steps(lm, PAIRS, 4, TrainConfig(lr=1e4, batch_size=4, grad_clip=0.0), seed=0, progress=False)
    finally:
        with torch.no_grad():
            for p, s in zip(lm.model.parameters(), saved):
                p.copy_(s)
    pop_nonfinite_steps()


def test_nonfinite_weights_fail_the_call_and_are_never_saved(lm, tmp_path):
    weight = next(p for p in lm.model.parameters() if p.requires_grad)
    saved = weight.detach().clone()

    def poison(step):  # stands in for an optimizer that overflowed
        with torch.no_grad():
            weight[0, 0] = float("nan")
        return None

    try:
        with pytest.raises(NonFiniteError, match=r"(?s)my-phase: the weights became non-finite.*Lower train.lr"):
            train_steps(lm, [], 2, TrainConfig(lr=1e-3, batch_size=4), seed=0, extra_loss=poison,
                        desc="my-phase", progress=False)
        with pytest.raises(NonFiniteError, match="refusing to save"):
            save_model(lm, tmp_path / "m")
        assert not (tmp_path / "m").exists()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    pop_nonfinite_steps()


@pytest.mark.parametrize("override, field", [("train.lr=nan", r"train\.lr"), ("generation.temperature=inf", "temperature"),
                                             ("train.grad_clip=-inf", "grad_clip"),
                                             ("clients.1.warmup_lr=nan", "warmup_lr"),
                                             ("engine.reply_timeout_s=inf", "reply_timeout_s")])
def test_config_floats_must_be_finite(override, field):
    with pytest.raises(ConfigError, match=f"{field}.*finite") as e:
        load_config(TINY, [override])
    assert "tiny-test.toml" in str(e.value)


def test_metrics_rows_are_strict_json():
    row = strict_json_row({"round": 1, "accuracy": 0.5, "train_loss": float("nan"), "x": float("inf"), "n": 3})
    text = json.dumps(row, allow_nan=False)
    assert json.loads(text) == {"round": 1, "accuracy": 0.5, "train_loss": None, "x": None, "n": 3}


# ----------------------------------------------------------------------------- whole runs

def _has_nonfinite_checkpoint(root: Path) -> list[str]:
    from safetensors.torch import load_file

    bad = []
    for f in root.rglob("*.safetensors"):
        if any(not bool(torch.isfinite(t).all()) for t in load_file(str(f)).values()):
            bad.append(str(f))
    return bad


@pytest.mark.e2e
def test_diverging_run_fails_loudly_and_saves_no_nan(tmp_path, monkeypatch):
    """lr = 1e3 used to finish "successfully" with every client's weights NaN."""
    from lada.cli import main

    run_dir = tmp_path / "run"
    code = main(["run", str(TINY), "--engine", "inline", "--run-dir", str(run_dir), "--set", "rounds=1",
                 "--set", "train.lr=1e3"])
    assert code != 0
    assert not (run_dir / "DONE").exists()
    assert _has_nonfinite_checkpoint(run_dir) == []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in metrics.jsonl"))
