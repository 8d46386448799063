"""The premise measurements: the noise rule, resumable cells, the compute the treated
and control trainings get, and the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lada.config import RunConfig
from lada.data.answers import chain_share
from lada.data.records import example_target
from lada.experiments import premises as pm
from lada.hosts.common import transfer_steps
from helpers import stop_training_at

ROOT = Path(__file__).resolve().parents[1]


def test_noise_rule():
    assert pm.binomial_se(0.5, 500) == pytest.approx(0.02236, abs=1e-4)
    assert pm.diff_se(0.5, 0.5, 500) == pytest.approx(0.0316, abs=1e-3)
    assert pm.clearly_above([0.08], [0.03])
    assert not pm.clearly_above([0.05], [0.03])  # under 2 se
    assert not pm.clearly_above([0.08, 0.07, -0.01], [0.03, 0.03, 0.03])  # one seed within noise
    assert pm.clearly_above([0.08, 0.09, 0.10], [0.03, 0.03, 0.03])
    assert not pm.clearly_above([], [])
    assert [pm.bucket_of(s) for s in (1, 2, 3, 5, 6, 7)] == ["1-2", "1-2", "3-4", "5-6", "5-6", ""]
    cfg16 = RunConfig()
    cfg16.train.batch_size = 16
    assert transfer_steps(cfg16, 100, 2) == 13 and transfer_steps(cfg16, 0, 2) == 0


def _ctx(tmp_path) -> pm.Context:
    ctx = pm.context(ROOT / "configs/tiny-test.toml", 0, tmp_path, epochs=1.0)
    # the tiny models cannot reason: stand in for the LLM's verified paths with gold
    # rationales of public questions, of every length
    public = ctx.views["server"].public
    ctx._paths["server"] = [{"id": ex.id, "prompt": f"Question: {ex.question}\nAnswer:\n",
                             "text": example_target(ex), "steps": ex.num_steps, "domain": ex.domain}
                            for ex in public]
    return ctx


def test_treated_and_control_get_the_same_steps_and_cells_resume(tmp_path):
    ctx = _ctx(tmp_path)
    treated = pm.run_cell(ctx, "down-client0", lambda: pm.cell_down(ctx, 0, control=False))
    control = pm.run_cell(ctx, "control-client0", lambda: pm.cell_down(ctx, 0, control=True))
    own, paths = len(ctx.views["client0"].train), len(ctx._paths["server"])
    assert treated["train_examples"] == own + paths and control["train_examples"] == own
    assert treated["train_steps"] == control["train_steps"] == transfer_steps(ctx.cfg, own + paths, 1.0)
    assert treated["n"] == len(ctx.views["client0"].test)
    stored = json.loads((tmp_path / "seed0" / "down-client0.json").read_text())
    assert stored["result"] == treated and stored["seconds"] >= 0
    # a restart reuses the stored cell instead of measuring again
    again = pm.run_cell(ctx, "down-client0", lambda: pytest.fail("measured twice"))
    assert again == treated
    # a changed input (another epochs budget) is measured again
    ctx.epochs = 2.0
    calls = []
    pm.run_cell(ctx, "down-client0", lambda: calls.append(1) or {"accuracy": 0.0, "n": 1})
    assert calls == [1]


def test_a_stopped_cell_goes_on_from_its_training_state(tmp_path, monkeypatch):
    """A cell stopped in the middle of its training resumes from the saved state, not from
    scratch, ends as an unbroken one does, counts the stopped attempt's training seconds,
    and leaves no state behind (nor a stale one of other inputs)."""
    import torch

    from lada.models import training

    monkeypatch.setattr(training, "SAVE_EVERY_S", 0.0)  # save before every step
    a = _ctx(tmp_path / "a")
    unbroken = pm.run_cell(a, "central-client0", lambda: pm.cell_central(a, "client0"))
    assert unbroken["train_steps"] >= 4
    b = _ctx(tmp_path / "b")
    cells = tmp_path / "b" / "seed0"
    cells.mkdir(parents=True)
    (cells / "central-client0.0123456789abcdef.7.partial.pt").write_bytes(b"another input's state")
    steps = stop_training_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pm.run_cell(b, "central-client0", lambda: pm.cell_central(b, "client0"))
    states = [p.name for p in cells.glob("*.partial.pt")]
    assert len(states) == 1 and ".0123456789abcdef." not in states[0] and b._cell is None
    # stand in for a long stopped attempt: its saved state counts 1,000 s of training
    state = torch.load(cells / states[0], weights_only=False)
    torch.save({**state, "seconds": 1000.0}, cells / states[0])
    steps.update(calls=0, stop_at=None)
    resumed = pm.run_cell(b, "central-client0", lambda: pm.cell_central(b, "client0"))
    assert steps["calls"] == unbroken["train_steps"] - 2  # from the stopped 3rd step on: 2 steps were saved
    assert resumed == unbroken
    assert not list(cells.glob("*.partial.pt"))
    assert json.loads((cells / "central-client0.json").read_text())["seconds"] >= 1000.0


def test_learnability_buckets_get_equal_tokens(tmp_path):
    ctx = _ctx(tmp_path)
    buckets, budget, tokens = pm._bucket_token_budget(ctx, 1)
    assert set(buckets) == {"1-2", "3-4", "5-6"} and budget == int(min(t for t in tokens.values() if t))
    trained = {}
    for b, paths in buckets.items():
        r = pm.cell_learn(ctx, 1, b)
        if paths:
            trained[b] = r["train_steps"] * ctx.cfg.train.batch_size * r["mean_path_tokens"]
            assert all(lo <= p["steps"] <= hi for p in paths for lo, hi in [map(int, b.split("-"))])
    assert len(trained) >= 2
    for v in trained.values():  # equal token budgets, up to rounding to whole steps
        assert abs(v - budget) <= ctx.cfg.train.batch_size * max(tokens.values())


def test_summary_and_table():
    def cell(acc, dom=None, n=100):
        return {"accuracy": acc, "n": n, **({"domain_accuracy": dom, "domain_n": 75} if dom is not None else {})}
    results = {s: {"base-server": cell(0.4, 0.05), "control-server": cell(0.4, 0.05), "up-server": cell(0.5, 0.3),
                   "central-server": cell(0.6, 0.5), "base-client0": cell(0.3), "control-client0": cell(0.31 + s / 100),
                   "down-client0": cell(0.33), "learn-client0-1-2": cell(0.2), "learn-client0-5-6": cell(0.1)}
               for s in (0, 1)}
    summary = pm.summarise(results, type("C", (), {"clients": [0]})())
    assert summary["server"]["headroom_domain_clear"] and summary["server"]["headroom"] == pytest.approx([0.1, 0.1])
    assert not summary["client0"]["headroom_clear"]  # +2 and +1 points on 100 problems: noise
    table = pm.format_tables(summary, "x.toml", [0, 1], 2)
    assert "| LLM (client domains only) | - | 5.0 ± 0.0 | 5.0 ± 0.0 | 30.0 ± 0.0 | 25.0 ± 0.0" in table
    assert "within noise" in table and "| client0 | 20.0 ± 0.0 | - | 10.0 ± 0.0 |" in table


@pytest.mark.parametrize("epochs", [0.0, -1.0, float("nan")])
def test_bad_epochs_are_refused_before_anything_runs(tmp_path, epochs):
    with pytest.raises(SystemExit, match="--epochs: must be a finite number > 0"):
        pm.main_premises(str(ROOT / "configs/tiny-test.toml"), str(tmp_path / "out"), [0], [], epochs, "base")
    assert not (tmp_path / "out").exists()


def test_mixed_client_test_sets_get_a_row_per_part_and_clients_come_from_the_cells():
    def cell(own, gen, n=100):
        return {"accuracy": (own + gen) / 2, "n": 2 * n,
                "by_domain": {"shop": {"accuracy": own, "n": n}, "general": {"accuracy": gen, "n": n}}}
    results = {s: {"base-client0": cell(0.5, 0.4), "control-client0": cell(0.6, 0.2),
                   "down-client0": cell(0.6, 0.6)} for s in (0, 1)}
    summary = pm.summarise(results, None)  # no context: the clients are read off the cells
    parts = summary["client0"]["parts"]
    assert parts["general"]["headroom"] == pytest.approx([0.4, 0.4]) and parts["general"]["headroom_clear"]
    assert parts["shop"]["headroom"] == pytest.approx([0.0, 0.0]) and not parts["shop"]["headroom_clear"]
    table = pm.format_tables(summary, "x.toml", [0, 1], 2)
    assert "| client0: general part | 100 | 40.0 ± 0.0 | 20.0 ± 0.0 | 60.0 ± 0.0 | 40.0 ± 0.0 (2se" in table
    assert "| client0: shop part | 100 |" in table


def test_slm_mean_row_combines_the_clients_noise():
    results = {s: {f"{kind}-client{k}": {"accuracy": acc, "n": 100}
                   for k in (0, 1) for kind, acc in (("control", 0.3), ("down", 0.3 + 0.05 * (k + 1)))}
               for s in (0, 1)}
    mean = pm.summarise(results, None)["slm-mean"]
    assert mean["headroom"] == pytest.approx([0.075, 0.075])
    se = pm.diff_se(0.35, 0.3, 100), pm.diff_se(0.4, 0.3, 100)
    assert mean["headroom_se"][0] == pytest.approx((se[0] ** 2 + se[1] ** 2) ** 0.5 / 2)
    assert "| SLM mean | 200 |" in pm.format_tables(pm.summarise(results, None), "x.toml", [0, 1], 2)


def test_stored_cells_survive_new_options_at_their_default_but_not_real_changes():
    from lada.config import load_config

    cfg = load_config(ROOT / "configs/tiny-test.toml")
    stored = pm._cell_config(cfg)
    assert pm.config_matches(stored, cfg)
    older = json.loads(json.dumps(stored))
    del older["data"]["client_test_general_share"]  # measured before this option existed
    assert pm.config_matches(older, cfg)
    assert not pm.config_matches(older, load_config(ROOT / "configs/tiny-test.toml",
                                                    ["data.client_test_general_share=0.5"]))
    assert not pm.config_matches(stored, load_config(ROOT / "configs/tiny-test.toml", ["train.lr=0.5"]))
    assert pm.config_matches(stored, load_config(ROOT / "configs/tiny-test.toml", ["server.device=cuda"]))
    older["data"]["gone_option"] = 1  # an option that no longer exists: measured under other rules
    assert not pm.config_matches(older, cfg)


def test_a_cell_missing_on_one_seed_does_not_pair_other_seeds_across():
    # seed 0 lacks client0's treated cell and seed 1 lacks client1's control cell: each
    # headroom is the difference within the seeds that have both, never across seeds
    results = {0: {"control-client0": {"accuracy": 0.1, "n": 100}, "down-client1": {"accuracy": 0.9, "n": 100},
                   "control-client1": {"accuracy": 0.5, "n": 100}},
               1: {"control-client0": {"accuracy": 0.4, "n": 100}, "down-client0": {"accuracy": 0.5, "n": 100},
                   "down-client1": {"accuracy": 0.2, "n": 100}},
               2: {f"{kind}-client{k}": {"accuracy": 0.3 + 0.1 * (kind == "down"), "n": 100}
                   for k in (0, 1) for kind in ("control", "down")}}
    summary = pm.summarise(results, None)
    assert summary["client0"]["headroom"] == pytest.approx([0.1, 0.1])  # seeds 1 and 2
    assert summary["client1"]["headroom"] == pytest.approx([0.4, 0.1])  # seeds 0 and 2
    mean = summary["slm-mean"]
    assert mean["headroom"] == pytest.approx([0.1])  # seed 2 only: the one where every client has both
    assert mean["control"] == pytest.approx([0.3, 0.3]) and mean["treated"] == pytest.approx([0.35, 0.4])


def _yesno(n: int, domain: str = "general"):
    from lada.data.synthetic import generate
    return generate(domain, n, seed=5, task="yesno")


def _wrong_chain(ex) -> str:
    """The gold path with its last note replaced by a right note that ends one off the
    gold value (the parity line and the answer kept)."""
    lines = example_target(ex).splitlines()
    i = max(j for j, line in enumerate(lines) if "<<" in line)
    gold = int(lines[i].rsplit(">>", 1)[1])
    lines[i] = f"{gold}+1=<<{gold}+1={gold + 1}>>{gold + 1}"
    return "\n".join(lines)


def test_chain_right_counts_chains_not_answers():
    from lada.data.answers import is_correct
    from lada.data.synthetic import generate
    exs = _yesno(6)
    outputs = [example_target(ex) for ex in exs[:4]] + [_wrong_chain(ex) for ex in exs[4:]]
    assert all(is_correct(o, ex.answer, ex.answer_type) for o, ex in zip(outputs, exs))  # every answer right...
    assert chain_share(outputs, exs) == pytest.approx(4 / 6)  # ...but two chains wrong
    arith = generate("general", 3, seed=5)
    assert chain_share([example_target(ex) for ex in arith], arith) is None  # not a linked task


def test_eval_reports_chains_per_part_on_a_linked_task(monkeypatch):
    from lada.models import generation
    general, farm = _yesno(4), _yesno(4, "farm")
    examples = general + farm
    outputs = [example_target(ex) for ex in general] + [_wrong_chain(ex) for ex in farm[:3]] + [example_target(farm[3])]
    monkeypatch.setattr(generation, "evaluate", lambda lm, exs, cfg, progress=None: generation.EvalResult(
        1.0, len(exs), [True] * len(exs), outputs, {}, chain_share(outputs, exs)))
    ctx = type("C", (), {"test_set": lambda self, who: examples, "cfg": RunConfig()})()
    out = pm._eval(ctx, None, "server")
    assert out["chain_right"] == pytest.approx(5 / 8) and out["domain_chain_right"] == pytest.approx(1 / 4)
    assert out["by_domain"]["general"] == {"accuracy": 1.0, "n": 4, "chain_right": 1.0}
    assert out["domain_accuracy"] == 1.0 and out["domain_n"] == 4


def test_chain_table_only_on_linked_tasks():
    def cell(acc, chain=None, dom=None):
        c = {"accuracy": acc, "n": 100, **({"domain_accuracy": dom, "domain_n": 75} if dom is not None else {})}
        if chain is not None:
            c["chain_right"] = chain
            if dom is not None:
                c["domain_chain_right"] = chain / 2
        return c
    linked = {0: {"base-server": cell(0.4, 0.2, 0.1), "control-server": cell(0.4, 0.2, 0.1),
                  "up-server": cell(0.5, 0.6, 0.5), "base-client0": cell(0.6, 0.3),
                  "control-client0": cell(0.6, 0.2), "down-client0": cell(0.62, 0.5)}}
    ctx = type("C", (), {"clients": [0]})()
    summary, chains = pm.summarise(linked, ctx), pm.summarise(linked, ctx, "chain_right")
    assert chains["client0"]["headroom"] == pytest.approx([0.3]) and chains["client0"]["headroom_clear"]
    assert not summary["client0"]["headroom_clear"]  # +2 points of accuracy: noise
    assert chains["server"]["headroom_domain"] == pytest.approx([0.2])
    table = pm.format_tables(summary, "x.toml", [0], 2, chains)
    assert "Chains right" in table and "| client0 | 100 | 30.0 | 20.0 | 50.0 | 30.0 (2se 12.8; clear) | - |" in table
    plain = {0: {k: {kk: vv for kk, vv in v.items() if "chain" not in kk} for k, v in linked[0].items()}}
    assert "Chains right" not in pm.format_tables(pm.summarise(plain, ctx), "x.toml", [0], 2,
                                                  pm.summarise(plain, ctx, "chain_right"))
