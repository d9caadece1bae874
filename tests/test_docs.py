"""The README and docs/: short README, generated sections up to date, links that resolve, no internal wording."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").rglob("*.md")])
README_MAX_LINES = 160
# Words about how the project is developed, not about what it does: they do not belong in user documentation
PROCESS_WORDS = re.compile(
    r"(?<!Paddle )\bissue \d+|\bthe main job\b|\bthe lead\b|\bhelpers?\b|\bdevelopment machine\b",
    re.IGNORECASE,
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_fits_on_a_few_screens():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES


def test_readme_generated_sections_equal_a_fresh_generation():
    from yolo_dysample.tools.readme_tables import write_sections

    assert write_sections(README, check=True), "run: python -m yolo_dysample.tools.readme_tables (in the checkout)"


def test_variants_table_counts_the_parameters_dysample_adds():
    from ultralytics import YOLO

    from yolo_dysample import DySample
    from yolo_dysample.tools.readme_tables import variants_table

    model = YOLO("yolov8n-dysample-s.yaml").model
    added = sum(p.numel() for m in model.modules() if isinstance(m, DySample) for p in m.parameters())
    row = next(line for line in variants_table().splitlines() if line.startswith("| `-dysample-s` |"))
    assert row.split("|")[-2].strip().split(" / ")[0] == f"{added:,}"


@pytest.mark.parametrize("document", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_docs_use_no_internal_process_words(document):
    found = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1)
        if PROCESS_WORDS.search(line)
    ]
    assert not found, found


@pytest.mark.parametrize("document", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_in_docs_point_at_existing_files(document):
    missing = []
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        if not (document.parent / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, missing


def test_readme_install_commands_name_no_distribution_that_is_not_on_the_index():
    text = README.read_text(encoding="utf-8")
    assert not re.search(r"pip install\s+\"?yolo-dysample", text), "yolo-dysample is not on PyPI"
    assert "python -m pip install ." in text
