"""The one registry of hosts and plug-ins: names -> implementation and options.

Each entry names its implementation class and its options dataclass as
``"module:Name"`` strings, so nothing is imported until it is used. Validating a
config loads only the options dataclasses (``lada/hosts/options.py``,
``lada/plugin/options.py``), which import neither torch nor any host or plug-in code:
``load_config`` stays cheap and never reports a missing torch as a config error.
Building a host or plug-in for a run imports its implementation.

This module sits at the bottom of the layering (next to ``lada.config``) and imports
upper layers only by name through ``importlib``: it is how lower layers (the protocol's
driver) find hosts and plug-ins without importing them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lada.schema import ConfigError, build_dataclass

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.protocol.host import Host, Plugin


@dataclass(frozen=True)
class Entry:
    impl: str  # "module:Class" of the Host / Plugin subclass
    options: str | None = None  # "module:Dataclass" of its [host] / [plugin] options, None: takes none


# A host is one module with a `Host` subclass. A plain "module:Class" string is accepted
# too (its options then come from the class's `config_cls`), e.g. for hosts that tests
# register at run time.
HOSTS: dict[str, Entry | str] = {
    "standalone": Entry("lada.hosts.standalone:StandaloneHost"),
    "cot": Entry("lada.hosts.cot:CoTHost", "lada.hosts.options:CoTConfig"),
    "fedmkt": Entry("lada.hosts.fedmkt:FedMKTHost", "lada.hosts.options:FedMKTConfig"),
    "fedcollm": Entry("lada.hosts.fedcollm:FedCoLLMHost", "lada.hosts.options:FedCoLLMConfig"),
}

PLUGINS: dict[str, Entry | str] = {
    "none": Entry("lada.protocol.host:Plugin"),
    "lada": Entry("lada.plugin.lada:LadaPlugin", "lada.plugin.options:LadaConfig"),
}


def _load(ref: str, what: str, name: str, where: str) -> Any:
    module, attr = ref.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # the registered module itself is missing
            raise ConfigError(f"{where}: {what} {name!r} is registered as {ref!r}, but {module} does not exist") \
                from e
        raise  # a missing dependency (e.g. torch) is an installation problem, not a config error
    if not hasattr(mod, attr):
        raise ConfigError(f"{where}: {what} {name!r} is registered as {ref!r}, but {module} has no {attr}")
    return getattr(mod, attr)


def _entry(table: dict, name: str, what: str, where: str) -> Entry | str:
    if name not in table:
        raise ConfigError(f"{where}: unknown {what} {name!r}; available: {sorted(table)}")
    return table[name]


def _impl(table: dict, name: str, what: str, where: str) -> type:
    e = _entry(table, name, what, where)
    return _load(e if isinstance(e, str) else e.impl, what, name, where)


def _options_cls(table: dict, name: str, what: str, where: str) -> type | None:
    e = _entry(table, name, what, where)
    if isinstance(e, str):
        return getattr(_load(e, what, name, where), "config_cls", None)
    return _load(e.options, what, name, where) if e.options else None


def build_options(options_cls: type | None, table: dict, where: str) -> Any:
    """Validate a [host]/[plugin] table (minus "name") against an options dataclass."""
    opts = {k: v for k, v in table.items() if k != "name"}
    if options_cls is None:
        if opts:
            raise ConfigError(f"{where}: takes no options, got {sorted(opts)}")
        return None
    options = build_dataclass(options_cls, opts, where)
    if hasattr(options, "validate"):
        options.validate(where)
    return options


def host_class(name: str, where: str = "[host].name") -> type:
    return _impl(HOSTS, name, "host", where)


def plugin_class(name: str, where: str = "[plugin].name") -> type:
    return _impl(PLUGINS, name, "plugin", where)


def host_options(cfg: "RunConfig", where: str = "config") -> Any:
    cls = _options_cls(HOSTS, cfg.host_name, "host", f"{where} [host].name")
    return build_options(cls, cfg.host, f"{where} [host]")


def plugin_options(cfg: "RunConfig", where: str = "config") -> Any:
    cls = _options_cls(PLUGINS, cfg.plugin_name, "plugin", f"{where} [plugin].name")
    return build_options(cls, cfg.plugin, f"{where} [plugin]")


def make_plugin(cfg: "RunConfig") -> "Plugin":
    return plugin_class(cfg.plugin_name)(cfg, plugin_options(cfg))


def make_host(cfg: "RunConfig", plugin: "Plugin") -> "Host":
    return host_class(cfg.host_name)(cfg, host_options(cfg), plugin)
