"""Run configuration: dataclasses, TOML loading and validation.

A run is described by one TOML file. Every table maps to a dataclass below (or, for
``[host]`` and ``[plugin]``, to the config dataclass that lives next to the host or
plug-in it configures). Loading validates every key and type and names the file and
field of anything wrong, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lada import registry
# Re-exported: every layer names config errors and checks through lada.config.
from lada.schema import (ConfigError, build_dataclass, check_choice, check_non_negative,  # noqa: F401
                         check_positive, check_range)

TINY_FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
DATA_SOURCES = ("synthetic", "gsm8k", "strategyqa", "aqua", "jsonl")
SYNTHETIC_TASKS = ("arith", "yesno", "choice")  # lada.data.synthetic.TASKS (this module stays torch- and generator-free)
# tasks whose rationale ends on a line linking the chain to the answer (a comparison, a choice)
LINKED_TASKS = ("yesno", "choice")
PARTITIONS = ("domain", "dirichlet", "iid")
ENGINES = ("simulation", "deployment", "inline")
DTYPES = ("float32", "bfloat16", "float16")
# Positions of the tiny families (lada.models.tiny.MAX_POSITIONS; a test keeps them equal):
# generation needs room for the prompt, so max_new_tokens must stay below it.
TINY_MAX_POSITIONS = 512
MAX_SEED = 2**31 - 1  # seeds also feed torch and per-participant offsets (seed * 1000 + k)


@dataclass
class ModelConfig:
    """One participant's model. ``name`` is a tiny family built from this config
    (``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``) or any Hugging Face causal LM, by hub
    name or local path."""

    name: str = "tiny-llama"
    hidden_size: int = 96  # tiny families only
    num_layers: int = 3
    num_heads: int = 4
    vocab_size: int = 640  # size of the locally trained BPE tokenizer (tiny only)
    dtype: str = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    lora_r: int = 0  # 0: full fine-tuning; >0: LoRA adapters of this rank
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    warmup_steps: int = 0  # optimizer steps on the node's starting data before round 1
    warmup_lr: float = 3e-3
    warmup_batch_size: int = 16
    checkpoint: str = ""  # start from this saved model directory instead of warm-up

    @property
    def is_tiny(self) -> bool:
        return self.name in TINY_FAMILIES

    def validate(self, where: str) -> None:
        check_choice(self, where, "dtype", DTYPES)
        # sizes first: num_heads = 0 must be a config error, not a ZeroDivisionError below
        check_positive(self, where, "hidden_size", "num_layers", "num_heads", "vocab_size", "warmup_batch_size")
        check_non_negative(self, where, "lora_r", "warmup_steps")
        check_positive(self, where, "lora_alpha", "warmup_lr")
        check_range(self, where, "lora_dropout", 0, 1, hi_open=True)
        if not self.is_tiny:
            _check_model_name(self, where)
        if self.checkpoint and not Path(self.checkpoint).expanduser().is_dir():
            raise ConfigError(f"{where}.checkpoint: {self.checkpoint!r} is not a directory")
        if self.is_tiny and self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class DataConfig:
    """Where examples come from and how they are split into client shards, the public
    set and the held-out sets."""

    source: str = "synthetic"
    # Seed of the split, the synthetic data and the warm-ups. Unset: the run's `seed`, so
    # repeated runs of an experiment vary the data split and sampling as well (each data
    # seed has its own warm-ups). Set it to pin the data across run seeds: the shipped
    # configs say `seed = 0` here, as every config did before this field became optional.
    seed: int | None = None
    path: str = ""  # data file for file sources; empty: the copy shipped in the repo
    num_clients: int = 3
    train_per_client: int = 300
    test_per_client: int = 100
    public_size: int = 300
    server_test_size: int = 150  # held-out, all domains: the LLM's test set
    server_train_size: int = 2000  # server warm-up data, disjoint from the rest
    partition: str = "domain"
    dirichlet_alpha: float = 0.5
    # synthetic client domains, one per client; clients beyond the list get generated ones (gen0, gen1, ...)
    domains: list[str] = field(default_factory=lambda: ["shop", "farm", "travel"])
    skip_bad_lines: bool = False  # report and skip malformed lines instead of stopping
    # Folder of per-participant files (lada.data.split); each node reads only its own part.
    # Empty: `lada run` writes <run_dir>/data before the run.
    split_dir: str = ""
    # Testbed options of the synthetic task (docs/testbed.md, "Premises"). Neither changes
    # the client train shards or the server's data, so warm-ups stay valid.
    # [lo, hi]: client test sets drawn uniformly over lo..hi steps of the client's domain
    # (empty: the domain's own short-skewed mix, like the train shard).
    client_test_steps: list[int] = field(default_factory=list)
    public_domain_share: float = 0.5  # share of client-domain questions in the public set
    # Share of each client's test set that is general problems (uniform over the
    # client_test_steps range, else 1-6 steps) instead of its own domain: a client's
    # users ask general questions too, and there the LLM's long chains have something to teach.
    client_test_general_share: float = 0.0
    # Synthetic task (docs/testbed.md): "arith" (number answers), "yesno" (the same chains
    # asked "is the answer even?", answer type "yesno": task 2 of the evidence) or
    # "choice" (the same chains as five-option multiple choice, answer type "option").
    task: str = "arith"

    def validate(self, where: str) -> None:
        check_choice(self, where, "source", DATA_SOURCES)
        check_choice(self, where, "partition", PARTITIONS)
        if self.source == "jsonl" and not self.path:
            raise ConfigError(f"{where}.path: required when source = 'jsonl'")
        check_positive(self, where, "num_clients", "train_per_client", "test_per_client", "public_size",
                       "server_test_size", "dirichlet_alpha")
        check_non_negative(self, where, "server_train_size")
        check_range(self, where, "public_domain_share", 0, 1)
        check_range(self, where, "client_test_general_share", 0, 1)
        if self.client_test_steps:
            lo_hi = self.client_test_steps
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1] <= 6:
                raise ConfigError(f"{where}.client_test_steps: must be [lo, hi] with 1 <= lo <= hi <= 6 "
                                  f"(or empty), got {lo_hi!r}")
        check_choice(self, where, "task", SYNTHETIC_TASKS)
        if self.source != "synthetic":
            for name, off in (("client_test_steps", []), ("public_domain_share", 0.5),
                              ("client_test_general_share", 0.0), ("task", "arith")):
                if getattr(self, name) != off:
                    raise ConfigError(f"{where}.{name}: only for source = 'synthetic', got source {self.source!r}")

    def validate_domains(self, where: str) -> None:
        """Synthetic task: the first ``num_clients`` domains must be known client domains
        (named, or generated ``gen<k>``), one per client; clients beyond the list get
        generated domains (see ``lada.data.synthetic.client_domains``)."""
        if self.source != "synthetic":
            return
        from lada.data.synthetic import CLIENT_DOMAINS, GENERATED_PREFIX, is_client_domain

        used = list(self.domains)[:self.num_clients]
        for i, d in enumerate(used):
            if not is_client_domain(d):
                raise ConfigError(f"{where}.domains[{i}]: {d!r} is not a synthetic client domain; choose from "
                                  f"{list(CLIENT_DOMAINS)} or generated ones ({GENERATED_PREFIX}0, "
                                  f"{GENERATED_PREFIX}1, ...)")
        if len(set(used)) != len(used):
            raise ConfigError(f"{where}.domains: each client needs its own domain, got {used}")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every participant's training steps."""

    lr: float = 1e-3
    batch_size: int = 16
    local_steps: int = 40  # optimizer steps of a client's training on its private data per round
    # Every transfer (a receiver training on what a sender sent it) runs
    # ceil(transfer_epochs * examples in its training mix / batch_size) steps: a budget in
    # passes over what it trains on, so a filter that keeps half gets half the steps,
    # not twice the epochs (docs/lada.md, "Training budget").
    transfer_epochs: float = 2.0
    max_length: int = 256  # tokens of prompt + target
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Batches of similar lengths (lada.models.training.index_batches): far less padding, so
    # faster steps; the batches' composition, hence the trajectory, differs from random
    # batches. Warm-ups always use random batches (the shipped checkpoints' recipe).
    length_buckets: bool = False

    def validate(self, where: str) -> None:
        check_positive(self, where, "lr", "batch_size", "max_length")
        check_non_negative(self, where, "local_steps", "weight_decay")
        check_positive(self, where, "grad_clip", "transfer_epochs")


@dataclass
class GenerationConfig:
    """Sampling of reasoning paths and greedy evaluation."""

    paths_per_question: int = 2
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    batch_size: int = 256  # sequences per sampling batch (prompts x paths); outputs do not depend on it
    eval_batch_size: int = 256

    def validate(self, where: str) -> None:
        check_positive(self, where, "paths_per_question", "max_new_tokens", "batch_size", "eval_batch_size")
        check_range(self, where, "top_p", 0, 1, lo_open=True)
        check_non_negative(self, where, "temperature")


@dataclass
class EngineConfig:
    """How the federation is executed."""

    kind: str = "simulation"  # simulation | deployment | inline (one process, no Flower; for debugging)
    superlink: str = ""  # deployment: address of the SuperLink's control API (empty: local federation)
    # Remote SuperLink: TLS unless insecure = true. A local federation (no superlink) is
    # bound to 127.0.0.1 and runs without TLS unless `lada federation up --tls` made it.
    insecure: bool = False
    root_certificates: str = ""  # PEM CA bundle that signed the SuperLink's certificate (TLS)
    cpus_per_client: float = 1.0  # simulation: Ray CPU share of one ClientApp
    reply_timeout_s: float = 3600.0  # per phase: a client silent this long drops out of the round
    # A round goes on with the clients that answered as long as at least this many did
    # (the others rejoin later from their last committed state); 0: every client.
    min_clients: int = 0

    def validate(self, where: str) -> None:
        check_choice(self, where, "kind", ENGINES)
        check_positive(self, where, "cpus_per_client", "reply_timeout_s")
        check_non_negative(self, where, "min_clients")
        if self.root_certificates and not Path(self.root_certificates).expanduser().is_file():
            raise ConfigError(f"{where}.root_certificates: {self.root_certificates!r} is not a file")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    rounds: int = 3
    run_dir: str = ""  # default: runs/<name>
    cache_dir: str = ""  # warm-up cache; default: LADA_CACHE or ~/.cache/lada
    host: dict = field(default_factory=lambda: {"name": "cot"})
    plugin: dict = field(default_factory=lambda: {"name": "none"})
    data: DataConfig = field(default_factory=DataConfig)
    server: ModelConfig = field(default_factory=lambda: ModelConfig(name="tiny-llama", hidden_size=192, num_layers=4))
    clients: list[ModelConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    source_file: str = ""  # where this config was loaded from (set by the loader)

    @property
    def host_name(self) -> str:
        return self.host.get("name", _TABLE_DEFAULT_NAMES["host"])

    @property
    def plugin_name(self) -> str:
        return self.plugin.get("name", _TABLE_DEFAULT_NAMES["plugin"])

    def __post_init__(self) -> None:
        self.resolve_data_seed()

    def resolve_data_seed(self) -> None:
        """An unset ``data.seed`` follows the run's ``seed`` (resolved once, at load)."""
        if self.data.seed is None:
            self.data.seed = self.seed

    def validate(self, where: str = "config") -> None:
        check_positive(self, where, "rounds")
        check_range(self, where, "seed", 0, MAX_SEED)
        self.resolve_data_seed()
        check_range(self.data, f"{where} [data]", "seed", 0, MAX_SEED)
        for name, sub in (("data", self.data), ("server", self.server), ("train", self.train),
                          ("generation", self.generation), ("engine", self.engine)):
            sub.validate(f"{where} [{name}]")
        if not self.clients:
            raise ConfigError(f"{where}: at least one [[clients]] table is required")
        if len(self.clients) != self.data.num_clients:
            raise ConfigError(f"{where}: {len(self.clients)} [[clients]] tables but data.num_clients = {self.data.num_clients}")
        if self.engine.min_clients > len(self.clients):
            raise ConfigError(f"{where} [engine].min_clients: must be <= the number of clients "
                              f"({len(self.clients)}), got {self.engine.min_clients}")
        for k, c in enumerate(self.clients):
            c.validate(f"{where} [[clients]] #{k}")
        self.data.validate_domains(f"{where} [data]")
        if any(m.is_tiny for m in [self.server, *self.clients]):
            for name, v in (("generation.max_new_tokens", self.generation.max_new_tokens),
                            ("train.max_length", self.train.max_length)):
                if v >= TINY_MAX_POSITIONS:
                    raise ConfigError(f"{where} [{name.split('.')[0]}].{name.split('.')[1]}: must be < "
                                      f"{TINY_MAX_POSITIONS} (the tiny models' positions), got {v}")
        # Host and plug-in options are checked by their own options dataclasses (torch-free).
        registry.host_options(self, where)
        registry.plugin_options(self, where)

    def to_dict(self) -> dict:
        """Every field as a plain dict. ``[host]`` and ``[plugin]`` are written with every
        option at its value (defaults filled in), so that a stored run says what it ran
        even after a default changes (``config_matches`` compares them that way)."""
        d = dataclasses.asdict(self)
        d.pop("source_file")
        for which in _OPTION_TABLES:
            d[which] = self.options_table(which)
        return d

    def options_table(self, which: str) -> dict:
        """The ``[host]`` or ``[plugin]`` table with every option of its options dataclass
        (the table as written where the name is unknown or takes no options)."""
        table = getattr(self, which)
        try:
            options = _table_options(self, which)
        except ConfigError:  # an invalid table is reported by validate(), not here
            return dict(table)
        if options is None:
            return dict(table)
        return {"name": getattr(self, f"{which}_name"), **dataclasses.asdict(options)}

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def fingerprint(self, *parts: Any) -> str:
        """A short stable hash of the given config parts (for cache keys)."""
        blob = json.dumps(parts, sort_keys=True, default=_jsonable)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def _jsonable(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def _check_model_name(m: "ModelConfig", where: str) -> None:
    """A name that is not a tiny family must be a local model directory or a hub name
    (``org/model``); a path that does not exist is an error here, not deep in a load."""
    p = Path(m.name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{where}.name: {m.name!r} is a file; a local model is a directory")
        return
    looks_like_path = m.name.startswith((".", "/", "~")) or m.name.count("/") > 1 or "\\" in m.name
    if looks_like_path or not m.name.strip() or any(c.isspace() for c in m.name):
        raise ConfigError(f"{where}.name: {m.name!r} is neither a tiny family {TINY_FAMILIES} nor an existing "
                          "model directory")


# ----------------------------------------------------------------------------- parsing

def config_from_dict(data: dict, where: str = "config") -> RunConfig:
    cfg = build_dataclass(RunConfig, data, where)
    cfg.source_file = where
    cfg.validate(where)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config from TOML, applying ``key.sub=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    for ov in overrides or []:
        apply_override(data, ov, str(path))
    return config_from_dict(data, str(path))


def apply_override(data: dict, override: str, where: str = "override") -> None:
    """Apply ``a.b.c=value`` (value parsed as TOML, else taken as a string). A list of
    tables (``[[clients]]``) is indexed by number: ``clients.1.lora_r=8``."""
    if "=" not in override:
        raise ConfigError(f"{where}: override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        value = raw
    parts = key.strip().split(".")
    if not key.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"{where}: override {override!r}: empty key part in {key.strip()!r}")
    node: Any = data
    for i, p in enumerate(parts):
        here = ".".join(parts[:i]) or "the config"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit():
                raise ConfigError(f"{where}: override {key.strip()!r}: {here} is a list; "
                                  f"index it by number ({here}.0.{'.'.join(parts[i:])}), not {p!r}")
            if int(p) >= len(node):
                raise ConfigError(f"{where}: override {key.strip()!r}: {here} has {len(node)} entr"
                                  f"{'y' if len(node) == 1 else 'ies'}, no index {p}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"{where}: override {key.strip()!r}: {here} is a {type(node).__name__} "
                              f"({node!r}), not a table")


def dump_toml(d: dict) -> str:
    """Write a nested dict (scalars, lists, tables, lists of tables) as TOML."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(prefix: str, t: dict) -> None:
        simple = {k: v for k, v in t.items() if not isinstance(v, dict) and not _is_table_list(v)}
        for k, v in simple.items():
            lines.append(f"{k} = {scalar(v)}")
        for k, v in t.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                lines.append(f"\n[{name}]")
                table(name, v)
            elif _is_table_list(v):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    table(name, item)

    table("", d)
    return "\n".join(lines).lstrip() + "\n"


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


_UNSET = object()
# Fields that say where a result was made or stored, not what it measures.
_WHERE_NOT_WHAT = ("source_file", "device", "run_dir", "cache_dir")
# Tables whose keys are the options of a registered host / plug-in, and their default names.
_OPTION_TABLES = ("host", "plugin")
_TABLE_DEFAULT_NAMES = {"host": "cot", "plugin": "none"}


def _table_options(cfg: "RunConfig", which: str) -> Any:
    return registry.host_options(cfg) if which == "host" else registry.plugin_options(cfg)


def _table_matches(stored: Any, cfg: "RunConfig", which: str) -> bool:
    """A stored ``[host]``/``[plugin]`` table against the current one, by meaning: the
    names equal and every stored option equal to the current value, where an option the
    stored table leaves out counts as the current default (see ``config_matches``)."""
    if not isinstance(stored, dict):
        return False
    if stored.get("name", _TABLE_DEFAULT_NAMES[which]) != getattr(cfg, f"{which}_name"):
        return False
    rest = {k: v for k, v in stored.items() if k != "name"}
    try:
        options = _table_options(cfg, which)
    except ConfigError:
        return False
    if options is None:
        return config_matches(rest, {k: v for k, v in getattr(cfg, which).items() if k != "name"})
    return config_matches(rest, options)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _UNSET


def config_matches(stored: Any, current: Any) -> bool:
    """Whether a result made under the ``stored`` config (a dict, as ``to_dict`` wrote it,
    or read back from a run's config.toml) holds for the ``current`` one (a config
    object), so that a stored measurement or run may be reused. A field the stored config
    lacks (an option added since) matches only where the current value is its default,
    so a new option at its default does not invalidate earlier results, while any
    explicit difference does. ``[host]`` and ``[plugin]`` are compared by meaning, against
    the current options with their defaults filled in. A run's ``name`` (a label), where
    models ran and where results are stored (``device``, ``run_dir``, ``cache_dir``) are
    not compared."""
    if dataclasses.is_dataclass(current):
        if not isinstance(stored, dict):
            return False
        names = {f.name for f in dataclasses.fields(current)}
        if set(stored) - names:  # a field that no longer exists
            return False
        for f in dataclasses.fields(current):
            if f.name in _WHERE_NOT_WHAT:
                continue
            if isinstance(current, RunConfig):
                if f.name == "name":  # a label (the grid's method-seed)
                    continue
                if f.name in _OPTION_TABLES and f.name in stored:
                    if not _table_matches(stored[f.name], current, f.name):
                        return False
                    continue
            value = getattr(current, f.name)
            if f.name in stored:
                if not config_matches(stored[f.name], value):
                    return False
            elif _field_default(f) is _UNSET or value != _field_default(f):
                return False
        return True
    if isinstance(current, (list, tuple)):
        return isinstance(stored, list) and len(stored) == len(current) and \
            all(config_matches(a, b) for a, b in zip(stored, current))
    if isinstance(current, dict):
        return isinstance(stored, dict) and set(stored) == set(current) and \
            all(config_matches(stored[k], current[k]) for k in current)
    return json.loads(json.dumps(current, default=str)) == stored
