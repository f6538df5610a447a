"""The docs: the MkDocs site builds strictly, the README's links resolve, its Python quickstart runs, and the
README stays a front page."""

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


def _readme_block(after_heading: str) -> str:
    """The first ```python block under the README heading `after_heading`."""
    text = README.read_text()
    section = text[text.index(after_heading):]
    match = re.search(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
    assert match, f"no python block under {after_heading!r}"
    return match.group(1)


def test_the_readme_python_quickstart_runs_and_protects(tiny_model_dir, tmp_path, monkeypatch):
    """The front page's Python example, run as written: same sizes out, ε held, the tiny model labelled."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_block("### Python"), "README.md", "exec"), scope)  # noqa: S102 - our own README
    result, photos = scope["result"], scope["photos"]
    assert len(photos) >= 2 and len(result.images) == len(photos)
    for path, image, array in zip(photos, result.images, result.arrays):
        original = np.array(Image.open(path).convert("RGB"))
        assert image.size == Image.open(path).size and array.shape == original.shape
        eps_255 = result.record.linf_255_max
        assert 0 < np.abs(array.astype(int) - original).max() <= eps_255 <= 0.05 * 127.5 + 0.5
    assert (tmp_path / "astronaut_1.protected.png").is_file()
    assert any("tiny random model" in note for note in result.record.notes)
    images, record = result  # unpacks as (images, record)
    assert record is result.record and len(images) == len(photos)
