"""cfpo_jax.sandbox_wire: the plain-data codec between a verdict and the sandboxed candidate.

Round trips are compared with the value itself (and each part's exact type); what the decoder
must refuse is written here as raw JSON, as a hostile candidate would send it."""

import math
import os
import time

import pytest

from cfpo_jax import sandbox_wire as wire

PLAIN = [None, True, False, 0, -7, 2**62 - 1, 2**62, -2**200, 10**5000, 1.5, -0.0, 1e308,
         float("inf"), "", "é\U0001f600", "\ud800", b"", b"\x00\xff", 3 + 4j, [], (), set(),
         frozenset(), {}, [1, [2, (3, {4: "x"})]], {(1, 2): {"a", "b"}, "k": [b"v"]},
         {frozenset({1}): None}, ((),)]


def _types(value):
    """The value with every part replaced by its exact type (and contents)."""
    if isinstance(value, (list, tuple)):
        return (type(value), [_types(v) for v in value])
    if isinstance(value, (set, frozenset)):
        return (type(value), sorted(map(repr, value)))
    if isinstance(value, dict):
        return (dict, [(_types(k), _types(v)) for k, v in value.items()])
    if type(value) is int:  # hex: no str digit limit (10**5000)
        return (int, hex(value))
    return (type(value), repr(value))


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
def test_plain_data_round_trips_exactly(value):
    back = wire.decode(wire.encode(value))
    assert _types(back) == _types(value)


def test_nan_and_the_sign_of_zero_survive():
    back = wire.decode(wire.encode([float("nan"), -0.0, complex(float("nan"), -0.0)]))
    assert math.isnan(back[0]) and math.copysign(1, back[1]) == -1
    assert math.isnan(back[2].real) and math.copysign(1, back[2].imag) == -1


class _Int(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


@pytest.mark.parametrize("value", [object(), _Int(3), [1, _Int(2)], {"k": lambda: 1},
                                   bytearray(b"x"), range(3), type, ValueError("x")],
                         ids=lambda v: type(v).__name__)
def test_encode_refuses_what_is_not_plain_data(value):
    with pytest.raises(wire.WireError, match="not plain data"):
        wire.encode(value)


def test_encode_refuses_deep_nesting():
    deep = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(wire.WireError, match="deeper"):
        wire.encode(deep)


@pytest.mark.parametrize("raw", [
    b"1.5",                      # an untagged float
    b'["X", 1]',                 # an unknown tag
    b"[1, 2]",                   # an untagged list
    b'["F", "zz"]',              # a bad float
    b'["I", "0xg"]',             # a bad int
    b'["D", [1]]',               # a dict entry that is not a pair
    b'["S", ["L", 1]]',          # an unhashable set member
    b'["D", [["L"], 1]]',        # an unhashable key
    b"{\"a\": 1}",               # a JSON object
    b"[" * 100000 + b"]" * 100000,  # recursion
    b"\xff",                     # not UTF-8
    b"",
], ids=range(12))
def test_decode_refuses_anything_else(raw):
    with pytest.raises(wire.WireError):
        wire.decode(raw)


def test_frames_are_capped_and_bounded_in_time():
    r, w = os.pipe()
    try:
        wire.write_frame(w, b"hello")
        assert wire.read_frame(r, cap=5) == b"hello"
        wire.write_frame(w, b"x" * 100)
        with pytest.raises(wire.WireError, match="longer than the cap"):
            wire.read_frame(r, cap=10)
    finally:
        os.close(r)
        os.close(w)
    r, w = os.pipe()
    try:
        started = time.monotonic()
        with pytest.raises(wire.WireError, match="deadline"):
            wire.read_frame(r, cap=10, deadline=time.monotonic() + 0.2)
        assert time.monotonic() - started < 1.0
    finally:
        os.close(r)
        os.close(w)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(wire.WireError, match="closed"):
        wire.read_frame(r, cap=10)
    os.close(r)
