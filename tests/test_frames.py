"""The frame encoder and decoder: round trips, arbitrary splits, what the sender must refuse,
and hostile bytes (hypothesis)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gunicorn_ext.ipc import frames
from gunicorn_ext.ipc.bus import Bus
from gunicorn_ext.ipc.errors import FrameError, MessageTooLarge, UnencodableMessage
from gunicorn_ext.ipc.hub import Hub

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


# -- the encoder: refuses in the sender what a receiver could not decode ---------------------

wild_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
    | st.binary(max_size=20) | st.complex_numbers() | st.just(object()) | st.just(Ellipsis)
)
wild = st.recursive(
    wild_leaves,
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200)
@given(wild, st.integers(16, 4096))
def test_encode_returns_a_frame_that_decodes_or_refuses_with_a_bus_error(payload: object,
                                                                          limit: int) -> None:
    frame = frames.Msg(1, "n", -1, 0, payload)
    try:
        data = frames.encode(frame, limit)
    except MessageTooLarge as exc:
        assert "over the bus limit" in str(exc)
        assert len(frames.encode(frame)) - 4 > limit  # only what is really over the limit
        return
    except UnencodableMessage as exc:
        assert "can't be sent on the bus" in str(exc)
        return
    assert len(data) - 4 <= limit
    reader = frames.FrameReader(limit)
    got = reader.feed(data)
    assert reader.error is None and len(got) == 1 and isinstance(got[0], frames.Msg)


@given(st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1))
def test_ints_beyond_64_bits_are_unencodable(i: int) -> None:
    with pytest.raises(UnencodableMessage, match="OverflowError"):
        frames.encode(frames.Pub("t", 0, {"n": [i]}))


@given(st.integers(-(2**63), 2**64 - 1))
def test_every_64_bit_int_round_trips(i: int) -> None:
    reader = frames.FrameReader()
    assert reader.feed(frames.encode(frames.Rep(1, i))) == [frames.Rep(1, i)]


def test_nesting_too_deep_to_encode_is_unencodable() -> None:
    deep: object = None
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UnencodableMessage, match="RecursionError"):
        frames.encode(frames.Req(1, "n", 0, 1, deep))


@pytest.mark.parametrize("call", [
    lambda bus, hub: bus.send(5),
    lambda bus, hub: bus.send(b"name"),
    lambda bus, hub: bus.send("n", None, 1.0),
    lambda bus, hub: bus.request("n", None, True),
    lambda bus, hub: bus.request("n", None, "0"),
    lambda bus, hub: bus.publish(None),
    lambda bus, hub: bus.subscribe(3),
    lambda bus, hub: bus.unsubscribe(3),
    lambda bus, hub: hub.send(1.0, "n"),
    lambda bus, hub: hub.send(0, 7),
    lambda bus, hub: hub.broadcast(("n",)),
    lambda bus, hub: hub.publish(1),
    lambda bus, hub: hub.request(False, "n"),
])
def test_wrongly_typed_names_and_destinations_are_refused_in_the_caller(call: Any) -> None:
    """The receiver's typed decoder would refuse them and close the connection."""
    with pytest.raises(UnencodableMessage, match="must be"):
        call(Bus(), Hub())


def test_error_text_is_bounded() -> None:
    text = "kaboom " * frames.MAX_ERROR_TEXT
    err = frames.Err(1, "handler_error", text)
    assert len(err.message) == frames.MAX_ERROR_TEXT + 3 and text.startswith(err.message[:-3])
    assert frames.FrameReader().feed(frames.encode(err)) == [err]


# -- the decoder: hostile bodies behind a well-formed length prefix ----------------------------


@settings(max_examples=150)
@given(any_frame, st.data())
def test_a_corrupted_frame_never_raises(frame: frames.Frame, data: st.DataObject) -> None:
    body = bytearray(frames.encode(frame)[4:])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and body:
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut" and body:
            del body[data.draw(st.integers(0, len(body) - 1)):]
        else:
            body.insert(data.draw(st.integers(0, len(body))), data.draw(st.integers(0, 255)))
    reader = frames.FrameReader()
    tail = frames.encode(frames.Ready(7))
    got = reader.feed(len(body).to_bytes(4, "big") + bytes(body) + tail)  # never raises
    if reader.error is None:
        assert len(got) == 2 and got[1] == frames.Ready(7)  # still in sync
    else:
        assert len(got) <= 1


@settings(max_examples=50)
@given(st.integers(1, 200_000), st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"]))
def test_nesting_too_deep_to_decode_is_a_frame_error_not_a_crash(depth: int, level: bytes) -> None:
    body = b"\x93\xa1r\x01" + level * depth + b"\xc0"  # a Rep whose payload nests `depth` levels
    reader = frames.FrameReader(1 << 30)
    got = reader.feed(len(body).to_bytes(4, "big") + body)
    if reader.error is not None:
        assert got == [] and "nested too deeply" in str(reader.error)
    else:
        assert len(got) == 1 and isinstance(got[0], frames.Rep)
    assert reader.feed(b"") == []  # the reader's state is consistent either way


def _at_depth(levels: int, fn: Any) -> Any:
    """``fn()`` called ``levels`` Python frames deeper than here."""
    return fn() if levels == 0 else _at_depth(levels - 1, fn)


@pytest.mark.parametrize("enc_depth,dec_depth", [(0, 700), (700, 0), (700, 700)])
def test_how_deep_a_value_can_nest_does_not_depend_on_either_stack(enc_depth: int,
                                                                  dec_depth: int) -> None:
    deep: Any = None
    for _ in range(900):
        deep = [deep]
    frame = frames.Rep(1, deep)
    data = _at_depth(enc_depth, lambda: frames.encode(frame))
    reader = frames.FrameReader()
    assert _at_depth(dec_depth, lambda: reader.feed(data)) == [frame]
    assert reader.error is None
