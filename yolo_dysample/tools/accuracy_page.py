"""The accuracy benchmark's published numbers, generated from finished comparisons and from nothing else.

``python -m yolo_dysample.tools.accuracy_page runs/compare/finetune runs/compare/scratch --write`` stores each
finished comparison's summary in ``docs/benchmarks/accuracy-<name>.*`` (summary.md, summary.csv, the plots and a JSON
record of the commit, machine, versions and wall time), then regenerates, between markers, the comparison's section
of ``docs/small_object_benchmark.md`` and the README's sentences. Without directories it regenerates both from what
is stored; ``--check`` exits 1 where the README or the page differ from that (a test runs it), so a number edited
by hand or left behind by a later run fails the tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from yolo_dysample.tools import readme_tables

__all__ = ["Comparison", "load_stored", "page_section", "readme_sentences", "store_comparison", "write_docs"]

REPO = Path(__file__).resolve().parents[2]
PAGE = Path("docs/small_object_benchmark.md")
STORE = Path("docs/benchmarks")
README_SECTION = "accuracy"
ORDER = ("finetune", "scratch")  # the README's order; other names follow alphabetically
LABELS = {"stock": "stock (nearest)", "bilinear": "bilinear", "dysample": "DySample", "dysample-plus": "DySample+"}
PLOTS = {"paired_ci.png": "paired_ci", "curves.png": "curves"}


@dataclass
class Comparison:
    """One finished comparison as stored: its name, the rows of summary.csv, summary.md and the run record."""

    name: str
    rows: list[dict[str, str]]
    summary_md: str
    record: dict

    @property
    def primary(self) -> str:
        """The summary's primary metric key (its rows carry ``<key> delta vs stock``)."""
        suffix = " delta vs stock"
        keys = [key[: -len(suffix)] for key in self.rows[0] if key.endswith(suffix)]
        if not keys:
            raise ValueError(f"comparison {self.name}: summary.csv has no paired-difference columns")
        return keys[0]

    def delta(self, variant: str) -> tuple[float, float, float, float, int]:
        """``(mean, ci_low, ci_high, p, pairs)`` of ``variant - stock`` on the primary metric."""
        row = next((row for row in self.rows if row["variant"] == variant), None)
        if row is None:
            raise KeyError(variant)
        key = self.primary
        values = [_number(row[f"{key} delta {part}"]) for part in ("vs stock", "ci95 low", "ci95 high", "p")]
        return (*values, int(float(row[f"{key} delta pairs"] or 0)))


def _number(cell: str) -> float:
    return float(cell) if cell not in ("", None) else math.nan


def _commit(checkout: Path) -> str:
    """HEAD of the checkout that holds this package, ``+changes`` if its tracked files differ; ``unknown``."""
    try:

        def git(*arguments: str) -> str:
            return subprocess.run(
                ["git", "-C", str(checkout), *arguments], capture_output=True, text=True, check=True
            ).stdout.strip()

        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    import torch

    from yolo_dysample.tools.bench_common import machine_summary

    return machine_summary(torch.device("cpu"), torch.get_num_threads())["cpu"]


def _progress_times(directory: Path) -> tuple[str, str]:
    """First and last timestamp of the comparison's progress.log (it spans every session that resumed it)."""
    stamps = [line.split(" ", 1)[0] for line in (directory / "progress.log").read_text().splitlines() if line]
    return stamps[0], stamps[-1]


def store_comparison(directory: Path, repo: Path = REPO, commit: str | None = None) -> Comparison:
    """Copy a finished comparison's summary into ``repo/docs/benchmarks`` with its record; the stored comparison.

    Raises:
        FileNotFoundError: ``directory`` has no summary.csv (the comparison has not finished).
    """
    directory = Path(directory)
    if not (directory / "summary.csv").is_file():
        raise FileNotFoundError(f"{directory}: no summary.csv; finish the comparison first (run it again to resume)")
    name = directory.name
    store = repo / STORE
    store.mkdir(parents=True, exist_ok=True)
    runs = [json.loads(path.read_text()) for path in sorted(directory.glob("*/compare_run.json"))]
    if not runs:
        raise FileNotFoundError(f"{directory}: no finished run (*/compare_run.json)")
    started, finished = _progress_times(directory)
    record = {
        "name": name,
        "commit": commit or _commit(REPO),
        "machine": _cpu(),
        "python": platform.python_version(),
        "versions": {key: sorted({run[key] for run in runs}) for key in ("torch", "ultralytics", "yolo_dysample")},
        "devices": sorted({run.get("device", "?") for run in runs}),
        "runs": len(runs),
        "started": started,
        "finished": finished,
        "train_seconds": round(sum(run.get("train_call_seconds") or 0.0 for run in runs), 1),
        "settings": json.loads((directory / "compare_settings.json").read_text()),
        "per_run": [  # every run's own metrics, so a paired difference can be recomputed from the page's data
            {
                "variant": run["variant"],
                "seed": run["seed"],
                "metrics": {**run.get("metrics", {}), **(run.get("test_metrics") or {})},
            }
            for run in runs
        ],
    }
    for file, suffix in PLOTS.items():
        if (directory / file).is_file():
            shutil.copyfile(directory / file, store / f"accuracy-{name}-{suffix}.png")
    shutil.copyfile(directory / "summary.csv", store / f"accuracy-{name}.csv")
    shutil.copyfile(directory / "summary.md", store / f"accuracy-{name}.md")
    _write_atomically(store / f"accuracy-{name}.json", json.dumps(record, indent=2) + "\n")
    return _load(store, name)


def _load(store: Path, name: str) -> Comparison:
    with open(store / f"accuracy-{name}.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    summary_md = (store / f"accuracy-{name}.md").read_text(encoding="utf-8")
    record = json.loads((store / f"accuracy-{name}.json").read_text(encoding="utf-8"))
    return Comparison(name, rows, summary_md, record)


def load_stored(repo: Path = REPO) -> list[Comparison]:
    """Every comparison stored in ``repo/docs/benchmarks``, in the README's order."""
    names = [path.name[len("accuracy-") : -len(".json")] for path in (repo / STORE).glob("accuracy-*.json")]
    names.sort(key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))
    return [_load(repo / STORE, name) for name in names]


def _design(comparison: Comparison) -> str:
    settings = comparison.record["settings"]
    seeds = comparison.rows[0]["seeds"].split()
    data = settings.get("data")
    test = data.get("shapes", {}).get("test_images") if isinstance(data, dict) else None
    scored = f"{test} held-out test images" if test else "the validation images"
    if settings.get("pretrain"):
        how = f"fine-tuned {settings['epochs']} epochs from one stock model pretrained on other images"
    elif settings.get("weights"):
        how = f"fine-tuned {settings['epochs']} epochs from `{settings['weights']}`"
    else:
        how = f"trained {settings['epochs']} epochs from scratch"
    return f"{len(seeds)} seeds, {how}, scored on {scored}"


def _verdict(low: float, high: float) -> str:
    if math.isnan(low):
        return "one seed cannot tell"
    if low > 0:
        return "a gain"
    if high < 0:
        return "a loss"
    return f"no difference this benchmark can resolve (CI half-width {(high - low) / 2:.4f})"


def _interval(delta: tuple[float, float, float, float, int]) -> str:
    mean, low, high, p_value, _ = delta
    if math.isnan(low):
        return f"{mean:+.4f} (one seed: no interval)"
    shown_p = "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"
    return f"{mean:+.4f} (95 % CI [{low:+.4f}, {high:+.4f}], {shown_p})"


def readme_sentences(comparisons: Sequence[Comparison], page: str = str(PAGE)) -> str:
    """One sentence per comparison: DySample's paired difference from stock with its CI, then the other variants."""
    lines = []
    for comparison in comparisons:
        variants = [row["variant"] for row in comparison.rows[1:]]
        lead = "dysample" if "dysample" in variants else variants[0]
        delta = comparison.delta(lead)
        others = "; ".join(
            f"{LABELS.get(variant, variant)} {_interval(comparison.delta(variant))}"
            for variant in variants
            if variant != lead
        )
        label = _metric_name(comparison.primary)
        lines.append(
            f"- `{comparison.name}` ({_design(comparison)}): {label} of {LABELS.get(lead, lead)} − stock (nearest) "
            f"= {_interval(delta)}, {_verdict(delta[1], delta[2])}" + (f"; {others}." if others else ".")
        )
    lines.append("")
    lines.append(f"Settings, per-variant tables and plots: [{Path(page).name}]({page}).")
    return "\n".join(lines)


def _metric_name(key: str) -> str:
    """``test/mAP50-95(B)`` -> ``test mAP50-95``."""
    return key.removeprefix("metrics/").replace("test/", "test ", 1).removesuffix("(B)")


def page_section(comparison: Comparison, repo: Path = REPO) -> str:
    """The comparison's section of the benchmark page: where and when it ran, its summary tables, its plots."""
    record = comparison.record
    versions = ", ".join(f"{key} {' / '.join(values)}" for key, values in record["versions"].items())
    hours = record["train_seconds"] / 3600
    lines = [
        f"Measured on {record['machine']}, device {', '.join(record['devices'])}; commit `{record['commit']}`; "
        f"{versions}; Python {record['python']}. {record['runs']} runs from {record['started']} to "
        f"{record['finished']} UTC, {hours:.2f} h of training in all (the runs' own wall time, start-up included).",
        "",
    ]
    body = comparison.summary_md.splitlines()
    if body and body[0].startswith("# "):
        body = body[1:]
    while body and not body[0].strip():
        body = body[1:]
    lines += body
    for suffix in PLOTS.values():
        plot = STORE / f"accuracy-{comparison.name}-{suffix}.png"
        if (repo / plot).is_file():
            lines += ["", f"![{comparison.name}: {suffix.replace('_', ' ')}](benchmarks/{plot.name})"]
    return "\n".join(lines).strip("\n") + "\n"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_docs(repo: Path = REPO, check: bool = False) -> list[str]:
    """Regenerate the README's sentences and the page's sections from the stored comparisons.

    Returns:
        (list[str]): The files that differed from the fresh generation (written unless ``check``).
    """
    comparisons = load_stored(repo)
    documents = {
        repo / "README.md": {README_SECTION: lambda: readme_sentences(comparisons)},
        repo / PAGE: {
            f"result-{comparison.name}": (lambda comparison=comparison: page_section(comparison, repo))
            for comparison in comparisons
        },
    }
    return [
        str(document)
        for document, sections in documents.items()
        if not readme_tables.write_sections(document, check=check, sections=sections)
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m yolo_dysample.tools.accuracy_page", description=__doc__)
    parser.add_argument("comparisons", nargs="*", type=Path, help="finished comparison folders to store first")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to write into (default: this one)")
    parser.add_argument("--commit", help="the commit the comparisons ran (default: this checkout's HEAD)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the docs differ; write nothing")
    args = parser.parse_args(argv)
    if args.check and args.comparisons:
        parser.error("--check compares the docs with what is stored; give no comparison folders")
    try:
        for directory in args.comparisons:
            stored = store_comparison(directory, args.repo, args.commit)
            print(f"stored {stored.name}: {len(stored.rows)} variants, {stored.record['runs']} runs")
        differing = write_docs(args.repo, check=args.check)
    except (OSError, ValueError) as error:  # an unfinished comparison, a doc without its markers
        print(f"accuracy_page: {error}", file=sys.stderr)
        return 2
    if args.check and differing:
        print(f"out of date: {', '.join(differing)}; run python -m yolo_dysample.tools.accuracy_page", file=sys.stderr)
        return 1
    for path in differing:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
