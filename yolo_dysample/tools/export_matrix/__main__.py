"""Command line of the export matrix: every case in its own interpreter, then the tables into the doc.

python -m yolo_dysample.tools.export_matrix                    # every case, rewrites docs/export_matrix.md
python -m yolo_dysample.tools.export_matrix --cases onnx ncnn  # a subset, table printed only
path/to/export-venv/bin/python -m yolo_dysample.tools.export_matrix   # a venv holding the heavy toolchains
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from yolo_dysample.export_policy import SAMPLERS
from yolo_dysample.tools.export_matrix.cases import CASES, CASES_BY_NAME, DOC
from yolo_dysample.tools.export_matrix.checkpoint import build_dysample_checkpoint
from yolo_dysample.tools.export_matrix.checks import broken_sampler_study, run_case, run_case_in_subprocess
from yolo_dysample.tools.export_matrix.cost import onnx_layer_cost, onnx_sampler_cost, sampler_cost
from yolo_dysample.tools.export_matrix.report import render_tables, write_doc


def main(argv: list[str] | None = None) -> int:
    """Run the cases (each in a child interpreter), print the tables and write them into the doc."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="case names or formats (default: all)")
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs each case")
    parser.add_argument(
        "--python-for",
        nargs="*",
        default=[],
        metavar="FORMAT=PYTHON",
        help="another interpreter for one format, e.g. litert=venv-litert/bin/python (litert-torch needs torch<2.15)",
    )
    parser.add_argument("--workdir", help="keep exports here (default: a temporary directory)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave the doc alone")
    parser.add_argument("--no-cost", action="store_true", help="skip the gather-cost measurement")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--stock", action="store_true", help="baseline: stock YOLOv8n, no DySample (never written)")
    parser.add_argument("--previous", help="rows of an earlier --json run to keep; the cases run now replace theirs")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--sampler", help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_case:  # child process: one case, one sampler
        local = Path(args.directory) / Path(args.checkpoint).name
        local.write_bytes(Path(args.checkpoint).read_bytes())  # exports land beside the checkpoint
        row = run_case(CASES_BY_NAME[args.run_case], args.sampler, args.directory, local)
        Path(args.result).write_text(json.dumps(row, indent=1))
        return 0

    interpreters = dict(item.split("=", 1) for item in args.python_for)
    wanted = args.cases or [case.name for case in CASES]
    cases = [case for case in CASES if case.name in wanted or case.format in wanted]
    with tempfile.TemporaryDirectory(prefix="export-matrix-") as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = build_dysample_checkpoint(workdir / "dysample-yolov8n.pt", dysample=not args.stock)
        previous = json.loads(Path(args.previous).read_text()) if args.previous else {}
        if isinstance(previous, list):  # rows only
            previous = {"rows": previous}
        results = [row for row in previous.get("rows", []) if row["case"] in CASES_BY_NAME]  # drop retired cases
        for case in cases:
            for sampler in args.samplers:
                started = time.perf_counter()
                python = interpreters.get(case.format, args.python)
                row = run_case_in_subprocess(python, case, sampler, workdir, checkpoint)
                results = [r for r in results if (r["case"], r["sampler"]) != (case.name, sampler)]
                if python != sys.executable:
                    where = f"run in a separate environment ({Path(python).parent.parent.name})"
                    row["notes"] = "; ".join(filter(None, [row.get("notes", ""), where]))
                results.append(row)
                shown = row.get("reason", "")
                if "max_abs_diff" in row:
                    shown = f"max {row['max_abs_diff']:.2e} mean {row['mean_abs_diff']:.2e}"
                print(
                    f"{case.name:24s} {sampler:12s} {row['status']:28s} {shown} "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
        if args.no_cost:  # keep the previous run's measurements, if any
            layer_cost, model_cost = previous.get("layer_cost", []), previous.get("model_cost", [])
            onnx_layer = previous.get("onnx_layer", [])
        else:
            layer_cost, model_cost = sampler_cost(), onnx_sampler_cost(workdir, checkpoint)
            onnx_layer = onnx_layer_cost()
        broken = [] if args.stock else broken_sampler_study(checkpoint)
    if args.json:
        measured = {"layer_cost": layer_cost, "model_cost": model_cost, "onnx_layer": onnx_layer, "broken": broken}
        Path(args.json).write_text(json.dumps({"rows": results, **measured}, indent=1))
    order = {case.name: index for index, case in enumerate(CASES)}
    results.sort(key=lambda row: (order.get(row["case"], len(order)), row["sampler"] != "grid_sample"))
    generated = render_tables(results, layer_cost, model_cost, onnx_layer, broken)
    print(generated)
    if not args.no_write and not args.stock and (not args.cases or args.previous):
        write_doc(generated)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
