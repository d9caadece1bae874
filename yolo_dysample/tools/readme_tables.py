"""Generated sections of README.md: each lies between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers.

The variants table's parameter counts are measured on the models themselves (twin minus stock), so they follow any
change of DySample's layers. ``python -m yolo_dysample.tools.readme_tables`` (in the checkout) rewrites the sections
of ./README.md; ``--check`` exits 1 if it differs from a fresh generation (a test checks it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["SECTIONS", "replace_section", "variants_table", "write_sections"]

BASE_MODELS = ("yolov8n", "yolo11n", "yolo26n")  # one per family with all four variants bundled, at scale n
PAPER_ORDER = ("-dysample", "-dysample-plus", "-dysample-s", "-dysample-s-plus")


def _parameters(yaml_name: str) -> int:
    from ultralytics import YOLO

    import yolo_dysample  # noqa: F401 - registers DySample with ultralytics

    return sum(parameter.numel() for parameter in YOLO(yaml_name).model.parameters())


def variants_table() -> str:
    """Markdown table of the paper's four variants with the parameters each adds to the base models."""
    from yolo_dysample.twins import VARIANTS

    by_suffix = {variant.suffix: variant for variant in VARIANTS}
    stock = {base: _parameters(f"{base}.yaml") for base in BASE_MODELS}
    lines = [
        f"| suffix | paper name | offsets from | scope | parameters added ({' / '.join(BASE_MODELS)}) |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for suffix in PAPER_ORDER:
        variant = by_suffix[suffix]
        added = [_parameters(f"{base}{suffix}.yaml") - stock[base] for base in BASE_MODELS]
        offsets = "the input (LP)" if variant.style == "lp" else "the pixel-shuffled input (PL)"
        scope = "dynamic" if variant.dyscope else "static"
        name = variant.paper_name.split(" (")[0]
        counts = " / ".join(f"{count:,}" for count in added)
        lines.append(f"| `{suffix}` | {name} | {offsets} | {scope} | {counts} |")
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[], str]] = {"variants": variants_table}


def replace_section(text: str, name: str, body: str) -> str:
    """Return ``text`` with the lines between the ``name`` markers replaced by ``body``.

    Raises:
        ValueError: The markers are missing or not in order.
    """
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n)(.*?)(<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' markers")
    return pattern.sub(lambda match: match[1] + body.rstrip("\n") + "\n" + match[3], text, count=1)


def write_sections(readme: Path, check: bool = False, sections: Mapping[str, Callable[[], str]] = SECTIONS) -> bool:
    """Regenerate ``sections`` (default: the README's) of ``readme``; with ``check``, only compare.

    Returns True if it was up to date.
    """
    text = readme.read_text(encoding="utf-8")
    fresh = text
    for name, render in sections.items():
        fresh = replace_section(fresh, name, render())
    if fresh != text and not check:
        temporary = readme.with_suffix(".md.tmp")
        temporary.write_text(fresh, encoding="utf-8")
        os.replace(temporary, readme)
    return fresh == text


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m yolo_dysample.tools.readme_tables", description=__doc__)
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="default: ./README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date; write nothing")
    args = parser.parse_args(argv)
    up_to_date = write_sections(args.readme, check=args.check)
    if args.check and not up_to_date:
        print(f"{args.readme} is out of date: run python -m yolo_dysample.tools.readme_tables", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
