import contextlib
import math

import numpy as np
import pytest
import torch

from lada.config import ConfigError, load_config
from lada import registry
from lada.data.records import example_prompt, example_target
from lada.plugin.lada import LadaPlugin
from lada.protocol.host import PLUGIN_PREFIX, Plugin, Transfer
from lada.protocol.paths import Candidate, paths_to_payload
from lada.hosts.fedmkt import (Encoded, FedMKTConfig, TopK, choose_teacher, own_targets, transfer_targets)
from lada.protocol.driver import handle_message, run_federation


# ----------------------------------------------------------------------------- selection and targets

def test_greater_selection_lower_cross_entropy_wins():
    own = np.array([1.0, 2.0, 3.0, 1.5])
    others = np.array([[0.5, 2.5, np.nan, 1.5],    # client 0
                       [0.7, 1.0, 2.0, np.nan]])   # client 1
    assert choose_teacher(own, others).tolist() == [1, 2, 2, 0]  # tie (1.5 vs 1.5) keeps own


def test_selection_ignores_senders_that_are_not_candidates():
    assert choose_teacher(np.array([5.0]), np.array([[np.nan]])).tolist() == [0]


def _topk(ids, starts_per, idx_per, logp_per, nll):
    return TopK(list(ids), np.array([len(s) for s in starts_per], dtype=np.int32),
                np.concatenate(starts_per).astype(np.int32), np.concatenate(idx_per).astype(np.int32),
                np.concatenate(logp_per).astype(np.float16), np.array(nll, dtype=np.float32))


def test_transfer_targets_map_aligned_positions_and_fall_back_to_gold_elsewhere():
    # receiver tokens start at bytes 0, 1, 3 and EOS at 5; sender tokens at 0, 2, 3 and EOS at 5
    recv = Encoded("e", [1, 2, 3, 4, 5], [-100, 2, 3, 4, 5], np.array([0, 1, 3, 5], np.int32), np.array([7, 8, 9, 2]))
    logp = np.log(np.array([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.99, 0.01]]))
    tk = _topk(["e"], [np.array([0, 2, 3, 5])], [np.array([[0, 1], [1, 2], [2, 3], [3, 0]])], [logp], [1.0])
    mapping = np.array([10, 10, 11, 2], dtype=np.int32)  # sender ids 0 and 1 collapse onto 10
    ids, probs, aligned = transfer_targets(recv, tk, slice(0, 4), mapping, 12, temperature=1.0)
    assert aligned.tolist() == [True, False, True, True]
    assert ids[0, 0] == 10 and probs[0, 0] == pytest.approx(1.0)          # 0.6 + 0.4 merged
    assert ids[1, 0] == 8 and probs[1].tolist() == [1.0, 0.0]             # no sender token starts at byte 1
    assert ids[2].tolist() == [11, 2] and probs[2] == pytest.approx([0.9, 0.1], rel=1e-3)
    assert ids[3, 0] == 2                                                  # EOS aligns with EOS


def test_own_targets_renormalise_over_the_top_k_with_temperature():
    tk = _topk(["a"], [np.array([0])], [np.array([[4, 5]])], [np.log(np.array([[0.3, 0.1]]))], [1.0])
    ids, probs = own_targets(tk, slice(0, 1), temperature=1.0)
    assert ids.tolist() == [[4, 5]] and probs[0] == pytest.approx([0.75, 0.25], rel=1e-3)
    _, hot = own_targets(tk, slice(0, 1), temperature=2.0)
    assert hot[0, 0] < probs[0, 0]


def test_topk_payload_round_trip_is_compact_and_checked():
    tk = _topk(["a", "b"], [np.array([0, 1]), np.array([0])], [np.zeros((2, 3)), np.ones((1, 3))],
               [np.zeros((2, 3)), np.zeros((1, 3))], [1.0, 2.0])
    p = tk.to_payload()
    assert p["tk_idx"].dtype == np.int32 and p["tk_logp"].dtype == np.float16
    back = TopK.from_payload(p)
    assert back.ids == ["a", "b"] and back.by_id() == {"a": slice(0, 2), "b": slice(2, 3)}
    p["tk_starts"] = p["tk_starts"][:2]
    with pytest.raises(ValueError, match="inconsistent top-k shapes"):
        TopK.from_payload(p)


@pytest.mark.parametrize("field,value,msg", [("alpha", 1.5, "alpha"), ("selection", "best", "selection"),
                                             ("top_k", 0, "top_k"), ("metric", "x", "metric"),
                                             ("lora_r", -1, "lora_r"), ("llm_lora_r", -2, "llm_lora_r"),
                                             ("epochs", -0.5, "epochs")])
def test_config_is_validated(field, value, msg):
    cfg = FedMKTConfig(**{field: value})
    with pytest.raises(ConfigError, match=msg):
        cfg.validate("[host]")


# ----------------------------------------------------------------------------- host on tiny models

TINY = ["rounds=1", "data.train_per_client=8", "data.test_per_client=3", "data.public_size=6",
        "data.server_test_size=4", "data.server_train_size=30", "server.warmup_steps=2",
        "clients.0.warmup_steps=2", "clients.1.warmup_steps=2", "clients.2.warmup_steps=2",
        "train.local_steps=1", "train.transfer_epochs=1.0", "train.batch_size=4", "generation.max_new_tokens=4"]


class DirectTransport:
    """Calls the client handler in-process, as the inline engine does."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.seen: list[tuple[str, int]] = []

    def client_ids(self):
        return list(range(len(self.cfg.clients)))

    def exchange(self, phase, rnd, payloads):
        self.seen.append((phase.name, rnd))
        rc = {"run-dir": str(self.cfg.resolved_run_dir())}
        return {k: handle_message(phase.name, rnd, p, {"partition-id": k}, rc) for k, p in payloads.items()}


def run_tiny(host: str, tmp_path, cache, extra=(), plugin=None):
    from lada.protocol.node import ServerNode, server_workspace
    from lada.registry import make_host, make_plugin

    cfg = load_config("configs/tiny-test.toml", [f'host.name="{host}"', f'run_dir="{tmp_path}/run"',
                                                  f'cache_dir="{cache}"', *TINY, *extra])
    server = ServerNode(cfg, server_workspace(cfg))
    plugin = plugin(cfg) if plugin else make_plugin(cfg)
    transport = DirectTransport(cfg)
    rows: list[dict] = []
    run_federation(cfg, transport, server, make_host(cfg, plugin), plugin, lambda r, rs: rows.extend(rs))
    return cfg, transport, rows


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lada-cache")


def test_fedmkt_round_on_tiny_heterogeneous_models(tmp_path, model_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, transport, rows = run_tiny("fedmkt", tmp_path, model_cache)
    assert [p for p, r in transport.seen if r == 1] == ["vocab", "local_train", "client_logits",
                                                          "server_logits"]  # evaluation rides on the last
    llm = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    clients = [r for r in rows if r["round"] == 1 and r["participant"] != "llm"]
    assert np.isfinite(llm["kd_loss"]) and np.isfinite(llm["lm_loss"]) and llm["distill_samples"] == 6
    assert 0.0 <= llm["other_share"] <= 1.0
    for r in clients:
        assert np.isfinite(r["kd_loss"]) and r["distill_samples"] == 6 and r["bytes_up"] > 0 and r["bytes_down"] > 0
    # the token mappings of round 1 persist for later rounds
    nodes = cfg.resolved_run_dir() / "nodes"
    assert (nodes / "server" / "token_maps" / "client0_to_llm.npy").is_file()
    assert (nodes / "client-1" / "token_maps" / "llm_to_client.npy").is_file()


def test_fedmkt_lora_and_epochs_per_phase(tmp_path, model_cache, monkeypatch):
    """host.lora_r / llm_lora_r: every participant trains LoRA adapters on its frozen
    warm-up; host.epochs: passes over the distillation mix, instead of train.transfer_epochs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lada.protocol.node import ClientNode, ServerNode

    cfg, _, rows = run_tiny("fedmkt", tmp_path, model_cache,
                            extra=("host.lora_r=2", "host.llm_lora_r=2", "host.epochs=2.0"))
    llm = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    assert llm["distill_steps"] == math.ceil(2.0 * 6 / 4)  # 2 passes over 6 public examples, batch 4
    nodes = cfg.resolved_run_dir() / "nodes"
    for node in (ServerNode(cfg, nodes / "server"), ClientNode(cfg, 1, nodes / "client-1")):
        lm = node.model()
        assert lm.is_lora and lm.model.peft_config["default"].r == 2
        from lada.models.loading import load_model

        init = load_model(node.model_cfg, node.initial_checkpoint()).model.state_dict()
        base = {k.replace(".base_layer.", "."): v for k, v in lm.model.get_base_model().state_dict().items()
                if "lora_" not in k}
        assert all(torch.equal(base[k], t) for k, t in init.items())
        assert any(float(v.abs().sum()) > 0 for k, v in lm.model.state_dict().items() if "lora_B" in k)


class ConstantLoss(Plugin):
    """A plug-in whose transfers keep the first three candidates and add a constant
    loss pair + 1, recording the transfers it sees (server side only: clients build
    theirs from the config)."""

    name = "constant-loss"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def transfer(self, direction, rnd, pair, node, lm, candidates):
        self.calls.append((direction, pair, len(candidates)))
        yield Transfer(direction, pair, candidates[:3], lambda step: torch.tensor(float(pair + 1)), len(candidates))


def test_fedmkt_opens_one_transfer_per_pair_and_averages_their_losses(tmp_path, model_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    made = []

    def factory(cfg):
        made.append(ConstantLoss(cfg))
        return made[0]

    _, _, rows = run_tiny("fedmkt", tmp_path, model_cache, plugin=factory)
    assert made[0].calls == [("up", k, 0) for k in range(3)]  # the plain paths exchange: no paths ride along
    llm = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    assert llm["distill_samples"] == 6  # the host distils on the whole public set whatever the plug-in keeps
    # the pairs' losses 1, 2, 3 are averaged (2), not summed (6)
    assert llm["extra_loss"] == pytest.approx(2.0)
    assert llm["distill_steps"] == math.ceil(1.0 * 6 / 4)  # budget: transfer_epochs passes over the mix


class GoldSender(LadaPlugin):
    """The real LaDa plug-in, except that senders send gold rationales as their paths
    (tiny untrained models write no verified path): client k answers 2 + k questions."""

    def paths_to_send(self, direction, rnd, node):
        if not self._rides_beside(direction):
            return {}
        n = 2 + getattr(node, "index", 3)
        cands = [Candidate(ex.id, example_prompt(ex), example_target(ex), -5.0, 9, 1, True) for ex in node.public[:n]]
        return paths_to_payload(cands, prefix=PLUGIN_PREFIX)


def test_fedmkt_with_the_lada_plugin_rewards_each_pair_on_its_own_selection(tmp_path, model_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(registry.PLUGINS, "lada", "test_fedmkt:GoldSender")  # clients build theirs from the config
    lada = ['plugin.name="lada"', "plugin.filter.num_clusters=2", "plugin.filter.epochs=1", "plugin.negative_paths=1"]
    cfg, _, rows = run_tiny("fedmkt", tmp_path, model_cache, extra=lada)
    llm = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    clients = [r for r in rows if r["round"] == 1 and r["participant"] != "llm"]
    server_ws = cfg.resolved_run_dir() / "nodes" / "server"
    for k in range(3):
        assert llm[f"lada_up{k}_candidates"] == 2 + k  # pair k's candidates are client k's paths only
        selected = llm[f"lada_up{k}_selected"]
        assert 1 <= selected <= math.ceil(0.5 * (2 + k))
        state = torch.load(server_ws / f"filter-up-{k}.pt", weights_only=True)
        assert len(state["hist_r"]) == selected  # rewarded on its own selection, nothing else
    assert llm["distill_paths"] == sum(llm[f"lada_up{k}_selected"] for k in range(3))
    for r in clients:  # the LLM's paths ride down beside the logits, each client's up: bytes counted apart
        assert r["lada_bytes_down"] > 0 and r["lada_bytes_up"] > 0
        assert r["bytes_down"] > r["lada_bytes_down"] and r["bytes_up"] > r["lada_bytes_up"]
        assert r["lada_down_candidates"] == 5 and r["lada_down_selected"] >= 1
    assert llm["lada_bytes_up"] == sum(r["lada_bytes_up"] for r in clients)
    assert not list(cfg.resolved_run_dir().rglob("*pending*"))
