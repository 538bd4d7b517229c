"""A prompt timeline: rows (start, end, prompt) in seconds that direct one continuous motion.

    0 4 a person walks forward
    4 7 the person waves with the right hand
    7 12 a person runs away

One row per line in files (``#`` starts a comment; blank lines are skipped). Rows may overlap: over an overlap
the motion blends the rows' prompts (two actions at once, or a longer transition). Every instant from 0 to the
last row's end must be covered by some row, and rows are listed in start order. Standard library only (the
add-on, the batch tool and the backend share it); errors are ``WireError``s naming the row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .wire import DEFAULT_LIMITS, Limits, WireError, check_prompt


@dataclass(frozen=True)
class TimelineRow:
    """One row: ``prompt`` from ``start`` to ``end`` seconds."""

    start: float
    end: float
    prompt: str

    def to_json(self) -> list:
        """The row on the wire: [start, end, prompt]."""
        return [self.start, self.end, self.prompt]


def parse_timeline(text: str) -> tuple[TimelineRow, ...]:
    """Rows from the text format (``START END PROMPT`` per line); WireError naming the line of a bad one."""
    if not isinstance(text, str):
        raise WireError(f"a timeline is text, got {type(text).__name__}")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            raise WireError(f"timeline line {number}: expected 'START END PROMPT', got {line[:60]!r}")
        try:
            start, end = float(parts[0]), float(parts[1])
        except ValueError:
            raise WireError(f"timeline line {number}: START and END are seconds, got {parts[0]!r} {parts[1]!r}") \
                from None
        rows.append(TimelineRow(start, end, parts[2].strip()))
    if not rows:
        raise WireError("the timeline has no rows")
    return tuple(rows)


def timeline_from_json(value: object) -> tuple[TimelineRow, ...]:
    """Rows from the wire's ``timeline`` field: a list of [start, end, prompt]; WireError naming a bad row."""
    if not isinstance(value, list) or not value:
        raise WireError("'timeline' must be a non-empty list of [start, end, prompt] rows")
    rows = []
    for k, row in enumerate(value, start=1):
        ok = (isinstance(row, list) and len(row) == 3 and all(_is_number(x) for x in row[:2])
              and isinstance(row[2], str))
        if not ok:
            raise WireError(f"timeline row {k}: expected [start, end, prompt] (two numbers and a text), "
                            f"got {str(row)[:60]}")
        rows.append(TimelineRow(float(row[0]), float(row[1]), row[2]))
    return tuple(rows)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_timeline(rows: Sequence[TimelineRow] | Iterable[TimelineRow],
                   limits: Limits = DEFAULT_LIMITS) -> tuple[TimelineRow, ...]:
    """The rows, checked: at most ``max_timeline_rows``, each a finite interval of at least ``min_seconds`` with a
    prompt, in start order, the first from 0, no gap, the end within ``max_timeline_seconds``. WireError names
    the first bad row (1-based, as in a file without comments)."""
    rows = tuple(rows)
    if not rows:
        raise WireError("the timeline has no rows")
    if len(rows) > limits.max_timeline_rows:
        raise WireError(f"the timeline has {len(rows)} rows; the limit is {limits.max_timeline_rows}")
    covered = 0.0
    for k, row in enumerate(rows, start=1):
        if not isinstance(row, TimelineRow):
            raise WireError(f"timeline row {k} is a {type(row).__name__}, not a TimelineRow")
        where = f"timeline row {k} ({row.start:g}-{row.end:g} s)"
        if not (math.isfinite(row.start) and math.isfinite(row.end)):
            raise WireError(f"timeline row {k}: start and end must be finite seconds")
        if row.start < 0:
            raise WireError(f"{where}: starts before 0")
        if row.end - row.start < limits.min_seconds:
            raise WireError(f"{where}: lasts {row.end - row.start:g} s; each row needs at least "
                            f"{limits.min_seconds:g} s")
        check_prompt(row.prompt, limits, f"{where}: the prompt")
        if k > 1 and row.start < rows[k - 2].start:
            raise WireError(f"{where}: starts before row {k - 1}; list rows in start order")
        if row.start > covered + 1e-9:
            raise WireError(f"{where}: leaves {covered:g}-{row.start:g} s with no prompt (a gap)")
        covered = max(covered, row.end)
    if covered > limits.max_timeline_seconds:
        raise WireError(f"the timeline ends at {covered:g} s; the limit is {limits.max_timeline_seconds:g} s")
    return rows


def timeline_seconds(rows: Sequence[TimelineRow]) -> float:
    """The timeline's length: its last end."""
    return max(row.end for row in rows)


def format_timeline(rows: Sequence[TimelineRow]) -> str:
    """The rows in the text format (``parse_timeline`` reads it back)."""
    return "".join(f"{row.start:g} {row.end:g} {row.prompt}\n" for row in rows)


def rows_from_durations(items: Iterable[tuple[str, float]]) -> tuple[TimelineRow, ...]:
    """Back-to-back rows from (prompt, seconds) pairs in order (the panel's list): each starts where the last
    ended."""
    rows, start = [], 0.0
    for prompt, seconds in items:
        rows.append(TimelineRow(round(start, 6), round(start + float(seconds), 6), prompt))
        start += float(seconds)
    return tuple(rows)
