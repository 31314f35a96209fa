"""The README links every page under docs/, and every relative link in README and docs resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    missing = [
        p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme
    ]
    assert missing == []


def test_relative_links_resolve():
    broken = []
    for page in _pages():
        for target in _LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            if not (page.parent / target).resolve().exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
