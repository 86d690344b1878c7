"""Read the public audiobooks CSV (with or without a header) into training rows.

Accepted layouts, always 12 columns: customer id, the ten features in contract order, the
0/1 label.

- No header (the file as published): columns are taken by position.
- A header with the contract names (`customer_id`, ..., `converted`), in any order: columns
  are taken by name.
- The course's original header (`ID, Book_length(mins)_overall, Book_length(mins)_avg, ...,
  Targets`): columns are taken by position, because that header lists "overall" before
  "avg" while the values show the first column is the average (see the data README).

The first row is a header when none of its fields is a number. A malformed file raises
`CsvFormatError` naming the first bad line (1-based, as an editor shows it) and column; no
partial frame is returned.
"""

from __future__ import annotations

import csv
import datetime
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, LABEL, TRAINING_COLUMNS, WINDOW_END

logger = logging.getLogger(__name__)

FILE_COLUMNS: tuple[str, ...] = (CUSTOMER_ID, *FEATURES, LABEL)

# The course's header names (normalized: lower case, letters and digits only), by position.
# Pairs the course is known to mislabel or reorder are accepted at either position.
COURSE_HEADER_ALIASES: tuple[frozenset[str], ...] = (
    frozenset({"id", "customerid"}),
    frozenset({"booklengthminsoverall", "booklengthminsavg"}),
    frozenset({"booklengthminsoverall", "booklengthminsavg"}),
    frozenset({"priceoverall", "priceavg"}),
    frozenset({"priceoverall", "priceavg"}),
    frozenset({"review"}),
    frozenset({"review1010", "reviewscore"}),
    frozenset({"completion", "minuteslistened"}),
    frozenset({"completion", "minuteslistened"}),
    frozenset({"supportrequest", "supportrequests"}),
    frozenset({"lastvisitedminuspurchasedate", "lastvisitedminspurchasedate"}),
    frozenset({"target", "targets", "targetslabels", "label", "labels"}),
)

_SAMPLE_CHARS = 40


class CsvFormatError(ValueError):
    """The CSV does not hold valid audiobooks rows; `line` is 1-based, `column` may be None."""

    def __init__(self, message: str, line: int, column: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


def _sample(value: str) -> str:
    shown = value if len(value) <= _SAMPLE_CHARS else value[:_SAMPLE_CHARS] + "..."
    return repr(shown)


def _error(path: Path, line: int, column: str | None, rule: str) -> CsvFormatError:
    where = f"{path.name}: line {line}" + (f", column {column!r}" if column else "")
    return CsvFormatError(f"{where}: {rule}", line, column)


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _normalize_course_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _column_order(path: Path, header: Sequence[str]) -> tuple[list[int], str]:
    """Position in the file of each of FILE_COLUMNS, and which header layout was found."""
    names = [name.strip().lower() for name in header]
    if len(names) == len(FILE_COLUMNS) and all(
        _normalize_course_name(name) in aliases
        for name, aliases in zip(names, COURSE_HEADER_ALIASES, strict=True)
    ):
        logger.warning(
            "%s has the course's original header; columns taken by position (that header "
            "names the average columns 'overall')",
            path.name,
        )
        return list(range(len(FILE_COLUMNS))), "course"
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if name not in FILE_COLUMNS:
            raise _error(
                path, 1, header[position], f"unknown header name; expected {list(FILE_COLUMNS)}"
            )
        if name in seen:
            raise _error(path, 1, name, "header name appears twice")
        seen[name] = position
    for name in FILE_COLUMNS:
        if name not in seen:
            raise _error(path, 1, name, "header lacks this column")
    return [seen[name] for name in FILE_COLUMNS], "contract"


def _field_count_rule(count: int) -> tuple[str, str]:
    """The column where a row with `count` fields goes wrong, and the rule it breaks."""
    expected = len(FILE_COLUMNS)
    if count < expected:
        column, where = FILE_COLUMNS[count], "it ends before this column"
    else:
        column, where = FILE_COLUMNS[-1], "extra fields after this column"
    return column, f"row has {count} fields, expected {expected}: {where}"


def _first_undecodable_line(path: Path) -> int:
    """1-based number of the first line that is not valid UTF-8 (1 if none is found)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _read_records(path: Path) -> tuple[list[list[str]], list[int], CsvFormatError | None]:
    """All non-blank records with their starting line numbers, stopping at a bad field count.

    The header (if any) is returned as the first record. The returned error, if any, is the
    first record with a wrong field count; the records before it are complete.
    """
    records: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            previous_end = 0
            for row in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                fields = [field.strip() for field in row]
                is_header = not records and not any(map(_is_number, fields))
                if not is_header and len(fields) != len(FILE_COLUMNS):
                    column, rule = _field_count_rule(len(fields))
                    return records, lines, _error(path, start, column, rule)
                records.append(fields)
                lines.append(start)
    except UnicodeDecodeError as exc:
        line = _first_undecodable_line(path)
        raise _error(path, line, None, f"not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        line = (lines[-1] + 1) if lines else 1
        raise _error(path, line, None, f"unreadable CSV ({exc})") from exc
    return records, lines, None


def _column_problem(name: str, raw: np.ndarray, values: np.ndarray) -> tuple[int, str] | None:
    """First row index breaking a rule for this column, with the rule, or None."""
    empty = raw == ""
    bad = ~np.isfinite(values)
    if name == CUSTOMER_ID:
        rules = [
            (empty, "empty value"),
            (bad & ~empty, "not a number"),
            (~bad & (values != np.round(values)), "customer id is not a whole number"),
        ]
    elif name == LABEL:
        rules = [
            (empty, "empty value"),
            (bad & ~empty, "not a number"),
            (~bad & (values != 0) & (values != 1), "label must be 0 or 1"),
        ]
    else:
        rules = [(empty, "empty value"), (bad & ~empty, "not a finite number")]
    firsts = [(int(np.argmax(mask)), rule, int(mask.sum())) for mask, rule in rules if mask.any()]
    if not firsts:
        return None
    index, rule, failing = min(firsts)
    others = f"; {failing} row(s) in this column fail this rule" if failing > 1 else ""
    return index, f"{rule} (got {_sample(str(raw[index]))}){others}"


def read_audiobooks_csv(path: Path, window_end: datetime.date) -> pd.DataFrame:
    """Return the labeled customers of an audiobooks CSV as TRAINING_COLUMNS rows."""
    path = Path(path)
    records, lines, count_error = _read_records(path)
    if not records:
        if count_error is not None:
            raise count_error
        raise _error(path, 1, None, "file is empty")
    order = list(range(len(FILE_COLUMNS)))
    layout = "none"
    if not any(map(_is_number, records[0])):
        order, layout = _column_order(path, records[0])
        records, lines = records[1:], lines[1:]

    problems: list[tuple[int, int, str, str]] = []  # (line, column position, column, rule)
    converted: dict[str, np.ndarray] = {}
    if records:
        columns = list(zip(*records, strict=True))
        for position, name in enumerate(FILE_COLUMNS):
            raw = np.asarray(columns[order[position]], dtype=object)
            values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
            problem = _column_problem(name, raw, values)
            if problem is not None:
                index, rule = problem
                problems.append((lines[index], position, name, rule))
            converted[name] = values
        if not problems:
            ids = pd.Series(pd.to_numeric(np.asarray(columns[order[0]], dtype=object)))
            converted[CUSTOMER_ID] = ids.to_numpy(dtype=np.int64)
            duplicated = ids.duplicated()
            if duplicated.any():
                index = int(np.argmax(duplicated.to_numpy()))
                first = int(np.argmax((ids == ids.iloc[index]).to_numpy()))
                problems.append(
                    (
                        lines[index],
                        0,
                        CUSTOMER_ID,
                        f"duplicate customer id {int(ids.iloc[index])} "
                        f"(first on line {lines[first]})",
                    )
                )
    if problems:
        line, _, column, rule = min(problems)
        raise _error(path, line, column, rule)
    if count_error is not None:
        raise count_error
    if not records:
        raise _error(path, 2, None, "header but no data rows")

    frame = pd.DataFrame(
        {
            CUSTOMER_ID: converted[CUSTOMER_ID].astype(np.int64),
            WINDOW_END: np.full(len(records), window_end, dtype=object),
            **{name: converted[name] for name in FEATURES},
            LABEL: converted[LABEL].astype(np.int8),
        },
        columns=list(TRAINING_COLUMNS),
    )
    logger.info("read %d customers from %s (header: %s)", len(frame), path.name, layout)
    return frame
