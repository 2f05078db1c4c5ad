"""MkDocs hook: links from the docs to files of the repository outside `docs/`.

The pages link results and sources the way GitHub shows them, relative to the page's own file
(`../benchmarks/results/fleet/fleet.json` from `docs/fleet.md`), so the same link works in a
clone, on GitHub and on the site. MkDocs only knows `docs/`, so this hook
- adds every repository file such a link points at to the site, under `repo/<its path>`
  (linked markdown files become pages, and their own links are followed the same way);
- rewrites each such link to that copy.
A link to a file that does not exist is left alone, so `mkdocs build --strict` fails on it.
Nothing here touches the network.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "repo"
# [text](target "title") and ![alt](target): the target and an optional #anchor
LINK = re.compile(r"(\]\()(<?)([^)\s>#]+)(#[^)\s>]*)?(>?)(\s+\"[^\"]*\")?(\))")
FENCE = re.compile(r"^(```|~~~)")


def _targets(text: str):
    """Relative link targets of a markdown text, outside fenced code blocks."""
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in LINK.finditer(line):
            target = m.group(3)
            if "://" in target or target.startswith(("/", "mailto:")):
                continue
            yield target


def _outside_file(page_path: Path, target: str, docs: Path) -> Path | None:
    """The repository file a relative link points at, when it lies outside docs/."""
    path = (page_path.parent / target).resolve()
    if path.is_relative_to(docs) or not path.is_relative_to(ROOT) or not path.is_file():
        return None
    return path


def on_files(files: Files, config) -> Files:
    docs = Path(config.docs_dir).resolve()
    queue = [Path(f.abs_src_path) for f in files.documentation_pages() if f.abs_src_path]
    seen: set[Path] = set()
    while queue:
        page = queue.pop()
        for target in _targets(page.read_text(encoding="utf-8")):
            path = _outside_file(page, target, docs)
            if path is None or path in seen:
                continue
            seen.add(path)
            uri = f"{PREFIX}/{path.relative_to(ROOT).as_posix()}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
            if path.suffix == ".md":
                queue.append(path)
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    docs = Path(config.docs_dir).resolve()
    src = Path(page.file.abs_src_path)
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(m: re.Match) -> str:
        target = m.group(3)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        path = _outside_file(src, target, docs)
        if path is None:
            return m.group(0)
        uri = f"{PREFIX}/{path.relative_to(ROOT).as_posix()}"
        new = posixpath.relpath(uri, here or ".")
        return "".join(g or "" for g in (m.group(1), m.group(2), new, m.group(4), m.group(5),
                                         m.group(6), m.group(7)))

    out, in_fence = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
        out.append(line if in_fence else LINK.sub(rewrite, line))
    return "\n".join(out)

