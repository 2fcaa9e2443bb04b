"""Terminal output for the CLI and the demo: aligned tables, colour, durations, progress.

Colour is used only when the stream is a terminal (and ``NO_COLOR`` is unset),
so that piping ``pgjournal runs`` into ``grep`` or a file gives plain text.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STYLES = {
    "bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34",
    "magenta": "35", "cyan": "36",
}
STATUS_STYLE = {
    "completed": "green", "running": "cyan", "queued": "blue", "suspended": "magenta",
    "failed": "red", "dead": "red", "cancelled": "yellow",
}


def use_colour(stream: TextIO) -> bool:
    """Colour only for a real terminal, and never when ``NO_COLOR`` is set."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, style: str | None, enabled: bool) -> str:
    if not enabled or not style:
        return text
    codes = ";".join(_STYLES[s] for s in style.split("+"))
    return f"\x1b[{codes}m{text}\x1b[0m"


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def table(rows: Sequence[Sequence[str]], headers: Sequence[str], *, colour: bool = False,
          styles: Sequence[Sequence[str | None]] | None = None,
          right: Sequence[int] = ()) -> str:
    """Rows of cells as aligned columns under a header.

    Cells are padded before they are painted, so colour does not break the
    alignment; ``right`` lists the columns to right-align (numbers).
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(paint(h.ljust(w), "bold", colour) for h, w in zip(headers, widths,
                                                                      strict=True)).rstrip()]
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            padded = cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            style = styles[r][i] if styles is not None else None
            cells.append(paint(padded, style, colour))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def human_seconds(seconds: float | None) -> str:
    """A duration for people: 850ms, 12.3s, 4m05s, 2h03m, 3d04h."""
    if seconds is None:
        return "-"
    s = float(seconds)
    sign = "-" if s < 0 else ""
    s = abs(s)
    if s < 1:
        return f"{sign}{s * 1000:.0f}ms"
    if s < 60:
        return f"{sign}{s:.1f}s"
    if s < 3600:
        return f"{sign}{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{sign}{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{sign}{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def between(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    return human_seconds((end - start).total_seconds())


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    return human_seconds((now - moment).total_seconds()) + " ago"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, require_unit: bool = False) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` (a bare number is seconds, unless
    ``require_unit``: where a wrong guess deletes data, the unit must be said)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 15m, 1h, 2d or 1w")
    if require_unit and not m.group(2):
        raise ValueError(f"{text!r} has no unit; say {text.strip()}d (days), {text.strip()}h "
                         f"(hours), {text.strip()}m (minutes) or {text.strip()}s (seconds)")
    return timedelta(seconds=float(m.group(1)) * _UNIT[(m.group(2) or "s").lower()])


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def to_json(value: Any, *, indent: int | None = 2) -> str:
    """JSON for ``--json`` output: timestamps as ISO 8601, ids as strings."""
    return json.dumps(value, default=_json_default, indent=indent, ensure_ascii=False)


def compact(value: Any, width: int = 60) -> str:
    """A one-line preview of a JSON value."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else to_json(value, indent=None)
    return shorten(text, width)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, else a few plain lines."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", None) and self.stream.isatty())
        self.done = 0
        self._started = time.monotonic()
        self._last_decile = -1

    def _line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        filled = round(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = human_seconds(time.monotonic() - self._started)
        return f"{self.label} [{bar}] {self.done}/{self.total} ({frac:4.0%}) {elapsed}"

    def update(self, done: int) -> None:
        self.done = done
        if self.tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()
            return
        decile = int(10 * done / self.total) if self.total else 10
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()
        elif self._last_decile != 10:
            self._last_decile = 10
            self.stream.write(self._line() + "\n")
            self.stream.flush()
