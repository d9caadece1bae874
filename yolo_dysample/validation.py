"""Argument validation shared by the package: errors name the argument and say what it must be."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = ["as_whole_number", "configuration_error"]


def as_whole_number(name: str, value: Any, minimum: int, maximum: int | None = None, whole_floats: bool = False) -> int:
    """Return ``value`` as an ``int`` if it is a whole number in ``[minimum, maximum]``.

    Integer types (``int``, numpy integers, anything with ``__index__``) are accepted, ``bool`` is not, and floats
    only with ``whole_floats``: ``2.0`` may be a typo for ``2.5`` as easily as for ``2``.

    Args:
        name (str): The argument's name, as the caller spells it.
        value (Any): The value to check.
        minimum (int): The smallest allowed value.
        maximum (int, optional): The largest allowed value; ``None`` for no bound.
        whole_floats (bool): Also accept finite floats with no fractional part (``16.0``), as layers built
            from arithmetic on channel counts receive them.

    Returns:
        (int): ``value`` as a plain ``int``.

    Raises:
        ValueError: ``value`` is not a whole number, or lies outside the range; the message names ``name``.

    Examples:
        >>> as_whole_number("groups", 4, 1)
        4
    """
    whole = None
    if not isinstance(value, bool):
        try:
            whole = operator.index(value)
        except TypeError:
            whole = None
        if whole is None and whole_floats and isinstance(value, numbers.Real) and math.isfinite(value):
            whole = int(value) if float(value) == int(value) else None
    if whole is None or whole < minimum or (maximum is not None and whole > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value!r} must be a whole number {bound}")
    return whole


def configuration_error(style: str, in_channels: int, scale: int, groups: int) -> str | None:
    """Why ``groups`` cannot split the channels of this configuration, or ``None`` if it can.

    The rule: LP needs ``groups`` to divide ``in_channels``; PL, which pixel-shuffles first, needs ``scale**2`` to
    divide ``in_channels`` and ``groups`` to divide ``in_channels / scale**2``.

    Examples:
        >>> configuration_error("pl", 64, 2, 4) is None
        True
        >>> configuration_error("lp", 64, 2, 3)
        'groups=3 must divide in_channels=64'
    """
    if in_channels % groups:
        return f"groups={groups} must divide in_channels={in_channels}"
    sub_pixels = scale * scale
    if style == "pl" and in_channels % sub_pixels:
        return f"style='pl' needs in_channels={in_channels} divisible by scale**2={sub_pixels}"
    if style == "pl" and (in_channels // sub_pixels) % groups:
        return f"style='pl' needs groups={groups} to divide in_channels / scale**2 = {in_channels // sub_pixels}"
    return None
