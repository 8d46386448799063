"""The federation's round loop, independent of any transport.

`run_federation` drives setup, every round's host (and plug-in) phases and the
evaluation, on the server side; `handle_message` is everything a client does with one
message. Engines supply a `Transport` (Flower Grid messages, or direct calls for the
inline debug engine) and never look inside payloads.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from lada.protocol.host import Host, Phase, Plugin
from lada.protocol.payload import Payload, check_payload, payload_nbytes

SETUP = Phase("setup", "query")
EVALUATE = Phase("evaluate", "evaluate")


class FederationError(RuntimeError):
    """A participant failed; the message names it, the phase and its reason."""


class Transport(Protocol):
    def client_ids(self) -> list[int]: ...

    def exchange(self, phase: Phase, rnd: int, payloads: dict[int, Payload]) -> dict[int, Payload]: ...


@dataclass
class RoundTraffic:
    """Bytes per client and direction in one round (down = server -> client)."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def add(self, cid: int, down: int, up: int, seconds: float) -> None:
        self.down[cid] = self.down.get(cid, 0) + down
        self.up[cid] = self.up.get(cid, 0) + up
        self.seconds[cid] = self.seconds.get(cid, 0.0) + seconds


def _exchange(transport: Transport, phase: Phase, rnd: int, payloads: dict[int, Payload], traffic: RoundTraffic | None) -> dict[int, Payload]:
    for cid, p in payloads.items():
        check_payload(p, f"{phase.name} payload for client-{cid}")
    replies = transport.exchange(phase, rnd, payloads)
    missing = sorted(set(payloads) - set(replies))
    if missing:
        raise FederationError(f"round {rnd}, phase {phase.name!r}: no reply from client(s) {missing}")
    for cid, reply in replies.items():
        if "error" in reply:
            raise FederationError(f"client-{cid} failed in round {rnd}, phase {phase.name!r}:\n{reply['error']}")
        if traffic is not None:
            traffic.add(cid, payload_nbytes(payloads[cid]), payload_nbytes(reply), float(reply.get("_seconds", 0.0)))
    return replies


def run_federation(cfg, transport: Transport, server, host: Host, plugin: Plugin,
                   on_round: Callable[[int, list[dict]], None], progress: Callable[[str], None] = lambda s: None) -> None:
    """Run setup, round-0 evaluation and ``cfg.rounds`` rounds; call ``on_round`` with
    the metric rows (one per participant) after each evaluation."""
    ids = transport.client_ids()
    expected = list(range(len(cfg.clients)))
    if sorted(ids) != expected:
        raise FederationError(f"connected clients {sorted(ids)} do not match the config's {expected}")
    config_text = cfg.to_toml()
    progress("setup: clients load their models")
    setup = _exchange(transport, SETUP, 0, {k: {"config": config_text} for k in ids}, None)
    host.server_setup(server, setup)
    on_round(0, _evaluate(cfg, transport, server, 0, RoundTraffic(), 0.0, progress))
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        traffic = RoundTraffic()
        steps = [(host, ph) for ph in host.phases(rnd)] + [(plugin, ph) for ph in plugin.phases(rnd)]
        for owner, phase in steps:
            progress(f"round {rnd}/{cfg.rounds}: {phase.name}")
            out = owner.server_send(phase.name, rnd, server, ids)
            replies = _exchange(transport, phase, rnd, out, traffic) if out else {}
            owner.server_receive(phase.name, rnd, replies, server)
            _count_nonfinite_steps(server)
        on_round(rnd, _evaluate(cfg, transport, server, rnd, traffic, time.perf_counter() - t0, progress))


def _count_nonfinite_steps(node) -> None:
    """Add the training steps skipped for a non-finite loss or gradient (in this process,
    since the last call) to the node's metrics row."""
    from lada.models.training import pop_nonfinite_steps

    n = pop_nonfinite_steps()
    if n:
        node.log_metric("nonfinite_steps", node.state.get("metrics", {}).get("nonfinite_steps", 0) + n)


def strict_json_row(row: dict) -> dict:
    """A metrics row with every non-finite float replaced by None (JSON null), so the
    file stays strict JSON that any reader accepts."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _evaluate(cfg, transport: Transport, server, rnd: int, traffic: RoundTraffic, round_seconds: float,
              progress: Callable[[str], None]) -> list[dict]:
    progress(f"round {rnd}/{cfg.rounds}: evaluate")
    replies = _exchange(transport, EVALUATE, rnd, {k: {} for k in transport.client_ids()}, None)
    t0 = time.perf_counter()
    correct, cached = _llm_correct(cfg, server)
    llm_row = {"round": rnd, "participant": "llm", "accuracy": sum(correct) / max(1, len(correct)),
               "n_test": len(correct), "bytes_up": sum(traffic.up.values()),
               "bytes_down": sum(traffic.down.values()), "seconds": round_seconds,
               "eval_seconds": time.perf_counter() - t0, "eval_cached": float(cached)}
    llm_row.update(_accuracy_by_domain(server.test_set, correct))
    llm_row.update(server.pop_metrics())
    server.save_state()
    rows = [llm_row]
    for k in sorted(replies):
        r = replies[k]
        row = {"round": rnd, "participant": f"client-{k}", "accuracy": float(r["accuracy"]), "n_test": int(r["n"]),
               "bytes_up": traffic.up.get(k, 0), "bytes_down": traffic.down.get(k, 0),
               "seconds": traffic.seconds.get(k, 0.0)}
        row.update({key[2:]: v for key, v in r.items() if key.startswith("m_")})
        rows.append(row)
    return rows


def _llm_correct(cfg, server) -> tuple[list[bool], bool]:
    """Per-example correctness of the LLM's greedy answers on its test set, and whether
    it was reused. Greedy decoding is deterministic, so while the weights are those of
    the last evaluation (hosts that never train the LLM: standalone, one-way CoT) the
    answers are reused instead of generated again. The key is the model version plus a
    checksum of the weights, which also catches a model changed in place without a save."""
    import torch

    from lada.models.generation import evaluate

    lm = server.model()
    with torch.no_grad():
        checksum = float(sum(p.detach().sum(dtype=torch.float64) for p in lm.model.parameters()))  # no fp64 copies
    key = [int(server.state.get("model_version", 0)), checksum, len(server.test_set)]
    last = server.state.get("llm_eval")
    if last and last.get("key") == key:
        return [bool(x) for x in last["correct"]], True
    res = evaluate(lm, server.test_set, cfg.generation)
    server.state["llm_eval"] = {"key": key, "correct": [bool(x) for x in res.correct]}
    return list(res.correct), False


def _accuracy_by_domain(examples, correct: list[bool]) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for ex, ok in zip(examples, correct):
        by.setdefault(ex.domain, []).append(ok)
    if len(by) < 2:
        return {}
    return {f"acc_{d}": sum(v) / len(v) for d, v in sorted(by.items())}


# ----------------------------------------------------------------------------- client side

def handle_message(phase: str, rnd: int, payload: Payload, node_config: dict[str, Any],
                   run_config: dict[str, Any]) -> Payload:
    """Everything a client does with one message. Errors come back as an ``error`` entry
    (with the traceback) so the server can fail the run with the client's reason."""
    t0 = time.perf_counter()
    try:
        reply = _handle(phase, rnd, payload, node_config, run_config)
        check_payload(reply, f"reply to {phase!r}")
    except Exception:  # noqa: BLE001 - the reason travels back to the server
        return {"error": traceback.format_exc(limit=20)}
    reply["_seconds"] = time.perf_counter() - t0
    return reply


def client_index(node_config: dict[str, Any]) -> int:
    if "partition-id" not in node_config:
        raise KeyError("node config has no 'partition-id': start the SuperNode with --node-config \"partition-id=K\"")
    return int(node_config["partition-id"])


def client_workspace(k: int, node_config: dict[str, Any], run_config: dict[str, Any]) -> Path:
    """Where client k keeps its state. A SuperNode on another machine names a local
    folder with ``--node-config "workspace=/path"``; otherwise the run directory is shared."""
    if node_config.get("workspace"):
        return Path(str(node_config["workspace"])) / str(run_config.get("run-name", "run")) / f"client-{k}"
    if not run_config.get("run-dir"):
        raise KeyError("run config has no 'run-dir' and the node config no 'workspace'")
    return Path(str(run_config["run-dir"])) / "nodes" / f"client-{k}"


def _handle(phase: str, rnd: int, payload: Payload, node_config: dict[str, Any], run_config: dict[str, Any]) -> Payload:
    from lada.protocol.node import ClientNode

    k = client_index(node_config)
    if phase == "hello":
        return {"partition_id": k}
    ws = client_workspace(k, node_config, run_config)
    if phase == "setup":
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "config.toml").write_text(payload["config"])
    cfg_file = ws / "config.toml"
    if not cfg_file.exists():
        raise FederationError(f"client-{k}: {cfg_file} missing; the server must send 'setup' first")
    cfg = _config_from_text(cfg_file.read_text())
    node = ClientNode(cfg, k, ws)
    if phase == "setup":
        lm = node.model()
        return {"n_train": len(node.train_set), "n_test": len(node.test_set),
                "params": int(sum(p.numel() for p in lm.model.parameters())),
                "model": node.model_cfg.name, "vocab_size": len(lm.tokenizer)}
    if phase == "evaluate":
        from lada.models.generation import evaluate

        res = evaluate(node.model(), node.test_set, cfg.generation)
        reply: Payload = {"accuracy": float(res.accuracy), "n": int(res.n)}
        reply.update({f"m_{name}": v for name, v in node.pop_metrics().items()})
        node.save_state()
        return reply
    from lada.hosts import make_host
    from lada.plugin import make_plugin

    plugin = make_plugin(cfg)
    host = make_host(cfg, plugin)
    owner = host if phase in {p.name for p in host.phases(rnd)} else plugin
    from lada.models.training import pop_nonfinite_steps

    pop_nonfinite_steps()  # count only this phase's steps
    reply = owner.client_handle(phase, rnd, payload, node)
    _count_nonfinite_steps(node)
    node.save_state()
    return reply


_CONFIG_CACHE: dict[str, Any] = {}


def _config_from_text(text: str):
    import tomllib

    from lada.config import config_from_dict

    if text not in _CONFIG_CACHE:
        _CONFIG_CACHE[text] = config_from_dict(tomllib.loads(text), "config sent by the server")
    return _CONFIG_CACHE[text]


# ----------------------------------------------------------------------------- server side entry

def serve(cfg, transport: Transport, progress: Callable[[str], None] = print) -> list[dict]:
    """What the server does for a whole run: build its node, host and plug-in, run the
    rounds and append every metric row to ``<run_dir>/metrics.jsonl``. Returns the rows."""
    import json

    from lada.hosts import make_host
    from lada.plugin import make_plugin
    from lada.protocol.node import ServerNode, server_workspace

    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    server = ServerNode(cfg, server_workspace(cfg))
    plugin = make_plugin(cfg)
    host = make_host(cfg, plugin)
    all_rows: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl"

    def on_round(rnd: int, rows: list[dict]) -> None:
        with metrics_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(strict_json_row(row), sort_keys=True, allow_nan=False) + "\n")
        all_rows.extend(rows)
        accs = "  ".join(f"{r['participant']}={r['accuracy']:.3f}" for r in rows)
        progress(f"round {rnd}: {accs}")

    run_federation(cfg, transport, server, host, plugin, on_round, progress)
    if not server.model_dir.exists():  # hosts that never update the LLM: keep its checkpoint with the run too
        server.save_model(server.model())
    (run_dir / "DONE").write_text("ok\n")
    return all_rows
