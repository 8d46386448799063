"""The lowest layer of configuration: the error type, the range checks every options
dataclass shares, and building a dataclass from a TOML table with key and type checks.
``lada.config`` (the run config), ``lada.registry`` and the host / plug-in options
dataclasses build on it; it imports nothing of lada."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config file or table is invalid; the message names the file and the field."""


# Range checks shared by every options dataclass (run config, hosts, plug-ins), so
# all of them word their errors the same way: "<where>.<field>: must be ..., got ...".

def check_positive(obj: Any, where: str, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{where}.{n}: must be > 0, got {getattr(obj, n)!r}")


def check_non_negative(obj: Any, where: str, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{where}.{n}: must be >= 0, got {getattr(obj, n)!r}")


def check_range(obj: Any, where: str, name: str, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = False) -> None:
    """``lo <= value <= hi`` (``lo < value`` with ``lo_open``, ``value < hi`` with ``hi_open``)."""
    v = getattr(obj, name)
    if not ((lo < v) if lo_open else (lo <= v)) or not ((v < hi) if hi_open else (v <= hi)):
        raise ConfigError(f"{where}.{name}: must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                          f"got {v!r}")


def check_choice(obj: Any, where: str, name: str, choices: tuple) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise ConfigError(f"{where}.{name}: must be one of {choices}, got {v!r}")


# ----------------------------------------------------------------------------- parsing

def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking keys and types.

    Unknown keys and wrong types raise ConfigError naming ``where`` and the key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # TOML has nan and inf literals; no setting of ours means anything with them
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got bool {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
