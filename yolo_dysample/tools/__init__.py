"""Developer tools: benchmarks, the export matrix and the GPU check, as importable modules.

Run one with ``python -m yolo_dysample.tools.<name> --help``.
"""
