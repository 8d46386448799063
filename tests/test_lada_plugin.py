"""The LaDa plug-in's transfer lifecycle on a tiny model, without a host: contexts,
the select -> train -> reward loop (state read and written once, nothing pending on
disk), the contrastive extra loss (same mode for reference and policy), paths beside a
host's exchange, config."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lada.config import ConfigError, GenerationConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from lada.data.answers import check_steps  # noqa: E402
from lada.data.records import Example, example_prompt, example_target  # noqa: E402
from lada.models.loading import build_model  # noqa: E402
from lada.models.scoring import mean_nll  # noqa: E402
from lada.models.training import train_steps  # noqa: E402
from lada.plugin.filter import FilterConfig  # noqa: E402
from lada.plugin.lada import (LadaConfig, LadaPlugin, _domain_shares, _pick_negative, attribute_gain,  # noqa: E402
                              build_contexts, head_gradient_alignment, learning_reward, paper_reward,
                              receiver_features, validation_likelihood)
from lada.protocol.host import PLUGIN_PREFIX, Capabilities, Plugin, PluginNode  # noqa: E402
from lada.protocol.paths import Candidate  # noqa: E402
from lada.registry import build_options  # noqa: E402
from helpers import arithmetic_examples  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _examples(n: int, seed: int = 0) -> list[Example]:
    return arithmetic_examples(n, seed, prefix="q")


EXAMPLES = _examples(12)
CORPUS = [t for ex in EXAMPLES for t in (example_prompt(ex), example_target(ex))] * 3


class FakeNode:
    """A participant as the plug-in sees it (``PluginNode``), plus a model for the
    paths it sends."""

    def __init__(self, workspace: Path, lm=None, seed: int = 0, held_out=None) -> None:
        self.workspace = workspace
        self.seed = seed
        self.public = EXAMPLES
        # reward = "receiver" (the default): the receiver's validation slice, by default
        # three of the problems under other ids (so that none is excluded as a candidate)
        self.held_out = list(_val_copies(EXAMPLES[:3]) if held_out is None else held_out)
        self.metrics: dict[str, float] = {}
        self.lm = lm

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def add_metric(self, name: str, value: float) -> None:
        self.metrics[name] = self.metrics.get(name, 0.0) + float(value)

    def model(self):
        return self.lm


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
                     train=TrainConfig(lr=3e-3, batch_size=4, max_length=96),
                     generation=GenerationConfig(paths_per_question=2, max_new_tokens=12, batch_size=16))


def cands_for(examples: list[Example], verified: bool = True) -> list[Candidate]:
    return [Candidate(ex.id, example_prompt(ex), example_target(ex), -12.0, 12,
                      check_steps(example_target(ex)).n_steps, verified) for ex in examples]


def test_the_test_node_is_a_plugin_node(tmp_path):
    assert isinstance(FakeNode(tmp_path), PluginNode)
    assert not isinstance(object(), PluginNode)


def test_receiver_features_match_scoring(lm):
    cands = cands_for(EXAMPLES[:5])
    hidden, nll, ntok = receiver_features(lm, [c.prompt for c in cands], [c.text for c in cands],
                                          batch_size=2, max_length=96)
    assert hidden.shape == (5, 32) and torch.isfinite(hidden).all()
    expected = mean_nll(lm, [c.prompt for c in cands], [c.text for c in cands], batch_size=3)
    assert torch.allclose(nll, expected, atol=1e-4)
    ctx = build_contexts(hidden, nll, cands, ntok)
    assert ctx.shape == (5, 36)
    assert torch.equal(ctx[:, -4], nll) and torch.equal(ctx[:, -1], ntok)
    assert ctx[0, -3].item() == pytest.approx(-1.0)  # sender log-prob per token
    assert ctx[:, -2].tolist() == [1.0, 2.0, 1.0, 2.0, 1.0]  # reasoning steps


@pytest.mark.parametrize("reward", ["gain", "relative"])
def test_transfer_selects_trains_rewards_and_keeps_state_in_memory(lm, tmp_path, reward, monkeypatch):
    plugin = LadaPlugin(run_cfg(), LadaConfig(filter=FilterConfig(kind="lada", budget_fraction=0.5, num_clusters=3,
                                                                  epochs=2), reward=reward, distill="sft"))
    loads, saves = [], []
    real_load, real_save = plugin._load_filter, plugin._save_filter
    monkeypatch.setattr(plugin, "_load_filter", lambda *a: loads.append(a[1:]) or real_load(*a))
    monkeypatch.setattr(plugin, "_save_filter", lambda *a: saves.append(a[1:3]) or real_save(*a))
    node = FakeNode(tmp_path)
    cands = cands_for(EXAMPLES) + cands_for(EXAMPLES[:2], verified=False)
    for rnd in (1, 2):
        with plugin.transfer("down", rnd, 0, node, lm, cands) as t:
            assert len(t.items) <= 6 and all(c.verified for c in t.items) and t.loss is None
            assert node.metrics["lada_down_candidates"] == 12 and t.n_candidates == 12
            assert node.metrics["lada_down_cold_start"] == (1.0 if rnd == 1 else 0.0)
            if rnd == 1:
                assert len(t.items) == 6
            assert sorted(p.name for p in tmp_path.iterdir()) == ([] if rnd == 1 else ["filter-down-0.pt"])
            before = mean_nll(lm, [c.prompt for c in t.items], [c.text for c in t.items])
            train_steps(lm, [(c.prompt, c.text) for c in t.items], 4, run_cfg().train, seed=rnd, progress=False)
            after = mean_nll(lm, [c.prompt for c in t.items], [c.text for c in t.items])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["filter-down-0.pt"]  # nothing pending, no temp file
        expected = learning_reward(before, after, reward).mean().item()
        assert node.metrics["lada_down_reward"] == pytest.approx(expected, abs=1e-4)
    assert loads == [("down", 0), ("down", 0)] and saves == [("down", 0), ("down", 0)]  # once each per transfer
    state = torch.load(tmp_path / "filter-down-0.pt", weights_only=True)
    assert state["num_updates"] == 2 and len(state["hist_r"]) >= 6 and len(state["hist_f1"]) == len(state["hist_r"])


def test_a_failed_transfer_leaves_the_filter_as_it_was(lm, tmp_path):
    plugin = LadaPlugin(run_cfg(), LadaConfig(filter=FilterConfig(num_clusters=3, epochs=1), distill="sft"))
    node = FakeNode(tmp_path)
    with pytest.raises(RuntimeError, match="training broke"):
        with plugin.transfer("up", 1, 2, node, lm, cands_for(EXAMPLES[:6])):
            raise RuntimeError("training broke")
    assert not list(tmp_path.iterdir()) and "lada_up2_reward" not in node.metrics


def test_extra_loss_is_lambda_log2_at_round_start_even_with_dropout(lm, tmp_path):
    """Reference and policy log-probs are taken in the same mode (no dropout), so the
    DPO margin is exactly 0 before any update, even in train mode with dropout on."""
    plugin = LadaPlugin(run_cfg(), LadaConfig(lambda_=0.5, beta=0.1, pair_batch=3, negative_paths=2))
    node = FakeNode(tmp_path)
    attn = [m for m in lm.model.modules() if hasattr(m, "attention_dropout")]
    assert attn
    with plugin.transfer("down", 1, 0, node, lm, cands_for(EXAMPLES[:4])) as t:
        assert t.loss is not None and node.metrics["lada_down_pairs"] >= 1
        try:
            for m in attn:
                m.attention_dropout = 0.5
            lm.model.train()
            for step in range(3):  # policy == reference before any update: margin 0, loss = lambda * log 2
                loss = t.loss(step)
                assert loss.item() == pytest.approx(0.5 * math.log(2), abs=1e-5)
            assert lm.model.training  # the caller's mode is restored
        finally:
            for m in attn:
                m.attention_dropout = 0.0
            lm.model.eval()
        lm.model.zero_grad()
        loss.backward()
        grads = [p.grad for p in lm.model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        lm.model.zero_grad()
    # y- are the receiver's own paths (an untrained model never verifies, so wrong ones)
    own = plugin.own_paths("down", 1, node, lm, ["q0"])
    assert len(own["q0"]) == 2
    with LadaPlugin(run_cfg(), LadaConfig(distill="sft")).transfer("down", 1, 0, node, lm, cands_for(EXAMPLES[:4])) as t:
        assert t.loss is None


def test_the_plain_plugin_keeps_every_verified_candidate(tmp_path):
    cands = cands_for(EXAMPLES[:3]) + cands_for(EXAMPLES[3:4], verified=False)
    with Plugin(run_cfg()).transfer("up", 1, 0, FakeNode(tmp_path), None, cands) as t:
        assert t.items == cands[:3] and t.loss is None
    assert Plugin(run_cfg()).paths_to_send("down", 1, FakeNode(tmp_path)) == {}


def test_paths_ride_beside_a_host_exchange_only_where_it_has_no_paths(lm, tmp_path):
    plugin = LadaPlugin(run_cfg(), LadaConfig())
    node = FakeNode(tmp_path, lm=lm, seed=3)
    plugin.attach(Capabilities(directions=frozenset({"down", "up"})))  # e.g. a logits-exchanging host
    sent = plugin.paths_to_send("up", 1, node)
    assert set(sent) == {PLUGIN_PREFIX + k for k in ("example_ids", "texts", "correct", "sender_logprob", "n_tokens")}
    assert node.metrics["lada_up_sent"] == len(sent[PLUGIN_PREFIX + "texts"])
    sent[PLUGIN_PREFIX + "example_ids"] = ["q1"]
    sent[PLUGIN_PREFIX + "texts"] = [example_target(EXAMPLES[1])]
    for k, v in ((PLUGIN_PREFIX + "correct", [True]), (PLUGIN_PREFIX + "sender_logprob", [-3.0]),
                 (PLUGIN_PREFIX + "n_tokens", [9])):
        sent[k] = torch.tensor(v).numpy()
    got = plugin.paths_received("up", {"other": 1, **sent}, node)
    assert got == [Candidate("q1", example_prompt(EXAMPLES[1]), example_target(EXAMPLES[1]), -3.0, 9, 2, True)]
    plugin.attach(Capabilities(directions=frozenset({"down", "up"}), path_directions=frozenset({"down", "up"})))
    assert plugin.paths_to_send("up", 1, node) == {} and plugin.paths_received("up", sent, node) == []
    plugin.attach(Capabilities(collaborative=False))
    assert plugin.paths_to_send("down", 1, node) == {}


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


def test_paper_reward_compares_set_sums_across_rounds_and_shares_the_difference():
    nb, na = -torch.log(torch.tensor([0.2, 0.4])), -torch.log(torch.tensor([0.5, 0.7]))
    r, s = paper_reward(nb, na, None)  # round 1: the same set before training
    assert s == pytest.approx(1.2) and torch.allclose(r, torch.full((2,), (1.2 - 0.6) / 2))
    r2, s2 = paper_reward(-torch.log(torch.tensor([0.1, 0.2, 0.3])), -torch.log(torch.tensor([0.2, 0.2, 0.2])), s)
    assert s2 == pytest.approx(0.6) and torch.allclose(r2, torch.full((3,), (0.6 - 1.2) / 3))  # smaller than last round
    assert paper_reward(torch.zeros(0), torch.zeros(0), 1.0)[0].numel() == 0


def test_attribution_of_a_set_gain_sums_to_it():
    share = attribute_gain(0.3, 3)
    assert torch.allclose(share, torch.full((3,), 0.1))
    cos = torch.tensor([0.9, 0.1, -0.4])
    up = attribute_gain(0.3, 3, cos)
    assert up.sum().item() == pytest.approx(0.3) and up.argmax() == 0 and up.argmin() == 2
    down = attribute_gain(-0.3, 3, cos)  # a loss: the best-aligned sample is blamed least
    assert down.sum().item() == pytest.approx(-0.3) and down.argmax() == 0
    assert torch.isfinite(attribute_gain(0.0, 2, torch.tensor([1.0, -1.0]))).all()
    with pytest.raises(ValueError, match="alignments"):
        attribute_gain(0.1, 2, torch.ones(3))


def test_head_gradient_alignment_is_the_cosine_of_the_lm_head_gradients(lm):
    """The closed form (no backward pass) against autograd on the output projection."""
    sel, val = cands_for(EXAMPLES[:3]), EXAMPLES[6:9]
    vp, vt = [example_prompt(e) for e in val], [example_target(e) for e in val]
    cos = head_gradient_alignment(lm, [c.prompt for c in sel], [c.text for c in sel], vp, vt, batch_size=2,
                                  max_length=96)
    assert cos.shape == (3,) and torch.isfinite(cos).all() and (cos.abs() <= 1 + 1e-5).all()
    head = lm.model.get_output_embeddings()

    def head_grad(prompts, texts):
        """Mean over examples of d(mean token NLL)/d(head weight), by autograd."""
        from lada.models.training import IGNORE, collate, encode_pairs
        grads = []
        for p, t in zip(prompts, texts):
            batch = collate(encode_pairs(lm.tokenizer, [(p, t)], 96), lm.tokenizer.pad_token_id)
            seen = []
            hook = head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach()))
            with torch.no_grad():
                lm.model.eval()
                lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hook.remove()
            w = head.weight.detach().clone().requires_grad_(True)
            labels = batch["labels"][0, 1:]
            keep = labels != IGNORE
            logits = seen[0][0, :-1][keep] @ w.T
            torch.nn.functional.cross_entropy(logits, labels[keep]).backward()
            grads.append(w.grad)
        return torch.stack(grads).mean(0)

    g_val = head_grad(vp, vt)
    for i, c in enumerate(sel):
        g = head_grad([c.prompt], [c.text])
        expected = float((g * g_val).sum() / (g.norm() * g_val.norm()))
        assert cos[i].item() == pytest.approx(expected, abs=1e-4)


def _val_copies(examples, prefix="v"):
    """The same problems under other ids: training on one improves the other."""
    return [dataclasses.replace(ex, id=prefix + ex.id) for ex in examples]


@pytest.mark.parametrize("attribution", ["gradient", "share"])
def test_receiver_reward_is_the_validation_gain_attributed_over_the_selection(lm, tmp_path, attribution):
    plugin = LadaPlugin(run_cfg(), LadaConfig(filter=FilterConfig(kind="none"), distill="sft", reward="receiver",
                                              reward_attribution=attribution))
    val = _val_copies(EXAMPLES[:6]) + [EXAMPLES[11]]
    node = FakeNode(tmp_path, held_out=val)
    own = copy.deepcopy(lm)  # the module's model stays untrained for the other tests
    with plugin.transfer("down", 1, 0, node, own, cands_for(EXAMPLES)) as t:
        assert node.metrics["lada_down_val_excluded"] == 1  # a held-out question is never a candidate
        assert len(t.items) == 11 and EXAMPLES[11].id not in {c.question_id for c in t.items}
        train_steps(own, [(c.prompt, c.text) for c in t.items], 6, run_cfg().train, seed=1, progress=False)
    m = node.metrics
    gain = m["lada_down_val_after"] - m["lada_down_val_before"]
    assert m["lada_down_val_before"] == pytest.approx(validation_likelihood(lm, val, max_length=96), abs=1e-5)
    assert gain > 0  # it trained on the validation problems' twins
    assert m["lada_down_reward"] == pytest.approx(gain / 11, abs=1e-6)  # the rewards sum to the gain
    assert ("lada_down_val_alignment" in m) == (attribution == "gradient")
    # a transfer that hurts the validation likelihood is rewarded negatively
    junk = [Candidate(f"j{i}", example_prompt(EXAMPLES[i]), "zq zq zq #### 7", -1.0, 4, 0, True) for i in range(4)]
    with plugin.transfer("down", 2, 0, node, own, junk) as t:
        train_steps(own, [(c.prompt, c.text) for c in t.items], 8, run_cfg().train, seed=2, lr=1e-2,
                    progress=False)
    assert node.metrics["lada_down_val_after"] < node.metrics["lada_down_val_before"]
    assert node.metrics["lada_down_reward"] < 0


def test_receiver_reward_needs_held_out_examples(lm, tmp_path):
    plugin = LadaPlugin(run_cfg(), LadaConfig(distill="sft", reward="receiver"))
    with pytest.raises(ValueError, match="held-out"):
        with plugin.transfer("down", 1, 0, FakeNode(tmp_path, held_out=()), lm, cands_for(EXAMPLES[:2])):
            pass


def test_paper_reward_keeps_the_set_sum_between_rounds(lm, tmp_path):
    plugin = LadaPlugin(run_cfg(), LadaConfig(filter=FilterConfig(kind="random", budget_fraction=0.5),
                                              distill="sft", reward="paper"))
    own = copy.deepcopy(lm)
    node = FakeNode(tmp_path)
    sums = []
    for rnd in (1, 2):
        with plugin.transfer("down", rnd, 0, node, own, cands_for(EXAMPLES)) as t:
            items = t.items
            before = mean_nll(own, [c.prompt for c in items], [c.text for c in items])
            train_steps(own, [(c.prompt, c.text) for c in items], 3, run_cfg().train, seed=rnd, progress=False)
        after = mean_nll(own, [c.prompt for c in items], [c.text for c in items])
        s = float(torch.exp(-after).sum())
        prev = float(torch.exp(-before).sum()) if rnd == 1 else sums[-1]
        assert node.metrics["lada_down_set_sum"] == pytest.approx(s, abs=1e-4)
        assert node.metrics["lada_down_reward"] == pytest.approx((s - prev) / len(items), abs=1e-4)
        assert json.loads((tmp_path / "reward-down-0.json").read_text())["set_sum"] == pytest.approx(s, abs=1e-4)
        sums.append(s)


def test_domain_shares_of_a_selection():
    one = {ex.id: ex.domain for ex in EXAMPLES}
    assert _domain_shares(one, cands_for(EXAMPLES[:3])) == {}  # one domain: nothing to tell
    mixed = {f"d{i}": ("shop" if i < 3 else "general") for i in range(4)}
    chosen = [Candidate(f"d{i}", "", "", 0.0, 1, 1, True) for i in (0, 1, 3)]
    assert _domain_shares(mixed, chosen) == pytest.approx({"general": 1 / 3, "shop": 2 / 3})
    assert _domain_shares(mixed, []) == {}


def test_pick_negative_takes_only_wrong_paths():
    assert _pick_negative([("a", True), ("b", False)], "x") == "b"
    assert _pick_negative([("a", True), ("y", True)], "a") is None  # never push a correct path down
    assert _pick_negative([("a", False)], "a") is None
    assert _pick_negative([], "a") is None


def options_for(table: dict):
    return build_options(LadaConfig, table, "[plugin]")


def test_config_table_and_validation():
    opts = options_for({"name": "lada", "lambda_": 0.5, "length_normalize": True,
                        "filter": {"kind": "random", "budget_fraction": 0.25}})
    assert opts.lambda_ == 0.5 and opts.filter.kind == "random" and opts.filter.budget_fraction == 0.25
    with pytest.raises(ConfigError, match="distillm2"):
        options_for({"name": "lada", "variant": "distillm2"})
    with pytest.raises(ConfigError, match=r"\[plugin\]\.filter\.kind"):
        options_for({"name": "lada", "filter": {"kind": "best"}})
    with pytest.raises(ConfigError, match="unknown key"):
        options_for({"name": "lada", "lambda": 1.0})
    with pytest.raises(ConfigError, match=r"\[plugin\]\.reward: must be one of"):
        options_for({"name": "lada", "reward": "loss"})
    assert options_for({"name": "lada", "reward": "relative"}).reward == "relative"
    for field_, bad in (("reward", "loss"), ("reward_attribution", "influence"), ("reward_val_size", 0)):
        with pytest.raises(ConfigError, match=rf"\[plugin\]\.{field_}: must be"):
            options_for({"name": "lada", "reward": "receiver", field_: bad} if field_ != "reward"
                        else {"name": "lada", "reward": bad})
    receiver = options_for({"name": "lada", "reward": "receiver", "reward_val_size": 7})
    assert receiver.holdout_size() == 7 and options_for({"name": "lada", "reward": "paper"}).holdout_size() == 0
    with pytest.raises(ValueError, match="direction"):
        with LadaPlugin(run_cfg(), LadaConfig()).transfer("sideways", 1, 0, None, None, []):
            pass
