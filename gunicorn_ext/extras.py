"""The optional parts of gunicorn-ext and the extras that install them.

The core (``pip install gunicorn-ext``) is the server half: bus, lifecycle, metrics,
control and the nginx CLI. Modules that need more import their dependency through
:func:`require`, through :func:`missing_extra`, so a missing one fails with the ``pip install`` line
that fixes it instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

#: extra -> what it is for (the names of ``[project.optional-dependencies]``).
EXTRAS = {
    "flask": "Flask server-side sessions and shared primitives (gunicorn_ext.state.flask)",
    "redis": "the Redis store: redis://, rediss://, redis+sentinel://, redis+cluster://",
    "socketio": "Socket.IO across workers (gunicorn_ext.socketio)",
}


class MissingExtra(ImportError):
    """A feature's dependency is not installed; the message names the extra."""


def missing_extra(exc: ImportError, extra: str, feature: str) -> ImportError:
    """The error to raise for *exc*, met while importing *feature*'s dependencies.

    Usage, around a module's third-party imports::

        try:
            import redis
        except ImportError as exc:
            raise missing_extra(exc, "redis", __name__) from exc

    A dependency that is installed but fails inside is re-raised as it is.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}")
    if not isinstance(exc, ModuleNotFoundError):
        return exc
    return MissingExtra(
        f"{feature} needs {exc.name!r}, which comes with gunicorn-ext's {extra!r} extra: "
        f"pip install 'gunicorn-ext[{extra}]'", name=exc.name)
