"""Plug-ins that change what a host transfers and how. `none` is the plain host;
`lada` is the learnability-aware filter plus contrastive reasoning distillation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lada.hosts import _resolve, options_for

if TYPE_CHECKING:
    from lada.config import RunConfig
    from lada.protocol.host import Plugin

PLUGINS: dict[str, str] = {
    "none": "lada.protocol.host:Plugin",
    "lada": "lada.plugin.lada:LadaPlugin",
}


def plugin_config(cfg: "RunConfig", where: str = "config") -> Any:
    cls = _resolve(PLUGINS, cfg.plugin_name, "plugin", f"{where} [plugin].name")
    return options_for(cls, cfg.plugin, f"{where} [plugin]")


def make_plugin(cfg: "RunConfig") -> "Plugin":
    cls = _resolve(PLUGINS, cfg.plugin_name, "plugin", "[plugin].name")
    return cls(cfg, options_for(cls, cfg.plugin, "[plugin]"))
