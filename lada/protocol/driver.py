"""The federation's round loop, independent of any transport.

`run_federation` drives setup, every round's host phases and the
evaluation, on the server side; `handle_message` is everything a client does with one
message. Engines supply a `Transport` (Flower Grid messages, or direct calls for the
inline debug engine) and never look inside payloads.
"""

from __future__ import annotations

import math
import time
import traceback
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from lada import registry
from lada.protocol.host import PLUGIN_PREFIX, Host, Phase, Plugin
from lada.threads import client_workers, fit_threads
from lada.protocol.payload import Payload, check_payload, payload_nbytes

SETUP = Phase("setup", "query")
EVALUATE = Phase("evaluate", "evaluate")
# A client's evaluation rides on its last message of a round (round 0: on 'setup'): the
# server marks that message with EVALUATE_FLAG and the client adds its evaluation reply,
# each key prefixed with EVAL_PREFIX. In deployment every message starts a process
# (import torch, load data and model), so this saves one per client and round. A client
# that leaves the evaluation out is asked with a separate 'evaluate' message.
EVALUATE_FLAG = "_evaluate"
EVAL_PREFIX = "_eval_"


class FederationError(RuntimeError):
    """A participant failed; the message names it, the phase and its reason."""


class Transport(Protocol):
    def client_ids(self) -> list[int]: ...

    def exchange(self, phase: Phase, rnd: int, payloads: dict[int, Payload]) -> dict[int, Payload]: ...


@dataclass
class RoundTraffic:
    """Bytes per client and direction in one round (down = server -> client); of those,
    the bytes of plug-in entries (keys starting with ``PLUGIN_PREFIX``) again apart."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    plugin_down: dict[int, int] = field(default_factory=dict)
    plugin_up: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def add(self, cid: int, down: Payload, up: Payload, seconds: float) -> None:
        for total, part, p in ((self.down, self.plugin_down, down), (self.up, self.plugin_up, up)):
            total[cid] = total.get(cid, 0) + payload_nbytes(p)
            part[cid] = part.get(cid, 0) + payload_nbytes({k: v for k, v in p.items() if k.startswith(PLUGIN_PREFIX)})
        self.seconds[cid] = self.seconds.get(cid, 0.0) + seconds


def _exchange(transport: Transport, phase: Phase, rnd: int, payloads: dict[int, Payload], traffic: RoundTraffic | None,
              failures: dict[int, str] | None = None, bases: dict[int, int] | None = None,
              attempt: str = "", evaluations: dict[int, Payload] | None = None) -> dict[int, Payload]:
    """Send one phase's payloads and return the good replies.

    A client that answers with an error or not at all fails the phase: with
    ``failures`` given it is recorded there (client -> reason) and left out of the
    result, otherwise the run stops. ``bases`` adds each client's last committed round
    (see `lada.protocol.commit`) to its payload, with ``attempt`` (which server process
    runs the round); neither is counted as traffic. With ``evaluations`` given, each
    client is asked to evaluate after the phase, and the evaluation replies go there
    (client -> reply), out of the phase's reply and its traffic."""
    for cid, p in payloads.items():
        check_payload(p, f"{phase.name} payload for client-{cid}")
    control: Payload = {EVALUATE_FLAG: True} if evaluations is not None else {}
    sent = {cid: (dict(p, _base=int(bases[cid]), _attempt=attempt, **control) if bases is not None else dict(p, **control))
            for cid, p in payloads.items()}
    replies = transport.exchange(phase, rnd, sent)
    good: dict[int, Payload] = {}
    for cid in sorted(payloads):
        reply = replies.get(cid)
        if reply is not None and "error" not in reply:
            evaluation = _split_evaluation(reply)
            if evaluations is not None and evaluation:
                evaluations[cid] = evaluation
            good[cid] = reply
            if traffic is not None:
                traffic.add(cid, payloads[cid], reply, float(reply.get("_seconds", 0.0)))
            continue
        if reply is None:
            full = short = f"round {rnd}, phase {phase.name!r}: no reply from client(s) [{cid}]"
        else:
            full = f"client-{cid} failed in round {rnd}, phase {phase.name!r}:\n{reply['error']}"
            short = f"phase {phase.name!r}: {_last_line(str(reply['error']))}"
        if failures is None:
            raise FederationError(full)
        failures[cid] = short
    return good


def _split_evaluation(reply: Payload) -> Payload:
    """Take the evaluation a client added to a phase's reply out of it (keys without
    EVAL_PREFIX); empty when there is none."""
    keys = [k for k in reply if k.startswith(EVAL_PREFIX)]
    return {k[len(EVAL_PREFIX):]: reply.pop(k) for k in keys}


def _last_line(text: str) -> str:
    """The exception line of a traceback, without the exception's module path."""
    import re

    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[-1]) if lines else "(no reason given)"


class _Round:
    """Who takes part in one round, and who dropped out and why."""

    def __init__(self, n: int, min_clients: int) -> None:
        self.n = n
        self.min_clients = min_clients
        self.failures: dict[int, str] = {}
        self.active: list[int] = []

    def drop_failed(self, rnd: int, phase: str, progress: Callable[[str], None]) -> None:
        for k in [k for k in self.active if k in self.failures]:
            progress(f"round {rnd}: client-{k} dropped out ({self.failures[k]}); it rejoins from its last committed state")
        self.active = [k for k in self.active if k not in self.failures]
        if len(self.active) < self.min_clients:
            why = "; ".join(f"client-{k}: {r}" for k, r in sorted(self.failures.items())) or "none connected"
            raise FederationError(
                f"round {rnd}, phase {phase!r}: only {len(self.active)} of {self.n} clients left "
                f"({', '.join(f'client-{k}' for k in self.active) or 'none'}), fewer than "
                f"engine.min_clients = {self.min_clients}. Failures: {why}")


def run_federation(cfg, transport: Transport, server, host: Host, plugin: Plugin,
                   on_round: Callable[[int, list[dict]], None], progress: Callable[[str], None] = lambda s: None,
                   committed: dict[str, Any] | None = None,
                   on_commit: Callable[[int, dict[int, int]], None] = lambda rnd, clients: None) -> None:
    """Run setup, round-0 evaluation and ``cfg.rounds`` rounds; call ``on_round`` with
    the metric rows (one per participant) after each evaluation, then ``on_commit``.

    ``committed`` (a commit record, `lada.protocol.commit.read_commit`) resumes after
    its round. A round goes on with the clients that answered each phase as long as at
    least ``engine.min_clients`` (0: all) did; the others are recorded as failed and
    rejoin in a later round from their last committed state."""
    from lada.protocol.commit import INITIAL

    n = len(cfg.clients)
    min_clients = int(getattr(cfg.engine, "min_clients", 0) or n)
    config_text = cfg.to_toml()
    bases = {k: INITIAL for k in range(n)}  # each client's last committed round
    first = 0
    if committed is not None:
        bases.update({int(k): int(r) for k, r in committed.get("clients", {}).items()})
        first = int(committed["round"]) + 1
    ready: set[int] = set()  # clients that took 'setup' from this server process
    attempt = uuid.uuid4().hex  # a resumed round is another attempt: clients drop the first one's work

    def start_round(rnd: int, evaluations: dict[int, Payload] | None = None) -> _Round:
        state = _Round(n, min_clients)
        ids = [k for k in transport.client_ids() if 0 <= k < n]
        for k in range(n):
            if k not in ids:
                state.failures[k] = "not connected"
        new = [k for k in ids if k not in ready]
        if new:
            progress(f"setup: client(s) {new} load their models")
            replies = _exchange(transport, SETUP, rnd, {k: {"config": config_text} for k in new}, None,
                                state.failures, bases, attempt, evaluations)
            if replies:
                host.server_setup(server, replies)
            ready.update(replies)
        state.active = [k for k in ids if k in ready and k not in state.failures]
        state.drop_failed(rnd, "setup", progress)
        return state

    def finish_round(rnd: int, state: _Round, traffic: RoundTraffic, seconds: float,
                     evaluations: dict[int, Payload]) -> None:
        rows = _evaluate(cfg, transport, server, rnd, traffic, seconds, progress, state, bases, attempt, evaluations)
        for k in state.failures:
            ready.discard(k)  # a client that failed gets 'setup' again when it is back
        done = {k: rnd for k in state.active}
        bases.update(done)
        on_round(rnd, rows)
        on_commit(rnd, dict(bases))

    if first == 0:
        evaluations: dict[int, Payload] = {}
        state = start_round(0, evaluations)
        finish_round(0, state, RoundTraffic(), 0.0, evaluations)
    for rnd in range(max(1, first), cfg.rounds + 1):
        t0 = time.perf_counter()
        traffic = RoundTraffic()
        state = start_round(rnd)
        evaluations = {}
        phases = host.phases(rnd)
        for i, phase in enumerate(phases):
            progress(f"round {rnd}/{cfg.rounds}: {phase.name} ({len(state.active)} client(s))")
            fit_threads()  # the server computes alone while clients wait, and vice versa
            t_phase = time.perf_counter()
            out = host.server_send(phase.name, rnd, server, list(state.active))
            out = {k: p for k, p in out.items() if k in state.active}
            last = evaluations if i == len(phases) - 1 else None  # a client's last message of the round
            replies = _exchange(transport, phase, rnd, out, traffic, state.failures, bases, attempt, last) if out else {}
            state.drop_failed(rnd, phase.name, progress)
            host.server_receive(phase.name, rnd, replies, server)
            server.log_metric(f"phase_{phase.name}_seconds", time.perf_counter() - t_phase)
            _count_nonfinite_steps(server)
        finish_round(rnd, state, traffic, time.perf_counter() - t0 - _evaluation_wall(transport, evaluations),
                     evaluations)


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


def _evaluation_wall(transport: Transport, evaluations: dict[int, Payload]) -> float:
    """Wall-clock seconds the clients' evaluations riding on a phase added to it: the
    longest one where clients run side by side, their sum where the transport runs them
    one after another (the inline engine)."""
    seconds = [float(e.get("seconds", 0.0)) for e in evaluations.values()]
    if not seconds:
        return 0.0
    return sum(seconds) if getattr(transport, "sequential", False) else max(seconds)


def _evaluate(cfg, transport: Transport, server, rnd: int, traffic: RoundTraffic, round_seconds: float,
              progress: Callable[[str], None], state: _Round, bases: dict[int, int], attempt: str,
              evaluations: dict[int, Payload]) -> list[dict]:
    """Evaluate every participant still in the round (clients whose evaluation came with
    their last message are not asked again), commit the server's state of the round,
    and return the metric rows (failed clients get a row saying why)."""
    from lada.protocol.commit import prune, snapshot

    ask = [k for k in state.active if k not in evaluations]
    t_clients = time.perf_counter()
    replies = {k: e for k, e in evaluations.items() if k in state.active}
    if ask:
        progress(f"round {rnd}/{cfg.rounds}: evaluate ({len(ask)} client(s))")
        fit_threads()
        replies.update(_exchange(transport, EVALUATE, rnd, {k: {} for k in ask}, None, state.failures, bases, attempt))
        state.drop_failed(rnd, "evaluate", progress)
    t0 = time.perf_counter()
    correct, cached, chain = _llm_correct(cfg, server)
    llm_row = {"round": rnd, "participant": "llm", "accuracy": sum(correct) / max(1, len(correct)),
               "n_test": len(correct), "bytes_up": sum(traffic.up.values()),
               "bytes_down": sum(traffic.down.values()), "lada_bytes_up": sum(traffic.plugin_up.values()),
               "lada_bytes_down": sum(traffic.plugin_down.values()), "seconds": round_seconds,
               "eval_seconds": time.perf_counter() - t0, "eval_cached": float(cached),
               "clients_eval_seconds": t0 - t_clients + _evaluation_wall(transport, evaluations)}
    llm_row.update(_accuracy_by_domain(server.test_set, correct))
    if chain is not None:
        llm_row["chain_right"] = chain
    llm_row.update(server.pop_metrics())
    server.save_state()
    snapshot(server.workspace, rnd)
    prune(server.workspace, rnd)
    rows = [llm_row]
    for k in range(state.n):
        if k in replies:
            r = replies[k]
            row = {"round": rnd, "participant": f"client-{k}", "accuracy": float(r["accuracy"]), "n_test": int(r["n"]),
                   "bytes_up": traffic.up.get(k, 0), "bytes_down": traffic.down.get(k, 0),
                   "lada_bytes_up": traffic.plugin_up.get(k, 0), "lada_bytes_down": traffic.plugin_down.get(k, 0),
                   "seconds": traffic.seconds.get(k, 0.0)}
            if r.get("chain_right") is not None:
                row["chain_right"] = float(r["chain_right"])
            row.update({key[2:]: v for key, v in r.items() if key.startswith("m_")})
        else:
            row = {"round": rnd, "participant": f"client-{k}", "accuracy": None, "status": "missing",
                   "reason": state.failures.get(k, "left out")}
        rows.append(row)
    # Every row says who took part in this round and who did not, and why.
    took_part = [f"client-{k}" for k in sorted(replies)]
    failed = {f"client-{k}": why for k, why in sorted(state.failures.items())}
    for row in rows:
        row["participants"] = took_part
        row["failures"] = failed
    return rows


def _llm_correct(cfg, server) -> tuple[list[bool], bool, float | None]:
    """Per-example correctness of the LLM's greedy answers on its test set, whether it
    was reused, and on a linked task the share of its chains that reached the gold value
    (``EvalResult.chain_right``). Greedy decoding is deterministic, so while the weights are those of
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
    if last and last.get("key") == key and "chain_right" in last:
        return [bool(x) for x in last["correct"]], True, last["chain_right"]
    res = evaluate(lm, server.test_set, cfg.generation)
    server.state["llm_eval"] = {"key": key, "correct": [bool(x) for x in res.correct], "chain_right": res.chain_right}
    return list(res.correct), False, res.chain_right


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
        _forget_models()  # a model trained in place by the failed phase must not be reused
        return {"error": traceback.format_exc(limit=20)}
    # the phase's own seconds: an evaluation riding on it reports its own
    reply["_seconds"] = time.perf_counter() - t0 - float(reply.get(EVAL_PREFIX + "seconds", 0.0))
    return reply


def _forget_models() -> None:
    from lada.protocol import node

    node._MODEL_CACHE.clear()


def client_index(node_config: dict[str, Any]) -> int:
    if "partition-id" not in node_config:
        raise KeyError("node config has no 'partition-id': start the SuperNode with --node-config \"partition-id=K\"")
    return int(node_config["partition-id"])


def client_workspace(k: int, node_config: dict[str, Any], run_config: dict[str, Any]) -> Path:
    """Where client k keeps its state. A SuperNode on another machine names a local
    folder with ``--node-config "workspace=/path"``, where each run keeps its own
    folder under its run id (unique per submission, so runs that share a name never
    share state); otherwise the run directory is shared."""
    if node_config.get("workspace"):
        run_id = str(run_config.get("run-id", "") or "")
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise KeyError(f"run config has no valid 'run-id' ({run_id!r}); start runs with `lada run`")
        return Path(str(node_config["workspace"])) / run_id / f"client-{k}"
    if not run_config.get("run-dir"):
        raise KeyError("run config has no 'run-dir' and the node config no 'workspace'")
    return Path(str(run_config["run-dir"])) / "nodes" / f"client-{k}"


def _handle(phase: str, rnd: int, payload: Payload, node_config: dict[str, Any], run_config: dict[str, Any]) -> Payload:
    from lada.protocol.commit import sync_working
    from lada.protocol.node import ClientNode

    k = client_index(node_config)
    if phase == "hello":
        return {"partition_id": k}
    base = payload.pop("_base", None)  # the last round of this client the server committed
    attempt = str(payload.pop("_attempt", ""))
    evaluate_after = bool(payload.pop(EVALUATE_FLAG, False)) and phase != EVALUATE.name
    ws = client_workspace(k, node_config, run_config)
    if phase == "setup":
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "config.toml").write_text(payload["config"])
    cfg_file = ws / "config.toml"
    if not cfg_file.exists():
        raise FederationError(f"client-{k}: {cfg_file} missing; the server must send 'setup' first")
    cfg = _config_from_text(cfg_file.read_text())
    if base is not None:
        sync_working(ws, int(base), rnd, phase, attempt)
    fit_threads(client_workers(cfg))
    # A SuperNode on its own machine names its part of the data split with
    # --node-config "data-dir=/path"; otherwise the run's [data] split_dir is used.
    data_dir = node_config.get("data-dir") or None
    node = ClientNode(cfg, k, ws, data_dir=data_dir)
    if phase == EVALUATE.name:
        return _evaluate_client(node, ws, rnd, base)
    if phase == SETUP.name:
        lm = node.model()
        reply: Payload = {"n_train": len(node.train_set), "n_test": len(node.test_set),
                          "params": int(sum(p.numel() for p in lm.model.parameters())),
                          "model": node.model_cfg.name, "vocab_size": len(lm.tokenizer)}
    else:
        host = registry.make_host(cfg, registry.make_plugin(cfg))
        from lada.models.training import pop_nonfinite_steps

        pop_nonfinite_steps()  # count only this phase's steps
        reply = host.client_handle(phase, rnd, payload, node)
        _count_nonfinite_steps(node)
        node.save_state()
    if evaluate_after:  # exactly as a separate 'evaluate' message of this round would
        t0 = time.perf_counter()
        if base is not None:
            sync_working(ws, int(base), rnd, EVALUATE.name, attempt)
        node = ClientNode(cfg, k, ws, data_dir=data_dir)  # the state as saved
        evaluation = _evaluate_client(node, ws, rnd, base)
        evaluation["seconds"] = time.perf_counter() - t0
        reply.update({EVAL_PREFIX + key: v for key, v in evaluation.items()})
    return reply


def _evaluate_client(node, ws: Path, rnd: int, base: int | None) -> Payload:
    """The client's test accuracy and the metrics it logged this round; its state of the
    round is saved (and, under a commit base, snapshotted until the server commits a
    later round)."""
    from lada.models.generation import evaluate
    from lada.protocol.commit import snapshot

    res = evaluate(node.model(), node.test_set, node.cfg.generation)
    reply: Payload = {"accuracy": float(res.accuracy), "n": int(res.n)}
    if res.chain_right is not None:
        reply["chain_right"] = float(res.chain_right)
    reply.update({f"m_{name}": v for name, v in node.pop_metrics().items()})
    node.save_state()
    if base is not None:
        snapshot(ws, rnd)
    return reply


_CONFIG_CACHE: dict[str, Any] = {}


def _config_from_text(text: str):
    import tomllib

    from lada.config import config_from_dict

    if text not in _CONFIG_CACHE:
        _CONFIG_CACHE[text] = config_from_dict(tomllib.loads(text), "config sent by the server")
    return _CONFIG_CACHE[text]


# ----------------------------------------------------------------------------- server side entry

def serve(cfg, transport: Transport, progress: Callable[[str], None] = print, resume: bool = False,
          run_id: str = "") -> list[dict]:
    """What the server does for a whole run: build its node, host and plug-in, run the
    rounds and append every metric row to ``<run_dir>/metrics.jsonl``; each round is
    committed to ``<run_dir>/commit.json`` after its rows. With ``resume`` the run
    continues after the last committed round (rows of later rounds are dropped and the
    server's state goes back to that round). Returns the rows of this call."""
    import json

    from lada.protocol.commit import read_commit, restore, write_commit
    from lada.protocol.node import ServerNode, server_workspace

    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    committed = read_commit(run_dir) if resume else None
    if resume:
        if committed is None:
            raise FederationError(f"{run_dir}: nothing to resume, no round was committed (no commit.json)")
        run_id = run_id or str(committed.get("run_id", ""))
        restore(server_workspace(cfg), int(committed["round"]))
        _truncate_metrics(metrics_path, int(committed["round"]))
        progress(f"resuming after committed round {committed['round']}")
    else:
        metrics_path.unlink(missing_ok=True)
    server = ServerNode(cfg, server_workspace(cfg))
    plugin = registry.make_plugin(cfg)
    host = registry.make_host(cfg, plugin)
    all_rows: list[dict] = []

    def on_round(rnd: int, rows: list[dict]) -> None:
        with metrics_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(strict_json_row(row), sort_keys=True, allow_nan=False) + "\n")
        all_rows.extend(rows)
        accs = "  ".join(f"{r['participant']}={r['accuracy']:.3f}" if r.get("accuracy") is not None
                         else f"{r['participant']}=missing" for r in rows)
        progress(f"round {rnd}: {accs}")

    def on_commit(rnd: int, clients: dict[int, int]) -> None:
        write_commit(run_dir, {"run_id": run_id, "round": rnd, "rounds": cfg.rounds,
                               "clients": {str(k): r for k, r in sorted(clients.items())}})

    run_federation(cfg, transport, server, host, plugin, on_round, progress, committed, on_commit)
    if not server.model_dir.exists():  # hosts that never update the LLM: keep its checkpoint with the run too
        server.save_model(server.model())
    (run_dir / "DONE").write_text("ok\n")
    return all_rows


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Keep only the rows of rounds up to ``last_round`` (later ones were not committed)."""
    import json

    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["round"] <= last_round]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)
