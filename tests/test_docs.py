"""The README stays a newcomer's two screens: at most 200 lines, the set-up-and-serve command and
the test command first, and every link in it pointing at a file that exists (the rest lives in
docs/, built with `mkdocs build --strict` by scripts/test.sh)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_opens_with_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    assert [b.strip() for b in blocks[:2]] == [
        "scripts/setup.sh && .venv/bin/llm-gateway serve --config configs/default.yaml",
        "scripts/test.sh",
    ]
    for path in ("scripts/setup.sh", "scripts/test.sh", "configs/default.yaml"):
        assert (ROOT / path).is_file(), path


def test_the_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links into docs/"
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert [page for page in pages if f": {page}" not in nav] == []
