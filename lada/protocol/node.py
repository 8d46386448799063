"""Node state: what one participant (the server or client k) holds between messages.

Flower ClientApps are ephemeral (a fresh process or actor call per message), so a
node keeps its model, data view and small state on disk under its workspace folder.
Within one process, models are cached and reloaded only when the saved version changes.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lada.config import ModelConfig, RunConfig
    from lada.data.split import ParticipantData
    from lada.models.loading import LoadedModel

log = logging.getLogger("lada.node")
# A plug-in's held-out slice takes at most 1 in this many of a participant's examples.
HOLDOUT_MAX_SHARE = 5
# workspace -> ((version, save id), LoadedModel), for the process's lifetime.
_MODEL_CACHE: dict[str, tuple[int, "LoadedModel"]] = {}


def cache_dir(cfg: "RunConfig") -> Path:
    return Path(cfg.cache_dir or os.environ.get("LADA_CACHE") or Path.home() / ".cache" / "lada")


def participant_checkpoint(cfg: "RunConfig", participant: str, progress: bool = False,
                           data_dir: str | Path | None = None) -> Path:
    """The warmed-up starting model of ``llm``, ``client-<k>`` or ``shared-slm`` (shipped,
    cached, or trained now), as the warm-up stage defines it, from what that participant
    may see (``shared-slm``, FedCoLLM's common SLM base, is the server's: general data only)."""
    from lada.data.split import participant_corpus, participant_data
    from lada.models.warmup import warmup_participant

    who = {"llm": "server", "shared-slm": "shared-slm"}.get(participant, participant.replace("-", ""))
    view = participant_data(cfg, "server" if who == "shared-slm" else who, data_dir)
    corpus = participant_corpus(cfg.data, view, cfg.data.seed)
    return warmup_participant(cfg, view, corpus, who, cache_dir(cfg), progress=progress)


class Node:
    """Shared behaviour of server and client nodes."""

    participant: str  # "llm" or "client-<k>"

    def __init__(self, cfg: "RunConfig", workspace: Path) -> None:
        self.cfg = cfg
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = self._read_state()
        self._capped: set[tuple[str, int]] = set()  # held-out slices already logged as capped

    # ---- small JSON state (counters, metrics of the current round, plug-in bits)
    def _read_state(self) -> dict[str, Any]:
        p = self.workspace / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"model_version": 0, "metrics": {}}

    def save_state(self) -> None:
        tmp = self.workspace / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        tmp.replace(self.workspace / "state.json")

    def log_metric(self, name: str, value: float) -> None:
        """Record a number for this round's metrics row (sent with the evaluation)."""
        self.state.setdefault("metrics", {})[name] = float(value)

    def add_metric(self, name: str, value: float) -> None:
        """Accumulate into this round's metric ``name`` (e.g. seconds over several calls)."""
        metrics = self.state.setdefault("metrics", {})
        metrics[name] = float(metrics.get(name, 0.0)) + float(value)

    def pop_metrics(self) -> dict[str, float]:
        m = self.state.get("metrics", {})
        self.state["metrics"] = {}
        return m

    # ---- model
    @property
    def model_cfg(self) -> "ModelConfig":
        raise NotImplementedError

    @property
    def seed(self) -> int:
        raise NotImplementedError

    @property
    def model_dir(self) -> Path:
        return self.workspace / "model"

    def initial_checkpoint(self) -> Path:
        """The warmed-up starting model of this participant (cached on disk)."""
        raise NotImplementedError

    def model(self) -> "LoadedModel":
        from lada.models.loading import load_model

        key = str(self.workspace.resolve())
        version = self._model_token()
        hit = _MODEL_CACHE.get(key)
        if hit and hit[0] == version:
            return hit[1]
        path = self.model_dir if self.model_dir.exists() else self.initial_checkpoint()
        lm = load_model(self.model_cfg, path)
        _MODEL_CACHE[key] = (version, lm)
        return lm

    def _model_token(self) -> tuple[int, str]:
        # The version alone can repeat after a rollback to a committed round (see
        # lada.protocol.commit); the id of each save cannot.
        return int(self.state.get("model_version", 0)), str(self.state.get("model_id", ""))

    def save_model(self, lm: "LoadedModel") -> None:
        """Persist an updated model; the new version invalidates other processes' caches."""
        from lada.models.loading import save_model

        tmp = self.workspace / "model.tmp"
        save_model(lm, tmp)
        if self.model_dir.exists():
            old = self.workspace / "model.old"
            self.model_dir.rename(old)
            tmp.rename(self.model_dir)
            _rmtree(old)
        else:
            tmp.rename(self.model_dir)
        self.state["model_version"] = int(self.state.get("model_version", 0)) + 1
        self.state["model_id"] = uuid.uuid4().hex
        self.save_state()
        _MODEL_CACHE[str(self.workspace.resolve())] = (self._model_token(), lm)

    data_dir: str | Path | None = None  # a node's own split folder (node config `data-dir`)

    @cached_property
    def data(self) -> "ParticipantData":
        """Only what this participant may see: the public set and its own sets."""
        from lada.data.split import participant_data

        return participant_data(self.cfg, self.who, self.data_dir)

    @property
    def who(self) -> str:
        return "server" if self.participant == "llm" else self.participant.replace("-", "")

    @cached_property
    def holdout_size(self) -> int:
        """How many examples the run's plug-in holds out for its own measurements (its
        options' ``holdout_size()``; 0 for plug-ins that define none)."""
        from lada import registry

        size = getattr(registry.plugin_options(self.cfg), "holdout_size", None)
        return int(size()) if size else 0

    def _last(self, examples: list, what: str) -> list:
        """The deterministic held-out slice: the last ``holdout_size`` of ``examples``,
        capped at a fifth of them so that a small shard keeps most of its data to train on
        (the tiny test configs hold 20 examples per client; the paper's protocol 1,000)."""
        want = self.holdout_size
        if not want:
            return []
        n = min(want, len(examples) // HOLDOUT_MAX_SHARE)
        if n == 0:
            from lada.schema import ConfigError

            raise ConfigError(f"{self.cfg.source_file or 'config'} [plugin].reward_val_size: {self.participant} "
                              f"holds {len(examples)} {what}, too few to hold any out (at most 1 in "
                              f"{HOLDOUT_MAX_SHARE}); use a reward that needs no held-out data, e.g. "
                              "[plugin] reward = \"gain\"")
        if n < want and (what, len(examples)) not in self._capped:
            self._capped.add((what, len(examples)))
            log.info("%s: holds out %d of its %d %s (a fifth; reward_val_size = %d)",
                     self.participant, n, len(examples), what, want)
        return examples[len(examples) - n:]

    @property
    def public_held_out(self) -> list:
        """The labelled public questions the LLM's side holds out (never plug-in candidates)."""
        return self._last(self.data.public, "public examples")


class ServerNode(Node):
    participant = "llm"

    @property
    def model_cfg(self) -> "ModelConfig":
        return self.cfg.server

    @property
    def seed(self) -> int:
        return self.cfg.seed * 1000 + 999

    def initial_checkpoint(self) -> Path:
        return participant_checkpoint(self.cfg, "llm")

    @property
    def public(self):
        return self.data.public

    @property
    def test_set(self):
        return self.data.test

    @property
    def train_set(self):
        return self.data.train

    @property
    def held_out(self):
        """The LLM's held-out labelled examples: a slice of the public set."""
        return self.public_held_out


class ClientNode(Node):
    def __init__(self, cfg: "RunConfig", index: int, workspace: Path, data_dir: str | Path | None = None) -> None:
        if not 0 <= index < len(cfg.clients):
            raise ValueError(f"client index {index} out of range: the config has {len(cfg.clients)} clients")
        self.index = index
        self.participant = f"client-{index}"
        self.data_dir = data_dir or None
        super().__init__(cfg, workspace)

    @property
    def model_cfg(self) -> "ModelConfig":
        return self.cfg.clients[self.index]

    @property
    def seed(self) -> int:
        return self.cfg.seed * 1000 + self.index

    def initial_checkpoint(self) -> Path:
        return participant_checkpoint(self.cfg, self.participant, data_dir=self.data_dir)

    @property
    def public(self):
        return self.data.public

    @property
    def train_set(self):
        """The private training shard, minus the plug-in's held-out slice (``held_out``)."""
        held = len(self.held_out)
        return self.data.train[:len(self.data.train) - held] if held else self.data.train

    @property
    def held_out(self):
        """The last ``holdout_size`` examples of the private shard: the plug-in measures
        the receiver on them; no host trains on them and they never leave the node."""
        return self._last(self.data.train, "private training examples")

    @property
    def test_set(self):
        return self.data.test


class SharedSLMNode(ClientNode):
    """The server's copy of a shared client SLM (FedCoLLM): client 0's model config, but
    the server's data view, and a starting point warmed up on the server's general data
    only, so the base every client receives carries no client's private data."""

    def __init__(self, cfg: "RunConfig", workspace: Path) -> None:
        super().__init__(cfg, 0, workspace)
        self.participant = "shared-slm"

    @property
    def who(self) -> str:
        return "server"

    @property
    def seed(self) -> int:
        return self.cfg.seed * 1000 + 998

    def initial_checkpoint(self) -> Path:
        return participant_checkpoint(self.cfg, "shared-slm")

    # The server's data view: its general data, and the server's held-out public slice.
    train_set = ServerNode.train_set
    held_out = ServerNode.held_out


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def server_workspace(cfg: "RunConfig") -> Path:
    return cfg.resolved_run_dir() / "nodes" / "server"
