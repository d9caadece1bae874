"""yolo-dysample: DySample (ICCV 2023), the learned point-sampling upsampler, for Ultralytics YOLO."""

from yolo_dysample.dysample import DySample

__all__ = ["DySample", "__version__"]
__version__ = "0.1.0"
