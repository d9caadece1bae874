"""The developer tools run: the timing loop, the deployment benchmark and the GPU check (dry run on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from yolo_dysample.tools import bench_deployment, gpu_check
from yolo_dysample.tools.timing import interleaved_samples, median_ratio, spread


def test_interleaved_samples_give_every_candidate_one_sample_per_round_in_a_rotated_order():
    order = []
    candidates = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = interleaved_samples(candidates, rounds=3, min_block_seconds=0.0, warmup=0)
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(value >= 0 for values in samples.values() for value in values)
    timed = order[3:]  # after one calibration call each: one call per candidate per round
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_ratio_pairs_rounds_and_spread_is_relative_half_interquartile_range():
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert spread([1.0, 1.0, 1.0]) == 0.0
    assert spread([0.8, 1.0, 1.2]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_samples({"a": lambda: None}, rounds=0)


def test_deployment_section_replaces_only_the_text_between_its_markers(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nhand-written\n")
    bench_deployment.write_section("first\n", doc)
    bench_deployment.write_section("second\n", doc)
    text = doc.read_text()
    assert text.startswith("# Performance\n\nhand-written\n")
    assert text.count(bench_deployment.BEGIN_MARKER) == 1 and "second\n" in text and "first" not in text


def test_quick_deployment_run_reports_the_onnx_ratio_and_the_eager_layer_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    result_file = tmp_path / "deployment.json"
    arguments = ["--runtimes", "onnxruntime", "--imgsz", "32", "--threads", "1", "--rounds", "1", "--block", "0"]
    arguments += ["--layer-shape", "1", "16", "4", "4", "--workdir", str(tmp_path / "work"), "--json", str(result_file)]
    assert bench_deployment.main(arguments) == 0
    result = json.loads(result_file.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {
        "onnxruntime",
        *(f"eager {name}, 1x16x4x4" for name in ("nearest", "DySample LP", "DySample PL")),
    }
    onnx_row = rows["onnxruntime"]
    assert onnx_row["reference"] == "stock" and onnx_row["ratio"] > 0 and onnx_row["threads"] == 1
    assert {row["reference"] for name, row in rows.items() if name.startswith("eager")} == {"bilinear"}
    assert result["versions"]["onnxruntime"] != "-" and result["machine"]["cpu"]
    table = bench_deployment.render(result)
    assert "| runtime / layer | threads | reference | reference ms | DySample ms | ratio | spread |" in table
    assert table.count("\n| ") == 2 + len(rows)


def test_a_file_the_runtime_cannot_load_is_its_own_row_and_the_others_are_still_timed(tmp_path, monkeypatch):
    def export(checkpoint, export_format, imgsz, sampler=None):
        return f"{checkpoint.parent.name}-{sampler or 'auto'}"

    def runner(runtime, exported, threads, image):
        if exported == "dysample-gather":
            raise RuntimeError("cannot load it")
        return lambda: None

    checkpoints = {variant: tmp_path / variant / "model.pt" for variant in ("stock", "dysample")}
    monkeypatch.setattr(bench_deployment, "build_checkpoints", lambda _: checkpoints)
    monkeypatch.setattr(bench_deployment, "export", export)
    monkeypatch.setattr(bench_deployment, "_runner", runner)
    arguments = bench_deployment.parse_arguments(["--runtimes", "onnxruntime", "--samplers", "grid_sample", "gather"])
    arguments.rounds, arguments.block, arguments.imgsz, arguments.threads = 1, 0.0, 32, [1, 2]
    rows = bench_deployment.measure_runtimes(arguments, tmp_path)
    timed = [(row["name"], row["threads"]) for row in rows if "ratio" in row]
    assert timed == [
        (name, threads) for threads in (1, 2) for name in ("onnxruntime", "onnxruntime, grid_sample forced")
    ]
    assert [row for row in rows if "status" in row] == [
        {"name": "onnxruntime, gather forced", "status": "RuntimeError: cannot load it"}
    ]


def test_gpu_check_dry_run_on_the_cpu_times_every_variant_and_checks_non_finite_offsets(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--parts", "layer", "nan", "tensorrt"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    timed = [(row["part"], row["case"]) for row in result["rows"] if "ratio" in row]
    variants = [f"DySample {name}" for name in gpu_check.LAYER_VARIANTS]
    assert timed == [(part, case) for part in ("layer forward", "layer forward+backward") for case in variants]
    checks = [row for row in result["rows"] if row["part"] == "non-finite offsets, backward"]
    assert len(checks) == 3 * 5 and all(row["status"] == "pass" for row in checks), checks
    assert [row["status"] for row in result["rows"] if row["part"] == "TensorRT engine"] == [
        "skipped: needs a CUDA device"
    ]
    assert "| part | case | setting |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would really run")
def test_gpu_check_without_cuda_exits_cleanly_and_says_so(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["rows"] == [
        {"part": "all", "case": "-", "status": "skipped: no CUDA device (torch.cuda.is_available() is False)"}
    ]
