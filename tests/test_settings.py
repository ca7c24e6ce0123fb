"""Settings: each declared with its type, default, named validator and doc line; every one
validated, naming the setting; the README's table is the declarations'."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from gunicorn_ext.settings import Settings, SettingsError

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- settings-table: generated from gunicorn_ext/settings.py; `make settings-table` rewrites it -->"
END = "<!-- /settings-table -->"

#: A value of the wrong kind for each annotation (a size setting takes an int or a string).
WRONG: dict[str, list[Any]] = {
    "int": ["x", 1.5, True, None, [1]],
    "float": ["x", True, None, float("nan"), [1.0]],
    "bool": [1, "yes", None, 0],
    "bool | None": [1, "yes", 0],
    "str": [123, None, b"x", ["a"]],
}


def test_every_setting_is_declared_with_a_named_validator_and_a_doc_line() -> None:
    for f in fields(Settings):
        validate = f.metadata.get("validate")
        assert callable(validate), (
            f"{f.name}: declare it as `{f.name}: {f.type} = setting(default, validate_..., "
            f"\"doc line\")` in gunicorn_ext/settings.py")
        assert validate.__name__ != "<lambda>" and validate.__name__.startswith(("validate_", "parse_")), f.name
        doc = f.metadata.get("doc", "")
        assert doc and "\n" not in doc and doc.endswith((".", ")")), f"{f.name}: doc line {doc!r}"
        assert str(f.type) in WRONG, f"{f.name}: add its type {f.type} to WRONG in this test"
        assert validate(f.name, f.default) == f.default  # the default is a valid value


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_every_setting_refuses_a_wrong_kind_of_value_naming_it(name: str) -> None:
    kind = next(str(f.type) for f in fields(Settings) if f.name == name)
    for value in WRONG[kind]:
        with pytest.raises(SettingsError, match=rf"\bsetting {name} must .*got {re.escape(repr(value))}"):
            Settings.from_kwargs({name: value})


def test_strings_are_validated() -> None:
    with pytest.raises(SettingsError, match="worker_ports_host must be a string"):
        Settings.from_kwargs({"worker_ports_host": 123})
    for bad in ("not a host", "http://x", "[::1]", "127.0.0.1:80", "-x", "a/b"):
        with pytest.raises(SettingsError, match="worker_ports_host must be a host name or an IP"):
            Settings(worker_ports_host=bad)
    for good in ("", "127.0.0.1", "::1", "localhost", "app-1.internal"):
        assert Settings(worker_ports_host=good).worker_ports_host == good
    for name, bad in (("restart_breaker_scope", "Slot"), ("restart_breaker_action", "stop"),
                      ("sticky_cookie", "a-b")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_kwargs({name: bad})


def test_values_are_converted_and_ranges_checked() -> None:
    s = Settings(memory_soft_limit="512M", memory_hard_limit="1G", restart_delay=1, ipc_max_frame="1M")
    assert (s.memory_soft_limit, s.memory_hard_limit, s.ipc_max_frame) == (512 << 20, 1 << 30, 1 << 20)
    assert isinstance(s.restart_delay, float)
    for kwargs, match in (({"ipc_max_frame": 100}, "ipc_max_frame must be between"),
                          ({"ipc_max_backlog": 2048}, "ipc_max_backlog must be at least ipc_max_frame"),
                          ({"restart_backoff_factor": 0.5}, "restart_backoff_factor must be at least 1"),
                          ({"restart_delay": 20}, "restart_max_delay must be at least restart_delay"),
                          ({"restart_breaker_failures": -1}, "restart_breaker_failures must be 0"),
                          ({"reload_batch": 0}, "reload_batch must be at least 1"),
                          ({"worker_ports_base": 70000}, "worker_ports_base must be 0 .off. or a port"),
                          ({"stats_interval": 0}, "stats_interval must be positive"),
                          ({"memory_soft_limit": "2G", "memory_hard_limit": "1G"},
                           "memory_soft_limit must not exceed memory_hard_limit"),
                          ({"max_lifetime": -1}, "max_lifetime must not be negative"),
                          ({"nope": 1}, "unknown gunicorn-ext setting.s.: nope")):
        with pytest.raises(SettingsError, match=match):
            Settings.from_kwargs(kwargs)


def readme_table() -> str:
    """The README's settings table, rendered from the declarations."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for f in fields(Settings):
        rows.append(f"| `{f.name}` | {cell(str(f.type))} | `{f.default!r}` | {cell(f.metadata['doc'])} |")
    return "\n".join([BEGIN, *rows, END])


def test_readme_settings_table_is_the_declarations() -> None:
    text = README.read_text()
    start, end = text.find(BEGIN), text.find(END)
    assert 0 <= start < end, f"README.md has no settings table between {BEGIN!r} and {END!r}"
    current = text[start:end + len(END)]
    expected = readme_table()
    if current != expected and os.environ.get("GX_WRITE_README"):
        README.write_text(text[:start] + expected + text[end + len(END):])
        current = expected
    assert current == expected, "README.md's settings table is out of date: run `make settings-table`"
