"""PostgreSQL's binary COPY format, both ways: rows parsed by numpy, batches encoded by numpy."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Float,
    Integer,
    SmallInteger,
    Table,
)

from audiobooks_scoring.warehouse.columns import CodedColumn
from audiobooks_scoring.warehouse.errors import WarehouseError

COPY_BLOCK_BYTES = 4 << 20
WRITE_SLICE_ROWS = 250_000
NUMERIC_TYPE_OIDS = {20, 21, 23, 700, 701, 1700}
PG_EPOCH = date(2000, 1, 1)
PG_EPOCH_UTC = datetime(2000, 1, 1, tzinfo=UTC)

# types the fast path reads and writes. Dates travel as days since 2000-01-01.
BINARY_TYPES: dict[int, tuple[str, pa.DataType]] = {
    16: ("u1", pa.bool_()),
    20: (">i8", pa.int64()),
    21: (">i2", pa.int16()),
    23: (">i4", pa.int32()),
    700: (">f4", pa.float32()),
    701: (">f8", pa.float64()),
    1082: (">i4", pa.date32()),
}
BOOL_OID = 16
DATE_OID = 1082
PG_EPOCH_DAYS = 10_957  # 2000-01-01 in days since 1970-01-01
PGCOPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
PGCOPY_HEADER = PGCOPY_SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
PGCOPY_TRAILER = b"\xff\xff"
NULL_FIELD = b"\xff\xff\xff\xff"


def binary_readable(oids: Mapping[str, int], types: Mapping[str, pa.DataType]) -> bool:
    """Whether every column is fixed-width and every requested type is a plain cast away."""
    if not all(oid in BINARY_TYPES for oid in oids.values()):
        return False
    return all(
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or (pa.types.is_date(kind) and oids[name] == DATE_OID)
        for name, kind in types.items()
    )


def parse_csv_rows(
    rows: list, names: list[str], column_types: Mapping[str, pa.DataType]
) -> pd.DataFrame:
    table = pacsv.read_csv(
        io.BytesIO(b"".join(rows)),
        read_options=pacsv.ReadOptions(column_names=names, block_size=COPY_BLOCK_BYTES),
        convert_options=pacsv.ConvertOptions(
            column_types=dict(column_types),
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    return table.to_pandas()


@dataclass(frozen=True)
class CopyChunk:
    """Binary COPY rows of one chunk: the rows of the regular width back to back, the rest apart.

    Rows of fixed-width columns differ in length only where a field is NULL (its value is
    left out); `irregular` holds each such row with its position in the chunk.
    """

    data: bytearray
    rows: int
    width: int
    irregular: list[tuple[int, bytes]]


def copy_out_batches(copy, size: int) -> Iterator[list]:
    """Lists of at most `size` text COPY OUT rows."""
    rows: list = []
    append = rows.append
    for row in copy:
        append(row)
        if len(rows) == size:
            yield rows
            rows = []
            append = rows.append
    if rows:
        yield rows


def copy_out_chunks(raw, copy, size: int, width: int) -> Iterator[CopyChunk]:
    """Binary COPY OUT rows in chunks of at most `size`, the `width`-byte rows in one bytearray.

    libpq hands rows over one at a time. Rows already in its buffer are taken straight
    from the connection (about a third cheaper per row than `Copy.read`); psycopg waits
    for the socket and, after the trailer, ends the COPY. A row of another length (one
    holding a NULL) is copied apart with its position in the chunk.
    """
    take, read = raw.pgconn.get_copy_data, copy.read
    first = read()  # the header comes with the first row (or with the trailer: no rows)
    if not first:
        return
    row = BinaryRowParser.strip_header(first)
    length = len(row)
    data, count, irregular = bytearray(), 0, []
    while True:
        if length == width:
            data += row
            count += 1
        elif length == len(PGCOPY_TRAILER) and bytes(row) == PGCOPY_TRAILER:
            read()  # consumes the end of the COPY
            break
        elif length:
            irregular.append((count, bytes(row)))
            count += 1
        if count == size:
            yield CopyChunk(data, count, width, irregular)
            data, count, irregular = bytearray(), 0, []
        length, row = take(1)  # 1: do not block; 0 means nothing buffered yet
        if length <= 0:
            row = read()  # waits for the socket; raises on errors
            length = len(row)
            if not length:
                break
    if count:
        yield CopyChunk(data, count, width, irregular)


class BinaryRowParser:
    """Turns a chunk of binary COPY rows of fixed-width columns into a frame, vectorised.

    Rows without NULLs all have the same length and are read by one `np.frombuffer`; the
    few rows holding a NULL (shorter) are read field by field and merged in at their place.
    """

    def __init__(self, oids: Mapping[str, int], types: Mapping[str, pa.DataType]) -> None:
        self.names = list(oids)
        self.oids = [oids[name] for name in self.names]
        self.types = dict(types)
        fields: list[tuple[str, str]] = [("count", ">i2")]
        for index, oid in enumerate(self.oids):
            fields += [(f"l{index}", ">i4"), (f"v{index}", BINARY_TYPES[oid][0])]
        self.row_dtype = np.dtype(fields)

    def __call__(self, chunk: CopyChunk) -> pd.DataFrame:
        data = np.frombuffer(chunk.data, dtype=self.row_dtype)
        self._check(data)
        regular = None
        if chunk.irregular:
            regular = np.ones(chunk.rows, dtype=bool)
            regular[[position for position, _ in chunk.irregular]] = False
        columns = {}
        for index, (name, oid) in enumerate(zip(self.names, self.oids, strict=True)):
            values, mask = data[f"v{index}"], None
            if regular is not None:
                values, mask = self._merge_irregular(chunk, regular, index, values)
            columns[name] = self._arrow_column(name, oid, values, mask)
        return pa.table(columns).to_pandas(split_blocks=True)

    @staticmethod
    def strip_header(first) -> memoryview:
        """The first COPY OUT message without the binary signature header."""
        view = memoryview(first).cast("B")
        if bytes(view[: len(PGCOPY_SIGNATURE)]) != PGCOPY_SIGNATURE:
            raise WarehouseError("binary COPY data does not start with the PGCOPY signature")
        extension = int.from_bytes(view[15:19], "big")
        return view[19 + extension :]

    def _check(self, data: np.ndarray) -> None:
        """Every row's field count, and the first row's field lengths.

        Rows of the expected length with the expected field count hold every field at full
        width: the columns are fixed-width and a NULL field is shorter. The field lengths of
        one row confirm the widths the query described.
        """
        ok = bool((data["count"] == len(self.oids)).all())
        for index, oid in enumerate(self.oids):
            width = np.dtype(BINARY_TYPES[oid][0]).itemsize
            ok = ok and (len(data) == 0 or int(data[f"l{index}"][0]) == width)
        if not ok:
            raise WarehouseError("binary COPY rows do not have the layout the query described")

    def _merge_irregular(self, chunk: CopyChunk, regular: np.ndarray, index: int, values):
        wire = np.dtype(BINARY_TYPES[self.oids[index]][0])
        merged = np.zeros(chunk.rows, dtype=wire)
        merged[regular] = values
        mask = np.zeros(chunk.rows, dtype=bool)
        for position, row in chunk.irregular:
            value = self._read_field(row, index)
            if value is None:
                mask[position] = True
            else:
                merged[position] = np.frombuffer(value, dtype=wire)[0]
        return merged, mask

    def _read_field(self, row, wanted: int) -> bytes | None:
        view = memoryview(row).cast("B")
        if int.from_bytes(view[:2], "big", signed=True) != len(self.oids):
            raise WarehouseError("binary COPY row has an unexpected number of fields")
        offset = 2
        for index in range(wanted + 1):
            length = int.from_bytes(view[offset : offset + 4], "big", signed=True)
            offset += 4
            if index == wanted:
                return None if length < 0 else bytes(view[offset : offset + length])
            offset += max(length, 0)
        return None

    def _arrow_column(self, name: str, oid: int, values: np.ndarray, mask) -> pa.Array:
        wire, natural = BINARY_TYPES[oid]
        if oid == DATE_OID:
            native = (values.astype(np.int32) + PG_EPOCH_DAYS).astype("datetime64[D]")
        elif oid == BOOL_OID:
            native = values.astype(bool)
        else:
            native = values.astype(np.dtype(wire).newbyteorder("="))
        array = pa.array(native, type=natural, mask=mask)
        wanted = self.types.get(name)
        if wanted is not None and wanted != natural:
            array = array.cast(wanted, safe=False)
        return array


def frame_to_csv(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pacsv.write_csv(
        pa.Table.from_pandas(frame, preserve_index=False),
        buffer,
        pacsv.WriteOptions(include_header=False),
    )
    return buffer.getvalue()


COPY_BATCHES_AHEAD = 2


class CopySender:
    """Writes batches of COPY data from a thread, at most `COPY_BATCHES_AHEAD` batches behind.

    A context manager: leaving it waits for every queued batch and raises the sender's error.
    """

    def __init__(self, copy: Any) -> None:
        self._copy = copy
        self._batches: queue.Queue = queue.Queue(maxsize=COPY_BATCHES_AHEAD)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._send, name="copy-sender", daemon=True)

    def __enter__(self) -> CopySender:
        self._thread.start()
        return self

    def _send(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            if self._error is not None:
                continue
            try:
                for piece in batch:
                    self._copy.write(piece)
            except BaseException as error:  # raised in the producer's thread
                self._error = error

    def send(self, batch: list) -> None:
        """Queue one batch of COPY data (waits while the sender is behind)."""
        if self._error is not None:
            raise self._error
        self._batches.put(batch)

    def __exit__(self, *exc_info) -> None:
        self._batches.put(None)
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error


def split_columns(
    table: Table, columns: Mapping[str, Any], rows: int
) -> tuple[dict[str, np.ndarray], tuple[tuple[str, CodedColumn], ...]]:
    """Fixed-width array columns, and the coded ones (constants become one-value codes)."""
    fixed: dict[str, np.ndarray] = {}
    coded: dict[str, CodedColumn] = {}
    for name, value in columns.items():
        if isinstance(value, CodedColumn):
            coded[name] = value
        elif isinstance(value, np.ndarray):
            if wire_dtype(table.c[name]) is None:
                raise WarehouseError(f"column {name} of {table.name} needs a CodedColumn")
            days = as_days(value) if isinstance(table.c[name].type, Date) else value
            if days is None:
                raise WarehouseError(f"column {name} of {table.name} holds missing dates")
            fixed[name] = days
        else:
            coded[name] = CodedColumn(np.zeros(rows, dtype=np.int8), (value,))
    return fixed, tuple(coded.items())


def wire_dtype(column: Column) -> str | None:
    """The binary COPY dtype of a table column's type, None when it is not fixed-width."""
    kind = column.type
    if isinstance(kind, Boolean):
        return "u1"
    if isinstance(kind, SmallInteger):
        return ">i2"
    if isinstance(kind, BigInteger):
        return ">i8"
    if isinstance(kind, Integer):
        return ">i4"
    if isinstance(kind, Double | Float):
        return ">f8"
    if isinstance(kind, Date):
        return ">i4"
    return None


def as_days(values) -> np.ndarray | None:
    """Dates (datetime64 or `date` objects) as days since 2000-01-01; None if one is missing."""
    array = np.asarray(values)
    if array.dtype.kind == "M":
        days = array.astype("datetime64[D]")
        if np.isnat(days).any():
            return None
        return days.astype(np.int64) - PG_EPOCH_DAYS
    codes, uniques = pd.factorize(array, use_na_sentinel=True)
    if (codes < 0).any() or not all(
        isinstance(v, date) and not isinstance(v, datetime) for v in uniques
    ):
        return None
    unique_days = np.array([(v - PG_EPOCH).days for v in uniques], dtype=np.int64)
    return unique_days[codes]


def binary_frame_columns(table: Table, frame: pd.DataFrame) -> dict[str, np.ndarray] | None:
    """The frame's columns as wire-ready arrays, or None when one needs the text path."""
    out: dict[str, np.ndarray] = {}
    for name in frame.columns:
        if name not in table.c:
            return None
        wire = wire_dtype(table.c[name])
        column = frame[name]
        if wire is None or column.isna().any():
            return None
        if isinstance(table.c[name].type, Date):
            days = as_days(column.to_numpy())
            if days is None:
                return None
            out[name] = days
        elif wire == "u1":
            if not pd.api.types.is_bool_dtype(column):
                return None
            out[name] = column.to_numpy(dtype=bool)
        elif pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            values = column.to_numpy()
            if wire != ">f8" and (values.dtype.kind not in "iu" or not fits(values, wire)):
                return None  # the text path lets the server judge fractions and overflows
            out[name] = values
        else:
            return None
    return out


def fits(values: np.ndarray, wire: str) -> bool:
    """Whether integer values fit the integer wire type."""
    limits = np.iinfo(np.dtype(wire))
    return not len(values) or (values.min() >= limits.min and values.max() <= limits.max)


def field_bytes(column: Column, value: Any) -> bytes:
    """One value's binary COPY field (length word, then the data) for a table column."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return NULL_FIELD
    wire = wire_dtype(column)
    if isinstance(column.type, DateTime):
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise WarehouseError(f"column {column.name} needs a time-zone aware datetime")
        microseconds = (value - PG_EPOCH_UTC) // timedelta(microseconds=1)
        data = microseconds.to_bytes(8, "big", signed=True)
    elif wire is None:
        data = str(value).encode()
    elif isinstance(column.type, Date):
        data = np.array([(value - PG_EPOCH).days], dtype=wire).tobytes()
    else:
        data = np.array([value], dtype=wire).tobytes()
    return len(data).to_bytes(4, "big") + data


def binary_blocks(
    table: Table,
    fixed: Mapping[str, np.ndarray],
    coded: tuple[tuple[str, CodedColumn], ...],
    rows: int,
) -> list[np.ndarray]:
    """Binary COPY rows (fixed-width columns, then coded ones) as uint8 blocks of equal rows.

    Rows are grouped by their combination of coded values: inside a group every row has
    the same layout, so a block is the rows' fixed-width bytes followed by one constant tail.
    """
    prefix_fields: list[tuple[str, str]] = [("count", ">i2")]
    for index, name in enumerate(fixed):
        prefix_fields += [(f"l{index}", ">i4"), (f"v{index}", str(wire_dtype(table.c[name])))]
    prefix = np.empty(rows, dtype=np.dtype(prefix_fields))
    prefix["count"] = len(fixed) + len(coded)
    for index, (name, values) in enumerate(fixed.items()):
        prefix[f"l{index}"] = np.dtype(wire_dtype(table.c[name])).itemsize
        prefix[f"v{index}"] = values
    width = prefix.dtype.itemsize
    prefix_rows = prefix.view(np.uint8).reshape(rows, width)
    if not coded:
        return [prefix_rows]
    encoded = [
        [field_bytes(table.c[name], v) for v in column.values] + [NULL_FIELD]
        for name, column in coded
    ]
    sizes = tuple(len(column.values) + 1 for _, column in coded)
    codes = [np.where(c.codes < 0, len(c.values), c.codes) for _, c in coded]
    key = np.ravel_multi_index(codes, sizes)
    if key.size and key.max() <= np.iinfo(np.uint16).max:
        key = key.astype(np.uint16)  # a stable sort of 16-bit keys is a radix sort
    order = np.argsort(key, kind="stable")
    key = key[order]
    row_type = np.dtype((np.void, width))  # rows taken whole, not byte by byte
    prefix_rows = np.take(prefix.view(row_type), order).view(np.uint8).reshape(rows, width)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [rows]])
    blocks = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        combination = np.unravel_index(int(key[start]), sizes)
        tail = b"".join(encoded[k][int(c)] for k, c in enumerate(combination))
        block = np.empty((stop - start, width + len(tail)), dtype=np.uint8)
        block[:, :width] = prefix_rows[start:stop]
        block[:, width:] = np.frombuffer(tail, dtype=np.uint8)
        blocks.append(block)
    return blocks


def leading_ids(chunk: CopyChunk) -> np.ndarray:
    """The leading bigint of each binary COPY row (the customer id; 0 where NULL)."""
    layout = np.dtype(
        [("head", "V2"), ("length", ">i4"), ("id", ">i8"), ("rest", f"V{chunk.width - 14}")]
    )
    data = np.frombuffer(chunk.data, dtype=layout)
    regular = np.where(data["length"] == 8, data["id"], 0).astype(np.int64)
    if not chunk.irregular:
        return regular
    ids = np.zeros(chunk.rows, dtype=np.int64)
    placed = np.ones(chunk.rows, dtype=bool)
    for position, row in chunk.irregular:
        placed[position] = False
        if int.from_bytes(row[2:6], "big", signed=True) == 8:
            ids[position] = int.from_bytes(row[6:14], "big", signed=True)
    ids[placed] = regular
    return ids
