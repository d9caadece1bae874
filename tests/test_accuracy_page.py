"""The accuracy page and the README's sentences come from the stored comparisons, and follow them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yolo_dysample.compare.report import summarise, write_csv
from yolo_dysample.compare.runner import PlannedRun
from yolo_dysample.tools import accuracy_page

REPO = Path(__file__).resolve().parents[1]
PRIMARY = "test/mAP50-95(B)"


def test_published_accuracy_equals_a_fresh_generation_from_the_stored_comparisons():
    assert accuracy_page.write_docs(REPO, check=True) == [], "run: python -m yolo_dysample.tools.accuracy_page"


def _finished_comparison(directory: Path, name: str, deltas: dict[str, list[float]], pretrain: bool) -> Path:
    """A comparison folder as compare leaves it, with the test metric of each variant = stock + its deltas."""
    comparison = directory / name
    stock = [0.30, 0.32, 0.31, 0.33]
    planned, records = [], {}
    for variant, offsets in {"stock": [0.0] * 4, **deltas}.items():
        for seed, (base, offset) in enumerate(zip(stock, offsets, strict=True)):
            run = PlannedRun(variant, seed, f"yolov8n-{variant}.yaml", comparison / f"{variant}-seed{seed}", {})
            record = {
                "variant": variant,
                "seed": seed,
                "metrics": {"metrics/mAP50-95(B)": base},
                "test_metrics": {PRIMARY: base + offset},
                "epochs_completed": 10,
                "parameters": 3_000_000,
                "gflops": 1.3,
                "train_seconds": 100.0,
                "train_call_seconds": 110.0,
                "cpu_seconds": 120.0,
                "peak_rss_mib": 1000.0,
                "device": "cpu",
                "torch": "2.14.1",
                "ultralytics": "8.4.190",
                "yolo_dysample": "0.1.0",
            }
            run.directory.mkdir(parents=True)
            (run.directory / "compare_run.json").write_text(json.dumps(record))
            planned.append(run)
            records[(variant, seed)] = record
    _, summary, _, primary = summarise(planned, records, ["stock", *deltas], {})
    assert primary == PRIMARY
    write_csv(comparison / "summary.csv", summary)
    (comparison / "summary.md").write_text(f"# DySample comparison `{name}`\n\n| Variant |\n|---|\n| stock |\n")
    settings = {"data": {"shapes": {"test_images": 400}}, "epochs": 10, "weights": None}
    if pretrain:
        settings["pretrain"] = {"epochs": 30}
    (comparison / "compare_settings.json").write_text(json.dumps(settings))
    (comparison / "progress.log").write_text("2026-12-01T10:00:00 start\n2026-12-01T11:30:00 end\n")
    return comparison


@pytest.fixture
def checkout(tmp_path):
    """A checkout's README and benchmark page, with the markers and text around them."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "README.md").write_text("# Title\n\n<!-- BEGIN accuracy -->\nold\n<!-- END accuracy -->\n\nTail.\n")
    page = "# Page\n\n## Fine-tuning\n\n<!-- BEGIN result-finetune -->\nold\n<!-- END result-finetune -->\n\n"
    page += "## Scratch\n\n<!-- BEGIN result-scratch -->\nold\n<!-- END result-scratch -->\n"
    (repo / "docs" / "small_object_benchmark.md").write_text(page)
    return repo


def test_readme_gives_each_comparisons_paired_difference_with_its_interval(tmp_path, checkout):
    finetune = _finished_comparison(
        tmp_path,
        "finetune",
        {"bilinear": [0.004, 0.014, -0.006, 0.004], "dysample": [0.010, 0.012, 0.008, 0.010]},
        True,
    )
    scratch = _finished_comparison(tmp_path, "scratch", {"dysample": [0.02, -0.02, 0.01, -0.01]}, False)
    arguments = [str(scratch), str(finetune), "--repo", str(checkout), "--commit", "abc123"]
    assert accuracy_page.main(arguments) == 0

    readme = (checkout / "README.md").read_text()
    assert readme.startswith("# Title\n\n") and readme.endswith("\n\nTail.\n")
    finetune_line, scratch_line = (line for line in readme.splitlines() if line.startswith("- `"))
    assert finetune_line.startswith("- `finetune` (4 seeds, fine-tuned 10 epochs from one stock model pretrained")
    assert "test mAP50-95 of DySample − stock (nearest) = +0.0100 (95 % CI [+0.0074, +0.0126]" in finetune_line
    assert "p = 0.001), a gain; bilinear +0.0040 (95 % CI [-0.0090, +0.0170], p = 0.399)" in finetune_line
    assert scratch_line.startswith("- `scratch` (4 seeds, trained 10 epochs from scratch, scored on 400 held-out")
    assert "no difference this benchmark can resolve (CI half-width 0.0291)" in scratch_line

    page = (checkout / "docs" / "small_object_benchmark.md").read_text()
    assert page.count("commit `abc123`") == 2 and "8 runs from 2026-12-01T10:00:00" in page
    assert "# DySample comparison" not in page, "the summary's title stays out of the page"
    stored = checkout / "docs" / "benchmarks"
    assert sorted(path.name for path in stored.iterdir()) == [
        f"accuracy-{name}.{suffix}" for name in ("finetune", "scratch") for suffix in ("csv", "json", "md")
    ]
    record = json.loads((stored / "accuracy-finetune.json").read_text())
    dysample = {run["seed"]: run["metrics"][PRIMARY] for run in record["per_run"] if run["variant"] == "dysample"}
    stock = {run["seed"]: run["metrics"][PRIMARY] for run in record["per_run"] if run["variant"] == "stock"}
    assert [round(dysample[seed] - stock[seed], 6) for seed in range(4)] == [0.010, 0.012, 0.008, 0.010]
    assert accuracy_page.main(["--repo", str(checkout), "--check"]) == 0


def test_check_fails_when_a_published_number_no_longer_matches_the_stored_summary(tmp_path, checkout):
    comparison = _finished_comparison(tmp_path, "finetune", {"dysample": [0.01, 0.02, 0.0, 0.01]}, True)
    assert accuracy_page.main([str(comparison), "--repo", str(checkout)]) == 0
    readme = checkout / "README.md"
    readme.write_text(readme.read_text().replace("stock (nearest) = +0.0100", "stock (nearest) = +0.0200"))
    assert accuracy_page.main(["--repo", str(checkout), "--check"]) == 1
    assert accuracy_page.main(["--repo", str(checkout)]) == 0
    assert "stock (nearest) = +0.0100" in readme.read_text()


def test_an_unfinished_comparison_is_refused(tmp_path, checkout):
    (tmp_path / "scratch").mkdir()
    with pytest.raises(FileNotFoundError, match="finish the comparison first"):
        accuracy_page.store_comparison(tmp_path / "scratch", checkout)
    assert accuracy_page.main([str(tmp_path / "scratch"), "--repo", str(checkout)]) == 2  # a message, no traceback
