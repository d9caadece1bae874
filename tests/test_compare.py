"""``yolo-dysample compare``: end to end on a tiny setting, resuming, argument errors, and the summary maths.

The end-to-end tests run the real command in subprocesses (``python -m yolo_dysample.cli``, the module the
``yolo-dysample`` console script calls) on a generated 4 + 2 image dataset at imgsz 64 for one epoch. One
comparison (stock + DySample+, seeds 0 and 1) is trained once per session and then re-run to prove resuming.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yolo_dysample.cli import main
from yolo_dysample.compare import (
    DYSAMPLE_VARIANTS,
    RUN_DONE_FILE,
    CompareError,
    ComparisonResult,
    _PlannedRun,
    _write_summary,
    parse_seeds,
    parse_variants,
    variant_model_name,
)

REPOSITORY = Path(__file__).resolve().parent.parent
TINY_SETTINGS = ["--epochs", "1", "--imgsz", "64", "--batch", "2", "--latency-runs", "2"]
COMPARED_VARIANT = "dysample-plus"
SEEDS = (0, 1)
RUN_NAMES = [f"{variant}-seed{seed}" for seed in SEEDS for variant in ("stock", COMPARED_VARIANT)]


def run_compare_command(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    # This checkout first on the path, for the command and the training subprocesses it starts: the code under test
    # even where an older copy of the package is installed (under scripts/test.sh both are the same).
    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "yolo_dysample.cli", "compare", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env={**os.environ, "PYTHONPATH": python_path},
    )


@pytest.fixture(scope="session")
def compare_dataset_yaml(tmp_path_factory) -> Path:
    """A 4 train + 2 val image dysample-shapes dataset (96 px), and its YAML."""
    from yolo_dysample.datasets import generate_shapes_dataset, write_dataset_yaml

    root = tmp_path_factory.mktemp("compare-data")
    dataset = generate_shapes_dataset(root / "shapes", train_images=4, val_images=2, image_size=96)
    return write_dataset_yaml(root / "tiny-shapes.yaml", dataset)


@pytest.fixture(scope="session")
def comparison_arguments(compare_dataset_yaml, tmp_path_factory) -> list[str]:
    project = tmp_path_factory.mktemp("compare-runs")
    return [
        "--data",
        str(compare_dataset_yaml),
        "--variants",
        COMPARED_VARIANT,
        "--seeds",
        ",".join(map(str, SEEDS)),
        "--project",
        str(project),
        "--name",
        "tiny",
        *TINY_SETTINGS,
    ]


@pytest.fixture(scope="session")
def finished_comparison(comparison_arguments, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny comparison, trained once: its directory and the first invocation's result."""
    result = run_compare_command(*comparison_arguments, cwd=tmp_path_factory.mktemp("compare-cwd"))
    assert result.returncode == 0, result.stdout + result.stderr
    directory = Path(comparison_arguments[comparison_arguments.index("--project") + 1]) / "tiny"
    return directory, result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def results_without_time(results_csv: Path) -> list[dict[str, str]]:
    return [{key: value for key, value in row.items() if key != "time"} for row in read_csv(results_csv)]


def modification_times(directory: Path, runs: list[str] = RUN_NAMES) -> dict[str, int]:
    files = [RUN_DONE_FILE, "results.csv", "weights/best.pt", "weights/last.pt"]
    return {f"{run}/{name}": (directory / run / name).stat().st_mtime_ns for run in runs for name in files}


# --------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_compare_writes_table_csv_and_plots_with_a_row_per_variant(finished_comparison):
    directory, first = finished_comparison
    for run in RUN_NAMES:
        assert f"{run}: training" in first.stdout
        assert (directory / run / "weights" / "best.pt").is_file()
        assert len(read_csv(directory / run / "results.csv")) == 1  # one epoch, an ordinary ultralytics run
        assert json.loads((directory / run / RUN_DONE_FILE).read_text())["epochs_completed"] == 1

    summary = read_csv(directory / "summary.csv")
    assert [row["variant"] for row in summary] == ["stock", COMPARED_VARIANT]
    assert [row["model"] for row in summary] == ["yolov8n.yaml", "yolov8n-dysample-plus.yaml"]
    assert [int(row["runs"]) for row in summary] == [2, 2]
    stock, dysample = summary
    assert int(dysample["parameters"]) > int(stock["parameters"])  # the offset and scope convolutions
    assert float(stock["gflops"]) > 0 and float(dysample["gflops"]) > 0
    for row in summary:
        assert float(row["latency_ms mean"]) > 0
        assert float(row["train_seconds mean"]) > 0
        assert float(row["peak_rss_mib mean"]) > 100  # a process that imported torch

    runs = read_csv(directory / "runs.csv")
    assert [(row["variant"], int(row["seed"])) for row in runs] == [
        (variant, seed) for seed in SEEDS for variant in ("stock", COMPARED_VARIANT)
    ]

    table = (directory / "summary.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert "mAP50(B)" in table_rows[0] and "mAP50-95(B)" in table_rows[0]
    assert [row.split("|")[1].strip() for row in table_rows[1:]] == ["stock", COMPARED_VARIANT]
    assert all("±" in row for row in table_rows[1:])  # two seeds: mean ± std
    assert "thop rule" in table  # the GFLOPs footnote says how DySample is counted
    assert table in first.stdout  # the command prints the table at the end

    for plot in ("curves.png", "final_metrics.png"):
        data = (directory / plot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000


@pytest.mark.slow
def test_summary_is_the_mean_and_std_of_the_individual_runs(finished_comparison):
    directory, _ = finished_comparison
    runs = read_csv(directory / "runs.csv")
    for row in read_csv(directory / "summary.csv"):
        variant_runs = [run for run in runs if run["variant"] == row["variant"]]
        records = [
            json.loads((directory / f"{row['variant']}-seed{run['seed']}" / RUN_DONE_FILE).read_text())
            for run in variant_runs
        ]
        for key in ("metrics/mAP50-95(B)", "latency_ms", "peak_rss_mib"):
            values = [record["metrics"][key] if key.startswith("metrics/") else record[key] for record in records]
            assert float(row[f"{key} mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{key} std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)


@pytest.mark.slow
def test_rerunning_a_finished_comparison_trains_nothing(finished_comparison, comparison_arguments, tmp_path):
    directory, _ = finished_comparison
    before = modification_times(directory)
    again = run_compare_command(*comparison_arguments, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ": training " not in again.stdout  # no "[i/n] <run>: training <model>" line
    for index, run in enumerate(RUN_NAMES, start=1):
        assert f"[{index}/{len(RUN_NAMES)}] {run}: skipped, finished earlier" in again.stdout
    assert modification_times(directory) == before  # no checkpoint, results.csv or marker was rewritten
    assert (directory / "summary.md").read_text() in again.stdout


@pytest.mark.slow
def test_an_unfinished_run_is_trained_again_and_only_it(finished_comparison, comparison_arguments, tmp_path):
    directory, _ = finished_comparison
    unfinished = RUN_NAMES[-1]
    first_history = results_without_time(directory / unfinished / "results.csv")
    (directory / unfinished / RUN_DONE_FILE).unlink()  # as if interrupted before the run finished
    others = [run for run in RUN_NAMES if run != unfinished]
    before = modification_times(directory, others)
    again = run_compare_command(*comparison_arguments, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{unfinished}: training" in again.stdout
    assert again.stdout.count(": training ") == 1
    assert (directory / unfinished / RUN_DONE_FILE).is_file()
    assert modification_times(directory, others) == before
    # same settings and seed, deterministic=True: the retrained run repeats the first one exactly
    assert results_without_time(directory / unfinished / "results.csv") == first_history
    progress_log = (directory / "progress.log").read_text()
    assert progress_log.count(f"{unfinished}: training") == 2  # the first comparison and this one


@pytest.mark.slow
def test_other_settings_under_the_same_name_are_refused(finished_comparison, comparison_arguments, capsys):
    directory, _ = finished_comparison
    arguments = [*comparison_arguments]
    arguments[arguments.index("--epochs") + 1] = "2"
    assert main(["compare", *arguments]) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "epochs: 1 -> 2" in error
    assert sorted(path.name for path in directory.iterdir() if path.is_dir()) == sorted(RUN_NAMES)


@pytest.mark.slow
def test_weights_start_every_run_from_the_same_stock_checkpoint(finished_comparison, compare_dataset_yaml, tmp_path):
    directory, _ = finished_comparison
    checkpoint = directory / "stock-seed0" / "weights" / "best.pt"
    project = tmp_path / "runs"
    result = run_compare_command(
        "--data", str(compare_dataset_yaml), "--variants", "dysample", "--weights", str(checkpoint),
        "--project", str(project), "--name", "transfer", *TINY_SETTINGS, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    stock = json.loads((project / "transfer" / "stock-seed0" / RUN_DONE_FILE).read_text())
    dysample = json.loads((project / "transfer" / "dysample-seed0" / RUN_DONE_FILE).read_text())
    assert stock["settings"]["weights"] == str(checkpoint)
    # every tensor of the stock model starts as the checkpoint's; the variant gets all but its two DySample layers
    # (offset.weight, offset.bias and the init_pos buffer each), which the stock checkpoint does not have
    assert stock["weights_transferred"]["from_weights"] == stock["weights_transferred"]["total"]
    assert dysample["weights_transferred"]["total"] - dysample["weights_transferred"]["from_weights"] == 2 * 3
    assert dysample["weights_transferred"]["from_weights"] == stock["weights_transferred"]["total"]
    assert "starting weights: " + str(checkpoint) in (project / "transfer" / "summary.md").read_text()


@pytest.mark.slow
def test_a_failing_run_exits_1_quotes_its_log_and_keeps_the_finished_runs(compare_dataset_yaml, tmp_path):
    from ultralytics.utils.checks import check_yaml

    from yolo_dysample.ultralytics_adapter import bundled_yaml

    (tmp_path / "mynet.yaml").write_text(Path(check_yaml("yolov8.yaml")).read_text())
    dysample_yaml = bundled_yaml("yolov8-dysample.yaml").read_text()
    assert '"lp", 4' in dysample_yaml
    (tmp_path / "mynet-dysample.yaml").write_text(dysample_yaml.replace('"lp", 4', '"lp", 3'))  # 3 groups: invalid
    project = tmp_path / "runs"
    result = run_compare_command(
        "--data", str(compare_dataset_yaml), "--model", str(tmp_path / "mynet.yaml"), "--variants", "dysample",
        "--project", str(project), "--name", "broken", *TINY_SETTINGS, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "yolo-dysample compare: error: run dysample-seed0 failed (exit code 1)" in result.stderr
    assert "groups=3 must divide" in result.stderr  # the end of the run's own log, quoted
    assert (project / "broken" / "stock-seed0" / RUN_DONE_FILE).is_file()  # the run before it stays finished
    assert not (project / "broken" / "dysample-seed0" / RUN_DONE_FILE).exists()


# --------------------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--variants", "dysampel"], "unknown variant 'dysampel' (did you mean 'dysample'?)"),
        (["--variants", "dysample,dysample"], "lists a variant twice"),
        (["--seeds", "0,x"], "seeds: 'x' is not a whole number >= 0"),
        (["--seeds", "1,1"], "repeats a seed"),
        (["--seeds", "-1"], "seeds: '-1' is not a whole number >= 0"),
        (["--epochs", "0"], "epochs=0 must be a whole number >= 1"),
        (["--epochs", "two"], "epochs='two' must be a whole number >= 1"),
        (["--imgsz", "16"], "imgsz=16 must be a whole number >= 32"),
        (["--batch", "0"], "batch=0 must be"),
        (["--latency-runs", "0"], "latency_runs=0 must be a whole number >= 1"),
        (["--name", "a/b"], "must be a plain directory name"),
        (["mosaik=0"], "unknown ultralytics train argument 'mosaik' (did you mean 'mosaic'?)"),
        (["epochs=3"], "'epochs' cannot be passed through: use --epochs"),
        (["lr0"], "'lr0' is not a key=value train argument"),
        (["momentum=fast"], "momentum=fast"),
        (["--model", "yolov8n.pt"], "must be a model YAML"),
        (["--model", "no-such-model.yaml"], "model 'no-such-model.yaml' not found"),
        (["--weights", "missing.pt"], "weights file 'missing.pt' not found"),
        (["--device", "99"], "device='99': Invalid CUDA"),
    ],
)
def test_bad_arguments_exit_with_code_2_and_a_message(arguments, message, compare_dataset_yaml, tmp_path, capsys):
    project = tmp_path / "runs"
    # the tiny settings first (later options win): should validation ever miss, the run is tiny, not a default one
    code = main(["compare", "--data", str(compare_dataset_yaml), "--project", str(project), *TINY_SETTINGS, *arguments])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert captured.err.startswith("yolo-dysample compare: error: ")
    assert not project.exists()  # nothing is written before the arguments pass


def test_missing_data_file_is_reported(tmp_path, capsys):
    code = main(["compare", "--data", str(tmp_path / "missing.yaml"), "--project", str(tmp_path / "runs")])
    assert code == 2
    assert "missing.yaml' not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_model_without_dysample_variant_yaml_is_reported(compare_dataset_yaml, tmp_path, capsys):
    from ultralytics.utils.checks import check_yaml

    custom = tmp_path / "mynet.yaml"
    custom.write_text(Path(check_yaml("yolov8.yaml")).read_text())  # a custom stock model, no mynet-dysample.yaml
    arguments = ["--data", str(compare_dataset_yaml), "--model", str(custom), "--project", str(tmp_path / "runs")]
    code = main(["compare", *arguments])
    assert code == 2
    assert f"variant 'dysample': model YAML '{tmp_path / 'mynet-dysample.yaml'}' not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--preset", "huge"], "invalid choice: 'huge'"), (["--epoch", "3"], "unrecognized arguments: --epoch")],
)
def test_malformed_options_are_argparse_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_arguments_may_stand_between_options(compare_dataset_yaml, tmp_path, capsys):
    arguments = ["lr0=0.01", "--data", str(compare_dataset_yaml), "mosaik=0", "--project", str(tmp_path), "cos_lr=1"]
    assert main(["compare", *arguments]) == 2
    assert "unknown ultralytics train argument 'mosaik'" in capsys.readouterr().err  # reached the train arguments


def test_console_script_exits_2_with_a_message_not_a_traceback(tmp_path):
    result = run_compare_command("--epochs", "0", "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert "yolo-dysample compare: error: epochs=0 must be a whole number >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_declared_for_cli_main():
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # the table's own lines
    assert 'yolo-dysample = "yolo_dysample.cli:main"' in scripts.splitlines()
    assert callable(main)


# --------------------------------------------------------------------------------------------------- parsing
@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=6, unique=True))
def test_seeds_round_trip_through_the_command_line_form(seeds):
    assert parse_seeds(",".join(map(str, seeds))) == tuple(seeds)
    assert parse_seeds(seeds) == tuple(seeds)


def test_variants_all_and_stock_are_understood():
    assert parse_variants("all") == DYSAMPLE_VARIANTS
    assert parse_variants("stock, dysample-s") == ("dysample-s",)  # stock is always the baseline anyway
    with pytest.raises(CompareError, match="at least one DySample variant"):
        parse_variants("stock")


@pytest.mark.parametrize(
    ("model", "variant", "expected"),
    [
        ("yolov8n.yaml", "dysample", "yolov8n-dysample.yaml"),
        ("yolo11s-seg.yaml", "dysample-plus", "yolo11s-seg-dysample-plus.yaml"),
        ("yolo26m-pose.yaml", "dysample-s-plus", "yolo26m-pose-dysample-s-plus.yaml"),
        ("configs/mynet.yaml", "dysample-s", "configs/mynet-dysample-s.yaml"),
        ("yolov8n.yaml", "stock", "yolov8n.yaml"),
    ],
)
def test_variant_model_names_are_derived_from_the_stock_name(model, variant, expected):
    assert variant_model_name(model, variant) == expected


@pytest.mark.parametrize("model", ["yolov8n.yaml", "yolo11s-seg.yaml", "yolo26n.yaml", "yolov8s-obb.yaml"])
def test_every_variant_of_bundled_families_resolves_to_a_dysample_yaml(model):
    from ultralytics.nn.tasks import yaml_model_load

    import yolo_dysample  # noqa: F401  registers the bundled YAMLs

    stock = yaml_model_load(model)
    for variant in DYSAMPLE_VARIANTS:
        derived = yaml_model_load(variant_model_name(model, variant))
        assert derived["scale"] == stock["scale"]
        assert any(row[2] == "DySample" for row in derived["head"])
        assert not any(row[2] == "DySample" for row in stock["head"])


# --------------------------------------------------------------------------------------------------- summary maths
def test_summary_table_shows_mean_std_and_delta_from_stock(tmp_path):
    mAP = "metrics/mAP50-95(B)"
    values = {("stock", 0): 0.40, ("stock", 1): 0.50, ("stock", 2): 0.60, ("dysample", 0): 0.55, ("dysample", 1): 0.55}
    planned, records = [], {}
    for (variant, seed), value in values.items():
        planned.append(_PlannedRun(variant, seed, f"{variant}.yaml", tmp_path / f"{variant}-seed{seed}", {}))
        records[(variant, seed)] = {
            "metrics": {"metrics/mAP50(B)": value + 0.1, mAP: value},
            "parameters": 1000 if variant == "stock" else 1100,
            "gflops": 1.5,
            "latency_ms": 10.0 + seed,
            "train_seconds": 100.0,
            "peak_rss_mib": 900.0,
            "peak_cuda_mib": None,
            "epochs_completed": 3,
            "latency_device": "cpu",
            "ultralytics": "x",
            "yolo_dysample": "y",
            "torch": "z",
        }
    settings = {"data": "d.yaml", "task": "detect", "epochs": 3, "imgsz": 64, "batch": 2, "weights": None}
    result = ComparisonResult(directory=tmp_path)
    _write_summary(result, planned, records, ("stock", "dysample"), {**settings, "train_args": {}}, latency_runs=7)

    table_rows = [line for line in result.files["summary_md"].read_text().splitlines() if line.startswith("| ")]
    stock_cells = [cell.strip() for cell in table_rows[1].split("|")]
    dysample_cells = [cell.strip() for cell in table_rows[2].split("|")]
    assert stock_cells[4:7] == ["0.600 ± 0.100", "0.500 ± 0.100", "—"]
    assert dysample_cells[4:7] == ["0.650 ± 0.000", "0.550 ± 0.000", "+0.050"]
    assert dysample_cells[7] == "1,100"
    assert stock_cells[11] == "n/a"  # no CPU time recorded: said so, not made up
    summary = read_csv(result.files["summary_csv"])
    assert float(summary[1][f"{mAP} delta vs stock"]) == pytest.approx(0.05)
    assert float(summary[0]["latency_ms mean"]) == pytest.approx(11.0)
    assert summary[0]["peak_cuda_mib mean"] == ""  # no GPU: empty, not a made-up zero
    assert math.isclose(float(summary[0][f"{mAP} std"]), 0.1)
