"""Every relative link of the documents a user reads (README.md, BENCHMARKS.md, docs/**/*.md) points to a
file or folder of the repository, and every #fragment into a Markdown file to one of its headings. Pure
Python, no torch: a moved result file or a renamed section fails here instead of in a reader's browser."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target "title") and <img src="target">; the target ends at whitespace or ')'.
MD_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str):
    """The lines of a Markdown text outside fenced code blocks."""
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            yield line


def relative_links(text: str) -> list[str]:
    """The relative link targets of a Markdown text (path and #fragment), outside code blocks and spans."""
    targets = []
    for line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        targets += [t for t in MD_LINK.findall(line) + HTML_SRC.findall(line) if not EXTERNAL.match(t)]
    return targets


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces → '-', repeats suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", INLINE_CODE.sub(lambda c: c.group(0)[1:-1], m.group(1)).lower())
        slug = slug.replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_extractor_reads_markdown_and_html_links():
    text = (
        "See [the CLI](docs/CLI.md#flags), [site](https://example.com), [top](#top) and\n"
        '<img src="docs/a.png" width="128">; `[not](a-link.md)`\n'
        "```\n[inside](a-fence.md)\n```\n"
    )
    assert relative_links(text) == ["docs/CLI.md#flags", "#top", "docs/a.png"]


def test_anchors_follow_github_slugs():
    text = "# Flux.1-dev\n## One GPU — 1×H200, 2026-11-21\n## `--tp auto`: memory\n## Notes\n## Notes\n"
    assert anchors(text) == {"flux1-dev", "one-gpu--1h200-2026-11-21", "--tp-auto-memory", "notes", "notes-1"}


def test_every_relative_link_points_to_a_file_and_heading():
    broken, seen = [], 0
    for doc in documents():
        for target in relative_links(doc.read_text(encoding="utf-8")):
            seen += 1
            path, _, fragment = target.partition("#")
            file = (doc.parent / path) if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert seen > 0, "no relative link found: the extractor reads nothing"
    assert not broken, "broken links:\n" + "\n".join(broken)
