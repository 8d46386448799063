"""Payload <-> Flower RecordDict, checked through Flower's own wire format
(deflate every object to bytes, inflate from bytes), as messages travel."""

from __future__ import annotations

import numpy as np
import pytest
from lada.engines.records import over_the_wire, payload_to_recorddict, recorddict_to_payload, wire_copy
from lada.protocol.payload import check_payload


def roundtrip(payload, meta=None):
    check_payload(payload)
    return recorddict_to_payload(over_the_wire(payload_to_recorddict(payload, meta)))


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        w = b[k]
        if isinstance(v, np.ndarray):
            assert isinstance(w, np.ndarray) and w.dtype == v.dtype and w.shape == v.shape, k
            assert np.array_equal(v, w, equal_nan=v.dtype.kind == "f"), k
        else:
            assert type(w) is type(v) and w == v, k
            if isinstance(v, list):
                assert [type(x) for x in w] == [type(x) for x in v], k


def test_every_supported_type_roundtrips():
    rng = np.random.default_rng(0)
    payload = {
        "text": "Question: 3 + 4?\n#### 7 — ünïcødé ✓ 数学",
        "empty_text": "",
        "n": -(2**62),
        "zero": 0,
        "x": 0.1,
        "inf": float("inf"),
        "yes": True,
        "no": False,
        "blob": bytes(range(256)),
        "texts": ["a", "", "ß∂ƒ", "line\nbreak"],
        "ints": [1, -2, 3],
        "floats": [0.5, -1.25],
        "flags": [True, False, True],
        "blobs": [b"", b"\x00\xff"],
        "empty": [],
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 5)).astype(np.float16),
        "bf": np.array([np.nan, 1.0], dtype=np.float64),
        "i32": np.arange(-5, 5, dtype=np.int32).reshape(2, 5),
        "i64": np.array([2**40, -1], dtype=np.int64),
        "u8": np.arange(7, dtype=np.uint8),
        "bools": np.array([True, False]),
        "scalar": np.array(3.5, dtype=np.float32),  # 0-d
        "none": np.zeros((0, 3), dtype=np.int32),  # empty
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],  # not contiguous
    }
    out, meta = roundtrip(payload, {"round": 3, "phase": "distill"})
    assert_same(payload, out)
    assert meta == {"round": 3, "phase": "distill"}


def test_the_inline_engine_s_copy_is_the_wire_s_and_shares_nothing():
    payload = {"ids": [3, 1], "x": np.arange(4, dtype=np.float16), "yes": True, "texts": ["a"]}
    out = wire_copy(payload)
    assert_same(payload, out)
    out["ids"].append(9)
    out["x"][0] = 7
    assert payload["ids"] == [3, 1] and payload["x"][0] == 0


def test_large_array_is_chunked_and_exact():
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as chunk

    n = (3 * chunk) // 4 + 17  # float32: about three chunks
    big = np.random.default_rng(1).standard_normal(n).astype(np.float32).reshape(-1, 1)
    content = payload_to_recorddict({"logits": big})
    assert len(content.array_records["arrays"]["logits"].slice_array()) >= 3
    out, meta = recorddict_to_payload(over_the_wire(content))
    assert meta == {}
    assert out["logits"].dtype == np.float32 and np.array_equal(out["logits"], big)


def test_empty_payload():
    out, meta = roundtrip({})
    assert out == {} and meta == {}


def test_payload_key_named_like_a_record_does_not_collide():
    out, _ = roundtrip({"meta": "mine", "arrays": [1], "values": np.ones(2)}, {"round": 1})
    assert out["meta"] == "mine" and out["arrays"] == [1] and np.array_equal(out["values"], np.ones(2))


def test_object_arrays_are_refused_with_the_key():
    with pytest.raises(TypeError, match="'bad'"):
        payload_to_recorddict({"bad": np.array([{"a": 1}], dtype=object)})


def test_mixed_list_is_refused():
    with pytest.raises(TypeError):
        payload_to_recorddict({"mixed": [1, "a"]})
