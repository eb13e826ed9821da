"""Plain data over a pipe, both ways, between the verdict and the sandboxed candidate.

Only None, bool, int, float, complex, str, bytes and lists, tuples, dicts, sets and frozensets of
them cross; anything else (a subclass included: an `int` whose `__eq__` always says True) is
refused by `encode`, and `decode` builds nothing but those exact built-in types from JSON with
type tags — never pickle, never eval — so what the candidate's side sends can only ever be plain
data. A frame is 8 bytes of big-endian length and then the JSON; `read_frame` refuses frames
longer than its cap before reading them.

Standard library only, no import of cfpo_jax: the launcher and the candidate's interpreter both
run it with `python -I -S`.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time

_HEADER = struct.Struct(">Q")
_SMALL_INT = 2**62  # beyond it, ints travel as hex (no str/int digit limit, exact)


class WireError(Exception):
    """The other side broke the protocol: bad JSON, a type that is not plain data, a frame too
    long, the pipe closed or the deadline passed."""


def _enc(value, depth: int):
    if depth > 200:
        raise WireError("nested deeper than 200 levels")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -_SMALL_INT < value < _SMALL_INT else ["I", hex(value)]
    if kind is float:
        return ["F", value.hex()]  # exact, and nan/inf too
    if kind is complex:
        return ["C", value.real.hex(), value.imag.hex()]
    if kind is bytes:
        return ["B", value.hex()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "L", tuple: "T", set: "S", frozenset: "Z"}[kind]
        return [tag, *(_enc(item, depth + 1) for item in value)]
    if kind is dict:
        return ["D", *([_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in value.items())]
    raise WireError(f"{kind.__name__} is not plain data (None, bool, int, float, complex, str, "
                    "bytes, or lists, tuples, dicts and sets of them)")


def encode(value) -> bytes:
    """`value` as JSON bytes; WireError when any part of it is not plain data."""
    return json.dumps(_enc(value, 0), ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8", "surrogatepass")


def _dec(node):
    kind = type(node)
    if node is None or kind is bool or kind is str or kind is int:
        return node
    if kind is not list or not node or type(node[0]) is not str:
        raise WireError(f"not a plain-data node: {str(node)[:80]}")
    tag, items = node[0], node[1:]
    try:
        if tag == "I" and len(items) == 1:
            return int(items[0], 16)
        if tag == "F" and len(items) == 1:
            return float.fromhex(items[0])
        if tag == "C" and len(items) == 2:
            return complex(float.fromhex(items[0]), float.fromhex(items[1]))
        if tag == "B" and len(items) == 1:
            return bytes.fromhex(items[0])
    except (TypeError, ValueError) as e:
        raise WireError(f"bad {tag} node: {e}") from None
    if tag == "L":
        return [_dec(item) for item in items]
    if tag == "T":
        return tuple(_dec(item) for item in items)
    try:  # unhashable keys or members: a list inside a set
        if tag == "S":
            return {_dec(item) for item in items}
        if tag == "Z":
            return frozenset(_dec(item) for item in items)
        if tag == "D":
            if any(type(pair) is not list or len(pair) != 2 for pair in items):
                raise WireError("a dict entry is not a [key, value] pair")
            return {_dec(k): _dec(v) for k, v in items}
    except TypeError as e:
        raise WireError(str(e)) from None
    raise WireError(f"unknown node tag {tag[:20]!r}")


def decode(data: bytes):
    """The plain data in `data` (from `encode`); WireError for anything else."""
    try:
        node = json.loads(data.decode("utf-8", "surrogatepass"))
        return _dec(node)
    except WireError:
        raise
    except (ValueError, RecursionError, MemoryError, UnicodeDecodeError) as e:
        raise WireError(f"undecodable frame: {type(e).__name__}: {str(e)[:200]}") from None


def write_frame(fd: int, payload: bytes):
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, count: int, deadline: float | None) -> bytes:
    chunks, left = [], count
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WireError("the deadline passed")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise WireError("the pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, *, cap: int, deadline: float | None = None) -> bytes:
    """One frame's payload; WireError when it is longer than `cap` bytes, the pipe closes or
    `deadline` (time.monotonic()) passes."""
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    if length > cap:
        raise WireError(f"a frame of {length} bytes is longer than the cap of {cap}")
    return _read_exact(fd, length, deadline)
