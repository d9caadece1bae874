#!/usr/bin/env bash
# DySample end to end with the stock `yolo` command and no network:
#   install yolo-dysample[onnx] -> train YOLOv8n-DySample on the embedded dysample-shapes dataset (generated locally
#   on first use) -> validate -> predict on the images ultralytics ships -> export to ONNX -> predict with the ONNX file.
# The metrics depend on the torch, ultralytics and numpy releases pip picks and on the CPU: the script ends by printing
# the versions it ran with.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]      (default: ./dysample-demo; works from any directory)
# Environment: PYTHON (default python3); YOLO_DYSAMPLE_SKIP_INSTALL=1 skips the install; EPOCHS (default 10),
# IMGSZ (default 256) and BATCH (default 8) size the training run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
epochs="${EPOCHS:-10}"
imgsz="${IMGSZ:-256}"
batch="${BATCH:-8}"
out="${1:-dysample-demo}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
runs="$out/runs"

# Offline and self-contained: ultralytics' own offline switch (no hub events, no online checks), and a settings folder
# of our own under OUTPUT_DIR, so the user's ~/.config/Ultralytics and datasets folder stay untouched.
export YOLO_OFFLINE=1
export YOLO_CONFIG_DIR="$out/ultralytics-config"

step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }

if [[ "${YOLO_DYSAMPLE_SKIP_INSTALL:-0}" != "1" ]]; then
    step "installing yolo-dysample[onnx] from $repo into $("$python" -c 'import sys; print(sys.prefix)')"
    "$python" -m pip install --quiet --disable-pip-version-check --no-input "$repo[onnx]"
fi
# The `yolo` command of the environment we just installed into (not whichever one PATH finds first).
yolo="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/yolo"
[[ -x "$yolo" ]] || yolo="$(command -v yolo)"
# Settings: datasets and runs under OUTPUT_DIR, no analytics. Fonts: plots and dataset checks look for Arial.ttf in
# the settings folder and otherwise try to download it; matplotlib's DejaVuSans stands in, so nothing waits on that.
paths="$("$python" - "$out" <<'PY'
import shutil, sys
from pathlib import Path

import matplotlib
from ultralytics.utils import ASSETS, SETTINGS, USER_CONFIG_DIR

out = Path(sys.argv[1])
SETTINGS.update(
    datasets_dir=str(out / "datasets"), runs_dir=str(out / "runs"), weights_dir=str(out / "weights"), sync=False
)
font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
for name in ("Arial.ttf", "Arial.Unicode.ttf"):
    if not (USER_CONFIG_DIR / name).exists():
        shutil.copyfile(font, USER_CONFIG_DIR / name)
print(f"assets={ASSETS}\ndatasets_dir={SETTINGS['datasets_dir']}")  # after any 'Creating new settings' lines
PY
)"
assets="$(sed -n 's/^assets=//p' <<<"$paths")"
datasets_dir="$(sed -n 's/^datasets_dir=//p' <<<"$paths")"
weights="$runs/train/weights/best.pt"
common=(imgsz="$imgsz" exist_ok=True project="$runs")

# A short run from scratch, so three defaults change: nbs=batch makes every batch an optimizer step (by default
# gradients accumulate up to 64 images: 3 steps per epoch on 192 images); warmup_epochs=0 (3 warm-up epochs would be
# a third of the run); scale=0.25 (the default 0.5 zooms 3 px objects below the 2 px boxes augmentation keeps).
step "training yolov8n-dysample.yaml on dysample-shapes.yaml for $epochs epochs (the dataset is generated under" \
    "$datasets_dir on first use)"
"$yolo" train model=yolov8n-dysample.yaml data=dysample-shapes.yaml epochs="$epochs" batch="$batch" nbs="$batch" \
    optimizer=AdamW lr0=0.002 warmup_epochs=0 close_mosaic=3 scale=0.25 "${common[@]}" name=train

step "validating $weights"
"$yolo" val model="$weights" data=dysample-shapes.yaml batch="$batch" "${common[@]}" name=val

step "predicting on the images ultralytics ships ($assets) and on 10 validation images of dysample-shapes"
"$yolo" predict model="$weights" source="$assets" "${common[@]}" name=predict-assets
"$yolo" predict model="$weights" source="$datasets_dir/dysample-shapes/images/val/val_000*.png" \
    "${common[@]}" name=predict-shapes

step "exporting to ONNX"
"$yolo" export model="$weights" format=onnx imgsz="$imgsz"

step "predicting with the ONNX file"
"$yolo" predict model="${weights%.pt}.onnx" source="$assets" "${common[@]}" name=predict-onnx

step "done in ${SECONDS}s, with these versions (the metrics depend on them):"
"$python" - <<'PY'
import importlib.metadata as metadata
import os
import platform

names = ("yolo-dysample", "torch", "ultralytics", "numpy", "onnx", "onnxruntime")
print(f"  python {platform.python_version()}, " + ", ".join(f"{name} {metadata.version(name)}" for name in names))
cpu = platform.processor() or platform.machine()
if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as file:
        cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
print(f"  {cpu}, {os.cpu_count()} logical CPUs")
PY
echo "Results under $out:"
cat <<EOF
  training run, metrics and plots   $runs/train   (results.csv, weights/best.pt)
  validation                        $runs/val
  predictions (PyTorch)             $runs/predict-assets, $runs/predict-shapes
  ONNX model                        ${weights%.pt}.onnx
  predictions (ONNX Runtime)        $runs/predict-onnx
  dataset (generated on first use)  $datasets_dir/dysample-shapes
  ultralytics settings and fonts    $YOLO_CONFIG_DIR
EOF
