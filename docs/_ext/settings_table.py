"""A Sphinx directive that renders gunicorn-ext's settings reference from the
declarations themselves (``gunicorn_ext.settings.Settings``): name, type, default and
the ``#:`` doc comment above each field, so the docs can't drift from the code."""

from __future__ import annotations

import dataclasses
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer


def _doc_comments() -> dict[str, str]:
    analyzer = ModuleAnalyzer.for_module("gunicorn_ext.settings")
    return {name: " ".join(lines).strip()
            for (cls, name), lines in analyzer.find_attr_docs().items() if cls == "Settings"}


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

        docs = _doc_comments()
        table = nodes.table()
        group = nodes.tgroup(cols=4)
        table += group
        for width in (22, 8, 12, 58):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += _row("setting", "type", "default", "what it does", code=0)
        group += head
        body = nodes.tbody()
        for f in dataclasses.fields(Settings):
            default: Any = f.default
            body += _row(f.name, str(f.type), repr(default), docs.get(f.name, ""))
        group += body
        return [table]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("gunicorn-ext-settings", SettingsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
