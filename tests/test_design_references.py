"""The design notes the code cites ship in the repository: no reference to a design file outside it, and every
`docs/<page>.md#anchor` reference points at a heading of that page."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = "DESIGN" + ".md"   # spelled in two pieces, so this file does not match itself
REF = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [ROOT / f for f in out.stdout.split("\0") if f]
    return [f for f in files if f.is_file() and f.suffix not in {".png", ".parquet", ".duckdb", ".u8", ".gz"}]


def read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to dashes."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_no_file_refers_to_a_design_file_outside_the_repository():
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in tracked_text_files()
            for n, line in enumerate(read(f).splitlines(), 1) if OLD in line]
    assert not hits, f"references to {OLD}, which is not in the repository: {hits}"


def test_every_docs_anchor_reference_points_at_a_heading():
    refs = [(f.relative_to(ROOT), page, anchor) for f in tracked_text_files() + [ROOT / "docs" / "design.md"]
            for page, anchor in REF.findall(read(f))]
    assert len(refs) >= 20 and any(page == "design.md" for _, page, _ in refs)
    bad = [f"{src}: docs/{page}#{anchor}" for src, page, anchor in refs
           if not (ROOT / "docs" / page).is_file() or anchor not in anchors(ROOT / "docs" / page)]
    assert not bad, f"references to missing pages or headings: {bad}"


def test_anchor_slugs_follow_github():
    page = ROOT / "docs" / "design.md"
    assert {"purpose", "data-contracts", "flows", "method", "evaluation", "performance",
            "reliability"} <= anchors(page)
