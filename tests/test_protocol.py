import numpy as np
import pytest

from lada.protocol.driver import (EVAL_PREFIX, EVALUATE_FLAG, FederationError, RoundTraffic, _exchange,
                                  handle_message)
from lada.protocol.host import Phase
from lada.protocol.payload import check_payload, payload_nbytes


def test_payload_bytes_count_content_exactly():
    p = {"a": "héllo", "b": np.zeros((3, 4), dtype=np.float16), "c": [1, 2], "d": b"xyz", "e": 1.5}
    check_payload(p)
    expected = 1 + 6 + 1 + 24 + 1 + 16 + 1 + 3 + 1 + 8
    assert payload_nbytes(p) == expected


@pytest.mark.parametrize("bad", [{"x": {"nested": 1}}, {"x": [1, "a"]}, {1: "k"}, {"x": None}, {"x": [[1]]}])
def test_payloads_that_cannot_cross_the_wire_are_rejected(bad):
    with pytest.raises(TypeError):
        check_payload(bad)


class _Echo:
    def __init__(self, replies):
        self.replies = replies

    def client_ids(self):
        return sorted(self.replies)

    def exchange(self, phase, rnd, payloads):
        return {k: self.replies[k] for k in payloads if k in self.replies}


def test_exchange_counts_bytes_per_client_and_direction():
    t = RoundTraffic()
    _exchange(_Echo({0: {"r": "ab"}, 1: {"r": "abcd", "_seconds": 2.0}}), Phase("x"), 1,
              {0: {"q": "abc"}, 1: {"q": ""}}, t)
    assert t.down == {0: 1 + 3, 1: 1}
    assert t.up == {0: 1 + 2, 1: 1 + 4 + len("_seconds") + 8}
    assert t.seconds[1] == 2.0


def test_an_evaluation_riding_on_a_phase_is_asked_for_and_kept_out_of_its_traffic():
    class Seen(_Echo):
        def exchange(self, phase, rnd, payloads):
            self.sent = payloads
            return super().exchange(phase, rnd, payloads)

    t, evaluations = RoundTraffic(), {}
    echo = Seen({0: {"r": "ab", EVAL_PREFIX + "accuracy": 0.5, EVAL_PREFIX + "n": 4}, 1: {"r": "ab"}})
    good = _exchange(echo, Phase("x"), 1, {0: {"q": "abc"}, 1: {"q": "abc"}}, t, evaluations=evaluations)
    assert all(p[EVALUATE_FLAG] is True for p in echo.sent.values())
    assert evaluations == {0: {"accuracy": 0.5, "n": 4}}  # client 1 left it out: asked separately later
    assert good == {0: {"r": "ab"}, 1: {"r": "ab"}}  # the host never sees the evaluation
    assert t.up == {0: 3, 1: 3} and t.down == {0: 4, 1: 4}  # nor does the traffic (or the flag)


def test_client_error_fails_loudly_with_the_reason():
    with pytest.raises(FederationError, match="(?s)client-1 failed in round 2, phase 'x'.*boom"):
        _exchange(_Echo({0: {}, 1: {"error": "Traceback...\nValueError: boom"}}), Phase("x"), 2, {0: {}, 1: {}}, None)


def test_missing_reply_fails():
    with pytest.raises(FederationError, match=r"no reply from client\(s\) \[1\]"):
        _exchange(_Echo({0: {}}), Phase("x"), 1, {0: {}, 1: {}}, None)


def test_handle_message_returns_errors_instead_of_raising(tmp_path):
    reply = handle_message("distill", 1, {}, {}, {"run-dir": str(tmp_path)})
    assert "partition-id" in reply["error"]
    reply = handle_message("distill", 1, {}, {"partition-id": 0}, {"run-dir": str(tmp_path)})
    assert "must send 'setup' first" in reply["error"]
    assert handle_message("hello", 0, {}, {"partition-id": 2}, {})["partition_id"] == 2


def test_llm_evaluation_is_reused_only_while_the_weights_are_unchanged(monkeypatch):
    import types

    import torch

    from lada.models import generation
    from lada.protocol import driver

    calls = []

    def fake_evaluate(lm, examples, gen_cfg):
        calls.append(1)
        return types.SimpleNamespace(correct=[True, False, len(calls) > 1], chain_right=len(calls) / 10)

    monkeypatch.setattr(generation, "evaluate", fake_evaluate)
    net = torch.nn.Linear(2, 1)
    server = types.SimpleNamespace(state={"model_version": 0}, test_set=[1, 2, 3],
                                   model=lambda: types.SimpleNamespace(model=net))
    cfg = types.SimpleNamespace(generation=None)
    assert driver._llm_correct(cfg, server) == ([True, False, False], False, 0.1)
    assert driver._llm_correct(cfg, server) == ([True, False, False], True, 0.1)  # same weights: reused
    with torch.no_grad():
        net.weight.add_(0.5)  # changed in place, no new version
    assert driver._llm_correct(cfg, server) == ([True, False, True], False, 0.2)
    server.state["model_version"] = 1  # a save
    assert driver._llm_correct(cfg, server)[1] is False and len(calls) == 3
    del server.state["llm_eval"]["chain_right"]  # the state of a run from before chains were counted
    assert driver._llm_correct(cfg, server)[1:] == (False, 0.4)
