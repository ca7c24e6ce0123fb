"""A Sphinx directive that renders gunicorn-ext's settings reference from the
declarations themselves (``gunicorn_ext.settings.Settings``): name, type, default,
validator and the doc line of each field, so the docs can't drift from the code."""

from __future__ import annotations

import dataclasses
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.application import Sphinx


def _row(*cells: str, code: int = 3) -> nodes.row:
    """A table row; the first *code* cells are set as code."""
    row = nodes.row()
    for i, text in enumerate(cells):
        entry = nodes.entry()
        entry += nodes.paragraph("", "", nodes.literal(text, text) if i < code else nodes.Text(text))
        row += entry
    return row


class SettingsTable(Directive):
    """``.. gunicorn-ext-settings::`` -- every setting of :func:`gunicorn_ext.enable`."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from gunicorn_ext.settings import Settings

        table = nodes.table()
        group = nodes.tgroup(cols=5)
        table += group
        for width in (20, 8, 10, 16, 46):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += _row("setting", "type", "default", "validator", "what it does", code=0)
        group += head
        body = nodes.tbody()
        for f in dataclasses.fields(Settings):
            default: Any = f.default
            validate = f.metadata.get("validate")
            body += _row(f.name, str(f.type), repr(default), getattr(validate, "__name__", ""),
                         f.metadata.get("doc", ""), code=4)
        group += body
        return [table]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("gunicorn-ext-settings", SettingsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
