"""The Gunicorn versions gunicorn-ext is tested with, and the check at startup.

gunicorn-ext wraps methods of Gunicorn's running arbiter, and Gunicorn changes
its arbiter between releases (25 raises a boot error before it forgets the
reaped worker, 27 after), so only the versions ``make test`` runs the suite on
are known to work: the oldest that ``pyproject.toml`` allows (``make
test-oldest``) and the newest (``make test``).

At startup (``on_starting``: gunicorn_internals.py's ``wrap_arbiter`` calls
:func:`check_gunicorn` before it touches the arbiter, so the seam to Gunicorn's
internals and the versions it was checked on stay together) a Gunicorn older than
:data:`OLDEST` is refused:
it is outside the dependency range, reachable only by forcing the install, and
the arbiter wraps are not known to hold on it. A Gunicorn newer than
:data:`NEWEST` (a major release not tested yet) gets one warning line and
runs: refusing would keep a deployment from taking a Gunicorn security fix.
"""

from __future__ import annotations

from typing import Any

#: The oldest Gunicorn tested; ``pyproject.toml`` says ``gunicorn>=25``.
OLDEST: tuple[int, ...] = (25, 0, 0)
#: The newest Gunicorn major tested; ``pyproject.toml`` says ``gunicorn<28``.
NEWEST: tuple[int, ...] = (27,)


class UnsupportedGunicorn(RuntimeError):
    """The running Gunicorn is older than gunicorn-ext supports."""


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def tested_range() -> str:
    """The tested versions as a phrase, e.g. ``25.0.0 to 27.x``."""
    return f"{_dotted(OLDEST)} to {_dotted(NEWEST)}.x"


def check_gunicorn(log: Any, version: tuple[int, ...] | None = None) -> None:
    """Refuse a Gunicorn older than :data:`OLDEST`, warn about one newer than :data:`NEWEST`.

    The refusal is a :class:`RuntimeError`, which Gunicorn prints as one
    ``Error:`` line before it exits with status 1.
    """
    if version is None:
        import gunicorn

        version = tuple(gunicorn.version_info)
    if version < OLDEST:
        raise UnsupportedGunicorn(
            f"gunicorn-ext needs Gunicorn {_dotted(OLDEST)} or newer (tested: {tested_range()}); "
            f"this is Gunicorn {_dotted(version)}: pip install 'gunicorn>={_dotted(OLDEST)}'")
    if version[:len(NEWEST)] > NEWEST:
        log.warning("gunicorn-ext: Gunicorn %s is newer than the versions gunicorn-ext is "
                    "tested with (%s); the restart policy and rolling reload wrap its arbiter "
                    "and may misbehave", _dotted(version), tested_range())
