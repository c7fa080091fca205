"""Load problems from JSONL / JSON / Parquet files with field mapping.

Fields are dotted paths into a row; integer parts index lists (negative from the end), so
verl's parquet schema maps with ``problem_field="prompt.-1.content"`` and
``answer_field="reward_model.ground_truth"``. A malformed row fails with the file, the line
(JSONL: the line number; Parquet/JSON: the row number) and the field named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tirl.types import Problem, TirlError

_MISSING = object()


def get_field(row: Any, dotted: str) -> Any:
    node = row
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, (list, tuple)) or hasattr(node, "__getitem__") and not isinstance(node, str):
            try:
                node = node[int(part)]
            except (ValueError, IndexError, TypeError, KeyError):
                return _MISSING
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _answer_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_answer_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise TirlError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TirlError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise TirlError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        yield from enumerate(data, 1)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), 1)
    else:
        raise TirlError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def load_problems(
    path: str | Path,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = "id",
    limit: int | None = None,
) -> list[Problem]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TirlError(f"data file {path} does not exist. Fix: set data.source to an existing .jsonl/.parquet file.")
    out: list[Problem] = []
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise TirlError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        fields = {}
        for role, dotted in (("problem", problem_field), ("answer", answer_field)):
            value = get_field(row, dotted)
            if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
                state = "missing" if value is _MISSING else "empty"
                raise TirlError(
                    f"{where}: field {dotted!r} ({role}) is {state}. Row keys: {sorted(row)}. "
                    f"Fix: set data.{role}_field to the dotted path of the {role} (e.g. prompt.-1.content)."
                )
            if role == "problem" and not isinstance(value, str):
                raise TirlError(f"{where}: field {dotted!r} (problem) must be a string, got {type(value).__name__}")
            fields[role] = value
        rid = get_field(row, id_field) if id_field else _MISSING
        out.append(
            Problem(
                id=str(rid) if rid is not _MISSING and rid is not None else f"{path.stem}-{lineno}",
                problem=fields["problem"].strip(),
                answer=_answer_text(fields["answer"]),
                source=str(row.get("source") or row.get("data_source") or path.stem),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TirlError(f"{path}: no rows")
    return out
