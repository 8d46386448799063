"""The LaDa plug-in's hooks on a tiny model, without a host: contexts, the select ->
train -> reward loop, the contrastive extra loss, the upward phase's server side, config."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lada.config import ConfigError, GenerationConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from lada.data.records import Example, example_prompt, example_target  # noqa: E402
from lada.hosts import options_for  # noqa: E402
from lada.models.loading import build_model  # noqa: E402
from lada.models.scoring import mean_nll  # noqa: E402
from lada.models.training import train_steps  # noqa: E402
from lada.plugin.filter import FilterConfig  # noqa: E402
from lada.plugin.lada import (UP_PHASE, LadaConfig, LadaPlugin, _domain_shares, _pick_negative,  # noqa: E402
                              build_contexts, learning_reward, receiver_features)
from helpers import arithmetic_examples  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _examples(n: int, seed: int = 0) -> list[Example]:
    return arithmetic_examples(n, seed, prefix="q")


EXAMPLES = _examples(12)
CORPUS = [t for ex in EXAMPLES for t in (example_prompt(ex), example_target(ex))] * 3


class FakeNode:
    """What the hooks use of a node: workspace, seed, public, log_metric (and, for the
    upward phase, model/save_model)."""

    def __init__(self, workspace: Path, lm=None, seed: int = 0) -> None:
        self.workspace = workspace
        self.seed = seed
        self.public = EXAMPLES
        self.metrics: dict[str, float] = {}
        self.lm = lm
        self.saved = 0

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def model(self):
        return self.lm

    def save_model(self, lm) -> None:
        self.saved += 1


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    cfg = ModelConfig(name="tiny-llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=300)
    return build_model(cfg, CORPUS, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def run_cfg(**plugin) -> RunConfig:
    return RunConfig(host={"name": "cot"}, plugin={"name": "lada", **plugin},
                     clients=[ModelConfig(name="tiny-llama")],
                     train=TrainConfig(lr=3e-3, batch_size=4, max_length=96, server_steps=3),
                     generation=GenerationConfig(paths_per_question=2, max_new_tokens=12, batch_size=16))


def items_for(examples: list[Example], correct: bool = True) -> list[dict]:
    return [{"example_id": ex.id, "prompt": example_prompt(ex), "text": example_target(ex), "correct": correct,
             "sender_logprob": -12.0, "n_tokens": 12} for ex in examples]


def test_receiver_features_match_scoring(lm):
    items = items_for(EXAMPLES[:5])
    hidden, nll, ntok = receiver_features(lm, [it["prompt"] for it in items], [it["text"] for it in items],
                                          batch_size=2, max_length=96)
    assert hidden.shape == (5, 32) and torch.isfinite(hidden).all()
    expected = mean_nll(lm, [it["prompt"] for it in items], [it["text"] for it in items], batch_size=3)
    assert torch.allclose(nll, expected, atol=1e-4)
    ctx = build_contexts(hidden, nll, items, ntok)
    assert ctx.shape == (5, 36)
    assert torch.equal(ctx[:, -4], nll) and torch.equal(ctx[:, -1], ntok)
    assert ctx[0, -3].item() == pytest.approx(-1.0)  # sender log-prob per token
    assert ctx[:, -2].tolist() == [1.0, 2.0, 1.0, 2.0, 1.0]  # reasoning steps


@pytest.mark.parametrize("reward", ["gain", "relative"])
def test_select_reward_loop_updates_filter_state(lm, tmp_path, reward):
    plugin = LadaPlugin(run_cfg(), LadaConfig(filter=FilterConfig(kind="lada", budget_fraction=0.5, num_clusters=3,
                                                                  epochs=2), reward=reward))
    node = FakeNode(tmp_path)
    items = items_for(EXAMPLES) + items_for(EXAMPLES[:2], correct=False)
    for rnd in (1, 2):
        chosen = plugin.select("down", rnd, items, node, lm, 0)
        assert len(chosen) <= 6 and all(it["correct"] for it in chosen)
        assert node.metrics["lada_down_candidates"] == 12
        assert node.metrics["lada_down_cold_start"] == (1.0 if rnd == 1 else 0.0)
        assert (tmp_path / "filter-down-0.pt").exists() and (tmp_path / "lada-pending-down-0.pt").exists()
        if rnd == 1:
            assert len(chosen) == 6
        before = mean_nll(lm, [it["prompt"] for it in chosen], [it["text"] for it in chosen])
        train_steps(lm, [(it["prompt"], it["text"]) for it in chosen], 4, run_cfg().train, seed=rnd, progress=False)
        after = mean_nll(lm, [it["prompt"] for it in chosen], [it["text"] for it in chosen])
        plugin.after_update("down", rnd, chosen, node, lm, 0)
        assert not (tmp_path / "lada-pending-down-0.pt").exists()
        expected = learning_reward(before, after, reward).mean().item()
        assert node.metrics["lada_down_reward"] == pytest.approx(expected, abs=1e-4)
    state = torch.load(tmp_path / "filter-down-0.pt", weights_only=True)
    assert state["num_updates"] == 2 and len(state["hist_r"]) >= 6


def test_extra_loss_is_lambda_log2_at_round_start_and_differentiable(lm, tmp_path):
    plugin = LadaPlugin(run_cfg(), LadaConfig(lambda_=0.5, beta=0.1, pair_batch=3, negative_paths=2))
    node = FakeNode(tmp_path)
    chosen = items_for(EXAMPLES[:4])
    fn = plugin.extra_loss("down", 1, chosen, node, lm, 0)
    assert fn is not None and node.metrics["lada_down_pairs"] == 4
    loss = fn(0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # policy == reference before any update: margin 0, loss = lambda * log 2
    assert loss.item() == pytest.approx(0.5 * math.log(2), abs=1e-4)
    lm.model.zero_grad()
    loss.backward()
    grads = [p.grad for p in lm.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    lm.model.zero_grad()
    # y- are the receiver's own paths (an untrained model never verifies, so wrong ones)
    own = plugin.own_paths("down", 1, node, lm, ["q0"])
    assert len(own["q0"]) == 2
    assert LadaPlugin(run_cfg(), LadaConfig(distill="sft")).extra_loss("down", 1, chosen, node, lm, 0) is None


def test_rewards_gain_and_share_of_headroom():
    p_before = torch.tensor([0.2, 0.8, 0.5])
    p_after = torch.tensor([0.5, 0.9, 0.4])
    nb, na = -torch.log(p_before), -torch.log(p_after)
    gain = learning_reward(nb, na, "gain")
    rel = learning_reward(nb, na, "relative")
    assert torch.allclose(gain, torch.tensor([0.3, 0.1, -0.1]), atol=1e-6)
    # the far-away path gains most, but closes less of its gap than the near one
    assert torch.allclose(rel, torch.tensor([0.3 / 0.8, 0.5, -0.2]), atol=1e-6)
    assert gain.argmax() == 0 and rel.argmax() == 1
    assert torch.isfinite(learning_reward(torch.zeros(1), torch.zeros(1), "relative")).all()  # p_before = 1
    with pytest.raises(ValueError, match="kind"):
        learning_reward(nb, na, "best")


def test_domain_shares_of_a_selection():
    one = {ex.id: ex.domain for ex in EXAMPLES}
    assert _domain_shares(one, items_for(EXAMPLES[:3])) == {}  # one domain: nothing to tell
    mixed = {f"d{i}": ("shop" if i < 3 else "general") for i in range(4)}
    chosen = [{"example_id": "d0"}, {"example_id": "d1"}, {"example_id": "d3"}]
    assert _domain_shares(mixed, chosen) == pytest.approx({"general": 1 / 3, "shop": 2 / 3})
    assert _domain_shares(mixed, []) == {}


def test_pick_negative_takes_only_wrong_paths():
    assert _pick_negative([("a", True), ("b", False)], "x") == "b"
    assert _pick_negative([("a", True), ("y", True)], "a") is None  # never push a correct path down
    assert _pick_negative([("a", False)], "a") is None
    assert _pick_negative([], "a") is None


def test_upward_phase_server_side(lm, tmp_path):
    """Client replies (gold paths, as a client would send) -> per-client filter ->
    LLM training with SFT + mirror loss -> rewards -> filter update."""
    from lada.hosts.common import items_to_payload

    plugin = LadaPlugin(run_cfg(), LadaConfig(filter=FilterConfig(kind="loss", budget_fraction=0.5), pair_batch=2))
    assert plugin.phases(1) == [UP_PHASE]
    server = FakeNode(tmp_path, lm=lm, seed=999)
    sent = plugin.server_send(UP_PHASE.name, 1, server, [0, 1])
    assert sent == {0: {"all_public": True}, 1: {"all_public": True}}
    replies = {0: items_to_payload(items_for(EXAMPLES[:6])), 1: items_to_payload(items_for(EXAMPLES[6:]))}
    plugin.server_receive(UP_PHASE.name, 1, replies, server)
    m = server.metrics
    assert m["lada_up0_candidates"] + m["lada_up1_candidates"] == 12 - m["lada_up_llm_solved"]
    assert m["lada_up_trained"] == m["lada_up0_selected"] + m["lada_up1_selected"] > 0
    assert "lada_up0_reward" in m and server.saved == 1
    assert (tmp_path / "filter-up-0.pt").exists() and (tmp_path / "filter-up-1.pt").exists()


def test_phases_depend_on_host():
    assert LadaPlugin(run_cfg(), LadaConfig(upward=False)).phases(1) == []
    cfg = run_cfg()
    cfg.host = {"name": "standalone"}
    assert LadaPlugin(cfg, LadaConfig()).phases(1) == []


def test_config_table_and_validation():
    opts = options_for(LadaPlugin, {"name": "lada", "lambda_": 0.5, "length_normalize": True,
                                    "filter": {"kind": "random", "budget_fraction": 0.25}}, "[plugin]")
    assert opts.lambda_ == 0.5 and opts.filter.kind == "random" and opts.filter.budget_fraction == 0.25
    with pytest.raises(ConfigError, match="distillm2"):
        options_for(LadaPlugin, {"name": "lada", "variant": "distillm2"}, "[plugin]")
    with pytest.raises(ConfigError, match=r"\[plugin\]\.filter\.kind"):
        options_for(LadaPlugin, {"name": "lada", "filter": {"kind": "best"}}, "[plugin]")
    with pytest.raises(ConfigError, match="unknown key"):
        options_for(LadaPlugin, {"name": "lada", "lambda": 1.0}, "[plugin]")
    with pytest.raises(ConfigError, match=r"\[plugin\]\.reward: must be one of"):
        options_for(LadaPlugin, {"name": "lada", "reward": "loss"}, "[plugin]")
    assert options_for(LadaPlugin, {"name": "lada", "reward": "relative"}, "[plugin]").reward == "relative"
    with pytest.raises(ValueError, match="direction"):
        LadaPlugin(run_cfg(), LadaConfig()).select("sideways", 1, [], None, None, 0)
