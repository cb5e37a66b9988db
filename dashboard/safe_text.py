"""Text from runs, data files and models on a page: never read as Markdown or HTML (one helper per place it goes)."""

from __future__ import annotations

import re

_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "[": "&#91;", "]": "&#93;", "&": "&amp;"}
_MD_ESCAPE = re.compile(r"[\\`*~$|#!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|:(?=[A-Za-z/])")


def md(text) -> str:
    """Text from a run, a data file or a model, made inert inside Markdown, shown exactly as written: no links,
    images, HTML, emphasis, code, maths or Streamlit directives (``:red[...]``, ``:material/...:``) can come out of
    it. Brackets and angle brackets become character references, the other marks are backslash-escaped; plain words
    (``beta_min = 0.9``) stay as they are."""
    text = "" if text is None else str(text)
    text = _MD_ESCAPE.sub(lambda m: "\\" + m.group(0), text)
    return "".join(_MD_ENTITIES.get(c, c) for c in text).replace("\n", "  \n")


def html_text(text) -> str:
    """A run id or label for Plotly, whose legend and hover labels read a subset of HTML (links included)."""
    import html

    return html.escape("" if text is None else str(text))


def code(text) -> str:
    """An id or a path as inline code: a code span never renders links, HTML or emphasis; its fence is longer
    than any run of backticks inside (so a directory named with backticks cannot close it)."""
    text = " ".join(("" if text is None else str(text)).split())
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"
