"""A local Flower federation: one SuperLink and K SuperNodes as separate processes.

This is the Deployment Engine on one machine (the same processes as on many
machines, bound to 127.0.0.1 without TLS). Processes are tracked by PID in a state
file, so `federation_down` can stop a federation started by another command, and
`stop()` checks that every process (and its children) is really gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

STATE_FILE = "federation.json"

# Environment of every Flower process we start: no `uv sync` of app dependencies
# (it would pull a CUDA torch), no telemetry, no update check, no hub downloads.
FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    # Ray (simulation) otherwise warns on every start about a future default we do not rely on.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class FederationStartError(RuntimeError):
    """A SuperLink or SuperNode did not come up; the message holds its log tail."""


def flower_executable(name: str) -> str:
    """The venv's Flower entry point (next to the running interpreter), else PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; install flwr")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its helpers (flower-superlink, flwr-serverapp, ...) by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _healthy(port: int, ca_file: Path | None = None) -> bool:
    """Whether the SuperLink answers ``/health`` (over TLS, verified with ``ca_file``, if given)."""
    import ssl

    try:
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1.0, context=ctx) as r:
                return r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def stop_pids(pids: dict[str, int], create_times: dict[str, float] | None = None, grace_s: float = 10.0) -> None:
    """Terminate processes (and their children) by PID, kill after ``grace_s``,
    then check they are gone. A PID whose start time differs from ``create_times``
    was reused by an unrelated process and is left alone."""
    procs: list[psutil.Process] = []
    for name, pid in pids.items():
        try:
            p = psutil.Process(pid)
            if create_times and name in create_times and abs(p.create_time() - create_times[name]) > 1.0:
                continue
            procs.extend(p.children(recursive=True))
            procs.append(p)
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5.0)
    if alive:
        raise RuntimeError(f"processes still running after kill: {[p.pid for p in alive]}")


class LocalFederation:
    """One SuperLink and ``num_clients`` SuperNodes on 127.0.0.1.

    Use as a context manager, or `start()` / `stop()`. Client k's SuperNode gets
    ``--node-config "partition-id=k num-partitions=K"`` (plus ``workspace=...`` when
    given, where clients then keep their state).

    ``tls``: a CA and a SuperLink certificate are made in the state folder and every
    connection uses TLS (verified against ``ca.crt``). ``auth`` (needs ``tls``): SuperNode
    authentication; a key pair per SuperNode is made, its public key registered with the
    SuperLink (`flwr supernode register`) before the SuperNode starts, and a SuperNode
    without a registered key is refused."""

    def __init__(self, num_clients: int, port: int | None = None, workspace: str | Path | None = None,
                 state_dir: str | Path | None = None, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 60.0, tls: bool = False, auth: bool = False) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS: pass tls=True with auth=True")
        self.tls, self.auth = tls, auth
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.port = port or free_port()
        self.workspace = Path(workspace).absolute() if workspace else None
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(_mkdtemp("lada-federation-"))
        self.extra_env = env or {}
        self.startup_timeout_s = startup_timeout_s
        self.pids: dict[str, int] = {}
        self.create_times: dict[str, float] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.state_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        self.pids[name] = proc.pid
        self.create_times[name] = psutil.Process(proc.pid).create_time()
        self._write_state()
        return proc

    @property
    def root_certificates(self) -> Path | None:
        """The CA certificate clients verify the SuperLink with (None without TLS)."""
        from lada.engines.tls import CA_CERT

        return (self.state_dir / "certificates" / CA_CERT).absolute() if self.tls else None

    def connection(self) -> dict[str, object]:
        """Flower connection settings (`$FLWR_HOME/config.toml`) for this SuperLink."""
        if self.tls:
            return {"address": self.address, "root-certificates": str(self.root_certificates)}
        return {"address": self.address, "insecure": True}

    def _write_state(self) -> None:
        state = {"superlink": self.address, "port": self.port, "num_clients": self.num_clients,
                 "pids": self.pids, "create_times": self.create_times, "state_dir": str(self.state_dir.absolute()),
                 "tls": self.tls, "auth": self.auth,
                 "root_certificates": str(self.root_certificates) if self.tls else ""}
        self.state_path.write_text(json.dumps(state, indent=1))

    def _wait(self, name: str, proc: subprocess.Popen, ready) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready():
            if proc.poll() is not None:
                raise FederationStartError(f"{name} exited with code {proc.returncode}:\n"
                                           f"{tail(self.state_dir / f'{name}.log')}")
            if time.monotonic() > deadline:
                raise FederationStartError(f"{name} not ready after {self.startup_timeout_s:.0f}s:\n"
                                           f"{tail(self.state_dir / f'{name}.log')}")
            time.sleep(0.3)

    def start(self) -> dict:
        """Start the processes, wait until they listen; returns the state dict."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists() and _alive(json.loads(self.state_path.read_text())):
            raise FederationStartError(f"a federation recorded in {self.state_path} is still running; stop it first")
        env = flower_env(self.state_dir / "flwr-home", self.extra_env)
        certs = self.state_dir / "certificates"
        try:
            link_security = ["--insecure"]
            if self.tls:
                from lada.engines.tls import make_tls_files

                files = make_tls_files(certs)
                link_security = ["--ssl-ca-certfile", str(files["ca"]), "--ssl-certfile", str(files["cert"]),
                                 "--ssl-keyfile", str(files["key"])]
                if self.auth:
                    link_security.append("--enable-supernode-auth")
            link = self._spawn("superlink", [
                flower_executable("flower-superlink"), *link_security, "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.port)], env)
            self._wait("superlink", link, lambda: _healthy(self.port, self.root_certificates))
            # K SuperNodes on this machine compute at once: each takes 1/K of the cores (lada.threads)
            node_env = dict(env, LADA_WORKERS=env.get("LADA_WORKERS") or str(self.num_clients))
            nodes = []  # started together, then waited for: each takes seconds to import Flower
            for k in range(self.num_clients):
                node_security = ["--root-certificates", str(self.root_certificates)] if self.tls else ["--insecure"]
                if self.auth:
                    key, pub = self.register_new_key(f"client-{k}", env)
                    node_security += ["--auth-supernode-private-key", str(key)]
                node_port = free_port()
                node_config = f"partition-id={k} num-partitions={self.num_clients}"
                if self.workspace:
                    node_config += f' workspace="{self.workspace}"'
                node = self._spawn(f"supernode-{k}", [
                    flower_executable("flower-supernode"), *node_security, "--superlink", self.address,
                    "--port", str(node_port), "--node-config", node_config], node_env)
                nodes.append((f"supernode-{k}", node, node_port))
            for name, node, node_port in nodes:
                self._wait(name, node, lambda p=node_port: _port_open(p))
        except BaseException:
            self.stop()
            raise
        return json.loads(self.state_path.read_text())

    def flwr_home(self) -> Path:
        """A Flower home whose default connection is this SuperLink (for `flwr` commands)."""
        home = self.state_dir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "lada-local"', "", "[superlink.lada-local]"]
        for key, value in self.connection().items():
            lines.append(f"{key} = {json.dumps(value)}")
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        return home

    def register_new_key(self, name: str, env: dict[str, str] | None = None) -> tuple[Path, Path]:
        """Make a SuperNode key pair ``<state>/keys/<name>.key|.pub`` and register its public
        key with the SuperLink (`flwr supernode register`)."""
        from lada.engines.tls import make_node_keys

        key, pub = make_node_keys(self.state_dir / "keys", name)
        home = self.flwr_home()
        env = dict(env or flower_env(home, self.extra_env), FLWR_HOME=str(home))
        res = subprocess.run([flower_executable("flwr"), "supernode", "register", str(pub), "lada-local"],
                             capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
        if res.returncode != 0 or "registered successfully" not in res.stdout + res.stderr:
            raise FederationStartError(f"registering {pub} with the SuperLink failed (exit {res.returncode}):\n"
                                       f"{(res.stdout + res.stderr).strip()[-2000:]}")
        return key, pub

    def stop(self) -> None:
        """Stop every process by PID and check they are gone."""
        stop_pids(self.pids, self.create_times)
        self.pids.clear()
        if self.state_path.exists():
            self.state_path.unlink()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> "LocalFederation":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(state: dict) -> bool:
    for name, pid in state.get("pids", {}).items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - state.get("create_times", {}).get(name, p.create_time())) < 1.0 and p.is_running():
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def _mkdtemp(prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=prefix)


# ----------------------------------------------------------------------------- CLI helpers

def federation_up(num_clients: int, state_dir: str | Path, port: int | None = None,
                  workspace: str | Path | None = None, tls: bool = False, auth: bool = False) -> dict:
    """Start a local federation that outlives this process; its PIDs and logs go to
    ``state_dir`` (with ``tls``/``auth``: also the certificates and keys). Returns
    {"superlink": "127.0.0.1:P", "pids": {...}, "root_certificates": ..., ...}."""
    fed = LocalFederation(num_clients, port=port, workspace=workspace, state_dir=state_dir, tls=tls, auth=auth)
    return fed.start()


def federation_down(state_dir: str | Path) -> None:
    """Stop the federation recorded in ``state_dir`` (by PID) and remove its state file."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no running federation recorded here")
    state = json.loads(path.read_text())
    stop_pids({k: int(v) for k, v in state["pids"].items()}, state.get("create_times"))
    path.unlink()
