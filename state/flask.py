"""Flask server-side sessions on the store interface: ``Session(app)``.

A drop-in for Flask-Session (change the import) that behaves like Flask's own cookie
session wherever an app can tell, with none of Flask-Session's pickle:

* Configuration: ``SESSION_TYPE`` (``"redis"``, ``"sqlite"``, ``"memory"``),
  ``SESSION_REDIS`` (a redis-py client, with ``SESSION_TYPE="redis"``), ``SESSION_URL``
  (any store URL, e.g. ``"sqlite:///var/app/sessions.db"``; wins over ``SESSION_TYPE``),
  ``SESSION_KEY_PREFIX`` (default ``"session:"``), ``SESSION_PERMANENT`` (default True),
  ``SESSION_ID_LENGTH`` (bytes of randomness, default 32, minimum 16),
  ``SESSION_MAX_SIZE`` (serialized bytes, default 64 KiB), ``SESSION_REFRESH_INTERVAL``
  (seconds, see below), and Flask's own ``PERMANENT_SESSION_LIFETIME``,
  ``SESSION_REFRESH_EACH_REQUEST``, ``SECRET_KEY_FALLBACKS`` and ``SESSION_COOKIE_*``.
  ``Session(app, store=...)`` takes a ready store. Flask-Session keys that have no
  meaning here get one warning naming what to do instead; an unsupported
  ``SESSION_TYPE`` is an error naming the store URL to use.
* Flask's behaviour: ``session.modified`` is set by assigning or deleting a key (as on
  Flask's ``SecureCookieSession``), ``session.accessed`` by Flask whenever the
  ``session`` proxy is touched, and ``Vary: Cookie`` follows it. The cookie's attributes
  come from the interface's hooks (``get_cookie_name``/``domain``/``path``/``secure``/
  ``httponly``/``samesite``/``partitioned``, ``get_expiration_time``,
  ``should_set_cookie``), so a subclass overriding one is obeyed. A session modified to
  empty deletes its cookie; a cookie that can't be verified (another key, tampered,
  garbage) is an empty session and is left alone, so a key rotation with
  ``SECRET_KEY_FALLBACKS`` never logs anyone out. ``Session(app)`` sets
  ``SESSION_COOKIE_SAMESITE="Lax"`` when it is Flask's default None (secure by default);
  otherwise Flask's value is used (None sends no SameSite attribute, an invalid value is
  a ValueError).

A session is one hash in the store, ``SESSION_KEY_PREFIX + id``, one field per top-level
key, each value in :mod:`gunicorn_ext.state.codec` (plain JSON, or Flask's tagged JSON
for Markup, datetime, bytes, tuple, UUID). It loads lazily, on first read, in one
round trip (``HGETALL``). At the end of the request only the fields whose serialized
value changed are written, in one round trip, so nested mutations are saved without
``session.modified``, and two concurrent requests changing different keys both survive.
Commonly that is one plain ``HSET`` of the changed fields: it keeps the TTL, and its
reply (the fields it created) says whether the key was still there; more than the
changed fields the load lacked means it vanished meanwhile, and a second round trip
(``EXPIRE ... NX``) gives the key made again its TTL, so a key is never left without
one. When every changed field is new the reply can't tell, and ``EXPIRE ... NX`` rides
with the ``HSET``; removed fields add an ``HDEL``. Keys assigned before any read don't
load the session: they are saved in one command, an ``HSET`` that also sets the mark
every stored session carries (``_MARK``), whose reply says whether the session still
existed (if it didn't, ``EXPIRE ... NX`` in a second round trip gives the key made
again its TTL, and a third moves the keys to a fresh id), and the size limit then covers
the keys assigned. An empty session stores nothing and sets no cookie.

Expiry follows Flask: the store keeps a session ``PERMANENT_SESSION_LIFETIME`` after it
was last written and, for a permanent session with ``SESSION_REFRESH_EACH_REQUEST``
(Flask's default), after it was last used, by any request carrying its cookie, also one
that never touches ``session``; the cookie of such a session is re-sent on every
request, as Flask does. The TTL is refreshed at most once per ``SESSION_REFRESH_INTERVAL``
(default 60 s, or a tenth of the lifetime if shorter; 0: every request), by reads and
writes alike: the cookie carries, signed, when it last was (to the second), so a refresh
costs no round trip in a request that uses the session (``EXPIRE`` rides with
``HGETALL`` or the write), one ``EXPIRE`` round trip per interval in requests that
don't, and no store access at all in between. A session that isn't permanent or isn't
refreshed on each request has its TTL set again by a write at most once per interval
too (its lifetime restarts when it is modified, give or take an interval), never by a
read. Needs Redis 7.0 or later (``EXPIRE ... NX``).

The cookie is ``id.flag.timestamp.signature`` (itsdangerous ``TimestampSigner`` with the
app's secret key, salt ``"gunicorn-ext-session"``; the flag says whether the session is
permanent), HttpOnly and SameSite=Lax by default. A tampered, garbage or unsigned
cookie is an empty session, without a store lookup.

``session.regenerate()`` (or ``app.session_interface.regenerate(session)``, as in
Flask-Session) moves the data to a new id and deletes the old one: call it at login,
against fixation. ``session.destroy()`` deletes the session and its cookie.

When the store is unavailable, requests that touch the session (or raise
:class:`~gunicorn_ext.state.store.StoreUnavailable` from app code) get ``503`` with
``Retry-After: 5`` and ``{"error": "session store unavailable"}``, keeping the headers
other extensions set (CORS, HSTS, CSP); requests that don't touch it are unaffected
(their expiry refresh is skipped). A session larger than ``SESSION_MAX_SIZE`` raises
:class:`SessionTooLarge` (a 500 unless the app handles it) and nothing of it is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from gunicorn_ext.extras import missing_extra

try:
    from flask import Flask, Request, Response, jsonify
    from flask.sessions import SessionInterface, SessionMixin
    from itsdangerous import BadSignature, TimestampSigner
    from werkzeug.http import http_date
except ImportError as exc:
    raise missing_extra(exc, "flask", __name__) from exc

from . import codec
from .store import Store, StoreUnavailable, open_store

__all__ = ["Session", "ServerSession", "SessionTooLarge", "StoreSessionInterface",
           "store_unavailable_response"]

log = logging.getLogger(__name__)

SALT = "gunicorn-ext-session"
DEFAULT_PREFIX = "session:"
DEFAULT_ID_LENGTH = 32
MIN_ID_LENGTH = 16
DEFAULT_MAX_SIZE = 64 * 1024
DEFAULT_REFRESH_INTERVAL = 60.0
RETRY_AFTER = 5
VERIFIED_CACHE = 4096  # signed cookie values remembered as verified, per process
GONE_CACHE = 4096      # ids known to have no session (expired, deleted), per process
_PERMANENT = "_permanent"
#: A field stored beside a session's keys, with an empty value, when the session is
#: created and by every write without a read: ``HSET``'s reply (the fields it added)
#: then says whether the key existed before the write, so that write is one command.
#: Never a key of the session: the load drops it and assigning it raises ValueError.
_MARK = "\x00"
_IMMUTABLE = (str, int, float, bool, type(None))  # values whose serialized form can be kept
_SID_RE = re.compile(r"[A-Za-z0-9_-]{20,512}")
_FLAGS = {"p": True, "s": False}
# What describes the view's body, replaced by the 503's; other headers are kept.
_BODY_HEADERS = ("Content-Type", "Content-Length", "Content-Encoding", "Content-Range",
                 "Content-Language", "Content-Disposition", "Content-Location", "ETag",
                 "Last-Modified", "Location", "Expires", "Cache-Control", "Retry-After")


class SessionTooLarge(Exception):
    """The serialized session exceeds ``SESSION_MAX_SIZE``; nothing of it was saved."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"session too large: {size} bytes serialized, "
                         f"SESSION_MAX_SIZE is {limit}; it was not saved")
        self.size = size
        self.limit = limit


def store_unavailable_response() -> Response:
    """The 503 answer when the store can't be reached."""
    response = jsonify(error="session store unavailable")
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER)
    response.headers["Cache-Control"] = "no-store"
    return response


class _Cookie(NamedTuple):
    """A verified session cookie."""

    sid: str
    permanent: bool  # the session's permanence when the cookie was signed
    stamp: float     # when it was signed, which is when the store's TTL was last set
    current: bool    # signed with the current key (else a fallback key: re-sign it)
    value: str


class ServerSession(SessionMixin):
    """A session loaded from the store on first access (not at all if never touched).

    ``modified`` is set when a key is assigned or deleted (``clear``, ``pop``,
    ``setdefault`` of a missing key, ``update``...), exactly as on Flask's cookie
    session; ``accessed`` is set by Flask when the ``session`` proxy is touched.
    """

    def __init__(self, interface: StoreSessionInterface, cookie: _Cookie | None,
                 ttl: float, refresh_due: bool, refresh_each_request: bool) -> None:
        self._interface = interface
        self._cookie = cookie      # the client's verified cookie, or None
        self._sid = cookie.sid if cookie is not None else None
        self._ttl = ttl
        self._refresh_due = refresh_due  # the TTL is due for a refresh (interval passed)
        self._refresh_each = refresh_each_request
        self._refreshed = False    # this request refreshed the TTL
        self._data: dict[str, Any] = {}
        self._raw: dict[str, bytes] = {}   # field -> serialized value as stored
        self._loaded = False
        self._failed = False               # the load raised StoreUnavailable
        self._discard: str | None = None   # an old id to delete at save (regenerate)
        self._sizes: dict[str, int] = {}   # field -> serialized size, for the early check
        # field -> (an immutable value, its serialized form), so a save needn't
        # serialize again what was just loaded or assigned
        self._dumped: dict[str, tuple[Any, bytes]] = {}
        # Keys assigned before the session was loaded (a write without a read): saved
        # without loading it, or laid over the stored data if it loads after all.
        self._pending: dict[str, Any] = {}
        self._new: bool | None = None if cookie is not None else True  # None: not known yet
        self.modified = False
        self.accessed = False
        self._varied = False  # the save added Vary: Cookie already

    # -- loading
    def _load(self) -> dict[str, Any]:
        if self._loaded:
            return self._data
        iface = self._interface
        sid = self._sid
        raw: dict[str, bytes] = {}
        if sid is not None:
            key = iface.key_prefix + sid
            cookie = self._cookie
            # A permanent session due for a refresh has it in the same round trip.
            refresh = (self._refresh_due and self._refresh_each and cookie is not None
                       and cookie.permanent)
            try:
                if refresh:
                    raw = (iface.store.batch().hgetall(key).expire(key, self._ttl)
                           .execute()[0] or {})
                else:  # one plain command
                    raw = iface.store.hgetall(key)
            except StoreUnavailable:
                self._failed = True
                raise
            raw = dict(raw)
            if raw.pop(_MARK, None) is not None and not raw:
                # Only the mark left (concurrent requests removed the last keys, each
                # with its own HDEL): no session, and the key goes (the reply is moot).
                with contextlib.suppress(StoreUnavailable):
                    iface.store.delete(key)
            self._refreshed = refresh and bool(raw)
        data: dict[str, Any] = {}
        self._raw = raw
        dumped = self._dumped
        for field, value in raw.items():
            try:
                data[field] = decoded = codec.loads(value)
            except Exception:  # a corrupt field is dropped (and deleted at save), not fatal
                log.warning("session field %r could not be decoded; dropped", field)
                continue
            if type(decoded) in _IMMUTABLE and field not in dumped:
                dumped[field] = (decoded, value)
        if raw:
            self._new = False
        else:  # no cookie, or an unknown or expired id: never reuse an id the client brought
            if sid is not None:
                iface._forget(sid)
            self._sid = iface.generate_sid()
            self._new = True
        sizes = {k: len(k.encode()) + len(self._raw[k]) for k in data}
        if self._pending:  # assigned before the load: they win over what was stored
            data.update(self._pending)
            sizes.update(self._sizes)
            self._pending = {}
        self._sizes = sizes
        self._data = data
        self._loaded = True
        self.accessed = True  # Flask 3.1.3 sets it on the proxy; before, the session did
        return data

    @property
    def sid(self) -> str:
        """This session's id (a fresh one, not yet stored, for a new session)."""
        self._load()
        assert self._sid is not None
        return self._sid

    @property
    def new(self) -> bool:
        """True for a session not yet stored (this loads the session when the store
        hasn't been asked yet)."""
        if self._new is None:
            self._load()
        return bool(self._new)

    @new.setter
    def new(self, value: bool) -> None:
        self._new = value

    @property
    def permanent(self) -> bool:
        """The ``_permanent`` key, else ``SESSION_PERMANENT``. Before the session is
        loaded, what its cookie says (so an untouched request needn't load it)."""
        if not self._loaded:
            if _PERMANENT in self._pending:
                return bool(self._pending[_PERMANENT])
            if self._cookie is not None:
                return self._cookie.permanent
        return bool(self._load().get(_PERMANENT, self._interface.permanent))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        self[_PERMANENT] = bool(value)

    # -- mapping (the mutators set ``modified`` as Flask's CallbackDict does)
    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session keys must be str, not {type(key).__name__}")
        if key == _MARK:
            raise ValueError("the session key '\\x00' is reserved by gunicorn_ext.state")
        # A write before any read doesn't load the session (it is saved in one round
        # trip); the size check then covers the keys this request assigned.
        data = self._pending if not self._loaded and self._sid is not None else self._load()
        limit = self._interface.max_size
        raw = codec.dumps(value)
        size = len(key.encode()) + len(raw)
        total = size + sum(n for k, n in self._sizes.items() if k != key)
        if total > limit:  # early, in the view, where an errorhandler can catch it
            log.error("session too large: setting %r makes it %d bytes serialized, "
                      "SESSION_MAX_SIZE is %d", key, total, limit)
            raise SessionTooLarge(total, limit)
        data[key] = value
        self._sizes[key] = size
        if type(value) in _IMMUTABLE:
            self._dumped[key] = (value, raw)
        else:
            self._dumped.pop(key, None)
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self._load()[key]
        self._sizes.pop(key, None)
        self.modified = True

    def _serialized(self, data: Mapping[str, Any]) -> dict[str, bytes]:
        """``data`` as stored (what was assigned or loaded as an immutable value is
        reused: the same object serializes the same)."""
        dumped = self._dumped
        out = {}
        for k, v in data.items():
            d = dumped.get(k)
            out[k] = d[1] if d is not None and d[0] is v else codec.dumps(v)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        return key in self._load()

    def clear(self) -> None:
        self._load().clear()
        self._sizes.clear()
        self.modified = True

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        super().update(other, **kwargs)
        self.modified = True  # even when empty, as on Flask's session

    def copy(self) -> dict[str, Any]:
        """A plain dict of the data (as ``dict.copy`` on Flask's session)."""
        return dict(self._load())

    def __or__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return self.copy() | dict(other)

    def __ror__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return dict(other) | self.copy()

    def __ior__(self, other: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> ServerSession:
        self.update(other)
        return self

    def __repr__(self) -> str:
        if not self._loaded:
            return "<ServerSession (not loaded)>"
        return f"<ServerSession {self._data!r}>"

    # -- lifecycle
    def regenerate(self) -> None:
        """Keep the data under a new id and delete the old one (at login: against fixation)."""
        self._load()
        if not self._new and self._discard is None:
            self._discard = self._sid
        self._sid = self._interface.generate_sid()
        self._raw = {}  # everything is written under the new id
        self._new = True
        self.modified = True

    def destroy(self) -> None:
        """Delete the session from the store and its cookie (data set afterwards goes
        into a fresh session)."""
        self.regenerate()
        self.clear()


class StoreSessionInterface(SessionInterface):
    """Flask's session interface over a :class:`~gunicorn_ext.state.store.Store`.

    ``refresh_interval``: seconds between TTL refreshes of a session (None: 60, or a
    tenth of the lifetime if shorter; 0: every request).
    """

    def __init__(self, store: Store, *, key_prefix: str = DEFAULT_PREFIX,
                 permanent: bool = True, id_length: int = DEFAULT_ID_LENGTH,
                 max_size: int = DEFAULT_MAX_SIZE,
                 refresh_interval: float | None = None) -> None:
        if id_length < MIN_ID_LENGTH:
            raise ValueError(f"SESSION_ID_LENGTH must be at least {MIN_ID_LENGTH} bytes, "
                             f"got {id_length}")
        if refresh_interval is not None and not refresh_interval >= 0:
            raise ValueError(f"SESSION_REFRESH_INTERVAL must be seconds >= 0, "
                             f"got {refresh_interval!r}")
        self.store = store
        self.key_prefix = key_prefix
        self.permanent = permanent
        self.id_length = id_length
        self.max_size = max_size
        self.refresh_interval = refresh_interval
        # (keys, current signer, fallbacks' signer, cookie value -> verified cookie)
        self._signer_cache: tuple[tuple[Any, tuple[Any, ...]], TimestampSigner,
                                  TimestampSigner | None, dict[str, _Cookie]] | None = None
        self._gone: dict[str, None] = {}

    def generate_sid(self) -> str:
        return secrets.token_urlsafe(self.id_length)

    def regenerate(self, session: SessionMixin) -> None:
        """Flask-Session's spelling of ``session.regenerate()``."""
        if not isinstance(session, ServerSession):
            raise TypeError(f"not a session of this interface: {type(session).__name__}")
        session.regenerate()

    # -- the signed cookie
    def _signers(self, app: Flask) -> tuple[TimestampSigner, TimestampSigner | None,
                                            dict[str, _Cookie]]:
        """Signers for the current secret key and for its fallbacks (None without any),
        and the cookie values verified with them.

        Cached per key set: deriving the key is most of what signing costs. All three
        change together, so a value verified with keys that were just replaced can only
        land in the old set's dict.
        """
        current = app.secret_key
        fallbacks = tuple(app.config.get("SECRET_KEY_FALLBACKS") or ())
        cached = self._signer_cache
        if cached is not None and cached[0] == (current, fallbacks):
            return cached[1], cached[2], cached[3]
        signer = TimestampSigner(current, salt=SALT)  # type: ignore[arg-type]
        old = TimestampSigner(list(fallbacks), salt=SALT) if fallbacks else None
        verified: dict[str, _Cookie] = {}
        self._signer_cache = ((current, fallbacks), signer, old, verified)
        return signer, old, verified

    def _sign(self, app: Flask, sid: str, permanent: bool) -> _Cookie:
        signer = self._signers(app)[0]
        value = signer.sign(f"{sid}.{'p' if permanent else 's'}").decode("ascii")
        return _Cookie(sid, permanent, time.time(), True, value)

    def _unsign(self, app: Flask, value: str | None) -> _Cookie | None:
        """The cookie ``value`` verified, or None for anything not signed by us.

        Values that verified are remembered (per process, up to ``VERIFIED_CACHE``,
        forgotten when the keys change): a client sends the same cookie on every
        request, and checking the HMAC again each time costs more than the lookup.
        Only what verified is remembered, so a forged value is checked every time.
        """
        if not value or len(value) > 1024:
            return None
        signer, old, verified = self._signers(app)
        hit = verified.get(value)
        if hit is not None:
            return hit
        for s, current in ((signer, True), (old, False)):
            if s is None:
                continue
            try:
                payload, signed_at = s.unsign(value, return_timestamp=True)
                sid, flag = payload.decode("ascii").rsplit(".", 1)
            except (BadSignature, UnicodeDecodeError, ValueError):
                continue
            if not _SID_RE.fullmatch(sid) or flag not in _FLAGS:
                return None
            cookie = _Cookie(sid, _FLAGS[flag], signed_at.timestamp(), current, value)
            if len(verified) >= VERIFIED_CACHE:
                with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                    del verified[next(iter(verified))]  # the oldest
            verified[value] = cookie
            return cookie
        return None

    def sid_from_cookie(self, app: Flask, value: str | None) -> str | None:
        """The id in a signed cookie value; None for anything not signed by us."""
        cookie = self._unsign(app, value)
        return None if cookie is None else cookie.sid

    def _forget(self, sid: str) -> None:
        """Remember that ``sid`` has no session (ids are never reused), so its cookie
        costs no more lookups or refreshes in this process."""
        gone = self._gone
        if len(gone) >= GONE_CACHE:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del gone[next(iter(gone))]
        gone[sid] = None

    def _cookie_params(self, app: Flask) -> dict[str, Any]:
        params = dict(domain=self.get_cookie_domain(app), path=self.get_cookie_path(app),
                      secure=self.get_cookie_secure(app),
                      samesite=self.get_cookie_samesite(app),
                      httponly=self.get_cookie_httponly(app))
        partitioned = getattr(self, "get_cookie_partitioned", None)  # Flask 3.1+
        if partitioned is not None:
            params["partitioned"] = partitioned(app)
        return params

    def _set_cookie(self, app: Flask, session: ServerSession, response: Response,
                    value: str) -> None:
        response.set_cookie(self.get_cookie_name(app), value,
                            expires=_http_date(self.get_expiration_time(app, session)),
                            **self._cookie_params(app))
        if not session._varied:
            _vary_cookie(response)

    # -- Flask's interface
    def open_session(self, app: Flask, request: Request) -> ServerSession | None:
        if not app.secret_key:
            return None  # Flask's NullSession explains that a secret key is needed
        cookie = self._unsign(app, request.cookies.get(self.get_cookie_name(app)))
        if cookie is not None and cookie.sid in self._gone:
            cookie = None
        ttl = max(1.0, app.permanent_session_lifetime.total_seconds())
        interval = self.refresh_interval
        if interval is None:
            interval = min(DEFAULT_REFRESH_INTERVAL, ttl / 10)
        due = cookie is not None and (not cookie.current
                                      or time.time() - cookie.stamp >= interval)
        return ServerSession(self, cookie, ttl, due,
                             bool(app.config["SESSION_REFRESH_EACH_REQUEST"]))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, ServerSession):
            return
        s = session
        s._varied = s.accessed
        if s.accessed:
            _vary_cookie(response)
        if s._failed:
            return  # its load failed: the request got its 503 (or the app handled that)
        if not s._loaded:
            if s._pending:  # written without a read
                self._save_unread(app, s, response)
                return
            if not s.modified:
                self._refresh_untouched(app, s, response)
                return
            try:  # ``session.modified = True`` without a read: save what is there
                s._load()
            except StoreUnavailable as exc:
                _answer_unavailable(response, exc)
                return
        current = s._serialized(s._data)
        self._check_size(current)
        assert s._sid is not None
        key = self.key_prefix + s._sid
        empty = not current
        deleted = touched = False
        raw = s._raw
        changed = {k: v for k, v in current.items() if raw.get(k) != v}
        removed = [k for k in raw if k not in current]
        if empty:
            pass
        elif changed or removed or s.modified:
            touched = self._ttl_due(s)
        else:  # read only: its refresh, if due and not done by the load
            touched = s._refresh_due and not s._refreshed and self.should_set_cookie(app, s)
        # The fields HSET should create: those not loaded. A larger reply means the key
        # vanished (expired, deleted) since the load, and HSET made it again, without a
        # TTL: a second round trip gives it one. When every changed field is new, the
        # reply can't tell, so ``EXPIRE ... NX`` rides with the write instead.
        expected = sum(1 for k in changed if k not in raw)
        by_reply = not touched and expected < len(changed)
        try:
            if by_reply and not removed and s._discard is None and not empty:
                # the common read-modify-write: one plain command, checked by its reply
                created = self.store.hset(key, changed)
            else:
                batch = self.store.batch()
                ops = 0
                if s._discard is not None:
                    batch.delete(self.key_prefix + s._discard)
                    ops += 1
                if empty:
                    if not s._new:
                        batch.delete(key)
                        ops += 1
                        deleted = True
                else:
                    if changed:  # its reply is results[ops]
                        batch.hset(key, {_MARK: b"", **changed} if s._new else changed)
                    if removed:
                        batch.hdel(key, *removed)
                    if touched:
                        batch.expire(key, s._ttl)
                    elif changed and not by_reply:
                        batch.expire(key, s._ttl, if_no_ttl=True)
                results = batch.execute() if ops or changed or removed or touched else []
                created = results[ops] if by_reply else 0
            if by_reply and created > expected:
                touched = self.store.expire(key, s._ttl, if_no_ttl=True)
        except StoreUnavailable as exc:
            _answer_unavailable(response, exc)
            return
        if s._discard is not None:
            self._forget(s._discard)
            s._discard = None
        if deleted:
            self._forget(s._sid)
        s._raw = current
        s._new = empty
        s._refreshed = s._refreshed or touched
        if empty:  # Flask: a session modified to empty deletes its cookie
            if s.modified or deleted:
                response.delete_cookie(self.get_cookie_name(app), **self._cookie_params(app))
                _vary_cookie(response)
            return
        self._send_cookie(app, s, response)

    def _ttl_due(self, s: ServerSession) -> bool:
        """Whether a write sets the TTL again: at most once per interval, for every
        session (its TTL is at most an interval old; the cookie carries, signed, when it
        was last set). A session's lifetime thus restarts when it is modified, as in
        Flask, give or take an interval."""
        return s._refresh_due and not s._refreshed

    def _check_size(self, fields: Mapping[str, bytes]) -> None:
        size = sum(len(k.encode()) + len(v) for k, v in fields.items())
        if size > self.max_size:
            log.error("session too large: %d bytes serialized, SESSION_MAX_SIZE is %d; "
                      "not saved", size, self.max_size)
            raise SessionTooLarge(size, self.max_size)

    def _save_unread(self, app: Flask, s: ServerSession, response: Response) -> None:
        """Save the keys assigned to a session that was never loaded, in one command:
        ``HSET`` them with the mark (see ``_MARK``); the mark was not new if the key
        existed. When the TTL is due, ``EXPIRE`` goes first and ``EXPIRE ... NX`` after,
        in the same round trip: the first reply says whether the key existed, the last
        gives a key the ``HSET`` made again its TTL.

        Otherwise a new mark means the key didn't exist, or holds a session stored
        without one (by an earlier version): ``EXPIRE ... NX``, a second round trip,
        tells them apart (a stored session always has a TTL) and gives a key the
        ``HSET`` made its TTL (between the two, as in a read-modify-write whose session
        vanished, that key has none: should the second fail, the cookie finds a session
        holding only these keys, without a TTL). If the key didn't exist (the session
        expired or was deleted since the cookie was signed), the key just made is
        deleted and the keys are stored under a fresh id, in one more round trip: an id
        the client brought is never given a new session.
        """
        fields = s._serialized(s._pending)
        self._check_size(fields)
        assert s._sid is not None
        key = self.key_prefix + s._sid
        refresh = self._ttl_due(s)
        stored = {_MARK: b"", **fields}
        store = self.store
        try:
            if refresh:
                existed = (store.batch().expire(key, s._ttl).hset(key, stored)
                           .expire(key, s._ttl, if_no_ttl=True).execute()[0])
            else:
                existed = (store.hset(key, stored) < len(stored)
                           or not store.expire(key, s._ttl, if_no_ttl=True))
            if not existed:
                self._forget(s._sid)
                s._sid = self.generate_sid()
                old, key = key, self.key_prefix + s._sid
                store.batch().delete(old).hset(key, stored).expire(key, s._ttl).execute()
                refresh = True
        except StoreUnavailable as exc:
            _answer_unavailable(response, exc)
            return
        s._new = False
        s._refreshed = s._refreshed or refresh
        self._send_cookie(app, s, response)
        s._pending = {}  # stored: a later load reads them back

    def _send_cookie(self, app: Flask, s: ServerSession, response: Response) -> None:
        """The cookie of a stored session, after its save: Flask's hook decides whether
        it is sent; it is signed again when the TTL was set again (the cookie carries
        when), for a new id, a change of permanence or a fallback key's signature."""
        assert s._sid is not None
        cookie = s._cookie
        if cookie is None or cookie.sid != s._sid or not cookie.current:
            cookie = None
        elif not self.should_set_cookie(app, s):
            return
        permanent = s.permanent
        if cookie is None or s._refreshed or cookie.permanent != permanent:
            cookie = s._cookie = self._sign(app, s._sid, permanent)
        self._set_cookie(app, s, response, cookie.value)

    def _refresh_untouched(self, app: Flask, s: ServerSession, response: Response) -> None:
        """A request that never touched ``session``: refresh a permanent session's
        cookie as Flask does (``should_set_cookie``), and its TTL once per interval."""
        cookie = s._cookie
        if cookie is None or not self.should_set_cookie(app, s):
            return  # no session, or nothing to refresh; a cookie we can't verify stays
        if s._refresh_due:
            try:
                alive = self.store.expire(self.key_prefix + cookie.sid, s._ttl)
            except StoreUnavailable as exc:
                log.warning("session store unavailable: session expiry not refreshed (%s)",
                            exc)
                return
            if not alive:  # expired or deleted meanwhile: its cookie is left as it is
                self._forget(cookie.sid)
                return
            cookie = s._cookie = self._sign(app, cookie.sid, cookie.permanent)
        self._set_cookie(app, s, response, cookie.value)


#: The last expiry formatted, as (its second, the text): every permanent session's cookie
#: in the same second expires at the same second (now + PERMANENT_SESSION_LIFETIME).
_last_date: tuple[int | None, str] = (None, "")


def _http_date(expires: Any) -> Any:
    """An aware datetime as werkzeug's ``http_date`` formats it (which ``set_cookie``
    would do, to the second, for every cookie: half of what dumping one costs), formatted
    once per second; anything else is passed on as it is."""
    global _last_date
    if not isinstance(expires, datetime) or expires.tzinfo is None:
        return expires
    second = math.floor(expires.timestamp())
    last = _last_date
    if last[0] != second:
        last = _last_date = (second, http_date(expires))
    return last[1]


def _vary_cookie(response: Response) -> None:
    """Add ``Vary: Cookie``, as Flask does (parsing the header only when it has other
    values: the parse costs as much as the rest of the save)."""
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Cookie"
    elif vary != "Cookie":
        response.vary.add("Cookie")


def _answer_unavailable(response: Response, exc: StoreUnavailable) -> None:
    """Turn ``response`` (already built by the view and the after-request functions)
    into the 503, keeping the headers that don't describe the view's body (CORS, HSTS,
    CSP, other cookies...)."""
    log.error("session store unavailable while saving the session (%s): answering 503", exc)
    other = store_unavailable_response()
    for name in _BODY_HEADERS:
        del response.headers[name]
    response.status_code = other.status_code
    response.set_data(other.get_data())
    for name in ("Content-Type", "Retry-After", "Cache-Control"):
        response.headers[name] = other.headers[name]
    _vary_cookie(response)


def _on_store_unavailable(exc: StoreUnavailable) -> Response:
    log.error("session store unavailable (%s): answering 503", exc)
    return store_unavailable_response()


# Flask-Session 0.8 keys with no meaning here -> what to do instead.
_FLASK_SESSION_KEYS = {
    "SESSION_USE_SIGNER": "the session id is always signed with SECRET_KEY "
                          "(and SECRET_KEY_FALLBACKS); remove it",
    "SESSION_SERIALIZATION_FORMAT": "values are stored as JSON (Flask's tagged JSON for "
                                    "other types), never msgpack or pickle; remove it",
    "SESSION_CLEANUP_N_REQUESTS": "the store expires sessions by itself; remove it",
}
_BACKEND_PREFIXES = ("SESSION_MEMCACHED", "SESSION_CACHELIB", "SESSION_FILE_",
                     "SESSION_MONGODB", "SESSION_SQLALCHEMY", "SESSION_DYNAMODB")
_USE_INSTEAD = ('SESSION_URL="redis://host:6379/0" (several machines; or SESSION_TYPE='
                '"redis" with SESSION_REDIS) or SESSION_URL="sqlite:////path/sessions.db" '
                "(one machine)")


class Session:
    """``Session(app)`` or ``Session().init_app(app)``: server-side sessions for ``app``.

    ``store`` (a :class:`~gunicorn_ext.state.store.Store`) overrides the configuration's store.
    """

    def __init__(self, app: Flask | None = None, store: Store | None = None) -> None:
        self._store = store
        self.store: Store | None = None
        self.interface: StoreSessionInterface | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> StoreSessionInterface:
        config = app.config
        _check_flask_session_keys(config)
        samesite = config.get("SESSION_COOKIE_SAMESITE")
        if samesite is None:
            config["SESSION_COOKIE_SAMESITE"] = "Lax"
        elif not isinstance(samesite, str) or samesite.title() not in ("Strict", "Lax", "None"):
            raise ValueError("SESSION_COOKIE_SAMESITE must be 'Strict', 'Lax', 'None' or "
                             f"None, got {samesite!r}")
        interval = config.get("SESSION_REFRESH_INTERVAL")
        try:
            interval = None if interval is None else float(interval)
        except (TypeError, ValueError):
            raise ValueError(f"SESSION_REFRESH_INTERVAL must be seconds >= 0, got {interval!r}")
        store = self._store or config.get("SESSION_STORE") or _store_from_config(config)
        interface = StoreSessionInterface(
            store,
            key_prefix=config.get("SESSION_KEY_PREFIX", DEFAULT_PREFIX),
            permanent=bool(config.get("SESSION_PERMANENT", True)),
            id_length=int(config.get("SESSION_ID_LENGTH", DEFAULT_ID_LENGTH)),
            max_size=int(config.get("SESSION_MAX_SIZE", DEFAULT_MAX_SIZE)),
            refresh_interval=interval)
        app.session_interface = interface
        app.register_error_handler(StoreUnavailable, _on_store_unavailable)
        app.extensions["gunicorn_ext.session"] = interface
        self.store = store
        self.interface = interface
        return interface


def _check_flask_session_keys(config: Mapping[str, Any]) -> None:
    """One warning for the Flask-Session keys set that mean nothing here."""
    notes = [f"{k} ({why})" for k, why in _FLASK_SESSION_KEYS.items() if k in config]
    backend = sorted(k for k in config if k.startswith(_BACKEND_PREFIXES))
    if backend:
        notes.append(f"{', '.join(backend)} (that Flask-Session backend is not supported; "
                     f"use {_USE_INSTEAD})")
    if config.get("SESSION_URL") and config.get("SESSION_REDIS") is not None:
        notes.append("SESSION_REDIS (SESSION_URL is set and wins)")
    if notes:
        warnings.warn("gunicorn_ext.state.flask ignores these Flask-Session settings: "
                      + "; ".join(notes), UserWarning, stacklevel=4)


def _store_from_config(config: Any) -> Store:
    url = config.get("SESSION_URL")
    if url:
        return open_store(url)
    kind = str(config.get("SESSION_TYPE") or "").lower()
    if kind == "redis":
        from .redis import RedisStore

        client = config.get("SESSION_REDIS")
        if client is not None:
            return RedisStore(url="redis://", client=client)
        return open_store("redis://127.0.0.1:6379/0")
    if kind == "memory":
        return open_store("memory://")
    if kind == "sqlite":
        raise ValueError('SESSION_TYPE="sqlite" needs SESSION_URL="sqlite:////path/sessions.db"')
    if kind in ("filesystem", "cachelib", "memcached", "mongodb", "sqlalchemy", "dynamodb"):
        raise ValueError(f"SESSION_TYPE={kind!r} (a Flask-Session backend) is not "
                         f"supported by gunicorn_ext.state.flask: use {_USE_INSTEAD}")
    raise ValueError(f"no session store configured (SESSION_TYPE={kind or None!r}): set "
                     f'{_USE_INSTEAD}, or SESSION_URL="memory://" for development')
