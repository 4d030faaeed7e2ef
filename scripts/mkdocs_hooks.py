"""mkdocs hook: pages made from files outside ``docs/`` and links that point outside it.

``<!-- include: PATH -->`` in a page is replaced by the repository file ``PATH`` (the README becomes the site's
home page without a copy that could drift). Relative links are resolved against the file they were written in and
re-pointed at the page that shows their target: ``docs/X`` → ``X``, ``README.md`` → ``index.md``,
``benchmarks/README.md`` → ``benchmarks.md``. A link to anything else outside ``docs/`` is left as it is, so
``mkdocs build --strict`` reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

INCLUDE = re.compile(r"<!-- include: (\S+) -->")
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
#: repository files shown as a site page of their own
PAGES = {"README.md": "index.md", "benchmarks/README.md": "benchmarks.md"}


def _relink(text: str, source: str) -> str:
    """Re-point the relative links of ``text``, written in repository file ``source``."""

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if resolved in PAGES:
            new = PAGES[resolved]
        elif resolved.startswith("docs/"):
            new = resolved[len("docs/") :]
        else:
            return match.group(0)
        return f"{match.group(1)}{new}{'#' + anchor if anchor else ''}{match.group(3)}"

    return LINK.sub(fix, text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent

    def include(match: re.Match) -> str:
        return _relink((root / match.group(1)).read_text(encoding="utf-8"), match.group(1))

    return _relink(INCLUDE.sub(include, markdown), "docs/" + page.file.src_uri)
