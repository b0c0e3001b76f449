"""The README stays a newcomer's page, and every relative link of the README and docs/*.md
leads to a file that exists, and to a heading of it where the link names one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a link in a code sample is not a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    # One string, so a link or a code span wrapped over two lines is still seen whole.
    prose = " ".join(prose_lines(page.read_text(encoding="utf-8")))
    prose = re.sub(r"`[^`]*`", "code", prose)  # inline code is not a link either
    return [target for target in LINK.findall(prose)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, mailto:, ...


def test_slug_follows_github():
    assert slug("`dcpo run` on several processes (`--nproc-per-node N`)") == \
        "dcpo-run-on-several-processes---nproc-per-node-n"
    assert slug("The paper's claims on the tiny model") == "the-papers-claims-on-the-tiny-model"


def test_readme_is_under_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < 300, f"README.md has {lines} lines; move detail to a docs/ page"


def test_the_readme_links_every_docs_page():
    targets = {Path(link.split("#")[0]).name for link in relative_links(ROOT / "README.md")}
    missing = [page.name for page in PAGES[1:] if page.name not in targets]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert relative_links(page) or page.name == "design.md", f"{page.name}: no links found"
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
