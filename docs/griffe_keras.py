"""A griffe extension: the Keras docstring format, read as Google style.

The docstrings follow Keras' format (CONTRIBUTING.md, "Style"), which
differs from the Google style that griffe parses in three places:

- `Example:` is followed by a blank line and `>>>` lines flush with it,
  where griffe reads an `Examples:` section only when its lines are
  indented. Unread, the doctests would render as prose, and their outputs
  (`[0.0, 1.0]`) as broken Markdown references.
- `Call arguments:` (a layer's or a metric's) is no Google section.
- `Returns:` is a description only, where griffe reads a first line that
  starts `word:` or `word (...):` as a name and a type
  (`Shape (B, T): ...` would lose its first words).

This rewrites each docstring, in the documentation only, before griffe
parses it: the doctests become an `Examples:` section, and a
`Call arguments:` block becomes a bold title and a list, and a `Returns:`
description starts with a colon: an empty name and type. (That its lines
make one item, not one each, is mkdocs.yml's `returns_multiple_items`.)
The source stays in Keras' format, and the doctests run as written.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^Examples?:\s*$")
_CALL_ARGUMENTS = re.compile(r"^Call arguments.*:\s*$")
_RETURNS = re.compile(r"^(Returns|Yields):\s*$")
# One argument of a `Call arguments:` block: `name: description`, where
# `name` may list several (`query_mask, value_mask, key_mask`).
_ITEM = re.compile(r"^    (\w[\w, ]*):\s+(.*)$")


def keras_to_google(text: str) -> str:
    """`text`, a cleaned Keras-format docstring, in griffe's Google style."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _EXAMPLE.match(line):
            start = _next_non_blank(lines, i + 1)
            if start < len(lines) and lines[start].startswith(">>>"):
                out.append("Examples:")
                i = _indent_doctests(lines, start, out)
                continue
        if (
            _CALL_ARGUMENTS.match(line)
            and i + 1 < len(lines)
            and lines[i + 1].startswith("    ")
        ):
            out += [f"**{line.strip()}**", ""]
            i += 1
            while i < len(lines) and lines[i].startswith("    "):
                item = _ITEM.match(lines[i])
                if item and not lines[i].startswith("     "):
                    out.append(f"- `{item[1]}`: {item[2]}")
                else:
                    out.append("  " + lines[i].strip())
                i += 1
            continue
        if _RETURNS.match(line):
            start = _next_non_blank(lines, i + 1)
            if start < len(lines) and lines[start].startswith("    "):
                out += [line, "    : " + lines[start].lstrip()]
                i = start + 1
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _next_non_blank(lines, i):
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


def _indent_doctests(lines, i, out):
    """Appends the doctest blocks from line `i` on, indented; returns the end."""
    while True:
        while i < len(lines) and lines[i].strip():
            out.append("    " + lines[i])
            i += 1
        following = _next_non_blank(lines, i)
        if following < len(lines) and lines[following].startswith(">>>"):
            out.append("")
            i = following
        else:
            return i


class KerasDocstrings(griffe.Extension):
    """Rewrites every docstring griffe loads before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = keras_to_google(obj.docstring.value)
