"""The stored-value codec (gunicorn_ext.state.codec): exact round trips, JSON only, no pickle."""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from gunicorn_ext.state import codec

_json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_tagged_leaves = st.one_of(
    _json_leaves, st.binary(max_size=20), st.uuids(),
    # Flask's tag keeps whole seconds, in HTTP date form (years before 1000 come back
    # wrong, as in Flask's own cookie session).
    st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(timezone.utc)).map(
        lambda d: d.replace(microsecond=0)),
    st.text(max_size=20).map(Markup))
_values = st.recursive(
    _tagged_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_values_round_trip_through_storage(value: Any) -> None:
    raw = codec.dumps(value)
    assert isinstance(raw, bytes)
    back = codec.loads(raw)
    assert back == value and type(back) is type(value)


def test_plain_json_when_json_keeps_the_value() -> None:
    assert codec.dumps({"a": [1, "x", None, True, 1.5]}) == b'{"a":[1,"x",null,true,1.5]}'
    assert codec.dumps(2**64 - 1) == b"18446744073709551615"
    for value in ((1, 2), b"x", Markup("<b>"), 2**64, float("inf"), {"a": (1,)}):
        raw = codec.dumps(value)
        assert raw[:1] == codec.TAGGED
        json.loads(raw[1:])  # tagged JSON is JSON


def test_never_pickle() -> None:
    with pytest.raises(TypeError):
        codec.dumps(object())
    with pytest.raises(Exception):  # noqa: B017 - any decode error, never code run
        codec.loads(pickle.dumps({"a": 1}))
