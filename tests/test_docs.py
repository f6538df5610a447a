"""The docs: the MkDocs site builds strictly, the README's links resolve, and the README stays a front page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 180

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(markdown_file: Path) -> set[str]:
    """The heading ids MkDocs gives a page (the toc extension with slugify_unicode, as mkdocs.yml sets)."""
    from markdown.extensions.toc import slugify_unicode, unique

    ids: set[str] = set()
    for line in prose(markdown_file.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "").replace("*", "")
            ids.add(unique(slugify_unicode(title, "-"), ids))
    return ids


def test_the_docs_site_builds_strictly(tmp_path):
    """Strict mode turns every warning into a failure: a broken link or anchor, a page left out of the nav."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml",
                           "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "img" / "report.png").is_file()  # the evaluation page's screenshot


def test_every_relative_link_in_the_readme_resolves():
    links = LINK.findall(prose(README.read_text()))
    assert links
    broken = []
    for target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve() if path else README
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md") if p.name != "index.md"}
    assert pages - linked == set()


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; topics belong in docs/"
    first_screen = [line.split("#", 1)[0].strip() for line in lines[:40]]
    assert "make demo" in first_screen and "make test" in first_screen
