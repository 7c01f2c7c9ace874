"""Every relative link and image in README.md and docs/*.md points at a file that exists, and
every ``#anchor`` at a heading of its target page (GitHub's heading slugs), so moving a section
between pages cannot leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

from tiny import REPO

PAGES = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", flags=re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed
    (letters, digits, '_', '-' and spaces stay), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """'page: target (why)' for each relative link or image of ``page`` that leads nowhere."""
    text = page.read_text(encoding="utf-8")
    body = INLINE_CODE.sub("code", FENCE.sub("", text))
    problems = []
    for target in LINK.findall(body):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{page.name}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text("utf-8")):
            problems.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return problems


def test_github_slugs_of_real_headings():
    assert (
        github_slug("Block rotations — `quant.rotation: {kind: hadamard, size: S}`")
        == "block-rotations--quantrotation-kind-hadamard-size-s"
    )
    assert github_slug("Scale choice — `scale: max | mse`") == "scale-choice--scale-max--mse"
    assert (
        github_slug("qat — block-quantisation-aware fine-tuning for 🤗 transformers")
        == "qat--block-quantisation-aware-fine-tuning-for--transformers"
    )
    assert github_slug("Use from [Python](x.md) (v2)") == "use-from-python-v2"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### b_c\n") == {"a", "a-1", "b_c"}


def test_the_checker_finds_dead_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Intro\n\n## Measured: PPL (CPU)\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n"
        "[ok](other.md#measured-ppl-cpu) ![ok](pic.png) [ok](#top) [web](https://x.org/a.md)\n"
        "[dead](missing.md) ![dead](docs/pic.png) [bad anchor](other.md#measured)\n"
        "[self](#nowhere) `[code](ignored.md)`\n"
        "```\n[fenced](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: docs/pic.png (no such file)",
        "page.md: other.md#measured (no heading #measured in other.md)",
        "page.md: #nowhere (no heading #nowhere in page.md)",
    ]


def test_readme_and_docs_have_no_dead_links():
    assert len(PAGES) > 3
    problems = [p for page in PAGES for p in broken_links(page)]
    assert problems == []


def headings(text: str) -> list[tuple[int, str]]:
    """``(level, text)`` of every heading of a page, fenced code left out."""
    return [
        (len(m.group(1)), m.group(2))
        for m in re.finditer(r"^(#{1,6})[ \t]+(.+?)[ \t]*$", FENCE.sub("", text), flags=re.M)
    ]


def test_each_page_has_one_topic_and_measurements_live_in_results():
    """One H1 per page; a measured table lives in docs/results/, whose pages the others link."""
    results = REPO / "docs" / "results"
    assert sorted(p.name for p in results.glob("*.md")) == [
        "decoders.md",
        "encoders.md",
        "performance.md",
        "qdec.md",
        "search.md",
    ]
    for page in PAGES:
        found = headings(page.read_text(encoding="utf-8"))
        assert [level for level, _ in found].count(1) == 1, f"{page.name}: one H1"
        assert found[0][0] == 1, f"{page.name}: the H1 comes first"
        if results not in page.parents:
            measured = [h for _, h in found if "measured" in h.lower()]
            assert measured == [], f"{page.relative_to(REPO)}: move {measured} to docs/results/"


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_ci_runs_the_test_command_of_the_readme():
    """The README's quickstart gives the test command (its last ``python -m pytest`` line);
    architecture.md's Tests section gives the same one, and .ci/run runs it (with extra
    reporting flags only)."""
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in quick.splitlines() if ln.startswith("python -m pytest")]
    command = line.split("#", 1)[0].strip()
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.+?)\n```", section) == [command]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    runs = [ln for ln in ci if ln == command or ln.startswith(command + " --")]
    assert runs, f".ci/run does not run the README's test command {command!r}"


def test_extend_md_names_files_and_names_that_exist():
    """docs/extend.md names every file an addition touches: each path exists (a placeholder
    such as <family> only its folder), and each plain name a table row gives for a file is
    in that file."""
    text = (REPO / "docs" / "extend.md").read_text()
    code = re.findall(r"`([^`\n]+)`", text)
    paths = [c for c in code if re.match(r"^(qat|tests|docs|bench|data)/|^pyproject\.toml$", c)]
    assert len(paths) > 20
    for path in paths:
        where = REPO / path.split("<")[0]
        assert (where if "<" not in path else where.parent).exists(), path
    checked = 0
    for row in re.findall(r"^\| `([^`<|]+)` \| (.+) \|$", text, flags=re.M):
        if (REPO / row[0]).is_dir():
            continue
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`", row[1])
        source = (REPO / row[0]).read_text()
        for name in names:
            assert name in source, f"{row[0]} has no {name}"
            checked += 1
    assert checked > 20
    # architecture.md's list of extension points is extend.md's, and links to it
    arch = (REPO / "docs" / "architecture.md").read_text()
    points = ["format", "kernel", "packed codec", "task", "export target", "command"]
    assert re.findall(r"\*\*([a-z ]+)\*\* (?:in|for)", arch) == points
    assert "[extend.md](extend.md)" in arch
    assert [h for h in re.findall(r"^## (.+)$", text, flags=re.M)] == [
        "A number format",
        "A kernel for a format",
        "A packed codec (export of a format's codes)",
        "A task",
        "An export target",
        "A command",
    ]
