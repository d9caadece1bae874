"""yolo-dysample: DySample (ICCV 2023), the learned point-sampling upsampler, for Ultralytics YOLO."""

import _yolo_dysample_autoload
from yolo_dysample.dysample import DySample
from yolo_dysample.ultralytics_adapter import register_with_ultralytics

__all__ = ["DySample", "__version__", "register_with_ultralytics"]
__version__ = "0.1.0"

_yolo_dysample_autoload.install()  # register with Ultralytics now if it is loaded, else right after it is imported
