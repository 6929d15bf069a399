"""Griffe extension for the API reference: Sphinx markup in docstrings read as Markdown.

The package's docstrings are Google style with a little reStructuredText (``:func:`x```
roles, ``.. math::`` blocks), which mkdocstrings would print verbatim. This extension,
loaded by ``mkdocs.yml``, rewrites them before rendering:

- ``:func:`~fisher_monitor.engine.measure``` → ```measure``` (inline code, last part
  with ``~``, the full dotted path without);
- a ``.. math::`` block → a fenced code block holding the formula as written;
- a doctest (lines from ``>>>`` to the next blank line) → a fenced ``pycon`` block, so
  that its output (``[0, 3, 6]``) is not read as Markdown (a link, a quote);
- a line ending in ``::`` (reStructuredText's literal-block marker) ends in ``:``.

Roles become plain inline code rather than links so that a renamed or private target never
breaks the ``--strict`` build.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|obj|exc|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != ".. math::":
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        block: list[str] = []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        body = [b for b in block if b.strip()]
        inner = min((len(b) - len(b.lstrip()) for b in body), default=0)
        pad = " " * indent
        out += [f"{pad}```text", *(pad + b[inner:] for b in block if b.strip()), f"{pad}```", ""]
    return "\n".join(out)


def _doctests(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = len(lines[i]) - len(stripped)
        pad = " " * indent
        out.append(f"{pad}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(pad + lines[i][indent:])
            i += 1
        out.append(f"{pad}```")
    return "\n".join(out)


class SphinxMarkup(griffe.Extension):
    """Rewrite Sphinx roles, ``.. math::`` blocks and doctests in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is None:
            return
        value = _math_blocks(_ROLE.sub(_role, obj.docstring.value))
        # reStructuredText's literal-block marker: "…order)::" reads "…order):"; the
        # indented block after it is a Markdown code block already
        value = re.sub(r"::[ \t]*$", ":", value, flags=re.MULTILINE)
        obj.docstring.value = _doctests(value)
