"""Model-level benchmark: stock YOLO against its DySample twins.

For YOLOv8n, YOLOv8s and YOLO11n, the stock model and the four DySample variants (the bundled
``<model>-dysample{,-plus,-s,-s-plus}.yaml``, built from their YAML dicts through
``yolo_dysample.register_with_ultralytics``) are measured side by side (``yolo_dysample.tools.bench_common``):

- parameters, and GFLOPs at 640 counted honestly: Ultralytics' thop count, in which yolo_dysample's thop
  rule (``ultralytics_adapter.count_dysample_multiply_adds``) counts, per DySample layer, 2 FLOPs per
  multiply-add of its offset/scope projection and 8 FLOPs (4 multiply-adds: four neighbours, one weight
  each) per sampled output value; :func:`dysample_flops` applies the same rule to each layer's input to
  show DySample's share;
- PyTorch CPU latency, batch 1 at 640, fused (Conv+BN) eval model under ``torch.no_grad``; DySample
  samples with its compiled CPU kernel (``yolo_dysample/cpu_sampling.py``), and the same models are
  also timed, in the same rounds, with the kernel switched off (``YOLO_DYSAMPLE_CPU_KERNEL=0``:
  ``F.grid_sample``);
- ONNX Runtime CPU latency of the same fused model exported with ``torch.onnx.export`` (opset 17),
  DySample once as ONNX ``GridSample`` and once as the export-safe ``gather`` sampler, graph
  optimisations on, the same thread count;
- training-step time and peak memory: forward, Ultralytics' detection loss on synthetic boxes,
  backward and an SGD step, batch ``--train-batch`` at ``--train-imgsz``; peak memory is peak RSS
  above the resident size before the step, in a child process (see ``bench_common``).

Writes ``models.md`` and ``models.json`` to ``--output-dir`` (default ``docs/benchmarks``; ``--quick``:
a temp dir) and prints the machine and versions. Default run: about 9 minutes with ``--threads 1`` on
a 2-core CPU; ``--quick`` (YOLOv8n stock vs LP only, training at 320): about
1 minute.

Usage:
    python -m yolo_dysample.tools.bench_models [--quick] [--threads N] [--models yolov8n yolo11n] [--skip-memory]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from yolo_dysample import register_with_ultralytics
from yolo_dysample.cpu_sampling import kernel_applies
from yolo_dysample.export_policy import dysample_layers
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
from yolo_dysample.ultralytics_adapter import dysample_multiply_adds

MODELS = ("yolov8n", "yolov8s", "yolo11n")
VARIANTS = {  # variant -> suffix of the bundled YAML name ("" for the stock model)
    "stock": "",
    "dysample-lp": "-dysample",
    "dysample-lp+": "-dysample-plus",
    "dysample-pl": "-dysample-s",
    "dysample-pl+": "-dysample-s-plus",
}
EXPECTED_CONFIGURATION = {  # variant -> (style, dyscope) every DySample layer of the model must have
    "dysample-lp": ("lp", False),
    "dysample-lp+": ("lp", True),
    "dysample-pl": ("pl", False),
    "dysample-pl+": ("pl", True),
}
IMGSZ = 640
ONNX_OPSET = 17
END_TO_END_TARGET = ("yolov8n", "dysample-lp", 1.02)  # target: YOLOv8n-dysample <= 1.02x stock
KERNEL_OFF = " (grid_sample)"  # PyTorch latency key suffix: the same model with YOLO_DYSAMPLE_CPU_KERNEL=0

REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout: docs/ and git history


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults of a full or a ``--quick`` run filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="YOLOv8n stock vs LP only, training at 320")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime threads")
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS)
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds (15; quick 5)")
    parser.add_argument("--train-rounds", type=int, default=None, help="training-step rounds (3; quick 2)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (4; quick 2)")
    parser.add_argument("--train-imgsz", type=int, default=None, help="training image size (640; quick 320)")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: docs/benchmarks (quick: a temp dir)")
    parser.add_argument(
        "--system-allocator", action="store_true", help="time with glibc's default malloc settings (see bench_common)"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-cases", default="[]", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    defaults = {
        "models": ["yolov8n"] if quick else list(MODELS),
        "rounds": 5 if quick else 15,
        "train_rounds": 2 if quick else 3,
        "train_batch": 2 if quick else 4,
        "train_imgsz": 320 if quick else IMGSZ,
        "output_dir": Path(tempfile.gettempdir()) / "yolo-dysample-bench"
        if quick
        else REPOSITORY / "docs" / "benchmarks",
    }
    for key, value in defaults.items():
        if getattr(arguments, key) is None:
            setattr(arguments, key, value)
    arguments.variants = ["stock", "dysample-lp"] if quick else list(VARIANTS)
    return arguments


def build_model(model: str, variant: str):
    """The detection model ``model`` + variant suffix, built from its YAML dict (random weights)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    register_with_ultralytics()
    torch.manual_seed(0)
    yaml_dict = yaml_model_load(f"{model}{VARIANTS[variant]}.yaml")
    detection_model = DetectionModel(yaml_dict, verbose=False)
    detection_model.args = get_cfg()  # loss gains (box, cls, dfl) for the training step
    layers = dysample_layers(detection_model)
    upsamples = [module for module in detection_model.modules() if isinstance(module, nn.Upsample)]
    if variant == "stock":
        if layers or not upsamples:
            raise RuntimeError(f"{model}: the stock model should have nn.Upsample and no DySample")
    elif not layers or upsamples or {(m.style, m.dyscope) for m in layers} != {EXPECTED_CONFIGURATION[variant]}:
        raise RuntimeError(f"{model}-{variant}: the built model does not hold the expected DySample layers")
    return detection_model


def dysample_flops(model: nn.Module, imgsz: int) -> int:
    """DySample's FLOPs in ``model`` at ``imgsz``, batch 1: the thop rule on each layer's input, 2 per multiply-add."""
    inputs = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0].shape)))
        for module in dysample_layers(model)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    for hook in hooks:
        hook.remove()
    return sum(2 * dysample_multiply_adds(module, tuple(shape)) for module, shape in inputs)


def static_numbers(model: nn.Module) -> dict[str, float]:
    """Parameters and GFLOPs at 640 (thop, DySample counted by its rule) and DySample's share."""
    from ultralytics.utils.torch_utils import get_flops

    thop_gflops = get_flops(model, IMGSZ)
    return {
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "thop_gflops": thop_gflops,
        "dysample_gflops": dysample_flops(model, IMGSZ) / 1e9,
        "gflops": thop_gflops,  # DySample included, through yolo_dysample's thop rule
    }


def inference_model(model: nn.Module) -> nn.Module:
    """A fused eval copy, as ``YOLO.predict`` runs it."""
    return copy.deepcopy(model).fuse(verbose=False).eval()


def onnx_session(model: nn.Module, threads: int, sampler: str = "grid_sample"):
    """An ONNX Runtime CPU session of ``model`` (fused, Detect in export mode, DySample with ``sampler``)."""
    import onnxruntime
    from ultralytics.nn.modules import Detect

    from yolo_dysample.export_policy import use_sampler

    exported = inference_model(model)
    for module in exported.modules():
        if isinstance(module, Detect):
            module.export, module.format = True, "onnx"
    buffer = io.BytesIO()
    with torch.no_grad(), use_sampler(exported, sampler):
        torch.onnx.export(
            exported,
            torch.zeros(1, 3, IMGSZ, IMGSZ),
            buffer,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["output0"],
            dynamo=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def synthetic_batch(batch_size: int, imgsz: int, boxes_per_image: int = 8) -> dict[str, torch.Tensor]:
    """Random images and ``boxes_per_image`` random boxes (normalised xywh) per image."""
    generator = torch.Generator().manual_seed(0)
    count = batch_size * boxes_per_image
    centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
    return {
        "img": torch.rand(batch_size, 3, imgsz, imgsz, generator=generator),
        "batch_idx": torch.arange(batch_size).repeat_interleave(boxes_per_image).float(),
        "cls": torch.randint(0, 80, (count, 1), generator=generator).float(),
        "bboxes": torch.cat((centres, sizes), 1),
    }


class TrainingStep:
    """Forward, detection loss, backward and an SGD step of one model on one fixed batch."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model, self.batch = model.train(), batch
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def __call__(self) -> None:
        """One training step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.model.loss(self.batch)
        loss.sum().backward()
        self.optimizer.step()


def memory_child(arguments: argparse.Namespace) -> None:
    """Child process: peak RSS of one training step of every requested (model, variant)."""
    torch.set_num_threads(arguments.threads)
    results = []
    batch = synthetic_batch(arguments.train_batch, arguments.train_imgsz)
    for model_name, variant in json.loads(arguments.memory_cases):
        step = TrainingStep(build_model(model_name, variant), batch)
        step()  # first step: optimizer state, lazy initialisation
        results.append([model_name, variant, peak_memory_bytes(step, torch.device("cpu"))])
        del step
    print(json.dumps(results))


def with_ratios(samples: dict[str, list[float]], reference: str = "stock") -> dict[str, dict[str, float]]:
    """Median ms per candidate and its median per-round ratio to ``reference``."""
    return {
        name: {"ms": median_ms(values), "ratio": median_ratio(values, samples[reference])}
        for name, values in samples.items()
    }


def measure_family(model_name: str, arguments: argparse.Namespace, device: torch.device) -> dict:
    """Every number for one model and its variants."""
    models = {variant: build_model(model_name, variant) for variant in arguments.variants}
    family: dict = {"static": {variant: static_numbers(model) for variant, model in models.items()}}
    images = torch.rand(1, 3, IMGSZ, IMGSZ)

    fused = {variant: inference_model(model) for variant, model in models.items()}

    def pytorch_call(model):
        def call():
            with torch.no_grad():
                model(images)

        return call

    candidates = {variant: pytorch_call(model) for variant, model in fused.items()}
    if kernel_applies(images):  # the kernel's end-to-end gain: the same fused models on the grid_sample path
        candidates.update(
            {
                f"{variant}{KERNEL_OFF}": without_cpu_kernel(pytorch_call(model))
                for variant, model in fused.items()
                if variant != "stock"
            }
        )
    samples = interleaved_latency(candidates, device, arguments.rounds, 0.2)
    family["pytorch_latency"] = with_ratios(samples)
    del fused
    print(f"  {model_name}: PyTorch latency done", flush=True)

    if not arguments.skip_onnx:
        sessions = {variant: onnx_session(model, arguments.threads) for variant, model in models.items()}
        sessions.update(  # the export-safe sampler (index arithmetic + Gather) instead of ONNX GridSample
            {
                f"{variant} (gather)": onnx_session(model, arguments.threads, "gather")
                for variant, model in models.items()
                if variant != "stock"
            }
        )
        feed = {"images": images.numpy()}
        samples = interleaved_latency(
            {variant: (lambda s: lambda: s.run(None, feed))(session) for variant, session in sessions.items()},
            device,
            arguments.rounds,
            0.2,
        )
        family["onnxruntime_latency"] = with_ratios(samples)
        del sessions
        print(f"  {model_name}: ONNX Runtime latency done", flush=True)

    batch = synthetic_batch(arguments.train_batch, arguments.train_imgsz)
    steps = {variant: TrainingStep(model, batch) for variant, model in models.items()}
    samples = interleaved_latency(steps, device, arguments.train_rounds, 0.0, warmup=1)
    family["train_step"] = with_ratios(samples)
    print(f"  {model_name}: training step done", flush=True)
    return family


def results_table(results: dict, memory: dict | None, arguments: argparse.Namespace) -> list[str]:
    """The Markdown lines of ``models.md``."""
    header = "| Model | Params | GFLOPs (of which DySample) | PyTorch (ms) | × stock |"
    rule = "|---|---:|---:|---:|---:|"
    kernel_off = any(name.endswith(KERNEL_OFF) for family in results.values() for name in family["pytorch_latency"])
    if kernel_off:
        header += " PyTorch, kernel off (ms) | × stock |"
        rule += "---:|---:|"
    if not arguments.skip_onnx:
        header += " ONNX Runtime (ms) | × stock | ORT, gather sampler (ms) | × stock |"
        rule += "---:|---:|---:|---:|"
    header += " Train step (s) | × stock |"
    rule += "---:|---:|"
    if memory:
        header += " Train peak (MiB) | × stock |"
        rule += "---:|---:|"
    lines = [header, rule]
    for model_name, family in results.items():
        for variant in arguments.variants:
            static = family["static"][variant]
            torch_latency = family["pytorch_latency"][variant]
            label = model_name if variant == "stock" else f"{model_name}-{variant}"
            row = (
                f"| {label} | {static['parameters']:,} | {static['gflops']:.2f} ({static['dysample_gflops']:.3f})"
                f" | {torch_latency['ms']:.1f} | {format_ratio(torch_latency['ratio'])} |"
            )
            if kernel_off:
                off = family["pytorch_latency"].get(f"{variant}{KERNEL_OFF}")
                row += f" {off['ms']:.1f} | {format_ratio(off['ratio'])} |" if off else " | |"
            if not arguments.skip_onnx:
                ort_latency = family["onnxruntime_latency"][variant]
                row += f" {ort_latency['ms']:.1f} | {format_ratio(ort_latency['ratio'])} |"
                gather = family["onnxruntime_latency"].get(f"{variant} (gather)")
                row += f" {gather['ms']:.1f} | {format_ratio(gather['ratio'])} |" if gather else " | |"
            step = family["train_step"][variant]
            row += f" {step['ms'] / 1e3:.2f} | {format_ratio(step['ratio'])} |"
            if memory:
                peak, stock_peak = memory[model_name][variant], memory[model_name]["stock"]
                row += f" {peak:.0f} | {format_ratio(peak / stock_peak)} |"
            lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> None:
    """Measure every model and variant; write ``models.md`` and ``models.json``."""
    arguments = parse_arguments(argv)
    if arguments.memory_child:
        memory_child(arguments)
        return
    reusing_allocator = not arguments.system_allocator and use_reusing_allocator()
    started = time.time()
    torch.set_num_threads(arguments.threads)
    device = torch.device("cpu")
    machine = machine_summary(device, arguments.threads)
    machine["malloc"] = "freed memory kept (MALLOC_MMAP_MAX_=0)" if reusing_allocator else "system defaults"
    print("Machine and versions:")
    for key, value in machine.items():
        print(f"  {key}: {value}")

    results = {}
    for model_name in arguments.models:
        print(f"\n{model_name}", flush=True)
        results[model_name] = measure_family(model_name, arguments, device)

    memory = None
    if not arguments.skip_memory:
        cases = [[model_name, variant] for model_name in arguments.models for variant in arguments.variants]
        child_arguments = [
            "--threads", str(arguments.threads),
            "--train-batch", str(arguments.train_batch),
            "--train-imgsz", str(arguments.train_imgsz),
            "--memory-cases", json.dumps(cases),
        ]  # fmt: skip
        memory = {model_name: {} for model_name in arguments.models}
        for model_name, variant, peak in run_memory_child(
            "yolo_dysample.tools.bench_models", child_arguments, timeout=1800
        ):
            memory[model_name][variant] = mebibytes(peak)

    table = results_table(results, memory, arguments)
    print()
    for line in table:
        print(line)
    target_model, target_variant, limit = END_TO_END_TARGET
    targets = []
    if target_model in results and target_variant in results[target_model]["pytorch_latency"]:
        engines = {"PyTorch CPU": ("pytorch_latency", target_variant)}
        if f"{target_variant}{KERNEL_OFF}" in results[target_model]["pytorch_latency"]:
            engines["PyTorch CPU, kernel off"] = ("pytorch_latency", f"{target_variant}{KERNEL_OFF}")
        engines["ONNX Runtime CPU"] = ("onnxruntime_latency", target_variant)
        for engine_name, (engine, variant) in engines.items():
            if engine in results[target_model]:
                ratio = results[target_model][engine][variant]["ratio"]
                verdict = "met" if ratio <= limit else f"MISSED by {100 * (ratio / limit - 1):.1f}%"
                targets.append(
                    f"- {target_model}-{target_variant} end to end ({engine_name}, batch 1, {IMGSZ}): "
                    f"{ratio:.3f}x stock (target <= {limit}x): {verdict}"
                )
    for line in targets:
        print(line)

    elapsed = time.time() - started
    command = "python -m yolo_dysample.tools.bench_models" + (" --quick" if arguments.quick else "")
    command += f" --threads {arguments.threads}"
    if arguments.system_allocator:
        command += " --system-allocator"
    machine["load average at end (1/5/15 min)"] = load_average()
    machine["run time"] = f"{elapsed:.0f} s"
    report = [
        "# Model benchmark: stock YOLO vs DySample",
        "",
        f"Generated by `{command}`: latency {arguments.rounds} interleaved rounds, training step "
        f"{arguments.train_rounds} rounds (batch {arguments.train_batch}, {arguments.train_imgsz} px, "
        "Ultralytics detection loss on synthetic boxes, SGD step); medians, ratios are medians of per-round ratios.",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        *table,
        "",
        *targets,
        "",
        f"GFLOPs at {IMGSZ}: Ultralytics' thop count (`model.info()`), DySample included by yolo_dysample's thop",
        "rule: 2 FLOPs per multiply-add of the",
        "offset (and scope) projection as it runs (a `(2*groups*scale^2 [x2 with dynamic scope]) x C` matrix product",
        "per input pixel, also for PL) and 8 FLOPs (4 multiply-adds) per sampled output value of `grid_sample`.",
        "PyTorch: DySample samples with its compiled CPU kernel; kernel off: the same fused models, same rounds,",
        "with `YOLO_DYSAMPLE_CPU_KERNEL=0` (`F.grid_sample`).",
        f"Latency: batch 1, {IMGSZ} x {IMGSZ}, fused model; ONNX: `torch.onnx.export` opset {ONNX_OPSET}, DySample as",
        "ONNX `GridSample` or, in the gather column, as the export-safe sampler (`yolo_dysample/sampling.py`).",
        "Train peak: peak RSS above the resident size before the step (model, optimizer state and batch excluded).",
        "",
    ]
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / "models.md").write_text("\n".join(report))
    raw = {"command": command, "machine": machine, "results": results, "train_peak_mib": memory}
    (arguments.output_dir / "models.json").write_text(json.dumps(raw, indent=1))
    print(f"\nwrote {arguments.output_dir}/models.md, .json in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
