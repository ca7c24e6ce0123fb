"""Sphinx configuration for the gunicorn-ext docs (``make docs``: warnings are errors)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

import gunicorn_ext  # noqa: E402

project = "gunicorn-ext"
author = "the gunicorn-ext developers"
copyright = "2026, the gunicorn-ext developers"
release = gunicorn_ext.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "settings_table",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# No network at build time: intersphinx maps stay empty unless cached inventories exist.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
suppress_warnings = ["myst.xref_missing"]
