"""Export a DySample YOLO model to every Ultralytics format and check each against PyTorch.

For every case the matrix exports a YOLOv8n whose two upsamplers are DySample (one LP with dynamic
scope, one PL with static scope, offsets perturbed far from zero so the sampling is real, BatchNorm
calibrated so the output depends on it), loads the result through ultralytics' AutoBackend (what
``yolo predict`` / ``yolo val`` use), runs it on letterboxed ``bus.jpg`` / ``zidane.jpg`` and reports
the max and mean |difference| of the raw outputs from the PyTorch checkpoint (boxes as fractions of
the image) against the case's tolerance, the median latency, and the toolchain versions. Each case
runs in its own subprocess once per sampler, so the table also shows where one sampler is the
problem. ``python -m yolo_dysample.tools.export_matrix --help`` runs it and writes
``docs/export_matrix.md``.

Files: ``cases`` (the rows), ``checkpoint`` (the model), ``checks`` (export, compare, broken samplers),
``cost`` (what each sampler costs), ``report`` (the Markdown), ``__main__`` (the command line).
"""

from yolo_dysample.tools.export_matrix.cases import (
    BEGIN_MARKER,
    CASES,
    CASES_BY_NAME,
    DOC,
    END_MARKER,
    FP16_TENSORS_TOLERANCE,
    FULL_PRECISION_TOLERANCE,
    IMAGE_SIZE,
    Case,
)
from yolo_dysample.tools.export_matrix.checkpoint import (
    bring_to_life,
    build_dysample_checkpoint,
    letterboxed_images,
    perturb_offsets,
)
from yolo_dysample.tools.export_matrix.checks import (
    BROKEN_SAMPLERS,
    broken_sampler_study,
    broken_sampling,
    compare_backends,
    export_with_sampler,
    output_differences,
    raw_output,
    reference_backend,
    run_case,
    run_case_in_subprocess,
)

__all__ = [
    "BEGIN_MARKER",
    "BROKEN_SAMPLERS",
    "CASES",
    "CASES_BY_NAME",
    "DOC",
    "END_MARKER",
    "FP16_TENSORS_TOLERANCE",
    "FULL_PRECISION_TOLERANCE",
    "IMAGE_SIZE",
    "Case",
    "bring_to_life",
    "broken_sampler_study",
    "broken_sampling",
    "build_dysample_checkpoint",
    "compare_backends",
    "export_with_sampler",
    "letterboxed_images",
    "output_differences",
    "perturb_offsets",
    "raw_output",
    "reference_backend",
    "run_case",
    "run_case_in_subprocess",
]
