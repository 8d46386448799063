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
    ``partition-id`` is k; the mapping is learned with a ``hello`` message."""

    def __init__(self, grid: Grid, num_clients: int, reply_timeout_s: float,
                 connect_timeout_s: float = 300.0, log: Callable[[str], None] = print) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.reply_timeout_s = reply_timeout_s
        self.log = log
        self.nodes: dict[int, int] = {}  # client index -> Flower node id
        self._discover(connect_timeout_s)

    def _discover(self, connect_timeout_s: float) -> None:
        deadline = time.monotonic() + connect_timeout_s
        node_ids = sorted(self.grid.get_node_ids())
        while len(node_ids) < self.num_clients:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(node_ids)} of {self.num_clients} SuperNodes connected after {connect_timeout_s:.0f}s; "
                    f"start one SuperNode per client with --node-config \"partition-id=K num-partitions={self.num_clients}\"")
            time.sleep(1.0)
            node_ids = sorted(self.grid.get_node_ids())
        self.log(f"{len(node_ids)} node(s) connected; asking who they are")
        replies = self._send(HELLO, 0, {nid: {} for nid in node_ids}, {nid: f"node {nid}" for nid in node_ids})
        for nid, reply in replies.items():
            k = int(reply["partition_id"])
            if not 0 <= k < self.num_clients:
                raise FederationError(f"node {nid} has partition-id {k}, outside 0..{self.num_clients - 1}")
            if k in self.nodes:
                raise FederationError(f"nodes {self.nodes[k]} and {nid} both have partition-id {k}")
            self.nodes[k] = nid
        missing = sorted(set(range(self.num_clients)) - set(self.nodes))
        if missing:
            raise FederationError(f"no connected node has partition-id {missing}")
        self.log("clients: " + ", ".join(f"client-{k}=node {n}" for k, n in sorted(self.nodes.items())))

    def client_ids(self) -> list[int]:
        return sorted(self.nodes)

    def exchange(self, phase: Phase, rnd: int, payloads: dict[int, Payload]) -> dict[int, Payload]:
        by_node = {self.nodes[k]: p for k, p in payloads.items()}
        names = {self.nodes[k]: f"client-{k} (node {self.nodes[k]})" for k in payloads}
        replies = self._send(phase, rnd, by_node, names)
        node_to_client = {n: k for k, n in self.nodes.items()}
        return {node_to_client[n]: r for n, r in replies.items()}

    def _send(self, phase: Phase, rnd: int, by_node: dict[int, Payload], names: dict[int, str]) -> dict[int, Payload]:
        """One message per node, wait for all replies; node id -> reply payload."""
        meta = {"round": rnd, "phase": phase.name}
        ttl = max(DEFAULT_TTL, self.reply_timeout_s + 60.0)
        messages = [Message(payload_to_recorddict(p, meta), dst_node_id=nid,
                            message_type=f"{phase.kind}.{phase.name}", group_id=str(rnd), ttl=ttl)
                    for nid, p in by_node.items()]
        where = f"round {rnd}, phase {phase.name!r}"
        replies: dict[int, Payload] = {}
        for msg in self.grid.send_and_receive(messages, timeout=self.reply_timeout_s):
            nid = msg.metadata.src_node_id
            who = names.get(nid, f"node {nid}")
            if msg.has_error():
                raise FederationError(f"{who} failed in {where}: Flower error {msg.error.code}: {msg.error.reason}")
            payload, _ = recorddict_to_payload(msg.content)
            if "error" in payload:
                raise FederationError(f"{who} failed in {where}:\n{payload['error']}")
            replies[nid] = payload
        missing = [names[n] for n in by_node if n not in replies]
        if missing:
            raise FederationError(f"{where}: no reply within {self.reply_timeout_s:.0f}s from {', '.join(missing)}")
        return replies


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
                                  connect_timeout_s=float(run_config.get("connect-timeout-s", 300.0)), log=log)
        serve_fn(cfg, transport, progress=log)
    except BaseException as e:
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
