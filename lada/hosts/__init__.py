"""Collaboration frameworks ("hosts"). A host is one module with a `Host` subclass;
register it in HOSTS as "module:Class" so it is imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.protocol.host import Host, Plugin

HOSTS: dict[str, str] = {
    "standalone": "lada.hosts.standalone:StandaloneHost",
    "cot": "lada.hosts.cot:CoTHost",
    "fedmkt": "lada.hosts.fedmkt:FedMKTHost",
    "fedcollm": "lada.hosts.fedcollm:FedCoLLMHost",
}


def _resolve(table: dict[str, str], name: str, what: str, where: str) -> type:
    from lada.config import ConfigError

    if name not in table:
        raise ConfigError(f"{where}: unknown {what} {name!r}; available: {sorted(table)}")
    module, cls = table[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}: {what} {name!r} is registered but cannot be loaded: {e}") from e


def options_for(cls: type, table: dict, where: str) -> Any:
    """Validate a [host]/[plugin] table (minus "name") against the class's config dataclass."""
    from lada.config import ConfigError, build_dataclass

    opts = {k: v for k, v in table.items() if k != "name"}
    if getattr(cls, "config_cls", None) is None:
        if opts:
            raise ConfigError(f"{where}: {cls.__name__} takes no options, got {sorted(opts)}")
        return None
    options = build_dataclass(cls.config_cls, opts, where)
    if hasattr(options, "validate"):
        options.validate(where)
    return options


def host_config(cfg: "RunConfig", where: str = "config") -> Any:
    cls = _resolve(HOSTS, cfg.host_name, "host", f"{where} [host].name")
    return options_for(cls, cfg.host, f"{where} [host]")


def make_host(cfg: "RunConfig", plugin: "Plugin") -> "Host":
    cls = _resolve(HOSTS, cfg.host_name, "host", "[host].name")
    return cls(cfg, options_for(cls, cfg.host, "[host]"), plugin)
