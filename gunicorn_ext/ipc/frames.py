"""The wire format of the bus.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack
(msgspec), holding one of the message structs below as a tagged array. The
decoder is typed, so a frame of the wrong shape or with an unknown tag fails to
decode instead of reaching a handler. Payloads are plain msgpack values
(dict, list, str, bytes, int, float, bool, None): no pickle, ever.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from .errors import FrameError

#: Address of the primary (arbiter) process.
PRIMARY = -1
#: Address meaning "every worker of this instance".
ALL = -2

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 * 1024 * 1024


class Msg(msgspec.Struct, array_like=True, tag="m"):
    """One-way message. ``id`` lets the receiver report a failure back to ``src``."""

    id: int
    name: str
    dst: int
    src: int
    payload: Any = None


class Req(msgspec.Struct, array_like=True, tag="q"):
    """Request that expects exactly one :class:`Rep` or :class:`Err` with the same id."""

    id: int
    name: str
    dst: int
    src: int
    payload: Any = None


class Rep(msgspec.Struct, array_like=True, tag="r"):
    """Successful reply to the request ``id``."""

    id: int
    payload: Any = None


class Err(msgspec.Struct, array_like=True, tag="e"):
    """Failed reply to request ``id``, or a failure notice for one-way message ``id``.

    ``dst`` is where a notice for a one-way message goes (a slot or PRIMARY);
    replies to requests are routed by id and ignore it.
    """

    id: int
    code: str
    message: str
    dst: int = PRIMARY
    oneway: bool = False
    #: Name of the failed one-way message (notices only).
    name: str = ""


class Sub(msgspec.Struct, array_like=True, tag="s"):
    """Subscribe this connection to a topic."""

    topic: str


class Unsub(msgspec.Struct, array_like=True, tag="u"):
    """Unsubscribe this connection from a topic."""

    topic: str


class Pub(msgspec.Struct, array_like=True, tag="p"):
    """Publication on a topic; the primary fans it out to the subscribers."""

    topic: str
    src: int
    payload: Any = None


class Ready(msgspec.Struct, array_like=True, tag="y"):
    """Sent by a worker once its app is loaded and it is about to serve."""

    pid: int


Frame = Msg | Req | Rep | Err | Sub | Unsub | Pub | Ready

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)  # type: ignore[arg-type]


def encode(frame: Frame) -> bytes:
    """Serialize one frame, length prefix included."""
    body = _encoder.encode(frame)
    return HEADER.pack(len(body)) + body


def encode_into(frame: Frame, buf: bytearray) -> None:
    """Append one serialized frame to ``buf`` (saves a copy on the hot path)."""
    start = len(buf)
    buf += b"\0\0\0\0"
    try:
        _encoder.encode_into(frame, buf, start + 4)
    except BaseException:
        del buf[start:]  # never leave half a frame in the stream
        raise
    HEADER.pack_into(buf, start, len(buf) - start - 4)


def decode(body: bytes | memoryview) -> Frame:
    """Decode one frame body; raise :class:`FrameError` saying what is wrong."""
    try:
        return _decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        text = str(exc)
        reason = "unknown message type" if "$[0]" in text else "malformed message"
        reason = f"{reason} ({text})"
    except msgspec.DecodeError as exc:
        reason = f"undecodable frame ({exc})"
    # Raised outside the except blocks, so no exception context keeps a
    # reference to the (borrowed) buffer.
    raise FrameError(reason)


class FrameReader:
    """Splits a byte stream into decoded frames, enforcing a size limit.

    Feed it whatever ``recv`` returned; it yields every complete frame and keeps
    the tail for the next call. Any error is final: the stream can't be trusted
    to be in sync after a bad frame, so the connection must be closed.
    """

    __slots__ = ("_buf", "max_frame", "error")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        #: The first :class:`FrameError` met; once set, nothing more is decoded.
        self.error: FrameError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Return the complete frames in the stream so far.

        Frames before a bad one are still returned (nothing good is lost); the
        bad one sets :attr:`error` and the caller closes the connection.
        """
        if self.error is not None:
            return []
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data  # the common case: parse straight from what recv returned
        out: list[Frame] = []
        pos = 0
        end = len(src)
        view = memoryview(src)
        try:
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(src, pos)
                if size > self.max_frame:
                    raise FrameError(
                        f"frame of {size} bytes exceeds the limit of {self.max_frame} bytes"
                    )
                if end - pos - 4 < size:
                    break
                out.append(decode(view[pos + 4 : pos + 4 + size]))
                pos += 4 + size
        except FrameError as exc:
            # Drop the traceback: its frames hold slices of the buffer, which
            # would keep it from being resized.
            self.error = exc.with_traceback(None)
        finally:
            view.release()
        if src is self._buf:
            if pos:
                del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(src[pos:])
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)
