"""DySample twins of model YAMLs: the same text with every ``nn.Upsample`` row replaced by a ``DySample`` row.

A twin keeps every other character of its source: the ``from`` and repeat fields, the layer count and numbering,
the comments and the ``scales`` block. So the twin of a stock YAML has the stock model's layers under the same
names, and a stock checkpoint transfers all of its tensors; DySample's own parameters are the only new ones.

This module works on text only and knows nothing of Ultralytics. Choosing ``groups`` needs the input channels of
each upsampling row at every width scale, which only Ultralytics' parser knows; the adapter
(:mod:`yolo_dysample.ultralytics_adapter`) measures them and passes them in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from yolo_dysample.validation import configuration_error

__all__ = [
    "GROUP_CHOICES",
    "MARKER_BEGIN",
    "MARKER_END",
    "TWIN_FORMAT",
    "VARIANTS",
    "UpsampleRow",
    "Variant",
    "choose_groups",
    "is_twin_of",
    "probe_text",
    "replace_marked_block",
    "split_twin_name",
    "twin_text",
    "upsample_rows",
    "variant_named",
]

TWIN_FORMAT = 1  # changes whenever twin_text() writes different text for the same input (part of the cache key)
GROUP_CHOICES = (4, 2, 1)  # tried in this order: the paper's default first
MARKER_BEGIN = "<!-- BEGIN families -->"
MARKER_END = "<!-- END families -->"


@dataclass(frozen=True)
class Variant:
    """One of the paper's four DySample variants and the file-name suffix of its twins."""

    suffix: str
    style: str
    dyscope: bool
    paper_name: str


VARIANTS = (  # the longest suffix first, so that a name's suffix is matched whole
    Variant("-dysample-s-plus", "pl", True, "DySample-S+ (PL, dynamic scope)"),
    Variant("-dysample-plus", "lp", True, "DySample+ (LP, dynamic scope)"),
    Variant("-dysample-s", "pl", False, "DySample-S (PL, static scope)"),
    Variant("-dysample", "lp", False, "DySample (LP, static scope)"),
)

_LAYER_ROW = re.compile(r"^\s*-\s*\[")  # one layer row of a backbone or head list
_SECTION = re.compile(r"^(\w+)\s*:")
_UPSAMPLE = re.compile(r"nn\.Upsample\s*,\s*\[(?P<args>[^\]]*)\]")


@dataclass(frozen=True)
class UpsampleRow:
    """An ``nn.Upsample`` layer row: its layer index, its line (0-based) in the text and its scale factor."""

    layer: int
    line: int
    scale: int


def variant_named(name: str) -> Variant:
    """Return the variant called ``name`` (``dysample``, ``dysample-plus``, ``dysample-s``, ``dysample-s-plus``).

    Raises:
        ValueError: ``name`` is none of them.
    """
    wanted = "-" + str(name).strip().lstrip("-").lower()
    for variant in VARIANTS:
        if variant.suffix == wanted:
            return variant
    choices = ", ".join(v.suffix[1:] for v in reversed(VARIANTS))
    raise ValueError(f"variant={name!r} is not a DySample variant; choose one of {choices}")


def split_twin_name(file_name: str) -> tuple[str, Variant] | None:
    """Split a twin's file name into its source's file name and its variant, else ``None``.

    ``yolov8-seg-dysample-plus.yaml`` -> ``("yolov8-seg.yaml", DySample+)``. Only ``.yaml`` / ``.yml`` names.
    """
    for extension in (".yaml", ".yml"):
        if file_name.endswith(extension):
            stem = file_name[: -len(extension)]
            for variant in VARIANTS:
                if stem.endswith(variant.suffix) and len(stem) > len(variant.suffix):
                    return stem[: -len(variant.suffix)] + extension, variant
    return None


def _layer_row_lines(text: str) -> list[int]:
    """0-based line numbers of the layer rows of ``backbone`` and ``head``, in layer order."""
    numbers, section = [], None
    for number, line in enumerate(text.splitlines()):
        key = _SECTION.match(line)
        if key:
            section = key.group(1)
        elif section in ("backbone", "head") and _LAYER_ROW.match(line):
            numbers.append(number)
    return numbers


def upsample_rows(text: str) -> list[UpsampleRow]:
    """Every ``nn.Upsample`` row of a model YAML text.

    Raises:
        ValueError: The layers are not one row per line (so the text could not keep its layout), or an
            ``nn.Upsample`` row has a target size or a fractional scale, which DySample cannot take.
    """
    model = yaml.safe_load(text)
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), list):
        raise ValueError("not a model YAML: it has no 'backbone' list")
    layers = model["backbone"] + (model.get("head") or [])
    numbers = _layer_row_lines(text)
    if len(numbers) != len(layers):
        raise ValueError(f"found {len(numbers)} one-line layer rows, the YAML has {len(layers)} layers")
    lines = text.splitlines()
    rows = []
    for index, (number, layer) in enumerate(zip(numbers, layers, strict=True)):
        match = _UPSAMPLE.search(lines[number])
        if match is None:
            if len(layer) > 2 and layer[2] == "nn.Upsample":
                raise ValueError(f"layer {index}: its nn.Upsample row is not on one line")
            continue
        size, scale, *_ = yaml.safe_load(f"[{match.group('args')}]") + [None, None]  # e.g. [None, 2, "nearest"]
        if size not in (None, "None") or isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
            raise ValueError(f"layer {index}: only nn.Upsample rows [None, <whole scale >= 2>, ...] become DySample")
        rows.append(UpsampleRow(index, number, scale))
    return rows


def _substitute(text: str, rows: Sequence[UpsampleRow], style: str, groups: Mapping[int, int], dyscope: bool) -> str:
    lines = text.splitlines(keepends=True)
    for row in rows:
        replacement = f'DySample, [{row.scale}, "{style}", {groups[row.layer]}, {dyscope}]'
        lines[row.line] = _UPSAMPLE.sub(replacement, lines[row.line], count=1)
    return "".join(lines)


def probe_text(text: str) -> str:
    """``text`` with every ``nn.Upsample`` row replaced by ``DySample`` LP with ``groups=1``, valid at any width.

    Building it shows the input channels each DySample row gets, which :func:`choose_groups` needs.
    """
    rows = upsample_rows(text)
    return _substitute(text, rows, "lp", {row.layer: 1 for row in rows}, False)


def choose_groups(in_channels: Sequence[int], scale: int, style: str, requested: int | None = None) -> int:
    """The first of :data:`GROUP_CHOICES` (or ``requested``) valid for a row's input channels at every width scale.

    LP needs ``in_channels % groups == 0``; PL pixel-shuffles first, so it needs ``in_channels % (groups *
    scale**2) == 0``.

    Raises:
        ValueError: ``requested`` does not divide the channels, or no choice does.
    """
    for groups in (requested,) if requested is not None else GROUP_CHOICES:
        if groups >= 1 and all(configuration_error(style, channels, scale, groups) is None for channels in in_channels):
            return groups
    tried = f"groups={requested}" if requested is not None else f"groups in {GROUP_CHOICES}"
    raise ValueError(f"no {tried} works for style={style!r}, scale={scale} with input channels {list(in_channels)}")


def _header(source: str, variant: Variant, reduced: Mapping[int, int], requested: int | None) -> str:
    lines = [
        f"# DySample twin of {source}, written by yolo-dysample (twin format {TWIN_FORMAT}).",
        f"# Variant: {variant.paper_name}. Each nn.Upsample row is replaced by DySample [scale, style, groups,",
        "# dyscope]; every other line (layers, indices, comments) is the source's, so its weights transfer 1:1.",
    ]
    if requested is not None:
        lines.append(f"# groups={requested} as requested.")
    for layer, groups in sorted(reduced.items()):
        lines.append(
            f"# Layer {layer} uses groups={groups}: groups={GROUP_CHOICES[0]} does not divide its channels at every "
            "scale."
        )
    return "\n".join(lines) + "\n\n"


def twin_text(
    text: str,
    variant: Variant,
    in_channels: Mapping[int, Sequence[int]],
    source: str,
    groups: int | None = None,
) -> str:
    """The DySample twin of the model YAML ``text``: a header comment, then ``text`` with its upsampling rows replaced.

    Args:
        text: The source model YAML.
        variant: Which of :data:`VARIANTS`.
        in_channels: For each ``nn.Upsample`` row's layer index, its input channels at every width scale.
        source: How the header names the source (e.g. ``ultralytics/cfg/models/v8/yolov8.yaml``).
        groups: Offset groups of every row; ``None`` chooses the largest of :data:`GROUP_CHOICES` that divides
            each row's channels at every scale, and the header names the rows that got fewer than the paper's 4.

    Raises:
        ValueError: ``text`` has no ``nn.Upsample`` row, or one :func:`upsample_rows` cannot replace, or
            ``groups`` does not divide a row's channels.
    """
    rows = upsample_rows(text)
    if not rows:
        raise ValueError(f"{source} has no nn.Upsample row to replace")
    chosen = {}
    for row in rows:
        try:
            chosen[row.layer] = choose_groups(in_channels[row.layer], row.scale, variant.style, groups)
        except ValueError as error:
            raise ValueError(f"{source} layer {row.layer}: {error}") from None
    reduced = {layer: g for layer, g in chosen.items() if groups is None and g != GROUP_CHOICES[0]}
    body = _substitute(text, rows, variant.style, chosen, variant.dyscope)
    return _header(source, variant, reduced, groups) + body


def is_twin_of(twin: str, text: str, variant: Variant) -> bool:
    """Whether ``twin`` is a header plus ``text`` with exactly its ``nn.Upsample`` rows turned into ``variant``.

    A text-only check (no groups rule): what a cached twin must pass before it is used.
    """
    header, separator, body = twin.partition("\n\n")
    if not separator or not header.startswith("# DySample twin of "):
        return False
    source_lines, twin_lines = text.splitlines(), body.splitlines()
    if len(source_lines) != len(twin_lines):
        return False
    upsampling = {row.line: row for row in upsample_rows(text)}
    expected_args = re.compile(rf'DySample, \[(\d+), "{variant.style}", (\d+), {variant.dyscope}\]')
    for number, (old, new) in enumerate(zip(source_lines, twin_lines, strict=True)):
        row = upsampling.get(number)
        if row is None:
            if old != new:
                return False
            continue
        match = expected_args.search(new)
        if match is None or int(match.group(1)) != row.scale:
            return False
        if _UPSAMPLE.sub(match.group(0), old, count=1) != new:
            return False
    return True


def replace_marked_block(document: str, block: str) -> str:
    """``document`` with the text between :data:`MARKER_BEGIN` and :data:`MARKER_END` replaced by ``block``.

    Raises:
        ValueError: The markers are missing or out of order.
    """
    start, end = document.find(MARKER_BEGIN), document.find(MARKER_END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {MARKER_BEGIN} ... {MARKER_END} block")
    return document[: start + len(MARKER_BEGIN)] + "\n" + block.strip("\n") + "\n" + document[end:]
