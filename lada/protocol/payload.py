"""Payloads: what one message carries between the server and a client.

A payload is a flat dict whose values are str, int, float, bool, bytes, lists of
those, or numpy arrays. Engines turn it into transport records (Flower
ConfigRecord/ArrayRecord); this module only defines the shape and counts bytes, so
communication cost is measured the same way on every engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Payload = dict[str, Any]

_SCALARS = (str, int, float, bool, bytes)


def check_payload(payload: Payload, where: str = "payload") -> None:
    """Raise TypeError naming the key whose value cannot cross the wire."""
    if not isinstance(payload, dict):
        raise TypeError(f"{where}: expected a dict, got {type(payload).__name__}")
    for key, value in payload.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: keys must be str, got {key!r}")
        if isinstance(value, np.ndarray) or isinstance(value, _SCALARS):
            continue
        if isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value):
            if len({type(v) for v in value}) > 1:
                raise TypeError(f"{where}[{key!r}]: list items must all have one type")
            continue
        raise TypeError(f"{where}[{key!r}]: unsupported value type {type(value).__name__}")


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (bool, int, float)):
        return 8
    if isinstance(value, list):
        return sum(_nbytes(v) for v in value)
    raise TypeError(f"cannot count bytes of {type(value).__name__}")


def payload_nbytes(payload: Payload) -> int:
    """Bytes of content a payload carries (keys included; framing excluded)."""
    return sum(len(k.encode("utf-8")) + _nbytes(v) for k, v in payload.items())
