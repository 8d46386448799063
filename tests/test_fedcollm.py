import numpy as np
import pytest

from lada.config import ConfigError, load_config
from lada.hosts.fedcollm import FedCoLLMConfig, check_same_slm, weighted_average
from test_fedmkt import run_tiny


def test_weighted_average_weights_by_examples():
    a = {"lora/x": np.array([1.0, 2.0], dtype=np.float32), "lora/y": np.ones((2, 2), dtype=np.float32)}
    b = {"lora/x": np.array([3.0, 6.0], dtype=np.float32), "lora/y": np.zeros((2, 2), dtype=np.float32)}
    avg = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(avg["lora/x"], [2.5, 5.0])
    np.testing.assert_allclose(avg["lora/y"], np.full((2, 2), 0.25))
    assert avg["lora/x"].dtype == np.float32
    np.testing.assert_allclose(weighted_average([a], [7])["lora/x"], a["lora/x"])


def test_weighted_average_rejects_mismatched_states():
    a = {"lora/x": np.zeros(2)}
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([a, {"lora/z": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([a, {"lora/x": np.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([a, a], [0, 0])


def _cfg(*overrides):
    return load_config("configs/tiny-test.toml", ['host.name="fedcollm"', *overrides])


def test_compatibility_check_names_the_differing_fields_per_client():
    cfg = _cfg()  # tiny-test has three different SLM families
    with pytest.raises(ConfigError, match=r"(?s)same SLM.*'name'.*client-0: .*name='tiny-qwen2'.*client-1: .*"
                                          r"name='tiny-gpt2'.*use host 'fedmkt'"):
        check_same_slm(cfg, {})


def test_compatibility_check_uses_the_setup_replies():
    same = [f'clients.{k}.name="tiny-qwen2"' for k in range(3)] + [f"clients.{k}.vocab_size=360" for k in range(3)]
    cfg = _cfg(*same)
    reply = {"model": "tiny-qwen2", "vocab_size": 360, "params": 1000}
    check_same_slm(cfg, {k: dict(reply) for k in range(3)})
    with pytest.raises(ConfigError, match=r"params \(setup\)"):
        check_same_slm(cfg, {0: dict(reply), 1: dict(reply, params=999), 2: dict(reply)})


def test_config_is_validated():
    with pytest.raises(ConfigError, match="adapter_dtype"):
        FedCoLLMConfig(adapter_dtype="int8").validate("[host]")
    with pytest.raises(ConfigError, match="lora_r"):
        FedCoLLMConfig(lora_r=0).validate("[host]")


SAME_SLM = [f'clients.{k}.name="tiny-qwen2"' for k in range(3)] + [f"clients.{k}.vocab_size=360" for k in range(3)]


def test_fedcollm_round_shares_one_slm_and_distils_mutually(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lada.hosts.fedcollm import ADAPTER_PREFIX, adapter_arrays
    from lada.protocol.node import ClientNode

    cfg, transport, rows = run_tiny("fedcollm", tmp_path, tmp_path_factory.mktemp("cache"), extra=SAME_SLM)
    assert [p for p, r in transport.seen if r == 1] == ["base", "local_train", "sync"]  # evaluation rides on "sync"
    llm = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    for key in ("slm_kd_loss", "llm_kd_loss", "slm_lm_loss", "llm_lm_loss"):
        assert np.isfinite(llm[key]), key
    assert llm["slm_distill_samples"] == 6 and llm["llm_distill_samples"] == 6
    # after "sync" every client holds the server's distilled adapter, on the one shared base
    nodes = cfg.resolved_run_dir() / "nodes"
    server_slm = ClientNode(cfg, 0, nodes / "server" / "fedcollm-slm").model()
    ref = adapter_arrays(server_slm)
    assert ref and all(k.startswith(ADAPTER_PREFIX) for k in ref)
    ref_base = {k: v for k, v in server_slm.model.get_base_model().state_dict().items() if "lora_" not in k}
    for k in range(3):
        lm = ClientNode(cfg, k, nodes / f"client-{k}").model()
        got = adapter_arrays(lm)
        assert all(np.array_equal(got[n], ref[n]) for n in ref)
        base = lm.model.get_base_model().state_dict()
        assert all(np.array_equal(base[n].numpy(), t.numpy()) for n, t in ref_base.items())


def test_fedcollm_with_the_lada_plugin_runs_the_same_algorithm_on_the_server(tmp_path, tmp_path_factory, monkeypatch):
    """Down: the LLM's paths for the shared SLM (pair 0), never on the wire. Up: each
    client's paths ride up beside its adapter; pair k's filter learns from its own."""
    import math

    import torch

    from lada import registry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(registry.PLUGINS, "lada", "test_fedmkt:GoldSender")
    lada = ['plugin.name="lada"', "plugin.filter.num_clusters=2", "plugin.filter.epochs=1", "plugin.negative_paths=1"]
    cfg, _, rows = run_tiny("fedcollm", tmp_path, tmp_path_factory.mktemp("cache"), extra=(*SAME_SLM, *lada))
    llm = next(r for r in rows if r["round"] == 1 and r["participant"] == "llm")
    clients = [r for r in rows if r["round"] == 1 and r["participant"] != "llm"]
    assert llm["lada_down_candidates"] == 5 and llm["lada_down_selected"] >= 1
    assert llm["slm_distill_paths"] == llm["lada_down_selected"] and llm["slm_distill_samples"] == 6
    server_ws = cfg.resolved_run_dir() / "nodes" / "server"
    for k in range(3):
        assert llm[f"lada_up{k}_candidates"] == 2 + k
        assert 1 <= llm[f"lada_up{k}_selected"] <= math.ceil(0.5 * (2 + k))
        assert len(torch.load(server_ws / f"filter-up-{k}.pt", weights_only=True)["hist_r"]) == llm[f"lada_up{k}_selected"]
    assert llm["llm_distill_paths"] == sum(llm[f"lada_up{k}_selected"] for k in range(3))
    for r in clients:
        assert r["lada_bytes_up"] > 0 and r["lada_bytes_down"] == 0
