"""Sphinx configuration of the API reference (built in CI: sphinx-build -W docs/api OUT)."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))

project = "fvd"
author = "the fvd authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
nitpicky = False  # cross-references to numpy / construct types are not resolved
html_theme = "alabaster"
exclude_patterns = ["_build"]


def _plain_text_blocks(app, what, name, obj, options, lines):
    """fvd's docstrings are plain text ("name: what it does" with indented
    continuation lines), not reST: a blank line around each indented block makes it a
    block quote instead of an "unexpected indentation" error."""
    out = []
    for line in lines:
        indented = line.startswith(" ") and line.strip()
        if out and out[-1].strip():
            was_indented = out[-1].startswith(" ")
            if indented and not was_indented or was_indented and not indented and line.strip():
                out.append("")
        out.append(line)
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", _plain_text_blocks)
