"""The small Markdown subset xfeat writes, as one standalone HTML page (no scripts, no links
out of the folder): headings, paragraphs, bold, code, links, images, lists, quotes, tables."""

from __future__ import annotations

import html
import re

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em;"
    "line-height:1.45;color:#222}"
    "h1{margin-bottom:.3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
    ".table{overflow-x:auto;margin:.6em 0}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
    "th{vertical-align:bottom}.n{text-align:right}td.n{white-space:nowrap}"
    "tr:nth-child(even){background:#f6f8fa}"
    "blockquote{margin:.5em 0;padding:.3em .8em;border-left:4px solid #e0b000;"
    "background:#fffbea}"
    "img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}"
)


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
    s = re.sub(r"\[([^\]]*)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)


def _numeric(text: str) -> bool:
    """``0.843 [0.81–0.87]``, ``12.3x faster``, ``< 0.001``, ``—``: right-aligned, one line."""
    return bool(re.match(r"[-+<—]?\s*(\d|$)", text))


def _table(lines: list) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    numeric = [all(_numeric(r[i]) for r in rows[2:] if i < len(r)) for i in range(len(rows[0]))]
    head = "".join(
        f"<th class='n'>{_inline(c)}</th>" if n else f"<th>{_inline(c)}</th>"
        for c, n in zip(rows[0], numeric)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='n'>{_inline(c)}</td>" if _numeric(c) else f"<td>{_inline(c)}</td>" for c in row
        )
        + "</tr>"
        for row in rows[2:]
    )
    return f"<div class='table'><table><tr>{head}</tr>{body}</table></div>"


def _blocks(lines: list):
    """Consecutive lines of one kind (table, list, quote) as one block."""
    i = 0
    while i < len(lines):
        kind = (
            "table"
            if lines[i].startswith("|")
            else "list"
            if lines[i].startswith("- ")
            else "quote"
            if lines[i].startswith("> ")
            else "line"
        )
        j = i + 1
        while (
            kind != "line"
            and j < len(lines)
            and lines[j].startswith({"table": "|", "list": "- ", "quote": "> "}[kind])
        ):
            j += 1
        yield kind, lines[i:j]
        i = j


def markdown_to_html(text: str, title: str = "xfeat report") -> str:
    """``text`` (headings, tables, images, lists, quotes, bold) as a standalone HTML page."""
    out = []
    for kind, lines in _blocks(text.splitlines()):
        if kind == "table":
            out.append(_table(lines))
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines) + "</ul>")
        elif kind == "quote":
            out += [f"<blockquote>{_inline(x[2:])}</blockquote>" for x in lines]
        elif m := re.match(r"(#+) (.*)", lines[0]):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif lines[0].strip():
            out.append(f"<p>{_inline(lines[0])}</p>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )
