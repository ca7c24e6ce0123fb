"""The one codec for app values kept in a store: :func:`dumps` and :func:`loads`.

Sessions (one hash field per top-level key) and the shared primitives store app values
with it, so a value means the same thing wherever it was written.

A value is plain JSON (msgspec, fast) when JSON keeps it exactly: ``str``, ``int`` that
fits 64 bits, finite ``float``, ``bool``, ``None``, and lists and str-keyed dicts of
those. Anything else (tuple, bytes, datetime, ``Markup``, UUID...) is Flask's tagged JSON (:class:`flask.json.tag.TaggedJSONSerializer`, what
Flask's cookie session uses) behind a marker byte ``\\x01``, which never starts plain
JSON. A type neither handles raises :class:`TypeError`, as in Flask's cookie session.
Never pickle: decoding stored bytes never runs code.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from gunicorn_ext.extras import missing_extra

try:
    from flask.json.tag import TaggedJSONSerializer
except ImportError as exc:
    raise missing_extra(exc, "flask", __name__) from exc

__all__ = ["TAGGED", "dumps", "loads"]

TAGGED = b"\x01"  # marks a value stored in Flask's tagged JSON (never starts plain JSON)

_serializer = TaggedJSONSerializer()
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode
_SCALARS = (str, int, bool, type(None))


def _plain(value: Any) -> bool:
    """True when JSON keeps ``value`` exactly (no tuple, bytes, datetime, Markup, UUID...)."""
    t = type(value)
    if t in _SCALARS:
        return t is not int or -(2**63) <= value < 2**64
    if t is float:
        return math.isfinite(value)
    if t is list:
        return all(_plain(v) for v in value)
    if t is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def dumps(value: Any) -> bytes:
    """``value`` as stored: plain JSON when that round-trips exactly, else Flask's tagged
    JSON behind :data:`TAGGED`."""
    if _plain(value):
        return _json_encode(value)
    return TAGGED + _serializer.dumps(value).encode("utf-8")


def loads(raw: bytes) -> Any:
    """The value :func:`dumps` stored as ``raw``. Raises (``ValueError``, ``TypeError``,
    ``msgspec.DecodeError``...) on bytes it did not write; it never runs code."""
    if raw[:1] == TAGGED:
        return _serializer.loads(raw[1:].decode("utf-8"))
    return _json_decode(raw)
