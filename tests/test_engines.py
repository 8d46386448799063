"""Engine tests: the inline transport, and real Flower runs (simulation and a local
deployment of SuperLink + SuperNode processes) of a minimal "echo" app, plus full
runs of configs/tiny-test.toml when the model stack is importable.

The echo app (below) replaces the protocol's `serve` by one exchange, so launchers,
the Grid transport, ClientApp dispatch, records on the wire and error propagation
are tested without training models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

import lada.registry
from lada.config import DataConfig, ModelConfig, RunConfig
from lada.engines import launch
from lada.engines.launch import EngineError, InlineTransport, run_engine
from lada.engines.local import LocalFederation, federation_down, federation_up

ECHO_APP = '''\
"""Echo app for lada's engine tests (written by tests/test_engines.py)."""
from __future__ import annotations

import json

import numpy as np

import lada.registry
from lada.engines.client_app import PhaseClientApp
from lada.engines.server_app import ServerApp, run_server
from lada.protocol.driver import _exchange
from lada.protocol.host import Host, Phase

lada.registry.HOSTS["echo"] = "engine_echo_app:EchoHost"

ECHO = Phase("echo", "train")


class EchoHost(Host):
    name = "echo"

    def phases(self, rnd: int) -> list[Phase]:
        return [ECHO]

    def client_handle(self, phase, rnd, payload, client):
        if payload.get("fail_on") == client.index:
            raise RuntimeError(f"echo host: deliberate failure on client-{client.index}")
        return {"k": client.index, "x2": payload["x"] * 2, "ids": payload["ids"][::-1],
                "text": payload["text"][::-1], "round": rnd, "flags": [True, False], "empty": []}


def echo_serve(cfg, transport, progress=print, **_):
    """Write each client's config (what 'setup' would do), run one echo exchange and
    record the replies in <run_dir>/echo.json, then mark the run done."""
    run_dir = cfg.resolved_run_dir()
    for k in transport.client_ids():
        ws = run_dir / "nodes" / f"client-{k}"
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "config.toml").write_text(cfg.to_toml())
    fail_on = 1 if cfg.name.endswith("-fail") else -1  # a run named "*-fail" makes client-1 raise
    payloads = {k: {"x": np.arange(6, dtype=np.float16).reshape(2, 3) + k, "ids": np.arange(5, dtype=np.int32),
                    "text": f"héllo-{k}", "fail_on": fail_on} for k in transport.client_ids()}
    replies = _exchange(transport, ECHO, 1, payloads, None)  # checks replies like serve does
    out = {}
    for k, r in replies.items():
        assert r["x2"].dtype == np.float16 and r["x2"].shape == (2, 3), r["x2"]
        assert r["ids"].dtype == np.int32
        out[str(k)] = {"k": r["k"], "x2": r["x2"].tolist(), "ids": r["ids"].tolist(), "text": r["text"],
                       "round": r["round"], "flags": r["flags"], "empty": r["empty"]}
    (run_dir / "echo.json").write_text(json.dumps(out, sort_keys=True))
    progress(f"echo replies from {sorted(out)}")
    (run_dir / "DONE").write_text("ok\\n")


class EchoClientApp(PhaseClientApp):
    """Defined here so the simulation's Ray actors, which receive the ClientApp
    pickled, import this module (and so register the echo host) too."""


client_app = EchoClientApp()
server_app = ServerApp()


@server_app.main()
def main(grid, context):
    run_server(grid, context, serve_fn=echo_serve)
'''

ECHO_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lada-echo"
version = "0.1.0"
description = "engine test app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lada"

[tool.flwr.app.components]
serverapp = "engine_echo_app:server_app"
clientapp = "engine_echo_app:client_app"

[tool.flwr.app.config]
config-path = ""
config-text = ""
run-dir = ""
run-name = ""
run-id = ""
resume = ""
connect-timeout-s = 120.0
"""


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def echo_app(tmp_path, monkeypatch):
    """A Flower app folder with the echo app; "echo" is a registered host here too."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "engine_echo_app.py").write_text(ECHO_APP)
    (app / "pyproject.toml").write_text(ECHO_PYPROJECT)
    monkeypatch.syspath_prepend(str(app))
    monkeypatch.setitem(lada.registry.HOSTS, "echo", "engine_echo_app:EchoHost")
    monkeypatch.delitem(sys.modules, "engine_echo_app", raising=False)
    return app


def echo_config(run_dir: Path, name: str = "echo", n: int = 2) -> RunConfig:
    cfg = RunConfig(name=name, rounds=1, run_dir=str(run_dir), host={"name": "echo"},
                    data=DataConfig(num_clients=n, domains=["shop", "farm", "travel", "kitchen"][:n]), clients=[ModelConfig() for _ in range(n)])
    cfg.validate("test config")
    return cfg


def check_echo(run_dir: Path, n: int = 2) -> None:
    out = json.loads((run_dir / "echo.json").read_text())
    assert sorted(out) == [str(k) for k in range(n)]
    for k in range(n):
        r = out[str(k)]
        assert r["k"] == k and r["round"] == 1
        assert r["x2"] == (2 * (np.arange(6).reshape(2, 3) + k)).tolist()
        assert r["ids"] == [4, 3, 2, 1, 0]
        assert r["text"] == f"héllo-{k}"[::-1]
        assert r["flags"] == [True, False] and r["empty"] == []


@pytest.fixture
def tracked(monkeypatch):
    """Record the ports and local-federation PIDs the launcher uses, to check later
    that nothing it started is still running."""
    seen = {"ports": [], "pids": []}
    real_free_port = launch.free_port

    def free_port():
        p = real_free_port()
        seen["ports"].append(p)
        return p

    class Tracked(LocalFederation):
        def start(self):
            state = super().start()
            seen["pids"].extend(self.pids.values())
            return state

    monkeypatch.setattr(launch, "free_port", free_port)
    monkeypatch.setattr(launch, "LocalFederation", Tracked)
    return seen


def assert_stopped(seen) -> None:
    for pid in seen["pids"]:
        assert not _running(pid), f"process {pid} of the local federation is still running"
    ports = {str(p) for p in seen["ports"]}
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info.get("cmdline") or []
        if any(c.endswith("flower-superlink") for c in cmd) and "--port" in cmd:
            port = cmd[cmd.index("--port") + 1] if cmd.index("--port") + 1 < len(cmd) else ""
            assert port not in ports or p.info["status"] == psutil.STATUS_ZOMBIE, \
                f"SuperLink {p.pid} on port {port} still running"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ----------------------------------------------------------------------------- inline

def test_inline_transport_echo(echo_app, tmp_path):
    import engine_echo_app

    cfg = echo_config(tmp_path / "run")
    transport = InlineTransport(2, {"run-dir": cfg.run_dir, "run-name": cfg.name})
    engine_echo_app.echo_serve(cfg, transport, progress=lambda s: None)
    check_echo(tmp_path / "run")


def test_inline_client_error_carries_traceback(echo_app, tmp_path):
    import engine_echo_app
    from lada.protocol.driver import FederationError

    cfg = echo_config(tmp_path / "run", name="echo-fail")
    transport = InlineTransport(2, {"run-dir": cfg.run_dir, "run-name": cfg.name})
    with pytest.raises(FederationError, match="client-1 failed") as e:
        engine_echo_app.echo_serve(cfg, transport, progress=lambda s: None)
    assert "Traceback" in str(e.value) and "deliberate failure on client-1" in str(e.value)


def test_absolute_paths_and_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(name="p", run_dir="rel/run", cache_dir="cache", data=DataConfig(num_clients=1),
                    clients=[ModelConfig(checkpoint="ckpt")])
    out = launch.absolute_paths(cfg)
    assert out.run_dir == str(tmp_path / "rel/run") and out.cache_dir == str(tmp_path / "cache")
    assert out.clients[0].checkpoint == str(tmp_path / "ckpt")
    assert cfg.run_dir == "rel/run"  # the caller's config is left alone
    run_dir = tmp_path / "rel/run"
    run_dir.mkdir(parents=True)
    assert launch._write_config(out, run_dir) == run_dir / "config.toml"
    (run_dir / "config.toml").write_text("# written by someone else\n")
    assert launch._write_config(out, run_dir) == run_dir / "engine-config.toml"


def test_failure_text_picks_server_traceback():
    lines = ["noise", "Traceback (most recent call last):", '  File "x.py"', "ValueError: bad",
             "lada-run-status: failed: ValueError: bad", "after"]
    assert launch._failure_text(lines, "lada-run-status: failed").splitlines() == lines[1:5]
    assert launch._failure_text(["nothing"], "lada-run-status: failed") == ""


# ----------------------------------------------------------------------------- Flower engines (echo app)

@pytest.mark.e2e
def test_simulation_echo(echo_app, tmp_path, tracked):
    cfg = echo_config(tmp_path / "run")
    run_engine(cfg, "simulation", tmp_path / "run" / "run.log", app_dir=echo_app)
    check_echo(tmp_path / "run")
    assert "echo replies from ['0', '1']" in (tmp_path / "run" / "server.log").read_text()
    assert_stopped(tracked)


@pytest.mark.e2e
def test_simulation_client_error_fails_run(echo_app, tmp_path, tracked):
    cfg = echo_config(tmp_path / "run", name="echo-fail")
    with pytest.raises(EngineError) as e:
        run_engine(cfg, "simulation", tmp_path / "run" / "run.log", app_dir=echo_app)
    msg = str(e.value)
    assert "client-1" in msg and "deliberate failure on client-1" in msg and "Traceback" in msg
    assert not (tmp_path / "run" / "DONE").exists()
    assert_stopped(tracked)


@pytest.mark.e2e
def test_deployment_echo(echo_app, tmp_path, tracked):
    cfg = echo_config(tmp_path / "run")
    run_engine(cfg, "deployment", tmp_path / "run" / "run.log", app_dir=echo_app)
    check_echo(tmp_path / "run")
    assert len(tracked["pids"]) == 3  # one SuperLink, two SuperNodes
    assert_stopped(tracked)


@pytest.mark.e2e
def test_federation_up_down(tmp_path):
    state = federation_up(1, tmp_path / "fed")
    pids = list(state["pids"].values())
    try:
        assert state["superlink"].startswith("127.0.0.1:") and len(pids) == 2
        assert all(_running(p) for p in pids)
        assert (tmp_path / "fed" / "federation.json").exists()
    finally:
        federation_down(tmp_path / "fed")
    assert not any(_running(p) for p in pids)
    assert not (tmp_path / "fed" / "federation.json").exists()


# ----------------------------------------------------------------------------- full runs of the tiny config

REPO = Path(__file__).resolve().parent.parent


def tiny_config(run_dir: Path, *overrides: str):
    from lada.config import load_config

    return load_config(REPO / "configs" / "tiny-test.toml", [f'run_dir="{run_dir}"', "rounds=2", *overrides])


# FedCoLLM needs one SLM architecture: every client takes client 0's model.
SAME_SLM = tuple(f"clients.{k}.{key}={value}" for k in (1, 2) for key, value in
                 (("name", '"tiny-qwen2"'), ("vocab_size", "360")))


@pytest.mark.e2e
# Every host's payloads go through Flower's records and their wire form on the
# inline engine too (InlineTransport), so the hosts run inline here. The Flower engines
# are covered by test_runs' inline-vs-simulation run, the TLS run below and
# test_shutdown's runs; here each would add a Flower start-up (half a minute or more)
# for no code path of its own.
@pytest.mark.parametrize("host", ["standalone", "cot", "fedmkt", "fedcollm"])
def test_tiny_run(host, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rounds = 2
    extra = SAME_SLM if host == "fedcollm" else ()
    cfg = tiny_config(tmp_path / "run", f'host.name="{host}"', f"rounds={rounds}", *extra)
    run_engine(cfg, "inline", tmp_path / "run" / "run.log")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    participants = ["llm"] + [f"client-{k}" for k in range(len(cfg.clients))]
    assert [(r["round"], r["participant"]) for r in rows] == [(t, p) for t in range(rounds + 1) for p in participants]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["bytes_up"] >= 0 and r["bytes_down"] >= 0 and r["seconds"] >= 0
    assert (tmp_path / "run" / "DONE").exists()


@pytest.mark.e2e
def test_tiny_run_client_error_is_loud(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A directory that is no saved model: the config check (which rejects a missing
    # checkpoint up front) passes, and client-1 fails at run time. (How the Flower
    # engines surface a client's error is test_simulation_client_error_fails_run's.)
    (tmp_path / "empty-checkpoint").mkdir()
    cfg = tiny_config(tmp_path / "run", f'clients.1.checkpoint="{tmp_path / "empty-checkpoint"}"')
    from lada.protocol.driver import FederationError

    with pytest.raises(FederationError) as e:
        run_engine(cfg, "inline", tmp_path / "run" / "run.log")
    assert "client-1" in str(e.value) and "empty-checkpoint" in str(e.value)


# ----------------------------------------------------------------------------- TLS + SuperNode authentication

@pytest.mark.e2e
def test_tiny_test_over_tls_with_supernode_auth(tmp_path):
    """`lada federation up --tls --auth` as on several machines: a CA and SuperLink
    certificate, a registered key per SuperNode, each node reading only its part of a
    `lada data split` and keeping state in a node workspace under the run's id (the
    submission of a run to a SuperLink that is not ours: the config travels as text,
    success is read from the log); and a SuperNode whose key was never registered is
    refused. Runs that share a name get their own ids (test_run_ids_differ_per_submission)
    and so their own client state (test_faults' same-name runs)."""
    import subprocess

    from lada.data.split import write_split
    from lada.engines.local import flower_env, flower_executable, free_port
    from lada.engines.tls import make_node_keys
    from lada.experiments.runner import run

    ws = tmp_path / "node-ws"
    state = federation_up(3, tmp_path / "fed", tls=True, auth=True, workspace=ws)
    intruder = None
    try:
        assert state["tls"] and state["auth"] and Path(state["root_certificates"]).is_file()
        # A SuperNode with a key the SuperLink does not know, started beside the run.
        key, _ = make_node_keys(tmp_path / "intruder", "intruder")
        log = (tmp_path / "intruder.log").open("wb")
        intruder = subprocess.Popen(
            [flower_executable("flower-supernode"), "--root-certificates", state["root_certificates"],
             "--auth-supernode-private-key", str(key), "--superlink", state["superlink"], "--port", str(free_port()),
             "--max-retries", "1", "--node-config", "partition-id=0 num-partitions=3"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=flower_env(tmp_path / "intruder"))
        split_dir = str(write_split(tiny_config(tmp_path / "run").data, 0, tmp_path / "split"))
        cfg = tiny_config(tmp_path / "run", "rounds=1")
        cfg.engine.root_certificates = state["root_certificates"]
        cfg.data.split_dir = split_dir
        rows = run(cfg, engine="deployment", superlink=state["superlink"])
        assert sorted((r["round"], r["participant"]) for r in rows) == sorted(
            (t, p) for t in (0, 1) for p in ("llm", "client-0", "client-1", "client-2"))
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
        assert "lada-run-status: ok" in (tmp_path / "run" / "run.log").read_text()
        run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
        assert sorted(p.name for p in ws.iterdir()) == [run_id]
        for k in range(3):
            node_state = json.loads((ws / run_id / f"client-{k}" / "state.json").read_text())
            assert node_state["model_version"] == 1  # one round

        try:
            code = intruder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        text = (tmp_path / "intruder.log").read_text(errors="replace")
        # The registered SuperNodes above connected with the same CA and address: what
        # differs is the key. Flower 1.42 refuses it at activation (exit code 305).
        assert code not in (None, 0), f"an unregistered SuperNode kept running:\n{text[-2000:]}"
        assert "Failed to activate SuperNode" in text, text[-2000:]
        link_log = (tmp_path / "fed" / "superlink.log").read_text(errors="replace")
        assert "No SuperNode found with the given public key" in link_log  # refused for its key
    finally:
        if intruder is not None and intruder.poll() is None:
            intruder.kill()
        federation_down(tmp_path / "fed")
    assert not any(_running(p) for p in state["pids"].values())


def test_run_ids_differ_per_submission():
    """Clients key their state by run id: two submissions under one name never share it."""
    from lada.engines.launch import new_run_id

    a, b = new_run_id("tiny test/1"), new_run_id("tiny test/1")
    assert a != b and a.startswith("tiny-test-1-") and "/" not in a
    assert new_run_id("...").startswith("run-")


def test_remote_connection_settings(tmp_path, capsys):
    from lada.engines.launch import remote_connection

    cfg = RunConfig()
    assert remote_connection(cfg, "10.0.0.5:9092") == {"address": "10.0.0.5:9092"}  # TLS, system roots
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    cfg.engine.root_certificates = str(ca)
    assert remote_connection(cfg, "10.0.0.5:9092")["root-certificates"] == str(ca.absolute())
    cfg.engine.insecure = True
    with pytest.raises(EngineError, match="root_certificates is set together with insecure"):
        remote_connection(cfg, "10.0.0.5:9092")
    cfg.engine.root_certificates = ""
    lines = []
    assert remote_connection(cfg, "10.0.0.5:9092", lines.append) == {"address": "10.0.0.5:9092", "insecure": True}
    assert "WITHOUT TLS" in lines[0]
    lines.clear()
    remote_connection(cfg, "127.0.0.1:9092", lines.append)
    assert not lines  # on this machine: no warning


def test_tls_files_verify(tmp_path):
    import ssl

    from lada.engines.tls import make_node_keys, make_tls_files

    files = make_tls_files(tmp_path / "c")
    ctx = ssl.create_default_context(cafile=str(files["ca"]))
    ctx.load_cert_chain(str(files["cert"]), str(files["key"]))  # the key matches the certificate
    assert oct(files["key"].stat().st_mode)[-3:] == "600"
    key, pub = make_node_keys(tmp_path / "k", "client-0")
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ") and "OPENSSH PRIVATE KEY" in key.read_text()
