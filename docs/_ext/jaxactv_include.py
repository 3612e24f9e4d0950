"""Reuse the repository's markdown (README, examples, benchmarks) on the site.

A page line ``<!-- include PATH [from "HEADING"] [to "HEADING"] [as-sections] -->``
is replaced, when Sphinx reads the page, by the lines of PATH (relative to docs/)
from the heading ``from`` (kept) up to the heading ``to`` (left out); with
``as-sections`` the headings are shifted so the shallowest is a ``##`` section.
Links are rewritten for the site: images and the other READMEs point at their place
in the tree, links to other files keep only their text.
So the site never holds a stale copy of the README's text.
"""

from __future__ import annotations

import os
import pathlib
import re

from sphinx.errors import ExtensionError

DIRECTIVE = re.compile(
    r'^<!-- include (?P<path>\S+)(?: from "(?P<start>[^"]+)")?(?: to "(?P<end>[^"]+)")?'
    r"(?P<sections> as-sections)? -->$",
    re.M,
)
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
# Markdown files of the repository that are pages of the site.
PAGES = {"README.md": "index.md", "examples/README.md": "examples.md",
         "benchmarks/README.md": "benchmarks.md"}


def _slice(lines: list[str], start: str | None, end: str | None, path: pathlib.Path):
  def find(heading):
    for i, line in enumerate(lines):
      if line.rstrip() == heading:
        return i
    raise ExtensionError(f"include: heading {heading!r} not found in {path}")

  lo = find(start) if start else 0
  hi = find(end) if end else len(lines)
  if hi <= lo:
    raise ExtensionError(f"include: {end!r} does not follow {start!r} in {path}")
  return lines[lo:hi]


def _rewrite_links(text: str, source: pathlib.Path, docs: pathlib.Path, root: pathlib.Path):
  def repl(m):
    target = m.group("target")
    if re.match(r"^[a-z]+://|^#|^mailto:", target):
      return m.group(0)
    path, _, anchor = target.partition("#")
    resolved = (source.parent / path).resolve()
    rel_root = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else None
    if m.group("bang"):
      return f"![{m.group('text')}]({os.path.relpath(resolved, docs)})"
    if rel_root in PAGES:
      return f"[{m.group('text')}]({PAGES[rel_root]}{'#' + anchor if anchor else ''})"
    return m.group("text")  # a source file or folder: its name, without a link

  out, fenced = [], False
  for line in text.split("\n"):
    if line.lstrip().startswith("```"):
      fenced = not fenced
    out.append(line if fenced else LINK.sub(repl, line))
  return "\n".join(out)


def _as_sections(lines: list[str]) -> list[str]:
  """Shift the headings so that the shallowest is a ``##`` section of the page."""
  heading, fenced, levels = re.compile(r"^(#+) "), False, []
  for line in lines:
    if line.lstrip().startswith("```"):
      fenced = not fenced
    elif not fenced and heading.match(line):
      levels.append(len(heading.match(line).group(1)))
  shift = 2 - min(levels) if levels else 0
  out, fenced = [], False
  for line in lines:
    if line.lstrip().startswith("```"):
      fenced = not fenced
    elif not fenced and heading.match(line):
      line = "#" * (len(heading.match(line).group(1)) + shift) + line.lstrip("#")
    out.append(line)
  return out


def expand_includes(app, docname, source):
  docs = pathlib.Path(app.srcdir)
  root = docs.parent

  def repl(m):
    path = (docs / m.group("path")).resolve()
    app.env.note_dependency(str(path))
    lines = _slice(path.read_text().split("\n"), m.group("start"), m.group("end"), path)
    if m.group("sections"):
      lines = _as_sections(lines)
    return _rewrite_links("\n".join(lines), path, docs, root)

  source[0] = DIRECTIVE.sub(repl, source[0])


def setup(app):
  app.connect("source-read", expand_includes)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
