"""What the autoload hook (yolo_dysample_autoload.pth) costs a Python process.

Runs fresh interpreters with the hook on (the default) and off (YOLO_DYSAMPLE_AUTOLOAD=0), alternating, and prints
the median wall time of each kind of process, along with the hook module's own import time from ``-X importtime``.
There are two kinds of process: one that never imports ultralytics (``python -c pass``) and one that does
(``import ultralytics.nn.tasks``; with the hook on, this also imports yolo_dysample and registers DySample).
The package must be installed (``pip install .``): the hook lives in site-packages.

Usage:
    python -m yolo_dysample.tools.benchmark_autoload [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

from yolo_dysample.tools.timing import time_block


def wall_time(code: str, autoload: bool) -> float:
    """Seconds for a fresh ``python -c code`` with the autoload hook on or off."""
    env = dict(os.environ, YOLO_DYSAMPLE_AUTOLOAD="1" if autoload else "0")
    return time_block(lambda: subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True), 1)


def hook_import_us() -> int:
    """Microseconds the hook's import adds at interpreter start (``python -X importtime``)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    )
    match = re.search(r"import time:\s+(\d+) \|\s+(\d+) \|\s+_yolo_dysample_autoload$", result.stderr, re.M)
    if match is None:
        raise SystemExit("_yolo_dysample_autoload is not imported at startup: is yolo-dysample installed?")
    return int(match.group(2))


def main() -> None:
    """Print the start-up cost of the hook, on and off, alternated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="processes per case (default 20)")
    args = parser.parse_args()
    print(f"_yolo_dysample_autoload import at startup: {hook_import_us()} us (python -X importtime)")
    for label, code, runs in (
        ("python -c pass", "pass", args.runs),
        ("import ultralytics.nn.tasks", "import ultralytics.nn.tasks", max(3, args.runs // 4)),
    ):
        on, off = [], []
        for _ in range(runs):  # alternate, so drifting machine load hits both cases alike
            on.append(wall_time(code, autoload=True))
            off.append(wall_time(code, autoload=False))
        median_on, median_off = statistics.median(on), statistics.median(off)
        print(
            f"{label:<30} hook on {median_on * 1e3:8.1f} ms   off {median_off * 1e3:8.1f} ms   "
            f"difference {(median_on - median_off) * 1e3:+7.1f} ms   (median of {runs})"
        )


if __name__ == "__main__":
    main()
