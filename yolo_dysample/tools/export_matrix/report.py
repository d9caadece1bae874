"""The generated part of docs/export_matrix.md: Markdown tables from the rows the cases return."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from yolo_dysample.export_policy import SAMPLERS
from yolo_dysample.tools.doc_sections import replace_section
from yolo_dysample.tools.export_matrix.cases import (
    BEGIN_MARKER,
    CASES_BY_NAME,
    DOC,
    END_MARKER,
    IMAGE_SIZE,
    LATENCY_RUNS,
)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _sampler_cost_table(title: str, grid_sample_name: str, rows: list[dict]) -> list[str]:
    """Markdown lines: each sampler's time and its ratio to the grid-sample one, one row per input shape."""
    others = [sampler for sampler in SAMPLERS if sampler != "grid_sample" and sampler in rows[0]]
    header = " | ".join([grid_sample_name, *others, *(f"{sampler} / {grid_sample_name}" for sampler in others)])
    lines = ["", title, "", f"| input | {header} |", "| --- |" + " --- |" * (1 + 2 * len(others))]
    for row in rows:
        times = [f"{row[sampler]:.2f}" for sampler in ("grid_sample", *others)]
        ratios = [f"{row[sampler] / row['grid_sample']:.2f}" for sampler in others]
        lines.append(f"| {row['input']} | " + " | ".join(times + ratios) + " |")
    return lines


def measured_notes(row: dict) -> list[str]:
    """The extra comparisons :func:`run_case` reports beside the checked one, as notes."""
    notes = []
    if "vs_unrounded_weights" in row:
        unrounded = row["vs_unrounded_weights"]
        notes.append(f"vs the unrounded weights: max {unrounded['max']:.1e}, mean {unrounded['mean']:.1e}")
    if "autobackend_default" in row:
        default = row["autobackend_default"]
        notes.append(
            f"AutoBackend's default here ({default['precision']}): max {default['max']:.1e}, mean {default['mean']:.1e}"
        )
    return notes


def _broken_sampler_table(broken: list[dict]) -> list[str]:
    """Markdown lines: what each broken sampler does to the output, and its margin over the closest check."""
    lines = [
        "",
        "### What a broken sampler gives (PyTorch, no export)",
        "",
        "The checkpoint against itself with its DySample layers broken on purpose (`broken_sampling`: offsets zeroed, "
        "the sampling grid scaled by 1.02, zeros padding), on the shapes the cases use. The last two columns give, "
        "over the checks above, the lowest ratio of a check's metric (on its own shapes and reference) to its "
        "tolerance: below 1 a check would pass the broken sampler. "
        "`tests/test_export_formats.py::test_every_check_catches_a_broken_sampler_tenfold` asserts >= 10.",
        "",
        "| broken sampler | max \\|diff\\| | mean \\|diff\\| | lowest ratio, max checks | lowest ratio, mean checks |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in broken:
        cells = []
        for metric in ("max", "mean"):
            checks = {name: check for name, check in row["cases"].items() if check["metric"] == metric}
            if not checks:
                cells.append("-")
                continue
            name = min(checks, key=lambda name: checks[name]["value"] / checks[name]["tolerance"])
            cells.append(f"{checks[name]['value'] / checks[name]['tolerance']:.1f} ({_cell(name)})")
        lines.append(f"| {row['breakage']} | {row['max']:.2g} | {row['mean']:.2g} | {cells[0]} | {cells[1]} |")
    return lines


def render_tables(
    results: list[dict],
    layer_cost: list[dict],
    model_cost: list[dict],
    onnx_layer: list[dict] | None = None,
    broken: list[dict] | None = None,
) -> str:
    """Markdown for the generated part of docs/export_matrix.md."""
    import torch
    import ultralytics

    from yolo_dysample.export_policy import sampler_for_export

    by_key = {(r["case"], r["sampler"]): r for r in results}
    lines = [
        f"Generated {time.strftime('%Y-%m-%d')} on {platform.machine()} Linux, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"ultralytics {ultralytics.__version__}; imgsz {IMAGE_SIZE}, YOLOv8n with two DySample layers "
        "(LP + dynamic scope, PL + static scope), offsets perturbed, BatchNorm calibrated on the sample photos. "
        "|diff|: raw outputs, boxes divided by the image size, class scores in [0, 1]; max and mean over the "
        "outputs (the worst shape); check: the metric that must stay within the case's tolerance. Latency: median of "
        f"{LATENCY_RUNS} AutoBackend calls, batch 1, on a shared machine (indicative only).",
        "",
        "### With the automatic sampler (what `yolo export` does)",
        "",
        "| case | sampler | status | max \\|diff\\| | mean \\|diff\\| | check | latency ms (PyTorch ms) "
        "| toolchain | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = list(dict.fromkeys(r["case"] for r in results))
    for name in names:
        case = CASES_BY_NAME.get(name)
        try:
            automatic = sampler_for_export(case.format, case.export_args.get("opset")) if case else "grid_sample"
        except ValueError:
            automatic = "gather"  # below every sampler's opset: the export must refuse; show the gather attempt
        row = by_key.get((name, automatic)) or next(r for r in results if r["case"] == name)
        differences = {}
        for metric in ("max", "mean"):
            differences[metric] = f"{row[f'{metric}_abs_diff']:.1e}" if f"{metric}_abs_diff" in row else "-"
            if f"{metric}_abs_diff" in row and len(row.get("diff_per_shape", {})) > 1:
                per_shape = ", ".join(f"{k}: {v[metric]:.1e}" for k, v in row["diff_per_shape"].items())
                differences[metric] += f" ({per_shape})"
        metric = row.get("metric", case.metric if case else "max")
        check = f"{metric} <= {row['tolerance']:g}" if "max_abs_diff" in row else "-"  # "-": nothing compared
        latency = f"{row['latency_ms']} ({row['pytorch_latency_ms']})" if "latency_ms" in row else "-"
        where = [part for part in row.get("notes", "").split("; ") if part.startswith("run in a separate")]
        notes = "; ".join(filter(None, [case.notes if case else row.get("notes", ""), *measured_notes(row), *where]))
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        if row.get("program_ops"):
            status += f"; sampling ops {row['program_ops']}"
        lines.append(
            f"| {_cell(name)} | {row['sampler']} | {_cell(status)} | {differences['max']} | {differences['mean']} "
            f"| {check} | {latency} | {_cell(row.get('versions', ''))} | {_cell(notes)} |"
        )
    if broken:
        lines += _broken_sampler_table(broken)
    lines += [
        "",
        "### Each sampler forced (`YOLO_DYSAMPLE_SAMPLER=" + "` / `=".join(SAMPLERS) + "`)",
        "",
        "| case | " + " | ".join(SAMPLERS) + " |",
        "| --- |" + " --- |" * len(SAMPLERS),
    ]
    for name in names:
        cells = []
        for sampler in SAMPLERS:
            row = by_key.get((name, sampler))
            if row is None:
                cells.append("not run")
                continue
            text = row["status"]
            if "max_abs_diff" in row:
                text += f", max {row['max_abs_diff']:.1e}, mean {row['mean_abs_diff']:.1e}"
            if row.get("reason") and row["status"] not in {"unverified"}:
                text += f": {row['reason'][:160]}"
            if row.get("program_ops"):
                text += f"; ops {row['program_ops']}"
            cells.append(_cell(text))
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    if layer_cost:
        lines += ["", "### Cost of the samplers"]
        lines += _sampler_cost_table(
            "One DySample layer (LP, dynamic scope) in PyTorch on CPU, best of 30 runs, ms (in eager CPU calls the "
            "grid_sample sampler runs the compiled CPU kernel, yolo_dysample/cpu_sampling.py):",
            "grid_sample",
            layer_cost,
        )
    if onnx_layer:
        lines += _sampler_cost_table(
            "The same layer exported to ONNX (opset 17) and run by ONNX Runtime on CPU, best of 30 runs, ms:",
            "GridSample",
            onnx_layer,
        )
    if model_cost:
        lines += [
            "",
            f"The whole model in ONNX Runtime (CPU, imgsz 320, batch 1), best of {LATENCY_RUNS} runs:",
            "",
            "| sampler | ONNX nodes | ms |",
            "| --- | --- | --- |",
        ]
        for row in model_cost:
            lines.append(f"| {row['sampler']} | {row['nodes']} | {row['latency_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def write_doc(generated: str, doc: Path = DOC) -> None:
    """Replace the text between the markers in ``doc`` (the rest of the file is hand-written)."""
    if doc.exists() and (BEGIN_MARKER not in doc.read_text() or END_MARKER not in doc.read_text()):
        raise ValueError(f"{doc} lacks the markers {BEGIN_MARKER!r} ... {END_MARKER!r}")
    replace_section(doc, BEGIN_MARKER, END_MARKER, generated, heading="# Export matrix")
