"""Write the generated files: the example twins in yolo_dysample/cfg/models/ and README.md's families table.

Both are derived from the installed ultralytics (the newest tested release). Model YAML names are never looked up
in these files: every twin is derived from the installed stock file on first use.

Usage:
    python scripts/generate_yamls.py            # (re)write them
    python scripts/generate_yamls.py --check    # exit 1 if either differs from a fresh generation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolo_dysample.ultralytics_adapter import update_examples, update_families_table

README = Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = update_examples(check=args.check)
    if not update_families_table(README, check=args.check):
        stale.append("README.md (families table)")
    for name in stale:
        print(f"{'differs from a fresh generation' if args.check else 'rewritten'}: {name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
