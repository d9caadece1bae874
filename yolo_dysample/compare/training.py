"""One run of a comparison, inside its own subprocess: train, check, evaluate on the test split, measure."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from yolo_dysample.compare.runner import RUN_DONE_FILE, read_results_csv

__all__ = ["run_single_training"]

EXIT_ORPHANED = 3
PARENT_POLL_SECONDS = 1.0


def _exit_when_orphaned(parent_pid: int, poll_seconds: float = PARENT_POLL_SECONDS) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent (the portable twin of PDEATHSIG)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(EXIT_ORPHANED)  # no cleanup: the run is unfinished and will be restarted from scratch
            time.sleep(poll_seconds)

    threading.Thread(target=watch, name="compare-parent-watch", daemon=True).start()


def check_epochs(rows: list[dict[str, float]], epochs: int, results_csv: Path) -> None:
    """Require results.csv to hold epochs 1..N exactly once each, in order, with N <= ``epochs``.

    Raises:
        RuntimeError: The rows are not one training's (e.g. two trainings wrote into the same folder).

    """
    found = [int(row.get("epoch", -1)) for row in rows]
    if not found or found != list(range(1, len(found) + 1)) or len(found) > epochs:
        shown = found if len(found) <= 12 else [*found[:6], "...", *found[-6:]]
        raise RuntimeError(
            f"{results_csv} holds epochs {shown} for a {epochs}-epoch run, not 1..N once each: the rows are not "
            "one training's"
        )


def _process_usage() -> tuple[float | None, float]:
    """Peak resident memory of this process in MiB (``None`` where unknown) and its CPU seconds, all threads."""
    try:
        import resource
    except ImportError:  # Windows
        times = os.times()
        return None, times.user + times.system
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_rss_mib = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 2**10  # bytes / KiB
    return peak_rss_mib, usage.ru_utime + usage.ru_stime


def _transfer_counter(model: Any, weights: str, transferred: dict[str, int]) -> None:
    """Count, when training starts, the tensors of the model that equal the checkpoint's (the transfer, verified)."""
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    source_model = load_checkpoint(weights)[0]
    source_state = {key: value.float() for key, value in source_model.state_dict().items()}

    def count_transferred_tensors(trainer: Any) -> None:
        from ultralytics.utils.torch_utils import unwrap_model

        target_state = unwrap_model(trainer.model).state_dict()
        transferred["from_weights"] = sum(
            1
            for key, value in target_state.items()
            if key in source_state
            and value.shape == source_state[key].shape
            and torch.equal(value.detach().float().cpu(), source_state[key])
        )
        transferred["total"] = len(target_state)

    model.add_callback("on_pretrain_routine_end", count_transferred_tensors)


def _test_metrics(checkpoint: Path, request: dict, imgsz: int) -> dict[str, float]:
    """Evaluate ``checkpoint`` once on the dataset's test split; keys ``test/<metric>``."""
    from ultralytics import YOLO

    train_args = request["train_args"]
    options = {key: train_args[key] for key in ("batch", "device", "workers") if train_args.get(key) is not None}
    options.update(project=str(checkpoint.parents[1]), name="test", exist_ok=True)  # into the run folder: <run>/test
    metrics = YOLO(checkpoint).val(
        data=request["data"], split="test", imgsz=imgsz, plots=False, verbose=False, **options
    )
    return {
        key.replace("metrics/", "test/", 1): float(value)
        for key, value in metrics.results_dict.items()
        if key.startswith("metrics/")
    }


def run_single_training(request_file: str | Path) -> int:
    """Train, validate and measure one run described by ``request_file``; the subprocess entry point.

    Writes ``compare_run.json`` beside the request when, and only when, everything succeeded.

    Returns:
        (int): The process exit code, 0 on success.

    """
    request = json.loads(Path(request_file).read_text())
    run_directory = Path(request_file).parent.resolve()
    if request.get("parent_pid"):
        _exit_when_orphaned(int(request["parent_pid"]))
    import torch
    from ultralytics import YOLO
    from ultralytics import __version__ as ultralytics_version

    import yolo_dysample

    yolo_dysample.register_with_ultralytics()
    model = YOLO(request.get("model_file") or request["model"])
    transferred: dict[str, int] = {}
    if request["weights"]:
        # pretrained=<path>, not model.load(): the trainer then transfers straight into the model built for the
        # dataset's classes. model.load() would go through the YAML's 80-class model first and lose the class head.
        request["train_args"]["pretrained"] = request["weights"]
        _transfer_counter(model, request["weights"], transferred)

    train_start = time.perf_counter()
    metrics = model.train(data=request["data"], **request["train_args"])
    train_wall_seconds = time.perf_counter() - train_start
    trainer = model.trainer
    if Path(trainer.save_dir).resolve() != run_directory:
        raise RuntimeError(f"ultralytics trained into {trainer.save_dir}, not into the run folder {run_directory}")
    rows = read_results_csv(run_directory / "results.csv")
    check_epochs(rows, int(request["train_args"]["epochs"]), run_directory / "results.csv")
    checkpoint = Path(trainer.best if Path(trainer.best).exists() else trainer.last)
    imgsz = int(trainer.args.imgsz)  # as trained (ultralytics rounds it to the stride)

    network = YOLO(checkpoint).model.float().fuse().eval()
    _layers, parameters, _gradients, gflops = network.info(verbose=True, imgsz=imgsz)
    test_metrics = _test_metrics(checkpoint, request, imgsz) if request.get("test_split") else {}
    peak_rss_mib, cpu_seconds = _process_usage()
    device = trainer.device
    record = {
        "settings": request["settings"],
        "variant": request["variant"],
        "seed": request["seed"],
        "model": request["model"],
        "metrics": {key: float(value) for key, value in metrics.results_dict.items() if key != "fitness"},
        "test_metrics": test_metrics,
        "epochs_completed": len(rows),
        "imgsz": imgsz,
        "train_seconds": rows[-1]["time"] if rows and "time" in rows[-1] else train_wall_seconds,
        "train_call_seconds": train_wall_seconds,  # model.train() as a whole: setup and final validation too
        "cpu_seconds": cpu_seconds,  # the whole process, all threads: the load-independent twin of wall time
        "parameters": int(parameters),
        "gflops": float(gflops),
        "device": str(device),
        "peak_rss_mib": peak_rss_mib,
        "peak_cuda_mib": torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        "weights_transferred": transferred or None,  # {"from_weights": n, "total": m} state-dict tensors
        "checkpoint": str(checkpoint),
        "ultralytics": ultralytics_version,
        "yolo_dysample": yolo_dysample.__version__,
        "torch": torch.__version__,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    temporary = run_directory / (RUN_DONE_FILE + ".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, run_directory / RUN_DONE_FILE)  # atomic: the marker exists only when complete
    return 0
