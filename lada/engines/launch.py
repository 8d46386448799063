"""Start a run on one of the engines.

- ``simulation``: Flower's Simulation Engine (`flwr run` against a local SuperLink in
  simulation mode; ClientApps run as Ray actors).
- ``deployment``: Flower's Deployment Engine: submit to a running SuperLink, or bring
  up a local SuperLink + SuperNodes (`LocalFederation`) for the run.
- ``inline``: no Flower at all; the server calls each client's handler in this
  process. For debugging (pdb, profilers) and fast tests: Flower is the real engine.

Every engine runs the same `lada.protocol.driver.serve`, so results only differ by
transport. A Flower run counts as successful only when the ServerApp wrote
``<run_dir>/DONE`` (or, for a remote SuperLink, printed its ok marker): `flwr run`
exits 0 even when a ClientApp or the ServerApp failed.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

from lada.config import RunConfig
from lada.engines.local import LocalFederation, flower_env, flower_executable, free_port, stop_pids
from lada.protocol.driver import handle_message, serve
from lada.protocol.host import Phase
from lada.protocol.payload import Payload

APP_DIR = Path(__file__).resolve().parent.parent / "flwr_app"
FEDERATION = "lada"


class EngineError(RuntimeError):
    """A run failed; the message carries the server's (or a client's) reason."""


# ----------------------------------------------------------------------------- inline engine

class InlineTransport:
    """Calls `handle_message` for each client in this process, one after another.
    Payloads go both ways through Flower's records and their serialized form
    (`lada.engines.records.wire_copy`), as on the Flower engines, so no object is shared
    between "server" and "client" and a payload Flower cannot carry fails here too."""

    sequential = True  # clients run one after another (see lada.protocol.driver._evaluation_wall)

    def __init__(self, num_clients: int, run_config: dict, workspace: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.num_clients = num_clients
        self.run_config = dict(run_config)
        self.workspace = str(workspace) if workspace else ""  # like a SuperNode's --node-config workspace=...
        self.log = log

    def client_ids(self) -> list[int]:
        return list(range(self.num_clients))

    def exchange(self, phase: Phase, rnd: int, payloads: dict[int, Payload]) -> dict[int, Payload]:
        from lada.engines.records import wire_copy  # imports Flower: not needed until a run

        replies = {}
        for i, (k, payload) in enumerate(sorted(payloads.items()), 1):
            node_config = {"partition-id": k, "num-partitions": self.num_clients}
            if self.workspace:
                node_config["workspace"] = self.workspace
            t0 = time.perf_counter()
            replies[k] = wire_copy(handle_message(phase.name, rnd, wire_copy(payload), node_config, self.run_config))
            elapsed = time.perf_counter() - t0
            if self.log is not None and elapsed > 2.0:  # progress on phases long enough to wonder about
                state = "failed" if "error" in replies[k] else "done"
                self.log(f"round {rnd}, phase {phase.name!r}: client-{k} {state} in {elapsed:.1f}s ({i}/{len(payloads)})")
        return replies


# ----------------------------------------------------------------------------- entry point

def new_run_id(name: str) -> str:
    """A run id unique to one submission: clients key their state by it."""
    import re
    import uuid

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-") or "run"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def run_engine(cfg: RunConfig, engine: str, log_path: Path, superlink: str | None = None,
               app_dir: Path | None = None, run_id: str = "", resume: bool = False) -> None:
    """Run ``cfg`` to completion on ``engine``; raise EngineError if it failed.

    Output lines go to the console and are appended to ``log_path``. Paths in the
    config are made absolute first, since Flower runs the apps in other directories.
    ``run_id`` keys the clients' state (a new one when empty); ``resume`` continues
    after the run directory's last committed round. On an interrupt (KeyboardInterrupt,
    or SIGTERM turned into one by the caller) everything this call started is stopped
    and its temporary folders removed before the exception goes on."""
    cfg = absolute_paths(cfg)
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.data.split_dir and not (engine == "deployment" and (superlink or cfg.engine.superlink)):
        # Private by construction: every node reads only its own part of the data.
        from lada.data.split import write_split

        cfg.data.split_dir = str(write_split(cfg.data, cfg.data.seed, run_dir / "data"))
    config_path = _write_config(cfg, run_dir)
    (run_dir / "DONE").unlink(missing_ok=True)
    run_config = {"config-path": str(config_path), "run-dir": str(run_dir), "run-name": cfg.name,
                  "run-id": run_id or new_run_id(cfg.name), "resume": "1" if resume else ""}
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log_file:
        echo = _echo(log_file)
        t0 = time.perf_counter()
        if engine == "inline":
            _run_inline(cfg, run_config, echo)
        elif engine == "simulation":
            _run_simulation(cfg, run_config, echo, app_dir or APP_DIR)
        elif engine == "deployment":
            address = superlink or cfg.engine.superlink
            if address:
                _run_remote(cfg, run_config, address, echo, app_dir or APP_DIR)
            else:
                _run_local_deployment(cfg, run_config, echo, app_dir or APP_DIR)
        else:
            raise EngineError(f"unknown engine {engine!r}; choose simulation, deployment or inline")
        echo(f"[lada] engine {engine}: run finished in {time.perf_counter() - t0:.1f}s")


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose run, cache, data and checkpoint paths are absolute."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(cfg.resolved_run_dir().absolute())
    if cfg.cache_dir:
        cfg.cache_dir = str(Path(cfg.cache_dir).absolute())
    if cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).absolute())
    if cfg.data.split_dir:
        cfg.data.split_dir = str(Path(cfg.data.split_dir).absolute())
    for m in [cfg.server, *cfg.clients]:
        if m.checkpoint:
            m.checkpoint = str(Path(m.checkpoint).absolute())
        if not m.is_tiny and Path(m.name).exists():
            m.name = str(Path(m.name).absolute())
    return cfg


def _write_config(cfg: RunConfig, run_dir: Path) -> Path:
    """``<run_dir>/config.toml`` unless one with other content is there already
    (then ``<run_dir>/engine-config.toml``): the file the ServerApp loads."""
    text = cfg.to_toml()
    path = run_dir / "config.toml"
    if path.exists() and path.read_text() != text:
        path = run_dir / "engine-config.toml"
    path.write_text(text)
    return path


def _echo(log_file: TextIO) -> Callable[[str], None]:
    def echo(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return echo


def _run_inline(cfg: RunConfig, run_config: dict, echo: Callable[[str], None]) -> None:
    def progress(line: str) -> None:
        echo(f"{time.strftime('%H:%M:%S')} [inline] {line}")

    serve(cfg, InlineTransport(len(cfg.clients), run_config, log=progress), progress=progress,
          resume=bool(run_config.get("resume")), run_id=str(run_config.get("run-id", "")))


# ----------------------------------------------------------------------------- Flower engines

def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _write_flwr_home(home: Path, connection: dict[str, object], run_config: dict) -> Path:
    """Connection settings for `flwr run` and the run-config override file."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {_toml_str(FEDERATION)}", "", f"[superlink.{FEDERATION}]"]
    for key, value in connection.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {_toml_str(str(value))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    run_config_file = home / "run-config.toml"
    run_config_file.write_text("".join(f"{k} = {_toml_str(str(v))}\n" for k, v in run_config.items()))
    return run_config_file


# Flower's notices a lada user cannot act on (lada sets the federation, the app and
# the SuperLink for them). They stay in the lines kept for error reports.
_FLOWER_NOISE = ("default simulated SuperNodes", "To change federation size", "flwr federation", "Federation `@",
                 "num-supernodes", "Starting local SuperLink", "Using SuperLink:", "Starting logstream",
                 "Successfully installed lada-app", "Start `flwr-serverapp` process", "Starting Flower Simulation",
                 "To view usage", "flwr log", "warnings.warn(")


def _is_noise(line: str) -> bool:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    return (not text or re.fullmatch(r"(INFO|DEBUG)\s*:\s*", text) is not None
            or any(n in text for n in _FLOWER_NOISE))


def _flwr_run(app_dir: Path, run_config_file: Path, env: dict[str, str], echo: Callable[[str], None],
              extra: list[str] | None = None, on_interrupt: Callable[[list[str]], None] | None = None
              ) -> tuple[int, list[str]]:
    """`flwr run APP lada --stream`, output streamed line by line; (exit code, lines).
    On an interrupt ``on_interrupt(lines so far)`` runs before `flwr run` is stopped."""
    cmd = [flower_executable("flwr"), "run", str(app_dir), FEDERATION, "--stream",
           "--run-config", str(run_config_file), *(extra or [])]
    lines: list[str] = []
    # Own process group: a terminal's Ctrl-C reaches only us, and we stop the run in order.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, text=True, errors="replace", bufsize=1, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if not _is_noise(line):
                echo(line)
        return proc.wait(), lines
    except BaseException:
        if on_interrupt is not None:
            try:
                on_interrupt(lines)
            except Exception as e:  # noqa: BLE001 - still stop what we started
                echo(f"[lada] could not stop the Flower run: {e}")
        stop_pids({"flwr-run": proc.pid})
        raise


def flower_run_id(lines: list[str]) -> int | None:
    """The Flower run id `flwr run` printed ("Successfully started run N")."""
    import re

    for line in lines:
        m = re.search(r"Successfully started run (\d+)", line)
        if m:
            return int(m.group(1))
    return None


def _flwr_stop(lines: list[str], env: dict[str, str], echo: Callable[[str], None]) -> None:
    """`flwr stop` the run `flwr run` started, so the SuperLink stops its ServerApp."""
    run = flower_run_id(lines)
    if run is None:
        return
    echo(f"[lada] stopping Flower run {run}")
    subprocess.run([flower_executable("flwr"), "stop", str(run), FEDERATION], env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)


def stop_flower_processes(home: Path) -> list[int]:
    """Stop every process whose FLWR_HOME is ``home`` or below it: the SuperLink that
    `flwr run` detaches, its SuperExec and ServerApp, and any SuperNode, whoever their
    parent is now. Returns their PIDs."""
    import psutil

    home_s = str(Path(home))
    me = psutil.Process().pid
    pids: dict[str, int] = {}
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            flwr_home = p.environ().get("FLWR_HOME", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
        if flwr_home == home_s or flwr_home.startswith(home_s + "/"):
            pids[f"pid-{p.pid}"] = p.pid
    stop_pids(pids)
    return sorted(pids.values())


def _check_outcome(run_dir: Path | None, code: int, lines: list[str], what: str) -> None:
    """Raise EngineError unless the run finished; the message carries the reason."""
    from lada.engines.server_app import FAILED_MARKER, OK_MARKER

    done = (run_dir / "DONE").exists() if run_dir is not None else any(OK_MARKER in ln for ln in lines)
    if done and code == 0:
        return
    reason = _failure_text(lines, FAILED_MARKER)
    if run_dir is not None and not reason and (run_dir / "server.log").exists():
        reason = _failure_text((run_dir / "server.log").read_text(errors="replace").splitlines(), FAILED_MARKER)
    if not reason:
        reason = "\n".join(lines[-40:]) or "(no output)"
    raise EngineError(f"{what} failed (flwr exit code {code}):\n{reason}")


def _failure_text(lines: list[str], marker: str) -> str:
    """The server's traceback: from its first 'Traceback' line to the failure marker."""
    end = next((i for i, ln in enumerate(lines) if marker in ln), None)
    if end is None:
        return ""
    start = next((i for i in range(end, -1, -1) if "Traceback (most recent call last)" in lines[i]), end)
    return "\n".join(lines[start:end + 1])


def _run_simulation(cfg: RunConfig, run_config: dict, echo: Callable[[str], None], app_dir: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="lada-flwr-home-"))
    port = free_port()
    # `flwr run` starts a detached local SuperLink on this port; a run-specific port
    # keeps concurrent runs (and other users' SuperLinks) apart.
    env = flower_env(home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
                            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())})
    # Flower 1.42 takes whole CPUs per ClientApp (the field is an unsigned int).
    cpus = max(1, round(cfg.engine.cpus_per_client))
    federation_config = f"num-supernodes={len(cfg.clients)} client-resources-num-cpus={cpus} client-resources-num-gpus=0.0"
    run_config_file = _write_flwr_home(home, {"address": ":local:"}, run_config)
    try:
        code, lines = _flwr_run(app_dir, run_config_file, env, echo, ["--federation-config", federation_config])
    finally:
        _stop_local_superlink(port)
        stop_flower_processes(home)  # what the SuperLink left behind (SuperExec, ServerApp)
        shutil.rmtree(home, ignore_errors=True)
    _check_outcome(cfg.resolved_run_dir(), code, lines, "simulation run")


def _stop_local_superlink(port: int) -> None:
    """Stop the SuperLink `flwr run` left running on ``port`` (found by its command
    line, stopped by PID together with its children)."""
    import psutil

    pids = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if any(c.endswith("flower-superlink") for c in cmd) and "--port" in cmd:
            i = cmd.index("--port")
            if i + 1 < len(cmd) and cmd[i + 1] == str(port):
                pids[f"superlink-{p.pid}"] = p.pid
    stop_pids(pids)


def _run_local_deployment(cfg: RunConfig, run_config: dict, echo: Callable[[str], None], app_dir: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="lada-flwr-home-"))
    try:
        with LocalFederation(len(cfg.clients), state_dir=home / "federation") as fed:
            echo(f"[lada] local federation: SuperLink {fed.address}, {len(cfg.clients)} SuperNode(s), "
                 f"PIDs {sorted(fed.pids.values())}")
            run_config_file = _write_flwr_home(home, fed.connection(), run_config)
            code, lines = _flwr_run(app_dir, run_config_file, flower_env(home), echo)
    finally:
        stop_flower_processes(home)
        shutil.rmtree(home, ignore_errors=True)
    _check_outcome(cfg.resolved_run_dir(), code, lines, "deployment run")


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def remote_connection(cfg: RunConfig, address: str, echo: Callable[[str], None] = print) -> dict[str, object]:
    """Flower connection settings for a SuperLink at ``address``: TLS, verified against
    ``[engine] root_certificates`` when given (else the system's CA store); without TLS
    only with an explicit ``[engine] insecure = true``, and with a warning unless the
    SuperLink is on this machine."""
    eng = cfg.engine
    if eng.root_certificates:
        if eng.insecure:
            raise EngineError("[engine] root_certificates is set together with insecure = true: "
                              "drop one (certificates mean TLS)")
        return {"address": address, "root-certificates": str(Path(eng.root_certificates).expanduser().absolute())}
    if eng.insecure:
        if not _is_loopback(address):
            echo(f"[lada] WARNING: connecting to the SuperLink {address} WITHOUT TLS ([engine] insecure = true): "
                 "the config, model updates and every payload travel in clear text. Use TLS "
                 "(--root-certificates CA.pem, see docs/engines.md) outside a trusted network.")
        return {"address": address, "insecure": True}
    return {"address": address}  # TLS with the system's root certificates


def _run_remote(cfg: RunConfig, run_config: dict, address: str, echo: Callable[[str], None], app_dir: Path) -> None:
    """Submit to a SuperLink that someone else runs. Its ServerApp may be on another
    machine, so the config travels as text and success is read from the log."""
    home = Path(tempfile.mkdtemp(prefix="lada-flwr-home-"))
    connection = remote_connection(cfg, address, echo)
    run_config = dict(run_config, **{"config-text": cfg.to_toml()})
    env = flower_env(home)
    try:
        run_config_file = _write_flwr_home(home, connection, run_config)
        # Interrupted: the SuperLink would go on running rounds, so `flwr stop` the run.
        code, lines = _flwr_run(app_dir, run_config_file, env, echo,
                                on_interrupt=lambda lines: _flwr_stop(lines, env, echo))
    finally:
        stop_flower_processes(home)
        shutil.rmtree(home, ignore_errors=True)
    _check_outcome(None, code, lines, f"deployment run on {address}")


if __name__ == "__main__":  # debugging aid: python -m lada.engines.launch CONFIG ENGINE
    from lada.config import load_config

    c = load_config(sys.argv[1])
    run_engine(c, sys.argv[2], c.resolved_run_dir() / "run.log")
