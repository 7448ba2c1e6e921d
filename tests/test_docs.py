"""The documentation as a visitor meets it: every relative link resolves inside the repository (nothing points
into ../shared or elsewhere outside it), the README's first screen has the paper, a result table and a figure,
and LICENSE and CITATION.cff exist and parse. Fast: reads files only."""
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target); a target ends at whitespace or ')' (an optional "title" may follow).
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "storage_layout.md", REPO / "bench" / "README.md"]
    files += sorted((REPO / "docs").glob("**/*.md"))
    return files


def links(md: Path) -> list[str]:
    """Every link and image target of a Markdown file, outside code blocks and inline code."""
    text = INLINE_CODE.sub("", FENCE.sub("", md.read_text(encoding="utf-8")))
    return LINK.findall(text)


def is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"))


def anchors(md: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_link_parser_finds_links_and_images_and_skips_code(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[a](b.md) ![i](img/p.png \"t\") [c](https://x.org) [d](#s)\n`[e](f.md)`\n```\n[g](h.md)\n```\n"
                  "[j](k.md#frag)\n")
    assert links(md) == ["b.md", "img/p.png", "https://x.org", "#s", "k.md#frag"]
    assert [t for t in links(md) if is_relative(t)] == ["b.md", "img/p.png", "k.md#frag"]
    (tmp_path / "k.md").write_text("# Title\n## The suite's `own` time\n## Title\n```\n# not a heading\n```\n")
    assert anchors(tmp_path / "k.md") == {"title", "the-suites-own-time", "title-1"}


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(md):
    assert md.is_file(), f"{md.relative_to(REPO)} is missing"
    broken = []
    for target in links(md):
        assert not target.startswith("../shared") and "/shared/" not in target, f"{md.name}: {target}"
        if not is_relative(target):
            continue
        file, _, fragment = target.partition("#")
        path = (md.parent / file).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(target)  # the file exists, the section does not
    assert not broken, f"{md.relative_to(REPO)}: links that do not resolve inside the repository: {broken}"


def test_readme_first_screen_has_the_paper_a_result_table_and_a_figure():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"
    first = "\n".join(lines[:60])
    assert re.search(r"\]\(https?://arxiv\.org/abs/2306\.06081", first), "no link to the paper in the first 60 lines"
    assert "@misc{" in first or "@article{" in first, "no BibTeX citation in the first 60 lines"
    assert re.search(r"^\|.*\|\s*$\n^\|(\s*:?-+:?\s*\|)+\s*$", first, re.M), "no Markdown table in the first 60 lines"
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", first)
    assert images and all((REPO / i).is_file() for i in images), "no image (or a missing one) in the first 60 lines"
    for number in ("73.00%", "58.20%", "-14.8", "100 steps x EOT 20", "eps 0.1"):
        assert number in first, f"the headline lacks {number!r}"


def test_readme_keeps_the_two_commands_and_both_test_tiers():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash .ci/setup && .venv/bin/pipeline run --config configs/fmnist.yaml --stage all" in text
    assert "bash .ci/setup && .venv/bin/python -m pytest -q\n" in text or \
        "bash .ci/setup && .venv/bin/python -m pytest -q " in text
    assert '-m "not slow"' in text
    assert ".venv/bin/python -m pytest -q" in (REPO / ".ci" / "run").read_text()
    assert "slow:" in (REPO / "pyproject.toml").read_text()  # the marker the fast tier deselects is declared


def test_license_is_mit_as_pyproject_declares():
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "Permission is hereby granted, free of charge" in license_text
    assert 'license = { text = "MIT" }' in (REPO / "pyproject.toml").read_text()


def test_citation_cff_parses_and_names_the_paper():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"].startswith("1.2")
    assert cff["title"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert "Adversarial Training and Purification" in paper["title"]
    assert [a["family-names"] for a in paper["authors"]] == ["Ballarin", "Ansuini", "Bortolussi"]
    assert "2306.06081" in paper["url"]
