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


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _accuracies(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["round"], r["participant"]): r["accuracy"] for r in _rows(run_dir)}


def _state(ws: Path) -> dict:
    return json.loads((ws / "state.json").read_text())


def test_node_workspace_is_keyed_by_run_id_not_name(tmp_path):
    from lada.protocol.driver import client_workspace

    node = {"partition-id": 1, "workspace": str(tmp_path)}
    a = client_workspace(1, node, {"run-name": "same", "run-id": "same-1"})
    b = client_workspace(1, node, {"run-name": "same", "run-id": "same-2"})
    assert a != b and a == tmp_path / "same-1" / "client-1"
    with pytest.raises(KeyError, match="run-id"):
        client_workspace(1, node, {"run-name": "same"})


@pytest.mark.e2e
def test_same_name_runs_on_node_workspaces_start_from_the_same_state(tmp_path, monkeypatch):
    """Clients with a node workspace (as SuperNodes on other machines have) used to key
    their state by run name: a rerun started from the previous run's final models."""
    from lada.engines.launch import InlineTransport
    from lada.experiments.runner import prepare_run_dir
    from lada.protocol.driver import serve

    ws = tmp_path / "node-ws"
    ids = []
    for i in range(2):
        cfg = load_config(TINY, [f'run_dir="{tmp_path / f"run{i}"}"', "rounds=1"])  # same name both times
        prepare_run_dir(cfg)
        run_id = f"tiny-test-{i}"
        ids.append(run_id)
        transport = InlineTransport(3, {"run-dir": cfg.run_dir, "run-id": run_id}, workspace=ws)
        serve(cfg, transport, progress=lambda s: None, run_id=run_id)
    assert _accuracies(tmp_path / "run0") == _accuracies(tmp_path / "run1")
    for run_id in ids:
        for k in range(3):
            assert _state(ws / run_id / f"client-{k}")["model_version"] == 1  # one round each, not two


@pytest.mark.e2e
def test_evaluation_rides_on_each_client_s_last_message_and_gives_the_same_numbers(tmp_path):
    """Each message starts a process on a SuperNode, so a client evaluates at the end of
    its last message of a round (round 0: 'setup') instead of in a message of its own. A
    client that leaves the evaluation out (here: never told to add it) is asked with a
    separate 'evaluate' message, and the numbers are the same either way."""
    from lada.engines.launch import InlineTransport
    from lada.experiments.runner import prepare_run_dir
    from lada.protocol.driver import EVALUATE_FLAG, serve

    class Counting(InlineTransport):
        def __init__(self, *args, strip_flag: bool, **kwargs):
            super().__init__(*args, **kwargs)
            self.strip_flag, self.sent = strip_flag, []

        def exchange(self, phase, rnd, payloads):
            if self.strip_flag:
                payloads = {k: {key: v for key, v in p.items() if key != EVALUATE_FLAG} for k, p in payloads.items()}
            self.sent += [(rnd, phase.name) for k in payloads if k == 0]
            return super().exchange(phase, rnd, payloads)

    runs = {}
    for strip in (False, True):
        run_dir = tmp_path / f"strip-{strip}"
        cfg = load_config(TINY, [f'run_dir="{run_dir}"', "rounds=2"])
        prepare_run_dir(cfg)
        transport = Counting(3, {"run-dir": cfg.run_dir, "run-id": "r"}, strip_flag=strip)
        serve(cfg, transport, progress=lambda s: None, run_id="r")
        runs[strip] = (transport.sent, _rows(run_dir))
    (merged, rows), (separate, rows_separate) = runs[False], runs[True]
    assert merged == [(0, "setup"), (1, "distill"), (2, "distill")]
    assert separate == [(0, "setup"), (0, "evaluate"), (1, "distill"), (1, "evaluate"), (2, "distill"), (2, "evaluate")]

    def untimed(rs):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]

    assert len(rows) == 3 * 4 and untimed(rows) == untimed(rows_separate)
    assert all(r["accuracy"] is not None and r["seconds"] >= 0 for r in rows)


def _interrupt_client(monkeypatch, k: int, rnd: int, exc: BaseException) -> None:
    """Make client ``k`` raise ``exc`` in the CoT distill phase of round ``rnd``."""
    from lada.hosts.cot import CoTHost

    real = CoTHost.client_handle

    def client_handle(self, phase, r, payload, client):
        if client.index == k and r == rnd:
            raise exc
        return real(self, phase, r, payload, client)

    monkeypatch.setattr(CoTHost, "client_handle", client_handle)


@pytest.mark.e2e
def test_resume_after_an_interrupt_equals_an_unbroken_run(tmp_path, monkeypatch, capsys):
    from lada.cli import main

    args = ["--engine", "inline", "--set", "rounds=2"]
    assert main(["run", str(TINY), "--run-dir", str(tmp_path / "whole"), *args]) == 0
    with monkeypatch.context() as m:
        # Ctrl-C in round 2, after client-0 already trained and saved its round-2 model
        _interrupt_client(m, 1, 2, KeyboardInterrupt())
        assert main(["run", str(TINY), "--run-dir", str(tmp_path / "cut"), *args]) == 130
    cut = tmp_path / "cut"
    state = json.loads((cut / "run.json").read_text())
    assert state["status"] == "interrupted" and state["committed_round"] == 1
    assert not (cut / "DONE").exists()
    assert main(["report", str(cut)]) == 0
    assert "INCOMPLETE RUN" in capsys.readouterr().out and "Incomplete run" in (cut / "summary.md").read_text()
    assert main(["run", "--resume", str(cut)]) == 0
    assert (cut / "DONE").exists() and json.loads((cut / "run.json").read_text())["status"] == "done"
    assert _accuracies(cut) == _accuracies(tmp_path / "whole")
    for k in range(3):
        assert (_state(cut / "nodes" / f"client-{k}")["model_version"]
                == _state(tmp_path / "whole" / "nodes" / f"client-{k}")["model_version"] == 2)
    assert main(["run", "--resume", str(cut)]) == 1  # complete: nothing to resume


@pytest.mark.e2e
def test_round_goes_on_without_a_failed_client_which_rejoins_later(tmp_path, monkeypatch):
    from lada.engines.launch import run_engine

    _interrupt_client(monkeypatch, 1, 1, RuntimeError("client-1 lost its disk"))
    cfg = load_config(TINY, [f'run_dir="{tmp_path / "run"}"', "rounds=2", "engine.min_clients=2"])
    run_engine(cfg, "inline", tmp_path / "run" / "run.log")
    rows = {(r["round"], r["participant"]): r for r in _rows(tmp_path / "run")}
    missing = rows[(1, "client-1")]
    assert missing["status"] == "missing" and missing["accuracy"] is None and "lost its disk" in missing["reason"]
    for (rnd, _), r in rows.items():  # every row says who took part and who failed
        assert r["participants"] == (["client-0", "client-2"] if rnd == 1 else ["client-0", "client-1", "client-2"])
        assert list(r["failures"]) == (["client-1"] if rnd == 1 else [])
    assert rows[(2, "client-1")]["accuracy"] is not None  # back in round 2 ...
    states = [_state(tmp_path / "run" / "nodes" / f"client-{k}")["model_version"] for k in range(3)]
    assert states == [2, 1, 2]  # ... from its round-0 state: round 1 never committed for it


@pytest.mark.e2e
def test_below_min_clients_the_run_stops_with_a_clear_message(tmp_path, monkeypatch):
    from lada.engines.launch import run_engine
    from lada.protocol.driver import FederationError

    _interrupt_client(monkeypatch, 1, 1, RuntimeError("client-1 lost its disk"))
    cfg = load_config(TINY, [f'run_dir="{tmp_path / "run"}"', "rounds=1"])  # min_clients 0: all
    with pytest.raises(FederationError, match=r"(?s)only 2 of 3 clients left.*min_clients = 3.*client-1:.*lost its disk"):
        run_engine(cfg, "inline", tmp_path / "run" / "run.log")


def test_min_clients_is_validated():
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(TINY, ["engine.min_clients=4"])
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(TINY, ["engine.min_clients=-1"])
