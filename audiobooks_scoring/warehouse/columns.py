"""Column batches for bulk writes: coded text columns, a batch writer, rows for executemany."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Table
from sqlalchemy.engine import Dialect


@dataclass(frozen=True)
class CodedColumn:
    """A column given as codes into its few distinct values (code -1 is NULL), for bulk writes."""

    codes: np.ndarray
    values: tuple[Any, ...]

    def decoded(self) -> np.ndarray:
        """The column's values as an object array (None for NULL)."""
        lookup = np.array([*self.values, None], dtype=object)
        return lookup[np.where(self.codes < 0, len(self.values), self.codes)]


class ColumnWriter:
    """Appends batches of columns to one table; made by `bulk_writer`."""

    def __init__(self, write_batch: Callable[[Mapping[str, Any], int], int]) -> None:
        self._write_batch = write_batch
        self.rows = 0

    def write(self, columns: Mapping[str, Any], rows: int) -> int:
        """Append `rows` rows given as in `write_columns`; returns `rows`."""
        written = self._write_batch(columns, rows) if rows else 0
        self.rows += written
        return written


def decoded_frame(columns: Mapping[str, Any], rows: int) -> pd.DataFrame:
    """The batch as a frame, coded columns decoded (the row-by-row engines' input)."""
    return pd.DataFrame(
        {
            name: value.decoded() if isinstance(value, CodedColumn) else value
            for name, value in columns.items()
        },
        index=pd.RangeIndex(rows),
    )


def executemany_rows(dialect: Dialect | None, table: Table, frame: pd.DataFrame) -> list[tuple]:
    """Plain Python rows, each value passed through its column type's bind processor."""
    converted = [
        _bound_values(_bind_processor(dialect, table, name), frame[name]) for name in frame.columns
    ]
    return list(zip(*converted, strict=True))


def executemany_column_rows(
    dialect: Dialect, table: Table, columns: Mapping[str, Any], rows: int
) -> list[tuple]:
    """Plain rows of a column batch; a coded column's values and a constant converted once."""
    converted = []
    for name, value in columns.items():
        process = _bind_processor(dialect, table, name)
        if isinstance(value, CodedColumn):
            lookup = np.array([*_bound_values(process, pd.Series(value.values)), None], object)
            codes = np.asarray(value.codes)
            converted.append(lookup[np.where(codes < 0, len(value.values), codes)].tolist())
        elif isinstance(value, np.ndarray | pd.Series | list):
            converted.append(_bound_values(process, pd.Series(value)))
        else:
            converted.append(_bound_values(process, pd.Series([value])) * rows)
    return list(zip(*converted, strict=True))


def _bind_processor(dialect: Dialect | None, table: Table, name: str) -> Callable | None:
    return None if dialect is None else table.c[name].type._cached_bind_processor(dialect)


def _bound_values(process: Callable | None, column: pd.Series) -> list:
    """The column's values as Python objects (None for missing), through `process`."""
    if pd.api.types.is_datetime64_any_dtype(column):
        values = [None if pd.isna(v) else v.to_pydatetime() for v in column]
    elif pd.api.types.is_float_dtype(column):
        values = [None if v != v else v for v in column.to_numpy().tolist()]
    elif pd.api.types.is_integer_dtype(column) or pd.api.types.is_bool_dtype(column):
        values = column.to_numpy().tolist()
    else:
        values = [None if _is_missing(v) else _native(v) for v in column.to_numpy(object)]
    if process is not None:
        values = [None if v is None else process(v) for v in values]
    return values


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or value is pd.NA
        or value is pd.NaT
        or (isinstance(value, float) and np.isnan(value))
    )


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
