"""``yolo-dysample compare``: end to end on a tiny setting, resuming, faults, argument errors, and the summary maths.

The end-to-end tests run the real command in subprocesses (``python -m yolo_dysample.cli``, the module the
``yolo-dysample`` console script calls) on a generated 4 + 2 + 3 image dataset (train, val, test) at imgsz 64 for one
epoch. One comparison (stock, the bilinear control, DySample and DySample+, seeds 0 and 1) is trained once per session
as a user runs it: from a temporary directory, with ultralytics' default settings (a fresh config directory, so a
relative ``runs_dir``) and no ``--project``; then it is re-run to prove resuming.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yolo_dysample.cli import main
from yolo_dysample.compare import (
    DYSAMPLE_VARIANTS,
    RUN_DONE_FILE,
    CompareError,
    RunFailedError,
    parse_seeds,
    parse_variants,
    variant_model_name,
)

REPOSITORY = Path(__file__).resolve().parent.parent
TINY_SETTINGS = ["--epochs", "1", "--imgsz", "64", "--batch", "2", "--latency-runs", "2"]
COMPARED_VARIANTS = ("bilinear", "dysample", "dysample-plus")
SEEDS = (0, 1)
RUN_NAMES = [f"{variant}-seed{seed}" for seed in SEEDS for variant in ("stock", *COMPARED_VARIANTS)]
COMPARISON_NAME = "tiny"


def run_compare_command(*arguments: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    # This checkout first on the path, for the command and the training subprocesses it starts: the code under test
    # even where an older copy of the package is installed (under scripts/test.sh both are the same).
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "yolo_dysample.cli", "compare", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env=environment,
    )


def fresh_ultralytics_environment(home: Path) -> dict[str, str]:
    """The test environment with a new, empty ultralytics config directory: ultralytics writes its defaults there.

    Only the fonts are put in place (ultralytics would try to download them); the settings are ultralytics' own.
    """
    config = home / "ultralytics-config"
    fonts = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    (config / "Ultralytics").mkdir(parents=True)
    for font in fonts.glob("*.ttf"):
        shutil.copyfile(font, config / "Ultralytics" / font.name)
    return {**os.environ, "YOLO_CONFIG_DIR": str(config)}


@pytest.fixture(scope="session")
def compare_dataset_yaml(tmp_path_factory) -> Path:
    """A 4 train + 2 val + 3 test image dysample-shapes dataset (96 px), and its YAML."""
    from yolo_dysample.datasets import generate_shapes_dataset, write_dataset_yaml

    root = tmp_path_factory.mktemp("compare-data")
    dataset = generate_shapes_dataset(root / "shapes", train_images=4, val_images=2, test_images=3, image_size=96)
    return write_dataset_yaml(root / "tiny-shapes.yaml", dataset)


@pytest.fixture(scope="session")
def user_workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A user's working directory and environment: ultralytics' default settings, a relative runs_dir."""
    home = tmp_path_factory.mktemp("compare-user")
    environment = fresh_ultralytics_environment(home)
    workdir = home / "work"
    workdir.mkdir()
    return workdir, environment


@pytest.fixture(scope="session")
def comparison_arguments(compare_dataset_yaml) -> list[str]:
    return [
        "--data", str(compare_dataset_yaml), "--variants", ",".join(COMPARED_VARIANTS),
        "--seeds", ",".join(map(str, SEEDS)), "--name", COMPARISON_NAME, *TINY_SETTINGS,
        "--imgsz", "60",  # not a multiple of the stride: every run trains (and is timed) at 64
    ]  # fmt: skip


@pytest.fixture(scope="session")
def finished_comparison(comparison_arguments, user_workspace) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny comparison, trained once: its directory and the first invocation's result."""
    workdir, environment = user_workspace
    result = run_compare_command(*comparison_arguments, cwd=workdir, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "runs" / "compare" / COMPARISON_NAME, result


def rerun(comparison_arguments, user_workspace) -> subprocess.CompletedProcess:
    workdir, environment = user_workspace
    return run_compare_command(*comparison_arguments, cwd=workdir, env=environment)


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
def test_runs_land_in_the_comparison_folder_with_default_ultralytics_settings(finished_comparison, user_workspace):
    directory, first = finished_comparison
    workdir, _ = user_workspace
    assert not (workdir / "runs" / "detect").exists()  # nothing went to <runs_dir>/<task>/runs/compare/...
    for run in RUN_NAMES:
        assert f"{run}: training" in first.stdout
        assert f"{run}: epoch 1/1 " in first.stdout  # the per-epoch line, read from the run's own results.csv
        assert (directory / run / "weights" / "best.pt").is_file()
        assert len(read_csv(directory / run / "results.csv")) == 1  # one epoch, an ordinary ultralytics run
        record = json.loads((directory / run / RUN_DONE_FILE).read_text())
        assert record["epochs_completed"] == 1
        assert record["test_metrics"]  # evaluated once on the held-out test split
    assert len((directory / "curves.png").read_bytes()) > 5_000


@pytest.mark.slow
def test_compare_writes_table_csv_and_plots_with_a_row_per_variant(finished_comparison):
    directory, first = finished_comparison
    summary = read_csv(directory / "summary.csv")
    assert [row["variant"] for row in summary] == ["stock", *COMPARED_VARIANTS]
    assert [row["model"] for row in summary] == ["yolov8n.yaml", *(f"yolov8n-{v}.yaml" for v in COMPARED_VARIANTS)]
    assert [int(row["runs"]) for row in summary] == [2, 2, 2, 2]
    stock, bilinear, dysample, _ = summary
    assert int(bilinear["parameters"]) == int(stock["parameters"])  # nn.Upsample has no parameters
    assert int(dysample["parameters"]) > int(stock["parameters"])  # the offset convolutions
    for row in summary:
        assert float(row["gflops"]) > 0
        assert float(row["latency_ms median"]) > 0
        assert float(row["latency_ms q1"]) <= float(row["latency_ms median"]) <= float(row["latency_ms q3"])
        assert float(row["train_seconds mean"]) > 0
        assert float(row["peak_rss_mib mean"]) > 100  # a process that imported torch
    assert float(stock["latency ratio to stock"]) == 1.0
    primary = "test/mAP50-95(B)"
    for row in summary[1:]:
        assert int(row[f"{primary} delta pairs"]) == 2
        assert row[f"{primary} delta ci95 low"] != "" and row[f"{primary} delta p"] != ""

    runs = read_csv(directory / "runs.csv")
    assert [(row["variant"], int(row["seed"])) for row in runs] == [
        (variant, seed) for seed in SEEDS for variant in ("stock", *COMPARED_VARIANTS)
    ]
    table = (directory / "summary.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert "mAP50(B)" in table_rows[0] and "test mAP50-95(B)" in table_rows[0]
    assert [row.split("|")[1].strip() for row in table_rows[1:5]] == ["stock", *COMPARED_VARIANTS]
    assert all("±" in row for row in table_rows[1:5])  # two seeds: mean ± std
    assert "primary metric test mAP50-95(B) (fixed in advance)" in table
    assert "| 95 % CI |" in table
    assert "thop rule" in table  # the GFLOPs footnote says how DySample is counted
    assert "imgsz 64" in table
    assert table in first.stdout  # the command prints the table at the end
    for plot in ("curves.png", "final_metrics.png", "paired_ci.png"):
        data = (directory / plot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000


@pytest.mark.slow
def test_an_image_size_off_the_stride_is_rounded_before_training_and_timed_as_trained(finished_comparison):
    directory, first = finished_comparison
    assert "imgsz 60 is not a multiple of the model's stride 32: every run uses 64" in first.stdout
    assert json.loads((directory / "compare_settings.json").read_text())["imgsz"] == 64
    for run in RUN_NAMES:
        assert json.loads((directory / run / RUN_DONE_FILE).read_text())["imgsz"] == 64
    assert json.loads((directory / "latency.json").read_text())["key"]["imgsz"] == 64


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
        for key in ("metrics/mAP50-95(B)", "test/mAP50(B)", "peak_rss_mib"):
            values = [
                {**record["metrics"], **record["test_metrics"]}[key] if "/" in key else record[key]
                for record in records
            ]
            assert float(row[f"{key} mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{key} std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)


@pytest.mark.slow
def test_rerunning_a_finished_comparison_trains_nothing(finished_comparison, comparison_arguments, user_workspace):
    directory, _ = finished_comparison
    before = modification_times(directory)
    latency_before = (directory / "latency.json").read_text()
    again = rerun(comparison_arguments, user_workspace)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ": training " not in again.stdout  # no "[i/n] <run>: training <model>" line
    for index, run in enumerate(RUN_NAMES, start=1):
        assert f"[{index}/{len(RUN_NAMES)}] {run}: skipped, finished earlier" in again.stdout
    assert modification_times(directory) == before  # no checkpoint, results.csv or marker was rewritten
    assert (directory / "latency.json").read_text() == latency_before  # same checkpoints: measured once
    assert (directory / "summary.md").read_text() in again.stdout


@pytest.mark.slow
def test_an_unfinished_run_restarts_in_an_emptied_folder_and_only_it(
    finished_comparison, comparison_arguments, user_workspace
):
    directory, _ = finished_comparison
    unfinished = RUN_NAMES[-1]
    run_directory = directory / unfinished
    first_history = results_without_time(run_directory / "results.csv")
    # as if interrupted while writing the marker, with a second training's rows and files left in the folder
    (run_directory / RUN_DONE_FILE).write_text("")
    rows = (run_directory / "results.csv").read_text().splitlines(keepends=True)
    with open(run_directory / "results.csv", "a", encoding="utf-8") as handle:
        handle.writelines(rows[1:])  # an orphaned training's epoch 1 again
    (run_directory / "left-by-another-training.txt").write_text("stale")
    others = [run for run in RUN_NAMES if run != unfinished]
    before = modification_times(directory, others)
    again = rerun(comparison_arguments, user_workspace)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert f"{unfinished}: training" in again.stdout
    assert again.stdout.count(": training ") == 1
    assert json.loads((run_directory / RUN_DONE_FILE).read_text())["epochs_completed"] == 1
    assert not (run_directory / "left-by-another-training.txt").exists()
    assert modification_times(directory, others) == before
    # same settings and seed, deterministic=True: the retrained run repeats the first one exactly
    assert results_without_time(run_directory / "results.csv") == first_history
    progress_log = (directory / "progress.log").read_text()
    assert progress_log.count(f"{unfinished}: training") == 2  # the first comparison and this one


@pytest.mark.slow
def test_a_second_compare_with_the_same_name_is_refused_while_one_runs(
    finished_comparison, comparison_arguments, capsys
):
    from yolo_dysample.compare.runner import comparison_lock

    directory, _ = finished_comparison
    before = modification_times(directory)
    with comparison_lock(directory):  # another compare process holds this comparison
        code = main(["compare", *comparison_arguments, "--project", str(directory.parent)])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{directory} is in use by another compare process (pid {os.getpid()})" in error
    assert modification_times(directory) == before


@pytest.mark.slow
def test_other_settings_under_the_same_name_are_refused(finished_comparison, comparison_arguments, capsys):
    directory, _ = finished_comparison
    arguments = [*comparison_arguments, "--project", str(directory.parent)]
    arguments[arguments.index("--epochs") + 1] = "2"
    assert main(["compare", *arguments]) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "epochs: 1 -> 2" in error
    run_folders = sorted(path.name for path in directory.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert run_folders == sorted([*RUN_NAMES, "models"])


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

    stock_text = Path(check_yaml("yolov8.yaml")).read_text()
    upsample = 'nn.Upsample, [None, 2, "nearest"]'
    assert upsample in stock_text
    (tmp_path / "mynet.yaml").write_text(stock_text)
    (tmp_path / "mynet-dysample.yaml").write_text(stock_text.replace(upsample, 'DySample, [2, "lp", 3, False]'))
    project = tmp_path / "runs"
    result = run_compare_command(
        "--data", str(compare_dataset_yaml), "--model", str(tmp_path / "mynet.yaml"), "--variants", "dysample",
        "--project", str(project), "--name", "broken", *TINY_SETTINGS, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "yolo-dysample compare: error: run dysample-seed0 failed (exit code 1)" in result.stderr
    assert "groups=3" in result.stderr  # the end of the run's own log, quoted
    assert (project / "broken" / "stock-seed0" / RUN_DONE_FILE).is_file()  # the run before it stays finished
    assert not (project / "broken" / "dysample-seed0" / RUN_DONE_FILE).exists()


@pytest.mark.slow
def test_a_fine_tuning_preset_pretrains_stock_once_and_starts_every_run_from_it(tmp_path, monkeypatch):
    from yolo_dysample.compare import compare, settings

    tiny = {"seed": 0, "train_images": 4, "val_images": 2, "test_images": 2, "image_size": 96}
    preset = {
        **settings.PRESETS["finetune"],
        "data": tiny,
        "variants": ("bilinear",),
        "seeds": (0,),
        "epochs": 1,
        "imgsz": 64,
        "batch": 2,
        "pretrain": {**settings.PRESETS["finetune"]["pretrain"], "data": {**tiny, "seed": 1}, "epochs": 1},
    }
    monkeypatch.setitem(settings.PRESETS, "tiny-finetune", preset)
    lines: list[str] = []
    result = compare(preset="tiny-finetune", project=tmp_path, latency_runs=2, progress=lines.append)
    pretrain = json.loads((result.directory / "pretrain" / RUN_DONE_FILE).read_text())
    assert pretrain["settings"]["pretrain"]["data"] == {"shapes": {**tiny, "seed": 1}}
    for run in ("stock-seed0", "bilinear-seed0"):
        record = json.loads((result.directory / run / RUN_DONE_FILE).read_text())
        assert record["weights_transferred"]["from_weights"] == record["weights_transferred"]["total"]
        arguments = (result.directory / run / "args.yaml").read_text()
        assert "optimizer: AdamW" in arguments and "lr0: 0.0002" in arguments and "warmup_epochs: 0.0" in arguments
    assert sum("pretrain: training" in line for line in lines) == 1
    assert "the stock model pretrained 1 epochs" in result.files["summary_md"].read_text()


# --------------------------------------------------------------------------------------------------- faults
def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_the_training_dies_with_a_killed_compare(compare_dataset_yaml, tmp_path):
    import psutil

    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "yolo_dysample.cli", "compare", "--data", str(compare_dataset_yaml), "--variants",
        "dysample", "--project", str(tmp_path / "runs"), "--name", "killed", "--epochs", "500", "--imgsz", "64",
        "--batch", "2",
    ]  # fmt: skip
    parent = subprocess.Popen(
        command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": python_path}, stdout=subprocess.DEVNULL
    )
    children: list = []
    try:
        assert _wait_for(lambda: bool(children.extend(psutil.Process(parent.pid).children()) or children), 120)
        assert _wait_for(lambda: (tmp_path / "runs" / "killed" / "stock-seed0" / "train.log").is_file(), 60)
        parent.send_signal(signal.SIGKILL)  # no Python cleanup runs
        parent.wait()
        assert _wait_for(lambda: not any(child.is_running() and child.status() != "zombie" for child in children), 10)
    finally:
        for child in children:
            if child.is_running():
                child.kill()
        if parent.poll() is None:
            parent.kill()


def test_a_child_exits_when_its_parent_is_gone_without_the_kernel_signal(tmp_path):
    import psutil

    # the portable fallback alone: a grandchild started with plain Popen (no PDEATHSIG) watches its parent
    ready = tmp_path / "watching"
    grandchild = (
        "import sys, time; from pathlib import Path; from yolo_dysample.compare.training import _exit_when_orphaned; "
        "_exit_when_orphaned(int(sys.argv[1]), 0.2); Path(sys.argv[2]).touch(); time.sleep(120)"
    )
    middle = (
        f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}, str(os.getpid()), "
        f"{str(ready)!r}]); time.sleep(120)"
    )
    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-c", middle], env={**os.environ, "PYTHONPATH": python_path})
    watched: list = []
    try:
        assert _wait_for(ready.is_file, 120)
        watched = psutil.Process(process.pid).children()
        assert len(watched) == 1
        process.kill()
        process.wait()
        assert _wait_for(lambda: not any(child.is_running() and child.status() != "zombie" for child in watched), 5)
    finally:
        for child in watched:
            if child.is_running():
                child.kill()
        if process.poll() is None:
            process.kill()


def test_a_run_folder_still_written_by_another_process_is_not_restarted(tmp_path):
    from yolo_dysample.compare.runner import PlannedRun, _take_run_lock, train_in_subprocess

    run = PlannedRun("stock", 0, "yolov8n.yaml", tmp_path / "stock-seed0", {})
    run.directory.mkdir()
    (run.directory / "results.csv").write_text("epoch\n1\n")
    held = _take_run_lock(run, 0)  # an orphaned training of this run still holds the folder
    try:
        with pytest.raises(RunFailedError, match="another process is still training into"):
            train_in_subprocess(run, {}, on_epoch=print, orphan_wait_seconds=0.5)
    finally:
        held.close()
    assert (run.directory / "results.csv").read_text() == "epoch\n1\n"  # untouched


@pytest.mark.parametrize(
    "epochs",
    [[1, 2, 1, 2], [1, 1], [2, 3], [1, 2, 3, 4]],  # two trainings interleaved, repeated, not from 1, too many
)
def test_results_of_more_than_one_training_are_rejected(epochs, tmp_path):
    from yolo_dysample.compare.training import check_epochs

    with pytest.raises(RuntimeError, match="not 1..N once each"):
        check_epochs([{"epoch": float(epoch)} for epoch in epochs], 3, tmp_path / "results.csv")
    check_epochs([{"epoch": 1.0}, {"epoch": 2.0}], 3, tmp_path / "results.csv")  # stopped early: fine


@pytest.mark.parametrize("content", ["", "{", "[]", "null"])
def test_an_unreadable_settings_file_is_one_clear_error(content, compare_dataset_yaml, tmp_path, capsys):
    (tmp_path / "runs" / "named").mkdir(parents=True)
    (tmp_path / "runs" / "named" / "compare_settings.json").write_text(content)
    arguments = ["--data", str(compare_dataset_yaml), "--project", str(tmp_path / "runs"), "--name", "named"]
    assert main(["compare", *arguments, *TINY_SETTINGS]) == 2
    error = capsys.readouterr().err
    assert "compare_settings.json is empty or not valid JSON" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


@pytest.mark.parametrize("content", ["", "{", '{"settings": {}}', "[1]"])
def test_an_unreadable_run_marker_counts_as_unfinished(content, tmp_path):
    from yolo_dysample.compare.runner import PlannedRun, finished_record

    run = PlannedRun("stock", 0, "yolov8n.yaml", tmp_path / "stock-seed0", {"seed": 0})
    run.directory.mkdir()
    (run.directory / RUN_DONE_FILE).write_text(content)
    assert finished_record(run) is None


# --------------------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--variants", "dysampel"], "unknown variant 'dysampel' (did you mean 'dysample'?)"),
        (["--variants", "bilinaer"], "unknown variant 'bilinaer' (did you mean 'bilinear'?)"),
        (["--variants", "dysample,dysample"], "lists a variant twice"),
        (["--seeds", "0,x"], "seeds: 'x' is not a whole number in [0, 4294967295]"),
        (["--seeds", "1,1"], "repeats a seed"),
        (["--seeds", "-1"], "seeds: '-1' is not a whole number in [0, 4294967295]"),
        (["--seeds", "4294967296"], "seeds: 4294967296 is not a whole number in [0, 4294967295]"),
        (["--epochs", "0"], "epochs=0 must be a whole number >= 1"),
        (["--epochs", "two"], "epochs='two' must be a whole number >= 1"),
        (["--imgsz", "16"], "imgsz=16 must be a whole number >= 32"),
        (["--batch", "0"], "batch=0 must be"),
        (["--latency-runs", "0"], "latency_runs=0 must be a whole number >= 1"),
        (["--name", "a/b"], "must be a plain directory name"),
        (["mosaik=0"], "unknown ultralytics train argument 'mosaik' (did you mean 'mosaic'?)"),
        (["epochs=3"], "'epochs' cannot be passed through: use --epochs"),
        (["split=test"], "'split' cannot be passed through"),
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


def test_an_image_size_off_the_stride_is_rounded_as_ultralytics_rounds_it(compare_dataset_yaml):
    from yolo_dysample.compare.settings import resolve_settings

    settings = resolve_settings(data=str(compare_dataset_yaml), imgsz=100, variants="dysample")
    assert settings.imgsz == 128 and settings.shared["imgsz"] == 128
    assert settings.notes == ["imgsz 100 is not a multiple of the model's stride 32: every run uses 128"]
    assert resolve_settings(data=str(compare_dataset_yaml), imgsz=96, variants="dysample").notes == []


# --------------------------------------------------------------------------------------------------- parsing
@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=6, unique=True))
def test_seeds_round_trip_through_the_command_line_form(seeds):
    assert parse_seeds(",".join(map(str, seeds))) == tuple(seeds)
    assert parse_seeds(seeds) == tuple(seeds)


def test_variants_all_controls_and_stock_are_understood():
    assert parse_variants("all") == DYSAMPLE_VARIANTS
    assert parse_variants("stock, dysample-s") == ("dysample-s",)  # stock is always the baseline anyway
    assert parse_variants("bilinear,dysample,dysample-plus") == ("bilinear", "dysample", "dysample-plus")
    with pytest.raises(CompareError, match="at least one variant besides stock"):
        parse_variants("stock")


@pytest.mark.parametrize(
    ("model", "variant", "expected"),
    [
        ("yolov8n.yaml", "dysample", "yolov8n-dysample.yaml"),
        ("yolo11s-seg.yaml", "dysample-plus", "yolo11s-seg-dysample-plus.yaml"),
        ("yolo26m-pose.yaml", "dysample-s-plus", "yolo26m-pose-dysample-s-plus.yaml"),
        ("configs/mynet.yaml", "dysample-s", "configs/mynet-dysample-s.yaml"),
        ("yolov8n.yaml", "bilinear", "yolov8n-bilinear.yaml"),
        ("yolov8n.yaml", "stock", "yolov8n.yaml"),
    ],
)
def test_variant_model_names_are_derived_from_the_stock_name(model, variant, expected):
    assert variant_model_name(model, variant) == expected


@pytest.mark.parametrize("model", ["yolov8n.yaml", "yolo11s-seg.yaml", "yolo26n.yaml", "yolov8s-obb.yaml"])
def test_every_variant_of_bundled_families_resolves_to_a_dysample_yaml(model):
    from ultralytics.nn.tasks import yaml_model_load

    import yolo_dysample

    yolo_dysample.register_with_ultralytics()  # bare-name lookup of the bundled YAMLs
    stock = yaml_model_load(model)
    for variant in DYSAMPLE_VARIANTS:
        derived = yaml_model_load(variant_model_name(model, variant))
        assert derived["scale"] == stock["scale"]
        assert any(row[2] == "DySample" for row in derived["head"])
        assert not any(row[2] == "DySample" for row in stock["head"])


@pytest.mark.parametrize("model", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov8n-seg.yaml"])
def test_the_bilinear_control_is_the_stock_model_with_bilinear_upsampling_and_its_weights(model, tmp_path):
    import torch
    import yaml
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel, yaml_model_load

    from yolo_dysample.compare.settings import bilinear_model_dict

    stock = yaml_model_load(model)
    derived = bilinear_model_dict(stock, model)
    changed = [
        (before, after)
        for section in ("backbone", "head")
        for before, after in zip(stock[section], derived[section], strict=True)
        if before != after
    ]
    assert len(changed) == 2
    for before, after in changed:  # YAML reads the None of [None, 2, "nearest"] as the string "None"
        assert before[3] == ["None", 2, "nearest"] and after[3] == ["None", 2, "bilinear", False]
        assert before[:3] == after[:3]
    path = tmp_path / variant_model_name(model, "bilinear")
    path.write_text(yaml.safe_dump(derived, sort_keys=False))
    model_class = SegmentationModel if "seg" in model else DetectionModel
    torch.manual_seed(0)
    stock_model = model_class(model, verbose=False)
    torch.manual_seed(0)
    bilinear_model = model_class(str(path), verbose=False)
    upsamplers = [module for module in bilinear_model.modules() if isinstance(module, torch.nn.Upsample)]
    assert [(module.mode, module.align_corners) for module in upsamplers] == [("bilinear", False)] * 2
    stock_state, bilinear_state = stock_model.state_dict(), bilinear_model.state_dict()
    assert stock_state.keys() == bilinear_state.keys()
    assert all(torch.equal(stock_state[key], bilinear_state[key]) for key in stock_state)  # paired initialisation


def test_a_model_without_nearest_upsampling_has_no_bilinear_control():
    from yolo_dysample.compare.settings import bilinear_model_dict

    with pytest.raises(CompareError, match="no nearest nn.Upsample layer"):
        bilinear_model_dict({"backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": []}, "mynet.yaml")


# --------------------------------------------------------------------------------------------------- latency
def test_latency_is_measured_interleaved_with_median_spread_and_ratio():
    import torch

    from yolo_dysample.compare.latency import interleaved_latency

    calls: list[str] = []

    def network(name: str, seconds: float):
        def forward(image):
            calls.append(name)
            time.sleep(seconds)

        return forward

    networks = {"stock": network("stock", 0.002), "dysample": network("dysample", 0.004)}
    measured = interleaved_latency(networks, torch.zeros(1), rounds=8, warmup=1)
    timed = calls[4:]  # first one warm-up and one calibration call per network (tools.timing)
    assert all(sorted(timed[index : index + 2]) == ["dysample", "stock"] for index in range(0, 16, 2))  # each round
    assert timed[0:2] != timed[2:4]  # the order rotates from round to round
    assert measured["stock"]["ratio_to_stock"] == 1.0
    assert 1.3 < measured["dysample"]["ratio_to_stock"] < 3.0
    for statistics_ in measured.values():
        assert statistics_["q1_ms"] <= statistics_["median_ms"] <= statistics_["q3_ms"] and statistics_["rounds"] == 8


# --------------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("df", "quantile"),
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (9, 2.2622), (30, 2.0423), (120, 1.9799)],
)
def test_t_quantiles_match_the_table(df, quantile):
    from yolo_dysample.compare.stats import student_t_cdf, student_t_quantile

    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=6e-5)
    assert student_t_cdf(quantile, df) == pytest.approx(0.975, abs=2e-6)
    assert student_t_quantile(0.025, df) == pytest.approx(-quantile, abs=6e-5)


@given(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False))
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    from yolo_dysample.compare.stats import student_t_cdf

    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_difference_has_the_textbook_interval_and_p_value():
    from yolo_dysample.compare.stats import paired_difference

    stock = {0: 0.20, 1: 0.30, 2: 0.40, 3: 0.50}
    variant = {0: 0.21, 1: 0.32, 2: 0.43, 9: 0.99}  # seed 9 has no stock run: not paired
    paired = paired_difference(variant, stock)
    assert paired.pairs == 3
    assert paired.mean == pytest.approx(0.02)
    assert paired.std == pytest.approx(0.01)
    half_width = 4.302653 * 0.01 / math.sqrt(3)
    assert (paired.ci_low, paired.ci_high) == pytest.approx((0.02 - half_width, 0.02 + half_width), abs=1e-7)
    t = 0.02 / (0.01 / math.sqrt(3))  # p from the closed form of the 2-df cdf
    assert paired.p_value == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-12)
    assert math.isnan(paired_difference({0: 1.0}, {0: 0.5}).ci_low)


# --------------------------------------------------------------------------------------------------- summary maths
def test_summary_table_shows_mean_std_and_the_paired_difference_from_stock(tmp_path):
    from yolo_dysample.compare.report import summarise, write_csv, write_markdown
    from yolo_dysample.compare.runner import PlannedRun

    mAP = "metrics/mAP50-95(B)"
    values = {("stock", 0): 0.40, ("stock", 1): 0.50, ("stock", 2): 0.60}
    values.update({("dysample", 0): 0.45, ("dysample", 1): 0.55, ("dysample", 2): 0.68})
    planned, records = [], {}
    for (variant, seed), value in values.items():
        planned.append(PlannedRun(variant, seed, f"{variant}.yaml", tmp_path / f"{variant}-seed{seed}", {}))
        records[(variant, seed)] = {
            "metrics": {"metrics/mAP50(B)": value + 0.1, mAP: value},
            "test_metrics": {},
            "parameters": 1000 if variant == "stock" else 1100,
            "gflops": 1.5,
            "train_seconds": 100.0,
            "peak_rss_mib": 900.0,
            "peak_cuda_mib": None,
            "epochs_completed": 3,
            "device": "cpu",
            "ultralytics": "x",
            "yolo_dysample": "y",
            "torch": "z",
        }
    latency = {"stock": {"median_ms": 10.0, "q1_ms": 9.5, "q3_ms": 11.0, "ratio_to_stock": 1.0, "rounds": 7}}
    runs, summary, headline_keys, primary = summarise(planned, records, ("stock", "dysample"), latency)
    assert primary == mAP  # no test split: the validation mAP50-95
    shared = {"data": "d.yaml", "task": "detect", "epochs": 3, "imgsz": 64, "batch": 2, "weights": None}
    table = write_markdown(
        tmp_path / "summary.md", "t", {**shared, "train_args": {}}, summary, records, headline_keys, primary,
        {"device": "cpu", "threads": 2, "variants": latency},
    ).read_text()  # fmt: skip
    table_rows = [line for line in table.splitlines() if line.startswith("| ")]
    stock_cells = [cell.strip() for cell in table_rows[1].split("|")]
    dysample_cells = [cell.strip() for cell in table_rows[2].split("|")]
    assert stock_cells[4:6] == ["0.600 ± 0.100", "0.500 ± 0.100"]
    assert dysample_cells[4:6] == ["0.660 ± 0.115", "0.560 ± 0.115"]
    assert dysample_cells[6] == "1,100"
    assert stock_cells[8:10] == ["10.0 (9.5-11.0)", "1.00x"]
    assert dysample_cells[8:10] == ["n/a", "n/a"]  # no latency measured: said so, not made up
    assert stock_cells[11] == "n/a"  # no CPU time recorded
    paired_row = [cell.strip() for cell in table_rows[-1].split("|")]
    half_width = 4.302653 * statistics.stdev([0.05, 0.05, 0.08]) / math.sqrt(3)
    assert paired_row[1:4] == ["dysample", "3", "+0.0600"]
    assert paired_row[5] == f"{half_width:.4f}"
    write_csv(tmp_path / "summary.csv", summary)
    rows = read_csv(tmp_path / "summary.csv")
    assert float(rows[1][f"{mAP} delta vs stock"]) == pytest.approx(0.06)
    assert float(rows[1][f"{mAP} delta ci95 high"]) == pytest.approx(0.06 + half_width, abs=1e-6)
    assert rows[0]["peak_cuda_mib mean"] == ""  # no GPU: empty, not a made-up zero
    assert math.isclose(float(rows[0][f"{mAP} std"]), 0.1)
    assert [row["variant"] for row in runs] == ["stock"] * 3 + ["dysample"] * 3
