"""The wire format of the bus.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack
(msgspec), holding one of the message structs below as a tagged array. The
decoder is typed, so a frame of the wrong shape or with an unknown tag fails to
decode instead of reaching a handler. Payloads are plain msgpack values
(dict, list, str, bytes, int, float, bool, None): no pickle, ever.

How deep a value can nest is bounded by Python's recursion limit, counted from
the current stack. So that it never depends on which thread encodes or decodes
(a value a shallow handler thread encoded must decode in a deep request
thread), a frame that hits the limit is retried once on a fresh thread's empty
stack; what fails there too is refused by its sender.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from .errors import FrameError, MessageTooLarge, UnencodableMessage

#: Address of the primary (arbiter) process.
PRIMARY = -1
#: Address meaning "every worker of this instance".
ALL = -2

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
#: Bytes a frame may grow by when the primary re-addresses it (a new id, the
#: sender's slot): readers allow this much over the senders' limit, so a
#: message its sender accepted is never refused on the way.
ROUTING_SLACK = 64
#: Longest error text carried in an :class:`Err` frame (characters).
MAX_ERROR_TEXT = 2000


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

    def __post_init__(self) -> None:
        if len(self.message) > MAX_ERROR_TEXT:  # an error report must never be too large to send
            self.message = self.message[:MAX_ERROR_TEXT] + "..."


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


_MAX_BODY = (1 << 32) - 1  # what the length prefix can say
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)
_T = TypeVar("_T")


def _on_fresh_stack(fn: Callable[[Any], _T], arg: Any) -> _T:
    """``fn(arg)`` in a new thread, whose Python stack starts empty (rare path:
    only for values nested too deep for the calling thread's stack)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, fn(arg)))
        except BaseException as exc:  # handed back to the caller
            out.append((False, exc))

    t = threading.Thread(target=run, name="gunicorn-ext-deep", daemon=True)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def encode(frame: Frame, max_frame: int = _MAX_BODY) -> bytes:
    """Serialize one frame, length prefix included.

    Refuses, before anything can be written, what the receiver could not
    decode: :class:`UnencodableMessage` for a payload that is not a msgpack
    value, :class:`MessageTooLarge` for a frame over ``max_frame`` bytes.
    Either way the caller's stream stays in sync. (Names and destinations are
    checked by :func:`check_address`.)
    """
    try:
        try:
            body = _encoder.encode(frame)
        except RecursionError:
            body = _on_fresh_stack(_encoder.encode, frame)
    except _ENCODE_ERRORS as exc:
        raise UnencodableMessage(f"{_describe(frame)} can't be sent on the bus: "
                                 f"{type(exc).__name__}: {exc}") from None
    if len(body) > max_frame:
        raise MessageTooLarge(f"{_describe(frame)} is {len(body)} bytes encoded, over the bus "
                              f"limit of {max_frame} bytes (ipc_max_frame)")
    return HEADER.pack(len(body)) + body


def check_address(name: object, dst: object = PRIMARY, what: str = "a message name") -> None:
    """Refuse, in the caller, a name or destination of the wrong type.

    The receiver's typed decoder would refuse such a frame as malformed and
    close the connection, so the public API checks these (and only these:
    frames the primary relays were decoded against the same types).
    """
    if type(name) is not str:
        raise UnencodableMessage(f"{what} must be a str, not {type(name).__name__}")
    if type(dst) is not int:
        raise UnencodableMessage(f"a destination must be an int (a slot, PRIMARY or ALL), "
                                 f"not {type(dst).__name__}")


def _describe(frame: Frame) -> str:
    if isinstance(frame, (Msg, Req)):
        return f"message {frame.name[:100]!r}"
    if isinstance(frame, Pub):
        return f"publication on {frame.topic[:100]!r}"
    if isinstance(frame, Rep):
        return "reply"
    return f"{type(frame).__name__} frame"


def decode(body: bytes | memoryview) -> Frame:
    """Decode one frame body; raise :class:`FrameError` saying what is wrong."""
    deep = False
    try:
        return _decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        reason = _invalid(exc)
    except msgspec.DecodeError as exc:
        reason = f"undecodable frame ({exc})"
    except RecursionError:
        # Its sender had more stack to spare than this thread. Never let it
        # escape the reader (that would leave the stream half-consumed).
        deep = True
    if deep:
        result = _on_fresh_stack(_decode_or_reason, bytes(body))
        if not isinstance(result, str):
            return result
        reason = result
    # Raised outside the except blocks, so no exception context keeps a
    # reference to the (borrowed) buffer.
    raise FrameError(reason)


def _invalid(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return f"{'unknown message type' if '$[0]' in text else 'malformed message'} ({text})"


def _decode_or_reason(body: bytes) -> Frame | str:
    try:
        return _decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        return _invalid(exc)
    except msgspec.DecodeError as exc:
        return f"undecodable frame ({exc})"
    except RecursionError:
        return "frame nested too deeply to decode"


class FrameReader:
    """Splits a byte stream into decoded frames, enforcing a size limit.

    Feed it whatever ``recv`` returned; it yields every complete frame and keeps
    the tail for the next call. Any error is final: the stream can't be trusted
    to be in sync after a bad frame, so the connection must be closed.

    ``max_frame`` is the senders' limit (``ipc_max_frame``); the reader allows
    :data:`ROUTING_SLACK` bytes more for frames the primary re-addressed.
    """

    __slots__ = ("_buf", "max_frame", "_limit", "error")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self._limit = max_frame + ROUTING_SLACK
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
                if size > self._limit:
                    raise FrameError(f"frame of {size} bytes exceeds the limit of "
                                     f"{self.max_frame} bytes (ipc_max_frame)")
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
