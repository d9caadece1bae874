"""Generated sections of the docs: text between two marker lines, replaced atomically, the rest left as written."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["replace_section"]


def replace_section(doc: Path, begin: str, end: str, generated: str, heading: str = "") -> None:
    """Put ``generated`` between the lines ``begin`` and ``end`` of ``doc``.

    A doc without the markers gets them appended (after ``heading``, if given); a missing doc is created.
    Written to a temporary file and moved into place, so a reader never sees half a file.

    Raises:
        ValueError: ``doc`` holds only one of the markers.
    """
    text = doc.read_text() if doc.exists() else ""
    if (begin in text) != (end in text):
        raise ValueError(f"{doc} holds only one of the markers {begin!r} ... {end!r}")
    if begin not in text:
        text = (
            text.rstrip("\n") + ("\n\n" if text else "") + (f"{heading}\n\n" if heading else "") + f"{begin}\n{end}\n"
        )
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    temporary = doc.with_name(doc.name + ".tmp")
    temporary.write_text(f"{head}{begin}\n{generated}{end}{tail}")
    os.replace(temporary, doc)
