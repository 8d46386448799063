"""The Flower ServerApp: load the run's config, find the clients, run the protocol.

All round logic lives in `lada.protocol.driver.serve`; this module only provides the
transport over a Flower Grid (one Message per client and phase) and the logging.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from flwr.app import Context, Message
from flwr.app.constants import DEFAULT_TTL
from flwr.serverapp import Grid, ServerApp

from lada.engines.records import payload_to_recorddict, recorddict_to_payload
from lada.protocol.driver import FederationError, serve
from lada.protocol.host import Phase
from lada.protocol.payload import Payload

HELLO = Phase("hello", "query")
# Printed by the ServerApp so a launcher that only sees the streamed log (a remote
# SuperLink) can tell success from failure.
OK_MARKER = "lada-run-status: ok"
FAILED_MARKER = "lada-run-status: failed"


class GridTransport:
    """Moves payloads as Flower Messages. Client index k is the node whose
    ``partition-id`` is k; the mapping is learned with a ``hello`` message, and
    learned again for nodes that connect later (a SuperNode that restarts gets a new
    node id). A reply is matched to its client by the id of the message it answers,
    since Flower's own error replies (a node that died) come from the SuperLink.
    Failed or missing replies come back as ``error`` payloads: the protocol decides
    whether the round can go on without that client."""

    def __init__(self, grid: Grid, num_clients: int, reply_timeout_s: float,
                 connect_timeout_s: float = 300.0, log: Callable[[str], None] = print,
                 min_clients: int = 0, hello_timeout_s: float = 120.0) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.reply_timeout_s = reply_timeout_s
        self.hello_timeout_s = min(hello_timeout_s, reply_timeout_s)
        self.log = log
        self.nodes: dict[int, int] = {}  # client index -> Flower node id
        self._discover(connect_timeout_s, min_clients or num_clients)

    def _discover(self, connect_timeout_s: float, min_clients: int) -> None:
        """Wait until every client is connected (or, at the deadline, at least
        ``min_clients``), then learn who is who."""
        deadline = time.monotonic() + connect_timeout_s
        node_ids = sorted(self.grid.get_node_ids())
        while len(node_ids) < self.num_clients:
            if time.monotonic() > deadline:
                if len(node_ids) >= min_clients:
                    break
                raise FederationError(
                    f"only {len(node_ids)} of {self.num_clients} SuperNodes connected after {connect_timeout_s:.0f}s; "
                    f"start one SuperNode per client with --node-config \"partition-id=K num-partitions={self.num_clients}\"")
            time.sleep(1.0)
            node_ids = sorted(self.grid.get_node_ids())
        self.log(f"{len(node_ids)} node(s) connected; asking who they are")
        self._learn(node_ids, strict=True)

    def _learn(self, node_ids: list[int], strict: bool) -> None:
        replies, errors = self._send(HELLO, 0, {nid: {} for nid in node_ids}, {nid: f"node {nid}" for nid in node_ids},
                                     self.hello_timeout_s)
        for nid, reply in sorted(replies.items()):
            k = int(reply["partition_id"])
            if not 0 <= k < self.num_clients:
                raise FederationError(f"node {nid} has partition-id {k}, outside 0..{self.num_clients - 1}")
            if k in self.nodes and self.nodes[k] != nid and self.nodes[k] in node_ids and strict:
                raise FederationError(f"nodes {self.nodes[k]} and {nid} both have partition-id {k}")
            self.nodes[k] = nid  # a client that came back on a new node
        for nid, why in errors.items():
            self.log(f"node {nid} did not say who it is: {why}")
        self.log("clients: " + ", ".join(f"client-{k}=node {n}" for k, n in sorted(self.nodes.items())))

    def client_ids(self) -> list[int]:
        """Clients whose node is connected now (new nodes are asked who they are)."""
        node_ids = sorted(self.grid.get_node_ids())
        new = [nid for nid in node_ids if nid not in self.nodes.values()]
        if new:
            self._learn(new, strict=False)
        return sorted(k for k, nid in self.nodes.items() if nid in node_ids)

    def exchange(self, phase: Phase, rnd: int, payloads: dict[int, Payload]) -> dict[int, Payload]:
        by_node = {self.nodes[k]: p for k, p in payloads.items() if k in self.nodes}
        names = {self.nodes[k]: f"client-{k}" for k in payloads if k in self.nodes}
        replies, errors = self._send(phase, rnd, by_node, names, self.reply_timeout_s)
        node_to_client = {n: k for k, n in self.nodes.items()}
        out = {node_to_client[n]: r for n, r in replies.items()}
        out.update({node_to_client[n]: {"error": why} for n, why in errors.items()})
        return out

    def _send(self, phase: Phase, rnd: int, by_node: dict[int, Payload], names: dict[int, str],
              timeout_s: float) -> tuple[dict[int, Payload], dict[int, str]]:
        """One message per node; wait for the replies up to ``timeout_s``. Returns
        (node id -> reply payload, node id -> why it has none)."""
        meta = {"round": rnd, "phase": phase.name}
        ttl = max(DEFAULT_TTL, timeout_s + 60.0)
        nids = list(by_node)
        messages = [Message(payload_to_recorddict(by_node[nid], meta), dst_node_id=nid,
                            message_type=f"{phase.kind}.{phase.name}", group_id=str(rnd), ttl=ttl)
                    for nid in nids]
        msg_ids = list(self.grid.push_messages(messages)) if messages else []
        pending = {mid: nid for mid, nid in zip(msg_ids, nids) if mid}
        errors = {nid: "the SuperLink did not accept the message" for mid, nid in zip(msg_ids, nids) if not mid}
        replies: dict[int, Payload] = {}
        where = f"round {rnd}, phase {phase.name!r}"
        t0 = time.monotonic()
        last_note = t0
        while pending and time.monotonic() - t0 < timeout_s:
            for msg in self.grid.pull_messages(list(pending)):
                nid = pending.pop(msg.metadata.reply_to_message_id, None)
                if nid is None:
                    continue
                who = names.get(nid, f"node {nid}")
                elapsed = time.monotonic() - t0
                if msg.has_error():
                    errors[nid] = f"Flower error {msg.error.code}: {msg.error.reason}"
                    self.log(f"{where}: {who} failed after {elapsed:.0f}s ({errors[nid]})")
                    continue
                payload, _ = recorddict_to_payload(msg.content)
                if "error" in payload:
                    errors[nid] = str(payload["error"])
                    self.log(f"{where}: {who} failed after {elapsed:.0f}s")
                    continue
                replies[nid] = payload
                if phase is not HELLO and len(by_node) > 1 and elapsed >= 2.0:  # only phases long enough to wonder
                    self.log(f"{where}: {who} done in {elapsed:.1f}s ({len(replies)}/{len(by_node)})")
            if pending:
                if time.monotonic() - last_note > 60.0:  # a long phase: say who we are waiting for
                    last_note = time.monotonic()
                    waiting = ", ".join(names.get(n, f"node {n}") for n in pending.values())
                    self.log(f"{where}: waiting for {waiting} ({last_note - t0:.0f}s)")
                time.sleep(0.5)
        for nid in pending.values():
            errors[nid] = f"no reply within {timeout_s:.0f}s (engine.reply_timeout_s)"
        return replies, errors


def load_run_config(run_config: dict[str, Any]):
    """The RunConfig of this run: ``config-text`` (sent along when the SuperLink is
    another machine) or else the file at ``config-path``."""
    import tomllib

    from lada.config import config_from_dict, load_config

    text = str(run_config.get("config-text", "") or "")
    if text:
        return config_from_dict(tomllib.loads(text), "run config 'config-text'")
    path = str(run_config.get("config-path", "") or "")
    if not path:
        raise FederationError("the run config has neither 'config-path' nor 'config-text': "
                              "start runs with `lada run` or pass --run-config 'config-path=\"/abs/config.toml\"'")
    return load_config(path)


def _logger(log_file: Path | None) -> Callable[[str], None]:
    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} [server] {line}"
        print(stamped, flush=True)
        if log_file is not None:
            with log_file.open("a") as f:
                f.write(stamped + "\n")

    return log


def run_server(grid: Grid, context: Context, serve_fn: Callable = serve) -> None:
    """Body of the ServerApp: load the config, connect the clients, run ``serve_fn``
    (the protocol's `serve`; tests pass their own), and log how it ended."""
    run_config = dict(context.run_config)
    log = _logger(None)
    try:
        cfg = load_run_config(run_config)
        run_dir = cfg.resolved_run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        log = _logger(run_dir / "server.log")
        log(f"run {cfg.name!r}: host={cfg.host_name} plugin={cfg.plugin_name} clients={len(cfg.clients)} "
            f"rounds={cfg.rounds} run_dir={run_dir}")
        transport = GridTransport(grid, len(cfg.clients), cfg.engine.reply_timeout_s,
                                  connect_timeout_s=float(run_config.get("connect-timeout-s", 300.0)), log=log,
                                  min_clients=int(getattr(cfg.engine, "min_clients", 0)))
        serve_fn(cfg, transport, progress=log, resume=bool(run_config.get("resume")),
                 run_id=str(run_config.get("run-id", "")))
    except BaseException as e:
        if isinstance(e, SystemExit):  # `flwr stop` (the launcher was interrupted): no traceback to read
            log("the run was stopped (flwr stop)")
        else:
            for line in traceback.format_exc().rstrip().splitlines():
                log(line)
        log(f"{FAILED_MARKER}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        sys.stdout.flush()
        raise
    log(OK_MARKER)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
