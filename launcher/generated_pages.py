"""The docs' generated parts (the config and CLI references): each lives between two marker lines of a Markdown
page, and `python -m launcher.<generator> [--write FILE]` prints it or replaces it there."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the marker lines `begin` and `end` replaced by `body`."""
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + text[stop:]


def generator_main(argv: list[str], generate: Callable[[], str], begin: str, end: str) -> int:
    """`--write FILE`: the generated part of FILE replaced; no argument: the generated text on stdout."""
    if argv[:1] == ["--write"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(replace_between(path.read_text(), begin, end, generate()))
        return 0
    sys.stdout.write(generate())
    return 0
