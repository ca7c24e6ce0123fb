"""Flask server-side sessions on the store interface: ``Session(app)``.

A drop-in for Flask-Session's common configuration keys, with none of its pickle:

* ``SESSION_TYPE`` (``"redis"``, ``"sqlite"``, ``"memory"``), ``SESSION_REDIS`` (a redis-py
  client, used when ``SESSION_TYPE="redis"``), ``SESSION_URL`` (any store URL, e.g.
  ``"sqlite:///var/app/sessions.db"``; wins over ``SESSION_TYPE``), ``SESSION_KEY_PREFIX``
  (default ``"session:"``), ``SESSION_PERMANENT`` (default True), ``SESSION_ID_LENGTH``
  (bytes of randomness, default 32, minimum 16), ``SESSION_MAX_SIZE`` (serialized bytes,
  default 64 KiB), ``PERMANENT_SESSION_LIFETIME``, ``SESSION_REFRESH_EACH_REQUEST`` and
  Flask's ``SESSION_COOKIE_*`` keys. ``Session(app, store=...)`` takes a ready store.

A session is one hash in the store, ``SESSION_KEY_PREFIX + id``, one field per top-level
key, each value in Flask's tagged JSON (Markup, datetime, bytes, tuple, UUID round-trip).
The session loads lazily, on first access, in one batch (``HGETALL`` + ``EXPIRE``: the
sliding expiry touches the TTL, it never rewrites). At the end of the request only the
fields whose serialized value changed are written, in one batch (``HSET`` changed fields,
``HDEL`` removed ones, ``EXPIRE``), so nested mutations are saved without
``session.modified``, and two concurrent requests changing different keys both survive.
An empty session stores nothing and sets no cookie; one that becomes empty is deleted,
with its cookie.

The cookie carries the id signed with the app's secret key (itsdangerous, salt
``"gunicorn-ext-session"``), HttpOnly and SameSite=Lax by default; a tampered, garbage or
unsigned cookie is simply a new empty session, without a store lookup.

``session.regenerate()`` moves the data to a new id and deletes the old one (call it at
login, against fixation); ``session.destroy()`` deletes the session and its cookie.

When the store is unavailable, requests that touch the session (or raise
:class:`~gunicorn_ext.state.store.StoreUnavailable` from app code) get ``503`` with ``Retry-After: 5``
and ``{"error": "session store unavailable"}``; requests that don't touch it are
unaffected. A session larger than ``SESSION_MAX_SIZE`` raises :class:`SessionTooLarge`
(a 500 unless the app handles it) and nothing of it is written.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Flask, Request, Response, jsonify
from flask.sessions import SessionInterface, SessionMixin
from itsdangerous import Signer

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
RETRY_AFTER = 5
VERIFIED_CACHE = 4096  # signed cookie values remembered as verified, per process
_PERMANENT = "_permanent"
_SID_RE = re.compile(r"[A-Za-z0-9_-]{20,512}")



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
    return response


class ServerSession(SessionMixin):
    """A session loaded from the store on first access (not at all if never touched)."""

    def __init__(self, interface: StoreSessionInterface, sid: str | None,
                 had_cookie: bool, cookie: str | None = None) -> None:
        self._interface = interface
        self._sid = sid            # the id the cookie carried (verified), or None
        self._had_cookie = had_cookie
        self._cookie = cookie      # that cookie's value, when signed with the current key
        self._data: dict[str, Any] = {}
        self._raw: dict[str, bytes] = {}   # field -> serialized value as stored
        self._loaded = False
        self._discard: str | None = None   # an old id to delete at save (regenerate)
        self._sizes: dict[str, int] = {}   # field -> serialized size, for the early check
        self.new = True
        self.modified = False

    # -- loading
    def _load(self) -> dict[str, Any]:
        if self._loaded:
            return self._data
        sid = self._sid
        raw: dict[str, bytes] = {}
        if sid is not None:
            iface = self._interface
            key = iface.key_prefix + sid
            raw = iface.store.batch().hgetall(key).expire(key, iface.ttl).execute()[0] or {}
        data: dict[str, Any] = {}
        self._raw = dict(raw)
        for field, value in raw.items():
            try:
                data[field] = codec.loads(value)
            except Exception:  # a corrupt field is dropped (and deleted at save), not fatal
                log.warning("session field %r could not be decoded; dropped", field)
        if raw:
            self.new = False
        else:  # no cookie, or an unknown or expired id: never reuse an id the client brought
            self._sid = self._interface.generate_sid()
            self._cookie = None
            self.new = True
        self._sizes = {k: len(k.encode()) + len(self._raw[k]) for k in data}
        self._data = data
        self._loaded = True
        return data

    @property
    def accessed(self) -> bool:  # type: ignore[override]
        """True once the data was loaded (merely touching the ``session`` proxy isn't)."""
        return self._loaded

    @accessed.setter
    def accessed(self, value: bool) -> None:
        pass  # Flask sets it whenever the proxy is touched; only a real load counts

    @property
    def sid(self) -> str:
        """This session's id (a fresh one, not yet stored, for a new session)."""
        self._load()
        assert self._sid is not None
        return self._sid

    @property
    def permanent(self) -> bool:
        return bool(self._load().get(_PERMANENT, self._interface.permanent))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        data = self._load()
        if bool(value) == self._interface.permanent and _PERMANENT not in data:
            return
        data[_PERMANENT] = bool(value)

    # -- mapping
    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session keys must be str, not {type(key).__name__}")
        data = self._load()
        limit = self._interface.max_size
        size = len(key.encode()) + len(codec.dumps(value))
        total = size + sum(n for k, n in self._sizes.items() if k != key)
        if total > limit:  # early, in the view, where an errorhandler can catch it
            log.error("session too large: setting %r makes it %d bytes serialized, "
                      "SESSION_MAX_SIZE is %d", key, total, limit)
            raise SessionTooLarge(total, limit)
        data[key] = value
        self._sizes[key] = size

    def __delitem__(self, key: str) -> None:
        del self._load()[key]
        self._sizes.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        return key in self._load()

    def clear(self) -> None:
        self._load().clear()
        self._sizes.clear()

    def __repr__(self) -> str:
        if not self._loaded:
            return "<ServerSession (not loaded)>"
        return f"<ServerSession {self._data!r}>"

    # -- lifecycle
    def regenerate(self) -> None:
        """Keep the data under a new id and delete the old one (at login: against fixation)."""
        self._load()
        if not self.new and self._discard is None:
            self._discard = self._sid
        self._sid = self._interface.generate_sid()
        self._cookie = None
        self._raw = {}  # everything is written under the new id
        self.new = True

    def destroy(self) -> None:
        """Delete the session from the store and its cookie (data set afterwards goes
        into a fresh session)."""
        self.regenerate()
        self.clear()


class StoreSessionInterface(SessionInterface):
    """Flask's session interface over a :class:`~gunicorn_ext.state.store.Store`."""

    def __init__(self, store: Store, *, key_prefix: str = DEFAULT_PREFIX,
                 permanent: bool = True, id_length: int = DEFAULT_ID_LENGTH,
                 max_size: int = DEFAULT_MAX_SIZE,
                 lifetime: timedelta | float = timedelta(days=31)) -> None:
        if id_length < MIN_ID_LENGTH:
            raise ValueError(f"SESSION_ID_LENGTH must be at least {MIN_ID_LENGTH} bytes, "
                             f"got {id_length}")
        self.store = store
        self.key_prefix = key_prefix
        self.permanent = permanent
        self.id_length = id_length
        self.max_size = max_size
        seconds = lifetime.total_seconds() if isinstance(lifetime, timedelta) else lifetime
        self.ttl = max(1.0, float(seconds))
        # (keys, current signer, fallbacks' signer, cookie value -> (sid, signed by current))
        self._signer_cache: tuple[tuple[Any, tuple[Any, ...]], Signer, Signer | None,
                                  dict[str, tuple[str, bool]]] | None = None

    def generate_sid(self) -> str:
        return secrets.token_urlsafe(self.id_length)

    def _signers(self, app: Flask) -> tuple[Signer, Signer | None, dict[str, tuple[str, bool]]]:
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
        signer = Signer(current, salt=SALT)  # type: ignore[arg-type]
        old = Signer(list(fallbacks), salt=SALT) if fallbacks else None
        verified: dict[str, tuple[str, bool]] = {}
        self._signer_cache = ((current, fallbacks), signer, old, verified)
        return signer, old, verified

    def _unsign(self, app: Flask, value: str | None) -> tuple[str | None, bool]:
        """The id in a signed cookie value (None for anything not signed by us), and
        whether the current key signed it (else a fallback did, and it is re-signed).

        Values that verified are remembered (per process, up to ``VERIFIED_CACHE``,
        forgotten when the keys change): a client sends the same cookie on every
        request, and checking the HMAC again each time costs more than the lookup.
        Only what verified is remembered, so a forged value is checked every time.
        """
        if not value or len(value) > 1024:
            return None, False
        signer, old, verified = self._signers(app)
        hit = verified.get(value)
        if hit is not None:
            return hit
        for s, current in ((signer, True), (old, False)):
            if s is None:
                continue
            try:
                sid = s.unsign(value).decode("ascii")
            except Exception:  # BadSignature, or bytes that aren't even text
                continue
            if not _SID_RE.fullmatch(sid):
                return None, False
            if len(verified) >= VERIFIED_CACHE:
                with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                    del verified[next(iter(verified))]  # the oldest
            verified[value] = (sid, current)
            return sid, current
        return None, False

    def sid_from_cookie(self, app: Flask, value: str | None) -> str | None:
        """The id in a signed cookie value; None for anything not signed by us."""
        return self._unsign(app, value)[0]

    def get_cookie_samesite(self, app: Flask) -> str | None:
        return app.config.get("SESSION_COOKIE_SAMESITE") or "Lax"

    def open_session(self, app: Flask, request: Request) -> ServerSession | None:
        if not app.secret_key:
            return None  # Flask's NullSession explains that a secret key is needed
        name = self.get_cookie_name(app)
        value = request.cookies.get(name)
        sid, current = self._unsign(app, value)
        return ServerSession(self, sid, value is not None, value if current else None)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, ServerSession) or not session._loaded:
            return  # never touched: no store access, no cookie, no Vary
        response.vary.add("Cookie")
        s = session
        current = {k: codec.dumps(v) for k, v in s._data.items()}
        size = sum(len(k.encode()) + len(v) for k, v in current.items())
        if size > self.max_size:
            log.error("session too large: %d bytes serialized, SESSION_MAX_SIZE is %d; "
                      "not saved", size, self.max_size)
            raise SessionTooLarge(size, self.max_size)
        assert s._sid is not None
        key = self.key_prefix + s._sid
        empty = not any(k != _PERMANENT for k in current)
        batch = self.store.batch()
        ops = 0
        if s._discard is not None:
            batch.delete(self.key_prefix + s._discard)
            ops += 1
        changed: dict[str, bytes] = {}
        removed: list[str] = []
        if empty:
            if not s.new:
                batch.delete(key)
                ops += 1
        else:
            changed = {k: v for k, v in current.items() if s._raw.get(k) != v}
            removed = [k for k in s._raw if k not in current]
            if changed:
                batch.hset(key, changed)
            if removed:
                batch.hdel(key, *removed)
            if changed or removed:
                batch.expire(key, self.ttl)
                ops += 1
        if ops:
            try:
                batch.execute()
            except StoreUnavailable as exc:
                log.error("session store unavailable while saving the session (%s): "
                          "answering 503", exc)
                _become(response, store_unavailable_response())
                return
        s._raw = current
        s._discard = None
        cookie_args: dict[str, Any] = dict(
            domain=self.get_cookie_domain(app), path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app), httponly=self.get_cookie_httponly(app),
            samesite=self.get_cookie_samesite(app))
        if app.config.get("SESSION_COOKIE_PARTITIONED"):
            cookie_args["partitioned"] = True
        name = self.get_cookie_name(app)
        if empty:
            if s._had_cookie:
                response.delete_cookie(name, **cookie_args)
                s._had_cookie = False
            return
        was_new = s.new
        s.new = False
        if was_new or changed or removed or (
                s.permanent and app.config.get("SESSION_REFRESH_EACH_REQUEST", True)):
            signed = s._cookie if s._cookie is not None and not was_new else None
            if signed is None:  # a new id, or one signed with a fallback key
                signed = self._signers(app)[0].sign(s._sid).decode("ascii")
                s._cookie = signed
            response.set_cookie(name, signed, expires=self.get_expiration_time(app, s),
                                **cookie_args)
            s._had_cookie = True


def _become(response: Response, other: Response) -> None:
    """Turn ``response`` (already built by the view) into ``other``."""
    response.status_code = other.status_code
    response.set_data(other.get_data())
    response.headers.clear()
    response.headers.extend(other.headers)
    response.vary.add("Cookie")


def _on_store_unavailable(exc: StoreUnavailable) -> Response:
    log.error("session store unavailable (%s): answering 503", exc)
    return store_unavailable_response()


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
        store = self._store or config.get("SESSION_STORE") or _store_from_config(config)
        interface = StoreSessionInterface(
            store,
            key_prefix=config.get("SESSION_KEY_PREFIX", DEFAULT_PREFIX),
            permanent=bool(config.get("SESSION_PERMANENT", True)),
            id_length=int(config.get("SESSION_ID_LENGTH", DEFAULT_ID_LENGTH)),
            max_size=int(config.get("SESSION_MAX_SIZE", DEFAULT_MAX_SIZE)),
            lifetime=app.permanent_session_lifetime)
        app.session_interface = interface
        app.register_error_handler(StoreUnavailable, _on_store_unavailable)
        app.extensions["gunicorn_ext.session"] = interface
        self.store = store
        self.interface = interface
        return interface


def _store_from_config(config: Any) -> Store:
    url = config.get("SESSION_URL")
    if url:
        return open_store(url)
    kind = (config.get("SESSION_TYPE") or "").lower()
    if kind == "redis":
        from .redis import RedisStore

        client = config.get("SESSION_REDIS")
        if client is not None:
            return RedisStore(url="redis://", client=client)
        return open_store("redis://127.0.0.1:6379/0")
    if kind == "memory":
        return open_store("memory://")
    if kind == "sqlite":
        raise ValueError('SESSION_TYPE="sqlite" needs SESSION_URL="sqlite:///path/to/file.db"')
    raise ValueError(f"unsupported SESSION_TYPE {kind!r}: set SESSION_URL (redis://..., "
                     "sqlite:///path, memory://) or SESSION_TYPE=\"redis\" with SESSION_REDIS")
