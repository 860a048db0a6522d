"""Output shared by the device's command-line tools: aligned text tables, strict JSON and exit statuses."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Exit statuses: usable / done; not usable or some input failed; usage error (argparse's own).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: text left-aligned, numbers right-aligned with 3 decimals, missing values as '-'."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [any(isinstance(row[i], int | float) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """JSON text, with NaN and infinities (e.g. the UAR of no utterances) written as null, as JSON requires."""
    return json.dumps(_strict(value), indent=2)


def fail(err: Exception, folder: str | Path | None = None) -> int:
    """Print an error for people (and how to check the participant folder, if it is the cause); EXIT_FAILED."""
    hint = f"\ncheck the folder with: python -m clients.validate {folder}" if folder is not None else ""
    print(f"error: {err}{hint}", file=sys.stderr)
    return EXIT_FAILED
