"""The frame decoder: round trips, arbitrary splits, and hostile bytes (hypothesis)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gunicorn_ext.ipc import frames
from gunicorn_ext.ipc.errors import FrameError

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=50) | st.binary(max_size=50),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
ids = st.integers(0, 2**62)
slots = st.integers(-2, 1000)
names = st.text(max_size=30)

any_frame = st.one_of(
    st.builds(frames.Msg, ids, names, slots, slots, payloads),
    st.builds(frames.Req, ids, names, slots, slots, payloads),
    st.builds(frames.Rep, ids, payloads),
    st.builds(frames.Err, ids, names, names, slots, st.booleans(), names),
    st.builds(frames.Sub, names),
    st.builds(frames.Unsub, names),
    st.builds(frames.Pub, names, slots, payloads),
    st.builds(frames.Ready, st.integers(0, 2**31)),
)


@given(st.lists(any_frame, max_size=10), st.data())
def test_any_split_of_a_stream_gives_back_the_frames(fs: list[frames.Frame], data: st.DataObject) -> None:
    stream = b"".join(frames.encode(f) for f in fs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = frames.FrameReader()
    got: list[frames.Frame] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[prev:cut])
        prev = cut
    assert reader.error is None
    assert got == fs
    assert reader.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_never_raises_and_sets_a_reason(blob: bytes) -> None:
    reader = frames.FrameReader(max_frame=1024)
    for f in reader.feed(blob):  # never raises
        assert isinstance(f, (frames.Msg, frames.Req, frames.Rep, frames.Err, frames.Sub,
                              frames.Unsub, frames.Pub, frames.Ready))
    if reader.error is not None:
        assert str(reader.error)
        assert reader.feed(b"more") == []  # nothing is decoded past a bad frame


@given(st.lists(any_frame, min_size=1, max_size=5), st.binary(min_size=1, max_size=40))
def test_good_frames_before_a_bad_one_are_kept(fs: list[frames.Frame], junk: bytes) -> None:
    body = b"\xc1" + junk  # 0xc1 is never valid msgpack
    stream = b"".join(frames.encode(f) for f in fs) + len(body).to_bytes(4, "big") + body
    reader = frames.FrameReader()
    assert reader.feed(stream) == fs
    assert isinstance(reader.error, FrameError)


@pytest.mark.parametrize(
    "body,reason",
    [
        (msgspec.msgpack.encode(["zz", 1]), "unknown message type"),
        (msgspec.msgpack.encode(["q", "not-an-int", "n", 1, 1]), "malformed message"),
        (msgspec.msgpack.encode({"a": 1}), "malformed message"),
        (b"\xc1", "undecodable frame"),
    ],
)
def test_each_kind_of_bad_frame_names_its_reason(body: bytes, reason: str) -> None:
    reader = frames.FrameReader()
    assert reader.feed(len(body).to_bytes(4, "big") + body) == []
    assert reader.error is not None and reason in str(reader.error)


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    reader = frames.FrameReader(max_frame=1024)
    assert reader.feed((1 << 30).to_bytes(4, "big")) == []
    assert reader.error is not None and "exceeds the limit of 1024 bytes" in str(reader.error)
