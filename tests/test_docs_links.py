"""Every relative link in README.md and docs/*.md leads somewhere: the file exists, and an anchor names a
heading of that file (as GitHub derives heading anchors). The README was split into docs/ pages, so a
section that moves breaks links silently unless something checks them. No network: absolute URLs are
left alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: [text](target) and ![alt](target); the target stops at whitespace or ')'. Inline code is removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens. E.g. "The `mid` preset: does it help?" -> "the-mid-preset-does-it-help"."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; a repeated heading gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = github_anchor(match.group(1))
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def relative_links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_anchor_rule_matches_github() -> None:
    # Known values, as GitHub renders these headings of this repository.
    assert github_anchor("The `mid` preset: does distillation help once the teacher is stronger?") == \
        "the-mid-preset-does-distillation-help-once-the-teacher-is-stronger"
    assert github_anchor("What the teacher adds: teacher-free controls") == "what-the-teacher-adds-teacher-free-controls"
    assert github_anchor("The smoke grid's time") == "the-smoke-grids-time"
    assert github_anchor("DDP workers: every GPU busy") == "ddp-workers-every-gpu-busy"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {dest.relative_to(REPO)} has no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(broken)
