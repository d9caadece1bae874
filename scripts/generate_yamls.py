"""Generate the bundled DySample model YAMLs (cfg/models/) from the installed ultralytics' stock YAMLs.

For every stock YOLOv8 / YOLO11 / YOLO26 model YAML that upsamples with nn.Upsample (ghost, world, rtdetr and yoloe
files excluded) this writes a twin ``<stock stem>-dysample.yaml``. For the base model of every task (the stock files
without -p2 / -p6) it also writes the other three variants of the paper:

    -dysample         LP, static scope   (DySample)
    -dysample-plus    LP, dynamic scope  (DySample+)
    -dysample-s       PL, static scope   (DySample-S)
    -dysample-s-plus  PL, dynamic scope  (DySample-S+)

A twin is the stock file's text with each nn.Upsample row's module and args replaced by
``DySample, [scale, style, groups, dyscope]``. The ``from`` and repeat fields, the layer count and numbering, and the
comments all stay as they are, so stock checkpoints load 1:1. ``groups`` is 4 (the paper's default) unless the
row's input channels at some model scale do not allow it. The script checks this by building every file at every
scale on the meta device and falls back to 2, then 1; the file's header then names the layers affected.

Usage:
    python scripts/generate_yamls.py            # (re)write cfg/models/
    python scripts/generate_yamls.py --check    # exit 1 if cfg/models/ differs from a fresh generation
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO / "cfg" / "models"
FAMILIES = ("v8", "11", "26")  # sub-folders of ultralytics/cfg/models
EXCLUDED_STEM_PARTS = ("ghost", "world", "rtdetr", "yoloe")
SIZE_SUFFIXES = ("-p2", "-p6")  # stock files that are not the base model of their task
GROUP_CHOICES = (4, 2, 1)  # groups to try, paper default first
VARIANTS = {  # file suffix: (style, dyscope, name in the paper)
    "-dysample": ("lp", False, "DySample (LP, static scope)"),
    "-dysample-plus": ("lp", True, "DySample+ (LP, dynamic scope)"),
    "-dysample-s": ("pl", False, "DySample-S (PL, static scope)"),
    "-dysample-s-plus": ("pl", True, "DySample-S+ (PL, dynamic scope)"),
}
ROW = re.compile(r"^\s*-\s*\[")  # one layer row of a backbone/head list
UPSAMPLE = re.compile(r"nn\.Upsample\s*,\s*\[(?P<args>[^\]]*)\]")


def stock_models_dir() -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "cfg" / "models"


def stock_yamls() -> list[Path]:
    """Stock model YAMLs of the three families that contain an nn.Upsample row, in a stable order."""
    found = []
    for family in FAMILIES:
        for path in sorted((stock_models_dir() / family).glob("*.yaml")):
            if any(part in path.stem for part in EXCLUDED_STEM_PARTS):
                continue
            if UPSAMPLE.search(path.read_text(encoding="utf-8")):
                found.append(path)
    return found


def is_base_model(stock_yaml: Path) -> bool:
    return not stock_yaml.stem.endswith(SIZE_SUFFIXES)


def upsample_rows(text: str) -> dict[int, tuple[int, int]]:
    """Map layer index -> (line number, scale factor) for every nn.Upsample row of a model YAML text."""
    model = yaml.safe_load(text)
    lines = text.splitlines()
    row_lines = []
    section = None
    for number, line in enumerate(lines):
        key = re.match(r"^(\w+):", line)
        if key:
            section = key.group(1)
        elif section in ("backbone", "head") and ROW.match(line):
            row_lines.append(number)
    expected = len(model["backbone"]) + len(model["head"])
    if len(row_lines) != expected:
        raise ValueError(f"found {len(row_lines)} one-line layer rows, the YAML has {expected} layers")
    rows = {}
    for index, number in enumerate(row_lines):
        match = UPSAMPLE.search(lines[number])
        if match is None:
            continue
        size, scale, *_ = yaml.safe_load(f"[{match.group('args')}]")  # e.g. [None, 2, "nearest"]
        if size not in (None, "None") or not isinstance(scale, int) or scale < 2:
            raise ValueError(f"layer {index}: only nn.Upsample(None, <whole scale>, ...) rows can become DySample")
        rows[index] = (number, scale)
    return rows


def substitute(text: str, rows: dict[int, tuple[int, int]], style: str, groups: dict[int, int], dyscope: bool) -> str:
    """Replace the module and args of each row in ``rows``; every other character of ``text`` is kept."""
    lines = text.splitlines(keepends=True)
    for index, (number, scale) in rows.items():
        replacement = f'DySample, [{scale}, "{style}", {groups[index]}, {dyscope}]'
        lines[number] = UPSAMPLE.sub(replacement, lines[number], count=1)
    return "".join(lines)


def dysample_input_channels(text: str) -> dict[str, dict[int, int]]:
    """For every scale of the model, map each DySample layer index to its input channels (built on meta)."""
    import torch
    from ultralytics.nn.tasks import parse_model

    from yolo_dysample import DySample  # importing the package registers DySample with the parser

    channels = {}
    for scale in yaml.safe_load(text)["scales"]:
        model = yaml.safe_load(text)
        model["scale"] = scale
        with torch.device("meta"):
            layers, _ = parse_model(model, ch=model.get("channels", 3), verbose=False)
        channels[scale] = {
            module.i: block.in_channels
            for module in layers
            for block in (module if isinstance(module, torch.nn.Sequential) else [module])
            if isinstance(block, DySample)
        }
    return channels


def largest_groups(in_channels: list[int], scale: int, style: str) -> int:
    """Largest of GROUP_CHOICES that divides the offset conv's input at every width scale."""
    for groups in GROUP_CHOICES:
        needed = groups * scale * scale if style == "pl" else groups
        if all(c % needed == 0 for c in in_channels):
            return groups
    raise ValueError(f"no groups in {GROUP_CHOICES} works for style={style!r} with in_channels {in_channels}")


def header(stock_yaml: Path, variant: str, reduced_groups: dict[int, int]) -> str:
    paper_name = VARIANTS[variant][2]
    relative = stock_yaml.relative_to(stock_models_dir().parents[2]).as_posix()  # ultralytics/cfg/models/...
    lines = [
        f"# Generated by scripts/generate_yamls.py from {relative}.",
        f"# Do not edit by hand. Variant: {paper_name}. Each nn.Upsample row is replaced by",
        "# DySample [scale, style, groups, dyscope]; everything else (layers, indices, comments, the stock",
        "# parameter summaries) is the stock file's, so stock weights transfer 1:1.",
    ]
    for index, groups in sorted(reduced_groups.items()):
        lines.append(f"# Layer {index} uses groups={groups}: groups=4 does not divide its channels at every scale.")
    return "\n".join(lines) + "\n\n"


def generate() -> dict[str, str]:
    """Return {path relative to cfg/models: text} for every bundled model YAML."""
    files = {}
    for stock_yaml in stock_yamls():
        text = stock_yaml.read_text(encoding="utf-8")
        rows = upsample_rows(text)
        probe = substitute(text, rows, "lp", dict.fromkeys(rows, 1), False)  # builds at any channel count
        channels = dysample_input_channels(probe)
        variants = VARIANTS if is_base_model(stock_yaml) else ["-dysample"]
        for variant in variants:
            style, dyscope, _ = VARIANTS[variant]
            groups = {
                index: largest_groups([per_scale[index] for per_scale in channels.values()], scale, style)
                for index, (_, scale) in rows.items()
            }
            reduced = {index: g for index, g in groups.items() if g != GROUP_CHOICES[0]}
            body = substitute(text, rows, style, groups, dyscope)
            name = f"{stock_yaml.parent.name}/{stock_yaml.stem}{variant}.yaml"
            files[name] = header(stock_yaml, variant, reduced) + body
    return files


def bundled(directory: Path = OUTPUT_DIR) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(directory.rglob("*.yaml"))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with cfg/models/ instead of writing")
    args = parser.parse_args(argv)
    fresh = generate()
    if args.check:
        current = bundled()
        stale = sorted(set(current) ^ set(fresh)) + sorted(n for n in fresh if n in current and current[n] != fresh[n])
        for name in stale:
            print(f"differs from a fresh generation: cfg/models/{name}")
        return 1 if stale else 0
    for name in set(bundled()) - set(fresh):
        (OUTPUT_DIR / name).unlink()
        print(f"removed cfg/models/{name}")
    for name, text in fresh.items():
        path = OUTPUT_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(fresh)} YAMLs to {OUTPUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's yolo_dysample, installed or not
    sys.exit(main())
