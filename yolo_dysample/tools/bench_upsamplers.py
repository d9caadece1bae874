"""Benchmark DySample against the usual upsamplers: latency, memory, parameters and FLOPs.

Upsamplers (``yolo_dysample.tools.upsampler_baselines``): nearest, bilinear, ConvTranspose2d, 1x1 conv +
PixelShuffle, CARAFE (pure PyTorch) and the four DySample variants (LP / PL, static / dynamic "+"
scope, groups 4). Every ratio is measured side by side in one run, against bilinear interpolation,
with interleaved rounds and medians (``yolo_dysample.tools.bench_common``). On the CPU, DySample samples with
its compiled kernel (``yolo_dysample/cpu_sampling.py``); the rows ``dysample-* (grid_sample)`` are the
same modules run with the kernel switched off (``YOLO_DYSAMPLE_CPU_KERNEL=0``), so the kernel's gain
is measured in the same rounds.

1. The paper's setting, ``1 x 256 x 120 x 120`` upsampled x2: forward latency, forward+backward
   latency, peak memory of a forward (inference) and of a forward+backward (training step),
   parameters and GFLOPs.
   ``pieces``: DySample's parts at that setting (offset projection, grid, ``grid_sample``, the kernel).
2. The neck shapes of YOLOv8n and YOLOv8s at 640 (what their ``nn.Upsample`` layers receive; found by
   building the stock models): forward and forward+backward latency, the ``(grid_sample)`` rows too.
3. Curves over feature-map size (batch 1, 256 channels) and over batch (128 x 40 x 40, YOLOv8n's
   P4 neck shape) for nearest, bilinear and DySample: latency ratio to bilinear.

Writes ``upsamplers.md``, ``upsamplers.json`` and ``upsamplers.png`` (``--name`` changes the stem, e.g.
``upsamplers-2threads``) to ``--output-dir`` (default ``docs/benchmarks``) and prints the machine, the
versions and the load average before each section. The default run takes about 5 minutes with
``--threads 1`` on a 2-core CPU; ``--quick`` (no CARAFE, fewer shapes and
rounds) 1-2 minutes.

Usage:
    python -m yolo_dysample.tools.bench_upsamplers [--quick] [--threads N] [--device cpu|cuda] [--skip-memory]
        [--name STEM]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from yolo_dysample.cpu_sampling import kernel_applies, sample_with_kernel
from yolo_dysample.sampling import sampling_grid
from yolo_dysample.tools.bench_common import (
    format_ratio,
    interleaved_latency,
    load_average,
    machine_summary,
    mebibytes,
    median_ms,
    median_ratio,
    peak_memory_bytes,
    run_memory_child,
    use_reusing_allocator,
    without_cpu_kernel,
)
from yolo_dysample.tools.upsampler_baselines import UPSAMPLERS, build_upsampler, forward_flops, parameter_count

PAPER_SHAPE = (1, 256, 120, 120)
SCALE = 2
REFERENCE = "bilinear"
DYSAMPLE_VARIANTS = ("dysample-lp", "dysample-lp+", "dysample-pl", "dysample-pl+")
CURVE_UPSAMPLERS = ("nearest", "bilinear", *DYSAMPLE_VARIANTS)
KERNEL_OFF = " (grid_sample)"  # name suffix: the same upsampler run with YOLO_DYSAMPLE_CPU_KERNEL=0
SIZE_CURVE = {"full": (10, 20, 40, 80, 120, 160), "quick": (20, 40, 80)}
SIZE_CURVE_CHANNELS = 256
BATCH_CURVE = {"full": (1, 2, 4, 8, 16), "quick": (1, 4)}
BATCH_CURVE_SHAPE = (128, 40, 40)
NECK_MODELS = ("yolov8n.yaml", "yolov8s.yaml")
SECTIONS = ("paper", "pieces", "neck", "curves")
MODES = ("forward", "train")  # train: forward + backward of a given output gradient
# Speed targets, as ratios to bilinear interpolation at the paper's setting (CPU).
TARGETS = (
    ("dysample-lp", "forward", 1.0),
    ("dysample-pl", "forward", 1.1),
    *((name, "train", 1.5) for name in ("dysample-lp", "dysample-lp+", "dysample-pl", "dysample-pl+")),
    *((name, "train memory", 1.5) for name in ("dysample-lp", "dysample-lp+", "dysample-pl", "dysample-pl+")),
)

REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout: docs/ and git history


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults of a full or a ``--quick`` run filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, shapes and curve points, no CARAFE (~2 min)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement (7; quick 3)")
    parser.add_argument("--min-block", type=float, default=None, help="seconds per timed block (0.1; quick 0.05)")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory measurements")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure (default: all)"
    )
    parser.add_argument(
        "--before",
        metavar="GIT_REVISION",
        help="also measure yolo_dysample/dysample.py as it was at this git revision (paper setting only)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: docs/benchmarks (quick: a temp dir)")
    parser.add_argument("--name", default="upsamplers", help="stem of the written .md/.json/.png (default: upsamplers)")
    parser.add_argument(
        "--system-allocator", action="store_true", help="time with glibc's default malloc settings (see bench_common)"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-cases", default="[]", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.rounds is None:
        arguments.rounds = 3 if arguments.quick else 7
    if arguments.min_block is None:
        arguments.min_block = 0.05 if arguments.quick else 0.1
    if arguments.output_dir is None:  # a quick run must not overwrite the published numbers
        repository = REPOSITORY
        quick_dir = Path(tempfile.gettempdir()) / "yolo-dysample-bench"
        arguments.output_dir = quick_dir if arguments.quick else repository / "docs" / "benchmarks"
    return arguments


def add_dysample_revision(revision: str) -> tuple[str, ...]:
    """Register the four DySample variants of ``dysample.py`` at git ``revision``; return their names."""
    repository = REPOSITORY
    source = subprocess.run(
        ["git", "-C", str(repository), "show", f"{revision}:yolo_dysample/dysample.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    namespace: dict = {"__name__": f"dysample_at_{revision}"}
    exec(compile(source, f"{revision}:yolo_dysample/dysample.py", "exec"), namespace)  # the file as it was
    earlier = namespace["DySample"]
    names = []
    for style, dyscope in (("lp", False), ("lp", True), ("pl", False), ("pl", True)):
        name = f"dysample-{style}{'+' if dyscope else ''}@{revision}"
        UPSAMPLERS[name] = lambda channels, scale, style=style, dyscope=dyscope: earlier(
            channels, scale=scale, style=style, groups=4, dyscope=dyscope
        )
        names.append(name)
    return tuple(names)


def cpu_kernel_available(device: torch.device) -> bool:
    """Whether DySample's eager forward on ``device`` takes the compiled CPU kernel."""
    return device.type == "cpu" and kernel_applies(torch.zeros(1, 1, 1, 1))


def base_upsampler(name: str) -> str:
    """``"dysample-lp (grid_sample)"`` -> ``"dysample-lp"``: the module behind a benchmark row."""
    return name.removesuffix(KERNEL_OFF)


class Case:
    """One upsampler on one input shape, ready to run a forward or a training step.

    A name ending in :data:`KERNEL_OFF` runs the upsampler with DySample's CPU kernel switched off.
    """

    def __init__(self, name: str, shape: tuple[int, ...], device: torch.device) -> None:
        torch.manual_seed(0)
        batch, channels, height, width = shape
        self.name, self.shape = name, shape
        self.kernel_off = name.endswith(KERNEL_OFF)
        self.module = build_upsampler(base_upsampler(name), channels, SCALE).to(device)
        self.x = torch.randn(shape, device=device)
        self.x_train = self.x.clone().requires_grad_(True)
        self.grad_output = torch.randn(batch, channels, SCALE * height, SCALE * width, device=device)

    def forward(self) -> None:
        """One forward pass without gradients."""
        with torch.no_grad():
            self.module(self.x)

    def train_step(self) -> None:
        """One forward and backward pass."""
        self.module(self.x_train).backward(self.grad_output)
        self.x_train.grad = None
        self.module.zero_grad(set_to_none=True)

    def call(self, mode: str) -> Callable[[], None]:
        """The call that ``mode`` (forward or fwd+bwd) times."""
        function = self.forward if mode == "forward" else self.train_step
        return without_cpu_kernel(function) if self.kernel_off else function


def measure_latency(
    names: tuple[str, ...], shape: tuple[int, ...], arguments: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, dict[str, float]]]:
    """``{mode: {name: {"ms": median, "ratio": median ratio to bilinear}}}`` for one shape."""
    cases = {name: Case(name, shape, device) for name in names}
    results = {}
    for mode in MODES:
        samples = interleaved_latency(
            {name: case.call(mode) for name, case in cases.items()}, device, arguments.rounds, arguments.min_block
        )
        results[mode] = {
            name: {"ms": median_ms(values), "ratio": median_ratio(values, samples[REFERENCE])}
            for name, values in samples.items()
        }
    return results


def memory_child(arguments: argparse.Namespace) -> None:
    """Child process: peak memory of every requested (name, shape, mode); prints one JSON line."""
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    if arguments.before:
        add_dysample_revision(arguments.before)
    results = []
    for name, shape, mode in json.loads(arguments.memory_cases):
        case = Case(name, tuple(shape), device)
        call = case.call(mode)
        call()  # lazy initialisation (thread pools, kernels) is not part of the peak
        results.append([name, shape, mode, peak_memory_bytes(call, device)])
        del case, call
    print(json.dumps(results))


def measure_memory(
    names: tuple[str, ...], shape: tuple[int, ...], arguments: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float]]:
    """``{mode: {name: MiB}}``: peak memory above the inputs (input, its gradient and the module excluded)."""
    cases = [[name, list(shape), mode] for mode in MODES for name in names]
    if device.type == "cuda":
        results = []
        for name, case_shape, mode in cases:
            case = Case(name, tuple(case_shape), device)
            case.call(mode)()
            results.append([name, case_shape, mode, peak_memory_bytes(case.call(mode), device)])
    else:
        child_arguments = ["--threads", str(arguments.threads), "--device", "cpu", "--memory-cases", json.dumps(cases)]
        if arguments.before:
            child_arguments += ["--before", arguments.before]
        results = run_memory_child("yolo_dysample.tools.bench_upsamplers", child_arguments)
    memory: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for name, _, mode, peak in results:
        memory[mode][name] = mebibytes(peak)
    return memory


def dysample_pieces(arguments: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Forward latency of DySample's parts at the paper setting, bilinear interpolation alongside.

    ``offsets``: the 1x1 projection(s); ``grid``: turning offsets into ``grid_sample`` points;
    ``grid_sample``: the sampling; ``kernel``: the compiled CPU kernel sampling from the same offsets
    (``cpu_sampling.sample_with_kernel``, no grid; CPU only); ``forward``: the whole module;
    ``forward (grid_sample)``: the whole module with the kernel switched off. For a ``--before`` revision
    the parts are its ``sample_offsets`` and ``sampling_grid``.
    """
    torch.manual_seed(0)
    x = torch.randn(PAPER_SHAPE, device=device)
    batch, channels, height, width = PAPER_SHAPE
    candidates = {
        "bilinear": lambda: torch.nn.functional.interpolate(x, scale_factor=SCALE, mode="bilinear", align_corners=False)
    }
    revisions = [""] + ([f"@{arguments.before}"] if arguments.before else [])
    with_kernel = cpu_kernel_available(device)
    for variant in DYSAMPLE_VARIANTS:
        for revision in revisions:
            module = build_upsampler(variant + revision, channels, SCALE).to(device).eval()
            grouped = x.reshape(batch * module.groups, channels // module.groups, height, width)
            if revision:  # the public two-step API of the earlier file
                offsets_of, grid_of = module.sample_offsets, module.sampling_grid
            else:  # what forward runs
                offsets_of = module.offsets

                def grid_of(x, offsets, module=module):
                    return sampling_grid(x, offsets, module.init_pos, module.groups, module.scale)

            with torch.no_grad():
                offsets = offsets_of(x)
                grid = grid_of(x, offsets)
            name = variant + revision
            candidates[f"{name} offsets"] = lambda offsets_of=offsets_of: offsets_of(x)
            candidates[f"{name} grid"] = lambda grid_of=grid_of, offsets=offsets: grid_of(x, offsets)
            candidates[f"{name} grid_sample"] = lambda grouped=grouped, grid=grid: torch.nn.functional.grid_sample(
                grouped, grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            if with_kernel and not revision:
                candidates[f"{name} kernel"] = lambda module=module, offsets=offsets: sample_with_kernel(
                    x, offsets, module.init_pos, module.groups, module.scale
                )
            candidates[f"{name} forward"] = lambda module=module: module(x)
            if with_kernel and not revision:
                candidates[f"{name} forward{KERNEL_OFF}"] = without_cpu_kernel(lambda module=module: module(x))
    with torch.no_grad():
        samples = interleaved_latency(candidates, device, arguments.rounds, arguments.min_block)
    return {
        name: {"ms": median_ms(values), "ratio": median_ratio(values, samples[REFERENCE])}
        for name, values in samples.items()
    }


PIECES = ("offsets", "grid", "grid_sample", "kernel", "forward", f"forward{KERNEL_OFF}")


def pieces_table(pieces: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: where DySample's forward time goes."""
    lines = [
        "| DySample | offsets (ms) | grid (ms) | grid_sample (ms) | kernel (ms) | forward (ms) | forward × bilinear "
        "| forward, kernel off (ms) | × bilinear |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = [name.removesuffix(" offsets") for name in pieces if name.endswith(" offsets")]  # in order
    names = [name for name in names if "@" not in name] + [name for name in names if "@" in name]
    for name in names:
        measured = {part: pieces.get(f"{name} {part}") for part in PIECES}
        cells = [f"{measured[part]['ms']:.2f}" if measured[part] else "" for part in PIECES[:5]]
        cells.append(format_ratio(measured["forward"]["ratio"]))
        kernel_off = measured[f"forward{KERNEL_OFF}"]
        cells += [f"{kernel_off['ms']:.2f}", format_ratio(kernel_off["ratio"])] if kernel_off else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"| bilinear (F.interpolate) | | | | | {pieces[REFERENCE]['ms']:.2f} | 1.00x | | |")
    return lines


def neck_shapes(imgsz: int = 640) -> dict[str, tuple[int, int, int, int]]:
    """What the ``nn.Upsample`` layers of the stock YOLOv8n / YOLOv8s necks receive at ``imgsz``."""
    from torch import nn
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    shapes = {}
    for yaml_name in NECK_MODELS:
        model = DetectionModel(yaml_model_load(yaml_name), verbose=False).eval()
        label = Path(yaml_name).stem.replace("yolov", "YOLOv")
        recorded = []
        hooks = [
            module.register_forward_pre_hook(
                lambda module, inputs, recorded=recorded: recorded.append(tuple(inputs[0].shape))
            )
            for module in model.modules()
            if isinstance(module, nn.Upsample)
        ]
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz))
        for hook in hooks:
            hook.remove()
        for shape in recorded:
            shapes[f"{label} {shape[1]}x{shape[2]}x{shape[3]}"] = shape
    return shapes


def paper_table(results: dict, memory: dict | None, static: dict) -> list[str]:
    """Markdown lines: every upsampler at the paper's setting."""
    header = "| Upsampler | Params | GFLOPs | Forward (ms) | × bilinear | Fwd+bwd (ms) | × bilinear |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if memory:
        header += " Peak mem, forward (MiB) | Peak mem, fwd+bwd (MiB) | × bilinear |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for name in results["forward"]:
        forward, train = results["forward"][name], results["train"][name]
        row = (
            f"| {name} | {static[name]['parameters']:,} | {static[name]['gflops']:.3f} "
            f"| {forward['ms']:.2f} | {format_ratio(forward['ratio'])} "
            f"| {train['ms']:.2f} | {format_ratio(train['ratio'])} |"
        )
        if memory:
            reference = memory["train"][REFERENCE]
            row += (
                f" {memory['forward'][name]:.1f} | {memory['train'][name]:.1f} "
                f"| {format_ratio(memory['train'][name] / reference)} |"
            )
        lines.append(row)
    return lines


def neck_table(neck: dict[str, dict]) -> list[str]:
    """Markdown lines: the YOLO neck shapes."""
    labels = list(neck)
    header = "| Upsampler | " + " | ".join(f"{label} fwd / fwd+bwd (ms)" for label in labels) + " |"
    lines = [header, "|---|" + "---:|" * len(labels)]
    for name in neck[labels[0]]["forward"]:
        cells = []
        for label in labels:
            forward, train = neck[label]["forward"][name], neck[label]["train"][name]
            cells.append(
                f"{forward['ms']:.3f} ({format_ratio(forward['ratio'])}) / {train['ms']:.3f} "
                f"({format_ratio(train['ratio'])})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def curve_table(curve: dict[str, dict], axis_name: str) -> list[str]:
    """Markdown lines: latency against ``axis_name``."""
    points = list(curve)
    lines = [
        "| Upsampler (forward / fwd+bwd, × bilinear) | " + " | ".join(f"{axis_name} {p}" for p in points) + " |",
        "|---|" + "---:|" * len(points),
    ]
    for name in curve[points[0]]["forward"]:
        cells = [f"{curve[p]['forward'][name]['ratio']:.2f} / {curve[p]['train'][name]['ratio']:.2f}" for p in points]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def target_lines(results: dict, memory: dict | None) -> list[str]:
    """Markdown lines: each target ratio and whether it holds."""
    lines = []
    for name, what, limit in TARGETS:
        if what == "train memory":
            if not memory:
                continue
            ratio = memory["train"][name] / memory["train"][REFERENCE]
        else:
            ratio = results[what][name]["ratio"]
        label = {"forward": "forward", "train": "forward+backward", "train memory": "peak fwd+bwd memory"}[what]
        verdict = "met" if ratio <= limit else f"MISSED by {100 * (ratio / limit - 1):.0f}%"
        lines.append(f"- {name} {label}: {ratio:.2f}x bilinear (target <= {limit:.1f}x): {verdict}")
    return lines


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    """Plot the latency curves to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    axis_labels = {"size": "feature map H = W (batch 1, 256 channels)", "batch": "batch (128 x 40 x 40)"}
    for column, (axis, curve) in enumerate(curves.items()):
        points = list(curve)
        for row, mode in enumerate(MODES):
            ax = axes[row][column]
            for name in curve[points[0]][mode]:
                ratios = [curve[p][mode][name]["ratio"] for p in points]
                style = "--" if name in ("nearest", "bilinear") else "-"
                ax.plot(points, ratios, style, marker="o", label=name)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(points, [str(p) for p in points])
            ax.set_xlabel(axis_labels[axis])
            ax.set_ylabel(f"{'forward' if mode == 'forward' else 'forward+backward'} latency / bilinear")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Measure every upsampler; write the ``.md``, ``.json`` and ``.png``."""
    arguments = parse_arguments(argv)
    if arguments.memory_child:
        memory_child(arguments)
        return
    reusing_allocator = not arguments.system_allocator and use_reusing_allocator()
    started = time.time()
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    machine = machine_summary(device, arguments.threads)
    machine["malloc"] = "freed memory kept (MALLOC_MMAP_MAX_=0)" if reusing_allocator else "system defaults"
    print("Machine and versions:")
    for key, value in machine.items():
        print(f"  {key}: {value}")
    # --quick leaves out CARAFE: its plain-PyTorch training step alone takes seconds at the paper setting
    names = tuple(name for name in UPSAMPLERS if not (arguments.quick and name == "carafe"))
    # the kernel's gain: the same DySample modules on the grid_sample path, in the same rounds (CPU only)
    kernel_off_names = tuple(f"{name}{KERNEL_OFF}" for name in DYSAMPLE_VARIANTS if cpu_kernel_available(device))
    quick = "quick" if arguments.quick else "full"
    report: list[str] = []
    raw: dict = {"machine": machine}

    if "paper" in arguments.sections:
        paper_names = names + (add_dysample_revision(arguments.before) if arguments.before else ()) + kernel_off_names
        print(f"\n[paper] {PAPER_SHAPE}, x{SCALE} (load average {load_average()})", flush=True)
        x = torch.randn(PAPER_SHAPE)
        static = {}
        for name in paper_names:  # FlopCounterMode keeps DySample on grid_sample, so FLOPs are counted alike
            module = build_upsampler(base_upsampler(name), PAPER_SHAPE[1], SCALE).eval()
            static[name] = {"parameters": parameter_count(module), "gflops": forward_flops(module, x) / 1e9}
        paper = measure_latency(paper_names, PAPER_SHAPE, arguments, device)
        paper_memory = None if arguments.skip_memory else measure_memory(paper_names, PAPER_SHAPE, arguments, device)
        table = paper_table(paper, paper_memory, static)
        targets = target_lines(paper, paper_memory)
        print("\n".join(table))
        print("\nTargets (ratios to bilinear in this run):\n" + "\n".join(targets))
        memory_rule = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
        report += [
            f"## Paper setting: {'x'.join(map(str, PAPER_SHAPE))}, x{SCALE}",
            "",
            *table,
            "",
            "GFLOPs: forward, 2 FLOPs per multiply-add, convolutions and matrix products as they run",
            "(`torch.utils.flop_counter`) plus 4 multiply-adds per output value for every bilinear interpolation or",
            "bilinear `grid_sample` (see `yolo_dysample.tools.upsampler_baselines`). "
            "DySample's CPU kernel does the same",
            "arithmetic as `grid_sample` (four neighbours, one weight each), so both paths count the same; the",
            "FLOP counter's dispatch mode makes DySample run `grid_sample`, which it can see.",
            "`(grid_sample)` rows: the same module with its CPU kernel switched off (`YOLO_DYSAMPLE_CPU_KERNEL=0`).",
            f"Peak memory: {memory_rule} above the inputs, for a forward without autograd and for forward + backward.",
            "",
            *targets,
            "",
        ]
        raw["paper"] = {"shape": PAPER_SHAPE, "latency": paper, "memory_mib": paper_memory, "static": static}

    if "pieces" in arguments.sections:
        print(f"\n[pieces] DySample's parts at {PAPER_SHAPE} (load average {load_average()})", flush=True)
        if arguments.before and "paper" not in arguments.sections:
            add_dysample_revision(arguments.before)
        pieces = dysample_pieces(arguments, device)
        table = pieces_table(pieces)
        print("\n".join(table))
        report += [
            f"## DySample's parts, forward at {'x'.join(map(str, PAPER_SHAPE))} (no autograd)",
            "",
            *table,
            "",
            "offsets: the 1x1 projection(s) with the scope; grid: offsets to `grid_sample` points; grid_sample: the",
            "sampling alone; kernel: the compiled CPU kernel sampling from the same offsets (no grid,",
            "`cpu_sampling.sample_with_kernel`); forward: the whole module, which runs offsets + kernel on the CPU;",
            "forward, kernel off: the whole module with `YOLO_DYSAMPLE_CPU_KERNEL=0` (offsets + grid + grid_sample).",
            "All measured in the same interleaved rounds.",
            "",
        ]
        raw["pieces"] = pieces

    if "neck" in arguments.sections:
        print(f"\n[neck] YOLOv8n / YOLOv8s neck shapes at 640 (load average {load_average()})", flush=True)
        neck = {}
        shapes = neck_shapes()
        if arguments.quick:
            shapes = dict(list(shapes.items())[:2])  # YOLOv8n only
        for label, shape in shapes.items():
            neck[label] = measure_latency(names + kernel_off_names, shape, arguments, device)
            print(f"  {label} done", flush=True)
        table = neck_table(neck)
        print("\n".join(table))
        report += ["## YOLOv8 neck shapes at 640 (batch 1): ms (× bilinear)", "", *table, ""]
        raw["neck"] = neck

    if "curves" in arguments.sections:
        print(f"\n[curves] over feature-map size and batch (load average {load_average()})", flush=True)
        curves: dict[str, dict] = {"size": {}, "batch": {}}
        for size in SIZE_CURVE[quick]:
            shape = (1, SIZE_CURVE_CHANNELS, size, size)
            curves["size"][size] = measure_latency(CURVE_UPSAMPLERS, shape, arguments, device)
        for batch in BATCH_CURVE[quick]:
            curves["batch"][batch] = measure_latency(CURVE_UPSAMPLERS, (batch, *BATCH_CURVE_SHAPE), arguments, device)
        tables = [*curve_table(curves["size"], "H=W"), "", *curve_table(curves["batch"], "batch")]
        print("\n".join(tables))
        arguments.output_dir.mkdir(parents=True, exist_ok=True)
        threads = f"{arguments.threads} thread{'s' if arguments.threads > 1 else ''}"
        title = f"Upsampler latency / bilinear, {machine['device']}, {threads} ({machine['cpu']})"
        plot(curves, arguments.output_dir / f"{arguments.name}.png", title)
        report += [
            "## Latency over feature-map size and batch (× bilinear)",
            "",
            *tables,
            "",
            f"![latency ratio to bilinear]({arguments.name}.png)",
            "",
        ]
        raw["curves"] = {axis: {str(point): value for point, value in curve.items()} for axis, curve in curves.items()}

    elapsed = time.time() - started
    command = "python -m yolo_dysample.tools.bench_upsamplers" + (" --quick" if arguments.quick else "")
    command += f" --threads {arguments.threads}"
    if arguments.system_allocator:
        command += " --system-allocator"
    if arguments.before:
        command += f" --before {arguments.before}"
    if set(arguments.sections) != set(SECTIONS):
        command += " --sections " + " ".join(arguments.sections)
    if arguments.name != "upsamplers":
        command += f" --name {arguments.name}"
    machine["load average at end (1/5/15 min)"] = load_average()
    machine["run time"] = f"{elapsed:.0f} s"
    raw["command"] = command
    header = [
        "# Upsampler benchmark",
        "",
        f"Generated by `{command}` ({arguments.rounds} interleaved rounds, medians; ratios are medians of",
        "per-round ratios to bilinear interpolation measured in the same round).",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
    ]
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / f"{arguments.name}.md").write_text("\n".join(header + report))
    (arguments.output_dir / f"{arguments.name}.json").write_text(json.dumps(raw, indent=1))
    print(f"\nwrote {arguments.output_dir}/{arguments.name}.md and .json" + (", .png" if "curves" in raw else "")
          + f" in {elapsed:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
