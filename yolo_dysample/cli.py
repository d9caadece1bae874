"""The ``yolo-dysample`` console script.

Subcommands:
    compare   train the stock model, the bilinear control and DySample variants with identical settings and
              compare them (:func:`yolo_dysample.compare.compare`).
    twin      write the DySample twin of a model YAML (:func:`yolo_dysample.ultralytics_adapter.write_twin`).

Exit codes: 0 success, 1 a training run failed, 2 bad arguments, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

EXIT_RUN_FAILED = 1
EXIT_BAD_ARGUMENTS = 2
EXIT_INTERRUPTED = 130

COMPARE_EXAMPLES = """\
examples:
  yolo-dysample compare --preset small-objects          # quick CPU small-object check (3 seeds, ~35 min)
  yolo-dysample compare --preset finetune               # the CPU benchmark: pretrain stock, fine-tune all (~90 min)
  yolo-dysample compare --preset scratch-gpu --device 0 # the same design at GPU scale (640 px)
  yolo-dysample compare --variants bilinear,dysample,dysample-plus --epochs 30
  yolo-dysample compare --data my-data.yaml --model yolo11s.yaml --epochs 50 --seeds 0,1
  yolo-dysample compare --model yolov8n-seg.yaml --variants all --weights yolov8n-seg.pt lr0=0.005

Every run trains in a subprocess under <project>/<name>/<variant>-seed<k>/. Run the same command
again to resume: finished runs are skipped; one compare at a time per <name>. Results: summary.md (with
the paired differences from stock and their 95 % CIs), summary.csv, runs.csv, curves.png, final_metrics.png,
paired_ci.png in <project>/<name>/.
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``yolo-dysample`` and its subcommands."""
    from yolo_dysample.compare import (
        CONTROL_VARIANTS,
        DEFAULT_DATA,
        DEFAULT_MODEL,
        DEFAULT_VARIANTS,
        DYSAMPLE_VARIANTS,
        LATENCY_RUNS,
        PRESETS,
    )

    parser = argparse.ArgumentParser(
        prog="yolo-dysample",
        description="DySample (ICCV 2023) for Ultralytics YOLO: command-line tools.",
        allow_abbrev=False,
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    compare = subcommands.add_parser(
        "compare",
        help="does DySample help on my data? train stock and DySample models with identical settings, compare them",
        description=(
            "Train the stock model and DySample variants with identical settings (data, epochs, imgsz, batch, "
            "seeds, optional starting checkpoint), validate each and write a table and plots."
        ),
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --epoch is a typo to report, not --epochs
    )
    compare.add_argument("--preset", choices=sorted(PRESETS), help="preset settings; the options below override them")
    compare.add_argument("--data", help=f"dataset YAML, path or bundled name (default {DEFAULT_DATA})")
    compare.add_argument("--model", help=f"stock model YAML, any family/scale/task (default {DEFAULT_MODEL})")
    compare.add_argument(
        "--variants",
        help=f"comma-separated variants: the control {', '.join(CONTROL_VARIANTS)}, DySample variants "
        f"{', '.join(DYSAMPLE_VARIANTS)}, or 'all' (the DySample ones) (default {','.join(DEFAULT_VARIANTS)}); "
        "the stock model is always trained",
    )
    compare.add_argument("--seeds", help="comma-separated seeds, one run per seed and variant (default 0)")
    compare.add_argument("--epochs", help="epochs of every run (default: ultralytics' default)")
    compare.add_argument("--imgsz", help="image size, rounded up to the model's stride (default: ultralytics')")
    compare.add_argument("--batch", help="batch size (default: ultralytics' default)")
    compare.add_argument("--device", help="ultralytics device, e.g. cpu or 0 (default: GPU if available)")
    compare.add_argument("--weights", help="stock checkpoint every run starts from (weight transfer)")
    compare.add_argument("--project", help="parent directory (default <ultralytics runs_dir>/compare)")
    compare.add_argument("--name", help="comparison directory name; the same name and settings resume (default exp)")
    compare.add_argument(
        "--latency-runs",
        default=str(LATENCY_RUNS),
        help=f"interleaved latency rounds, each timing every variant once (default {LATENCY_RUNS})",
    )
    compare.add_argument("--quiet", action="store_true", help="print nothing but errors (progress.log still written)")
    compare.add_argument("train_args", nargs="*", metavar="key=value", help="further ultralytics train arguments")
    _add_twin_parser(subcommands)
    return parser


def _add_twin_parser(subcommands) -> None:
    twin = subcommands.add_parser(
        "twin",
        help="write the DySample twin of a model YAML: its nn.Upsample rows replaced, everything else kept",
        description="Write the DySample twin of a model YAML (a file, or a stock name such as yolov8-p2.yaml): "
        "every nn.Upsample row becomes a DySample row; layer indices, from fields and comments are kept.",
        allow_abbrev=False,
    )
    twin.add_argument("source", metavar="IN.yaml", help="model YAML file or stock model YAML name")
    twin.add_argument(
        "--variant",
        default="dysample",
        choices=("dysample", "dysample-plus", "dysample-s", "dysample-s-plus"),
        help="DySample variant (default dysample: LP, static scope)",
    )
    twin.add_argument("--groups", type=int, help="offset groups of every row (default 4, else the largest that fits)")
    twin.add_argument("-o", "--output", metavar="OUT.yaml", help="output file (default <IN stem>-<variant>.yaml)")


def _run_twin(arguments: argparse.Namespace) -> int:
    from yolo_dysample.ultralytics_adapter import write_twin

    try:
        path = write_twin(arguments.source, arguments.output, variant=arguments.variant, groups=arguments.groups)
    except (OSError, ValueError) as error:
        print(f"yolo-dysample twin: error: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    print(path)
    return 0


def _run_compare(arguments: argparse.Namespace) -> int:
    from yolo_dysample.compare import CompareError, RunFailedError, compare, parse_train_args

    def progress(message: str) -> None:
        print(message, flush=True)

    try:
        train_args = parse_train_args(arguments.train_args)
        result = compare(
            data=arguments.data,
            model=arguments.model,
            variants=arguments.variants,
            seeds=arguments.seeds,
            epochs=arguments.epochs,
            imgsz=arguments.imgsz,
            batch=arguments.batch,
            device=arguments.device,
            weights=arguments.weights,
            project=arguments.project,
            name=arguments.name,
            preset=arguments.preset,
            latency_runs=arguments.latency_runs,
            progress=None if arguments.quiet else progress,
            **train_args,
        )
    except CompareError as error:
        print(f"yolo-dysample compare: error: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED if isinstance(error, RunFailedError) else EXIT_BAD_ARGUMENTS
    except KeyboardInterrupt:
        print("\nyolo-dysample compare: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not arguments.quiet:
        print(result.files["summary_md"].read_text())
    return 0


def _interrupt(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``yolo-dysample`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    # parse_known_args: key=value train arguments may stand anywhere, also between and after options
    arguments, leftovers = parser.parse_known_args(argv)  # exits with code 2 and a usage message when malformed
    unknown_options = [item for item in leftovers if item.startswith("-")]
    if unknown_options:
        parser.error(f"unrecognized arguments: {' '.join(unknown_options)}")
    if arguments.command == "compare":
        arguments.train_args = [*arguments.train_args, *leftovers]
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the training subprocess too, like Ctrl-C
        return _run_compare(arguments)
    if arguments.command == "twin":
        if leftovers:
            parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
        return _run_twin(arguments)
    parser.error(f"unknown command {arguments.command!r}")
    return EXIT_BAD_ARGUMENTS


if __name__ == "__main__":
    sys.exit(main())
