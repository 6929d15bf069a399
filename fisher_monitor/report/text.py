r"""User-controlled text (run paths, layer names, settings, notes) made safe for each output.

HTML goes through Jinja's autoescaping (``markupsafe``); this module covers the terminal
and Markdown:

- :func:`encodable`: lone surrogates (a file or directory name that is not valid UTF-8
  decodes to them, and so may a layer name) become ``\udcNN`` escapes, so that the text
  can be written as UTF-8 at all (the callback's logs, the report's files);
- :func:`terminal_safe`: control characters (C0, DEL, C1, which carry terminal escape
  sequences), bidirectional-override characters and lone surrogates are shown as
  ``\xNN``/``\uNNNN`` escapes, so a name cannot move the cursor, recolour the terminal or
  reorder text;
- :func:`markdown_text`: the characters that open raw HTML, links, emphasis, code,
  entities and table cells are backslash-escaped (CommonMark makes any escaped ASCII
  punctuation literal), as is a character that would start a block (heading, list,
  quote); line breaks become spaces;
- :func:`markdown_code`: a code span whose backtick fence is longer than any run of
  backticks inside it.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_INLINE = re.compile(r"([\\`*_\[\]<>|~&{}])")
_BLOCK_START = re.compile(r"^(\s*)([#+\-=>]|\d+[.)])")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def encodable(text: object) -> str:
    r"""``text`` with lone surrogates shown as ``\udcNN`` escapes: valid for UTF-8.

    ``os.fsdecode`` turns the bytes of a name that is not valid UTF-8 into lone
    surrogates; such text cannot be encoded (``UnicodeEncodeError``) where it is written
    to a file, a TensorBoard tag or a figure, so it is shown as its escapes instead.
    """
    text = str(text)
    return _SURROGATE.sub(_escape, text) if _SURROGATE.search(text) else text


def terminal_safe(text: object) -> str:
    """``text`` with control, bidi-override and surrogate characters shown as escapes."""
    return _UNSAFE.sub(_escape, str(text))


def markdown_text(text: object, starts_block: bool = False) -> str:
    """``text`` as literal Markdown inline text (CommonMark/GFM), on one line.

    Args:
        text: Any text.
        starts_block: Whether the text starts a line or a list item's content, where a
            leading ``#``, ``-``, ``1.`` or ``>`` would open a block.
    """
    one_line = terminal_safe(re.sub(r"[\r\n]+", " ", str(text)))
    escaped = _INLINE.sub(r"\\\1", one_line)
    return _BLOCK_START.sub(_lead, escaped) if starts_block else escaped


def _lead(match: re.Match) -> str:
    """Backslash before a character that would start a block (heading, list, quote)."""
    marker = match[2]
    if marker[0].isdigit():  # "1." -> "1\." (an ordered list needs the bare dot)
        return f"{match[1]}{marker[:-1]}\\{marker[-1]}"
    return f"{match[1]}\\{marker}"


def markdown_code(text: object) -> str:
    """``text`` as a Markdown code span (shown literally, in monospace)."""
    content = terminal_safe(re.sub(r"[\r\n]+", " ", str(text)))
    longest = max((len(run) for run in re.findall(r"`+", content)), default=0)
    fence = "`" * (longest + 1)
    if content.startswith("`") or content.endswith("`") or not content.strip():
        content = f" {content} "
    return f"{fence}{content}{fence}"


__all__ = ["encodable", "markdown_code", "markdown_text", "terminal_safe"]
