"""The batch tool's prompts: ``--prompt`` texts and .txt/.csv/.json prompt files, read into validated rows.

Each row holds an ``addon.wire.GenerateRequest`` (one sample); what a row leaves out takes the command line's
defaults, which are the protocol's. A row may give a ``timeline`` instead of a prompt: a timeline file's path
(``START END PROMPT`` per line, relative to the prompts file) or, in JSON, the rows as [[start, end, prompt], ...].
No Blender or torch here.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from addon import wire
from addon.timeline import parse_timeline, timeline_from_json

DEFAULTS = {k: v for k, v in wire.GenerateRequest.defaults().items() if k != "samples"}  # one sample per row
ROW_FIELDS = ("prompt", *DEFAULTS, "name", "timeline")


@dataclass
class Row:
    """One prompt of the batch and what became of it (its record in summary.json); ``error`` is set when it
    cannot be generated (``request`` then holds what could be read)."""

    row: int  # 1-based position in the batch (command-line prompts first, then the file's rows)
    request: wire.GenerateRequest
    name: str = ""  # the Action's name when given (else one made from the prompt)
    stem: str = ""  # the output files' name: the given name, or the prompt's slug and key; unique in the batch
    status: str = "pending"  # done | skipped | failed
    error: str = ""
    frames: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """What determines the motion (one sample per row)."""
        return {k: v for k, v in self.request.to_header().items() if k != "samples"}

    @property
    def key(self) -> str:
        """A stable hash of what determines the motion (resume skips a row whose key is already done)."""
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    def record(self) -> dict[str, Any]:
        """The row's entry in summary.json."""
        return {"row": self.row, "name": self.stem, **self.settings, "key": self.key, "status": self.status,
                "error": self.error, "frames": self.frames, "outputs": self.outputs, "timings": self.timings}


def _number(value: Any, kind: type, name: str) -> float | int:
    """A row value as ``kind`` (int or float); ValueError naming the field otherwise."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
        if kind is int and not number.is_integer():
            raise ValueError
        return kind(number)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _timeline(value: Any, folder: Path) -> tuple:
    """A row's timeline: rows given in JSON, or a timeline file (relative to ``folder``)."""
    if isinstance(value, list):
        return timeline_from_json(value)
    if not isinstance(value, str):
        raise ValueError(f"timeline must be a file name or a list of [start, end, prompt], got {value!r}")
    path = folder / value.strip()
    if not path.is_file():
        raise ValueError(f"timeline file {path} does not exist")
    return parse_timeline(path.read_text(encoding="utf-8-sig"))


def make_row(index: int, values: dict[str, Any], defaults: argparse.Namespace, limits: wire.Limits,
             folder: Path = Path()) -> Row:
    """A Row from one record (missing or empty fields take the defaults); problems go into ``row.error``."""
    row = Row(index, wire.GenerateRequest("", **{name: getattr(defaults, name) for name in DEFAULTS}))
    try:
        if None in values:  # csv.DictReader's key for the values beyond the header's columns
            raise ValueError(f"the row has {len(values[None])} more value(s) than the header has columns (quote a "
                             "prompt that contains commas)")  # fmt: skip
        unknown = sorted(set(values) - set(ROW_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}")
        prompt = values.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {prompt!r}")
        row.name = str(values.get("name") or "").strip()
        given = {k: _number(values[k], type(v), k) for k, v in DEFAULTS.items() if values.get(k) not in (None, "")}
        if values.get("timeline") not in (None, ""):
            given["timeline"] = _timeline(values["timeline"], folder)
        row.request = replace(row.request, prompt=prompt.strip(), **given).check(limits)
    except ValueError as exc:
        row.error = str(exc)
    return row


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Records of a .txt, .csv or .json prompts file; raises ValueError when the file itself is unusable."""
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = (line.strip() for line in text.splitlines())
        return [{"prompt": line} for line in lines if line and not line.startswith("#")]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "prompt" not in columns and "timeline" not in columns:
            raise ValueError(f"{path}: the first row must name the columns, one of them 'prompt' (or 'timeline'); "
                             f"got {columns}")
        unknown = sorted(set(columns) - set(ROW_FIELDS))
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}")
        return [{c: (v or "") for c, v in zip([*columns, None], record.values())} for record in reader]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of prompts (strings or objects with a 'prompt')")
        return [{"prompt": item} if not isinstance(item, dict) else item for item in data]
    raise ValueError(f"{path}: prompts files must be .txt, .csv or .json")


def load_rows(args: argparse.Namespace, limits: wire.Limits = wire.DEFAULT_LIMITS) -> list[Row]:
    """Every prompt of the batch, validated, each with a unique file-safe stem."""
    records = [{"prompt": p} for p in args.prompt or []]
    if args.prompts:
        records += read_prompt_file(Path(args.prompts))
    if not records:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    folder = Path(args.prompts).parent if args.prompts else Path()
    rows = [make_row(i, record, args, limits, folder) for i, record in enumerate(records, 1)]
    keys: dict[str, int] = {}
    stems: dict[str, int] = {}
    for row in rows:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", row.request.title).strip("_")[:40].strip("_").lower() or "motion"
        row.stem = re.sub(r"[^\w.\-]+", "_", row.name).strip("._") or f"{slug}-{row.key[:8]}"
        if row.error:
            row.status = "failed"
        elif row.key in keys:
            row.status, row.error = "failed", f"same prompt and settings as row {keys[row.key]}"
        elif row.stem in stems:
            row.status, row.error = "failed", f"name {row.stem!r} is already used by row {stems[row.stem]}"
        else:
            keys[row.key], stems[row.stem] = row.row, row.row
    return rows
