"""A diverged DySample model survives to ultralytics' NaN recovery, as the stock model does.

Ultralytics checks the loss at the end of every epoch; a NaN/Inf loss reloads ``last.pt`` and redoes the epoch.
That only helps if the process lives through the NaN pass: PyTorch's CPU ``grid_sampler_2d_backward`` with border
padding crashes (SIGSEGV) on a NaN sampling coordinate, and a diverged DySample hands it one unless the sampling
points are made finite first (``sampling.sampling_grid``).
"""

from __future__ import annotations

import pytest

DIVERGE_AND_RECOVER = """
import sys

import torch
from ultralytics import YOLO

from yolo_dysample import DySample

data, project = sys.argv[1:3]
poisoned = []


def diverge(trainer):
    # the second epoch starts from NaN weights in the first conv and in every DySample's offset conv, as after a
    # diverged step: every feature map, every offset and the loss are NaN
    if trainer.epoch == 1 and not poisoned:
        model = trainer.model
        layers = [layer for layer in model.modules() if isinstance(layer, DySample)]
        with torch.no_grad():
            model.model[0].conv.weight.fill_(float("nan"))
            for layer in layers:
                layer.offset.weight.fill_(float("nan"))
        poisoned.append(len(layers))


model = YOLO("yolov8n-dysample-plus.yaml")
model.add_callback("on_train_epoch_start", diverge)
model.train(
    data=data, epochs=3, imgsz=64, batch=8, workers=0, device="cpu", plots=False, project=project, name="run",
    exist_ok=True,
)
print("poisoned DySample layers:", poisoned)
print("finite after recovery:", all(torch.isfinite(p).all().item() for p in model.model.parameters()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["1", "0"], ids=["cpu-kernel", "grid-sample"])
def test_a_dysample_model_trained_into_nan_loss_is_recovered_by_ultralytics(
    run_python, tiny_shapes_dataset, tmp_path, kernel
):
    result = run_python(
        DIVERGE_AND_RECOVER,
        tiny_shapes_dataset,
        tmp_path / "runs",
        cwd=tmp_path,
        env={"YOLO_DYSAMPLE_CPU_KERNEL": kernel},
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}\n{output[-4000:]}"  # a crash in backward: 139 (SIGSEGV)
    assert "poisoned DySample layers: [2]" in result.stdout
    assert "Loss NaN/Inf detected (attempt 1/3), recovering from last.pt" in output
    assert "finite after recovery: True" in result.stdout
