"""Payload <-> Flower RecordDict.

A payload (see `lada.protocol.payload`) is a flat dict. On the wire it becomes one
RecordDict with up to three records:

- ``arrays``: an ArrayRecord with every numpy value (dtype and shape kept exactly;
  Flower chunks large arrays by itself),
- ``values``: a ConfigRecord with everything else (str, int, float, bool, bytes and
  lists of one of those),
- ``meta``: a ConfigRecord the engines use for routing (round, phase), kept apart
  so a payload key can never collide with it.

Only this module and the engines know about Flower records; the protocol never does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from lada.protocol.payload import Payload

ARRAYS = "arrays"
VALUES = "values"
META = "meta"


def payload_to_recorddict(payload: Payload, meta: dict[str, Any] | None = None) -> RecordDict:
    """Pack a payload (and optional routing metadata) into a RecordDict."""
    arrays: dict[str, Array] = {}
    values: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"payload[{key!r}]: object arrays cannot cross the wire")
            arrays[key] = Array(value)
        else:
            values[key] = value
    try:
        content = RecordDict({ARRAYS: ArrayRecord(arrays), VALUES: ConfigRecord(values)})
        if meta is not None:
            content[META] = ConfigRecord(dict(meta))
    except TypeError as e:
        raise TypeError(f"payload cannot be turned into Flower records: {e}") from e
    return content


def recorddict_to_payload(content: RecordDict) -> tuple[Payload, dict[str, Any]]:
    """Unpack a RecordDict made by `payload_to_recorddict`: (payload, meta)."""
    payload: Payload = {}
    if VALUES in content.config_records:
        payload.update(dict(content.config_records[VALUES]))
    if ARRAYS in content.array_records:
        for key, arr in content.array_records[ARRAYS].items():
            payload[key] = arr.numpy()
    meta = dict(content.config_records[META]) if META in content.config_records else {}
    return payload, meta


def over_the_wire(content: RecordDict) -> RecordDict:
    """``content`` as the receiver of a Flower 1.42 message gets it: split into Flower's
    inflatable objects, each deflated to bytes, and inflated again."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    out = inflate_object_from_contents(content.object_id, contents)
    if not isinstance(out, RecordDict):
        raise TypeError(f"a RecordDict came back from the wire as {type(out).__name__}")
    return out


def wire_copy(payload: Payload) -> Payload:
    """The payload as the other side of a Flower message gets it (`over_the_wire`). The
    inline engine sends every payload through this, so a value that Flower would not
    carry the same way fails there as it would on the Flower engines, and nothing is
    shared by reference."""
    return recorddict_to_payload(over_the_wire(payload_to_recorddict(payload)))[0]
