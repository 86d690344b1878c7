"""Warehouse IO: engine, table definitions, streaming reads and bulk writes (SQLite, PostgreSQL)."""

from __future__ import annotations

import io
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
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
    Engine,
    Enum,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    create_engine,
    event,
    literal_column,
    text,
)
from sqlalchemy import (
    table as table_clause,
)
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateSchema

from audiobooks_scoring.contract import (
    CUSTOMER_ID,
    FEATURES,
    LABEL,
    SCORE_REASON_CODES,
    SCORE_REASON_LABELS,
    WINDOW_END,
)
from audiobooks_scoring.settings import Settings, check_identifier

logger = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
COPY_BLOCK_BYTES = 4 << 20
WRITE_SLICE_ROWS = 250_000
NUMERIC_TYPE_OIDS = {20, 21, 23, 700, 701, 1700}
PG_EPOCH = date(2000, 1, 1)
PG_EPOCH_UTC = datetime(2000, 1, 1, tzinfo=UTC)


class WarehouseError(RuntimeError):
    """A warehouse operation failed for a reason the operator can act on."""


@dataclass(frozen=True)
class WarehouseTables:
    """SQLAlchemy Core definitions of every table the job reads or writes."""

    metadata: MetaData
    training: Table
    activity: Table
    scores: Table
    history: Table
    runs: Table
    rejected: Table
    model_versions: Table
    staging: Table


def _feature_columns(nullable: bool = True) -> list[Column]:
    return [Column(name, Double, nullable=nullable) for name in FEATURES]


RANKED_COLUMNS = (
    CUSTOMER_ID,
    WINDOW_END,
    "probability",
    "rank",
    "decile",
    "is_target",
    "holdout",
    "reason_1",
    "reason_2",
    "reason_3",
)
RUN_CONSTANT_COLUMNS = ("model_version", "run_id", "scored_at")


def reason_code_type(settings_scores_table: str, metadata: MetaData | None = None) -> Enum:
    """The reason-code column type: a PostgreSQL enum (4 bytes a value), VARCHAR elsewhere."""
    return Enum(
        *SCORE_REASON_CODES,
        name=f"{settings_scores_table}_reason"[:60],
        metadata=metadata,
        native_enum=True,
        create_constraint=False,
        validate_strings=True,
    )


def score_columns(reason_type: Enum | None = None) -> list[Column]:
    """Columns shared by `customer_scores` and the history table, in their table order.

    The first ones (`RANKED_COLUMNS`) vary by customer; the last three are constant in a run.
    """
    reason = reason_type if reason_type is not None else String(48)
    return [
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date),
        Column("probability", Double, nullable=False),
        Column("rank", BigInteger, nullable=False),
        Column("decile", SmallInteger, nullable=False),
        Column("is_target", Boolean, nullable=False),
        Column("holdout", Boolean, nullable=False),
        Column("reason_1", reason),
        Column("reason_2", reason),
        Column("reason_3", reason),
        Column("model_version", String(80), nullable=False),
        Column("run_id", String(80), nullable=False),
        Column("scored_at", DateTime(timezone=True), nullable=False),
    ]


def build_tables(settings: Settings, dialect_name: str = "postgresql") -> WarehouseTables:
    """Table definitions named and scoped as the settings say."""
    schema = settings.warehouse_schema if dialect_name == "postgresql" else None
    metadata = MetaData(schema=schema)
    training = Table(
        settings.training_table,
        metadata,
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date, nullable=False),
        *_feature_columns(),
        Column(LABEL, SmallInteger, nullable=False),
    )
    activity = Table(
        settings.activity_table,
        metadata,
        Column(CUSTOMER_ID, BigInteger),
        Column(WINDOW_END, Date),
        *_feature_columns(),
    )
    postgres = dialect_name == "postgresql"
    reason = reason_code_type(settings.scores_table, metadata)
    # PostgreSQL lists carry a customer index only when asked (`customer_index`): each run
    # checks its ids on the scoring machine, and the list's readers scan by rank and decile.
    scores_index = (
        [Index(f"{settings.scores_table}_customer"[:60], CUSTOMER_ID, unique=True)]
        if settings.customer_index or not postgres
        else []
    )
    scores = Table(settings.scores_table, metadata, *score_columns(reason), *scores_index)
    # PostgreSQL: one partition per run (loaded once, indexed after the load; the current
    # run's partition is `customer_scores` itself). Elsewhere one table with indexes.
    history_layout: list[Any] = (
        []
        if postgres
        else [
            Index(f"ix_{settings.history_table}_run"[:60], "run_id"),
            Index(f"ix_{settings.history_table}_customer"[:60], CUSTOMER_ID),
        ]
    )
    history = Table(
        settings.history_table,
        metadata,
        *score_columns(reason),
        *history_layout,
        **({"postgresql_partition_by": "LIST (run_id)"} if postgres else {}),
    )
    runs = Table(
        settings.runs_table,
        metadata,
        Column("run_id", String(80), primary_key=True),
        Column("flow_run_id", String(80)),
        Column("as_of", Date),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True)),
        Column("status", String(32), nullable=False),
        Column("model_version", String(80)),
        Column("rows_in", BigInteger),
        Column("rows_scored", BigInteger),
        Column("rows_rejected", BigInteger),
        Column("reject_share", Double),
        Column("published", Boolean, nullable=False, default=False),
        Column("score_mean", Double),
        Column("score_psi", Double),
        Column("max_feature_psi", Double),
        Column("max_psi_feature", String(48)),
        Column("feature_psi", Text),
        Column("drift_status", String(16)),
        Column("decile_change_share", Double),
        Column("targets", BigInteger),
        Column("report_path", Text),
        Column("message", Text),
    )
    rejected = Table(
        settings.rejected_table,
        metadata,
        Column("run_id", String(80), nullable=False),
        Column(CUSTOMER_ID, Text),
        Column("reason_code", String(48), nullable=False),
        Column("reason", Text, nullable=False),
        Column("raw_values", Text, nullable=False),
        Column("rejected_at", DateTime(timezone=True), nullable=False),
        Index(f"ix_{settings.rejected_table}_run"[:60], "run_id"),
    )
    model_versions = Table(
        settings.model_versions_table,
        metadata,
        Column("version", String(80), primary_key=True),
        Column("status", String(16), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("recipe", String(48)),
        Column("auc", Double),
        Column("balanced_accuracy", Double),
        Column("brier", Double),
        Column("log_loss", Double),
        Column("lift_top_decile", Double),
        Column("training_rows", BigInteger),
        Column("training_fingerprint", String(80)),
        Column("artifact_digest", String(80)),
        Column("decision_reason", Text),
    )
    staging = Table(
        check_identifier(f"{settings.scores_table}_staging"[:48], "scores_table"),
        metadata,
        Column("run_id", String(80), nullable=False),
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date),
        Column("probability", Double, nullable=False),
        Column("holdout", Boolean, nullable=False),
        Column("reason_1", reason),
        Column("reason_2", reason),
        Column("reason_3", reason),
        Column("partition_no", SmallInteger, nullable=False),
        prefixes=["UNLOGGED"] if postgres else [],
    )
    return WarehouseTables(
        metadata, training, activity, scores, history, runs, rejected, model_versions, staging
    )


def _configure_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_warehouse_engine(url: str) -> Engine:
    """An engine for `url` that never shows bound parameters or the password."""
    is_sqlite = url.startswith("sqlite")
    if is_sqlite:
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(
            url,
            hide_parameters=True,
            pool_pre_ping=not is_sqlite,
            connect_args={"application_name": "audiobooks-scoring"}
            if url.startswith("postgresql")
            else {},
        )
    except Exception as error:  # the URL itself may hold the password
        raise WarehouseError(f"cannot create a warehouse engine: {type(error).__name__}") from None
    if is_sqlite:
        event.listen(engine, "connect", _configure_sqlite)
    return engine


def engine_from_settings(settings: Settings) -> Engine:
    """The warehouse engine the settings point at."""
    return create_warehouse_engine(settings.warehouse_url_value)


def is_postgres(bind: Engine | Connection) -> bool:
    """Whether the engine or connection talks to PostgreSQL."""
    return bind.dialect.name == "postgresql"


def qualified_name(bind: Engine | Connection, table: Table) -> str:
    """The dialect-quoted, schema-qualified name of a table."""
    return bind.dialect.identifier_preparer.format_table(table)


VIEW_NAMES = ("campaign_targets", "decile_summary", "customer_scores_explained")
_TEMPLATE_ATTRS = {
    "training_table": "training",
    "activity_table": "activity",
    "scores_table": "scores",
    "history_table": "history",
    "runs_table": "runs",
    "rejected_table": "rejected",
    "model_versions_table": "model_versions",
    "staging_table": "staging",
}


def render_sql(name: str, bind: Engine | Connection, tables: WarehouseTables) -> str:
    """The text of `sql/<name>.sql` with `{table}` placeholders replaced by quoted names."""
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        raise WarehouseError(f"no SQL file named {name!r} under {SQL_DIR}")
    relations = {key: getattr(tables, attr) for key, attr in _TEMPLATE_ATTRS.items()}
    relations.update(
        {f"{view}_view": table_clause(view, schema=tables.metadata.schema) for view in VIEW_NAMES}
    )

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key == "reason_labels":
            return reason_labels_sql()
        if key not in relations:
            raise WarehouseError(f"{path.name}: unknown placeholder {{{key}}}")
        return qualified_name(bind, relations[key])

    return PLACEHOLDER.sub(substitute, strip_comments(path.read_text()))


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def reason_labels_sql(prefix: str = "") -> str:
    """SQL for the plain-language reasons of a score row: its reason labels joined by '; '."""

    def label(column: str) -> str:
        cases = " ".join(
            f"WHEN {_sql_string(code)} THEN {_sql_string(text_)}"
            for code, text_ in SCORE_REASON_LABELS.items()
        )
        return f"CASE {prefix}{column} {cases} END"

    return (
        f"{label('reason_1')} || COALESCE('; ' || {label('reason_2')}, '')"
        f" || COALESCE('; ' || {label('reason_3')}, '')"
    )


def reasons_column():
    """The plain-language `reasons` of a score row, as a column of a one-table SELECT."""
    return literal_column(reason_labels_sql()).label("reasons")


def strip_comments(sql_text: str) -> str:
    """SQL text without its `--` comment lines (they may mention placeholders)."""
    return "\n".join(line for line in sql_text.splitlines() if not line.lstrip().startswith("--"))


def split_statements(sql_text: str) -> list[str]:
    """The `;`-separated statements of a SQL file, without comments-only pieces."""
    pieces = re.split(r";(?=(?:[^']*'[^']*')*[^']*$)", strip_comments(sql_text))
    return [piece.strip() for piece in pieces if piece.strip()]


def create_tables(engine: Engine, tables: WarehouseTables) -> None:
    """Create the schema, the tables and the marketing views if missing (idempotent)."""
    with engine.begin() as conn:
        if is_postgres(conn) and tables.metadata.schema:
            conn.execute(CreateSchema(tables.metadata.schema, if_not_exists=True))
        if is_postgres(conn):
            _check_history_layout(conn, tables)
        tables.metadata.create_all(conn, checkfirst=True)
        create_views(conn, tables)


def _check_history_layout(conn: Connection, tables: WarehouseTables) -> None:
    """Refuse a history table of an earlier layout (not partitioned by run) on PostgreSQL."""
    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:name)"),
        {"name": qualified_name(conn, tables.history)},
    ).scalar()
    if kind is not None and kind != "p":
        raise WarehouseError(
            f"{tables.history.name} exists but is not partitioned by run (an earlier layout); "
            f"rename it (and {tables.scores.name}) aside and run init again, then copy old "
            "runs back if they are needed"
        )


def create_views(conn: Connection, tables: WarehouseTables) -> None:
    """(Re)create the marketing views over `customer_scores` inside the caller's transaction."""
    drop_views(conn, tables)
    for statement in split_statements(render_sql("marketing/views", conn, tables)):
        conn.execute(text(statement))


def drop_views(conn: Connection, tables: WarehouseTables) -> None:
    """Drop the marketing views inside the caller's transaction."""
    for statement in split_statements(render_sql("marketing/drop_views", conn, tables)):
        conn.execute(text(statement))


def table_row_count(bind: Engine | Connection, table: Table) -> int:
    """Number of rows in a table."""
    from sqlalchemy import func, select

    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    return int(bind.execute(select(func.count()).select_from(table)).scalar_one())


def query_columns(bind: Engine, sql: str, params: Mapping[str, Any]) -> dict[str, bool]:
    """The columns a query returns, each mapped to whether the server types it as numeric."""
    with bind.connect() as conn:
        result = conn.execute(text(f"SELECT * FROM ({sql}) AS source_query LIMIT 0"), dict(params))
        description = result.cursor.description
        result.close()
    if is_postgres(bind):
        return {col[0]: col[1] in NUMERIC_TYPE_OIDS for col in description}
    return {col[0]: True for col in description}


def _parse_csv_rows(
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


def stream_query(
    engine: Engine,
    sql: str,
    params: Mapping[str, Any],
    chunk_size: int,
    column_types: Mapping[str, pa.DataType] | None = None,
) -> Iterator[pd.DataFrame]:
    """Frames of at most `chunk_size` rows from a query; memory is bounded by the chunk."""
    if is_postgres(engine):
        yield from _stream_postgres(engine, sql, params, chunk_size, column_types)
        return
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(
            text(sql), dict(params)
        )
        keys = list(result.keys())
        for rows in result.partitions(chunk_size):
            yield pd.DataFrame.from_records(rows, columns=keys)


# PostgreSQL binary COPY: type oid -> (big-endian wire dtype, Arrow type) of the fixed-width
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


def _query_type_oids(engine: Engine, sql: str, params: Mapping[str, Any]) -> dict[str, int]:
    with engine.connect() as conn:
        result = conn.execute(text(f"SELECT * FROM ({sql}) AS source_query LIMIT 0"), dict(params))
        description = result.cursor.description
        result.close()
    return {col[0]: int(col[1]) for col in description}


def _binary_readable(oids: Mapping[str, int], types: Mapping[str, pa.DataType]) -> bool:
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


def _stream_postgres(
    engine: Engine,
    sql: str,
    params: Mapping[str, Any],
    chunk_size: int,
    column_types: Mapping[str, pa.DataType] | None,
) -> Iterator[pd.DataFrame]:
    """COPY ... TO STDOUT in binary when every column is fixed-width (else CSV), per chunk."""
    oids = _query_type_oids(engine, sql, params)
    names = list(oids)
    types = {name: kind for name, kind in (column_types or {}).items() if name in names}
    parse = _BinaryRowParser(oids, types) if _binary_readable(oids, types) else None
    compiled = text(sql).bindparams(**dict(params)).compile(dialect=engine.dialect)
    copy_format = "binary" if parse else "csv"
    copy_sql = f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT {copy_format})"
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor, cursor.copy(copy_sql, compiled.params) as copy:
            if parse:
                for chunk in _copy_out_chunks(raw, copy, chunk_size, parse.row_dtype.itemsize):
                    yield parse(chunk)
            else:
                for rows in _copy_out_batches(copy, chunk_size):
                    yield _parse_csv_rows(rows, names, types)
        conn.rollback()


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


def stream_copy_chunks(
    engine: Engine, sql: str, params: Mapping[str, Any], chunk_size: int
) -> Iterator[CopyChunk]:
    """Binary COPY rows of a PostgreSQL query of fixed-width columns, unparsed, per chunk."""
    oids = _query_type_oids(engine, sql, params)
    if not all(oid in BINARY_TYPES for oid in oids.values()):
        raise WarehouseError("binary COPY chunks need a query of fixed-width columns only")
    width = _BinaryRowParser(oids, {}).row_dtype.itemsize
    compiled = text(sql).bindparams(**dict(params)).compile(dialect=engine.dialect)
    copy_sql = f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT binary)"
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor, cursor.copy(copy_sql, compiled.params) as copy:
            yield from _copy_out_chunks(raw, copy, chunk_size, width)
        conn.rollback()


def _copy_out_batches(copy, size: int) -> Iterator[list]:
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


def _copy_out_chunks(raw, copy, size: int, width: int) -> Iterator[CopyChunk]:
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
    row = _BinaryRowParser.strip_header(first)
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


class _BinaryRowParser:
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


def _frame_to_csv(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pacsv.write_csv(
        pa.Table.from_pandas(frame, preserve_index=False),
        buffer,
        pacsv.WriteOptions(include_header=False),
    )
    return buffer.getvalue()


def write_frame(conn: Connection, table: Table, frame: pd.DataFrame) -> int:
    """Append a frame to a table inside the caller's transaction with the engine's bulk path."""
    if frame.empty:
        return 0
    columns = list(frame.columns)
    if is_postgres(conn):
        binary = _binary_frame_columns(table, frame)
        if binary is not None:
            return _copy_binary(conn, table, binary, ())
        preparer = conn.dialect.identifier_preparer
        column_list = ", ".join(preparer.quote(name) for name in columns)
        copy_sql = (
            f"COPY {qualified_name(conn, table)} ({column_list}) FROM STDIN WITH (FORMAT csv)"
        )
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor, cursor.copy(copy_sql) as copy:
            for start in range(0, len(frame), WRITE_SLICE_ROWS):
                copy.write(_frame_to_csv(frame.iloc[start : start + WRITE_SLICE_ROWS]))
        return len(frame)
    preparer = conn.dialect.identifier_preparer
    insert_sql = (
        f"INSERT INTO {qualified_name(conn, table)} "
        f"({', '.join(preparer.quote(name) for name in columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    for start in range(0, len(frame), WRITE_SLICE_ROWS):
        piece = frame.iloc[start : start + WRITE_SLICE_ROWS]
        conn.exec_driver_sql(insert_sql, _rows(conn, table, piece))
    return len(frame)


def _rows(conn: Connection, table: Table, frame: pd.DataFrame) -> list[tuple]:
    """Plain Python rows, each value passed through its column type's bind processor."""
    converted = []
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            values = [None if pd.isna(v) else v.to_pydatetime() for v in column]
        elif pd.api.types.is_float_dtype(column):
            values = [None if v != v else v for v in column.to_numpy().tolist()]
        elif pd.api.types.is_integer_dtype(column) or pd.api.types.is_bool_dtype(column):
            values = column.to_numpy().tolist()
        else:
            values = [None if _is_missing(v) else _native(v) for v in column.to_numpy(object)]
        process = table.c[name].type._cached_bind_processor(conn.dialect)
        if process is not None:
            values = [None if v is None else process(v) for v in values]
        converted.append(values)
    return list(zip(*converted, strict=True))


@dataclass(frozen=True)
class CodedColumn:
    """A column given as codes into its few distinct values (code -1 is NULL), for bulk writes."""

    codes: np.ndarray
    values: tuple[Any, ...]

    def decoded(self) -> np.ndarray:
        """The column's values as an object array (None for NULL)."""
        lookup = np.array([*self.values, None], dtype=object)
        return lookup[np.where(self.codes < 0, len(self.values), self.codes)]


def write_columns(conn: Connection, table: Table, columns: Mapping[str, Any], rows: int) -> int:
    """Append `rows` rows given column by column (arrays, `CodedColumn`s or one constant).

    Uses the engine's bulk path inside the caller's transaction: on PostgreSQL one binary
    COPY whose rows are grouped by their coded values (row order is not kept).
    """
    if rows == 0:
        return 0
    if not is_postgres(conn):
        return write_frame(conn, table, _decoded_frame(columns, rows))
    fixed, coded = _split_columns(table, columns, rows)
    return _copy_binary(conn, table, fixed, coded)


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


@contextmanager
def bulk_writer(engine: Engine, table: Table) -> Iterator[ColumnWriter]:
    """A writer of column batches to `table`; on PostgreSQL one transaction committed at the end.

    On PostgreSQL one binary COPY stays open across batches, and a sender thread feeds it to
    the server while the caller prepares the next batch (the server ingests in parallel), at
    most `COPY_BATCHES_AHEAD` batches behind, so memory stays bounded when the server is the
    slower side. Every batch must give the same columns the same way. Row order is not kept.
    Elsewhere (SQLite, one writer at a time) each batch is its own transaction.
    """
    if not is_postgres(engine):

        def write_committed(columns: Mapping[str, Any], rows: int) -> int:
            with engine.begin() as conn:
                return write_columns(conn, table, columns, rows)

        yield ColumnWriter(write_committed)
        return
    with engine.begin() as conn, ExitStack() as stack:
        raw = conn.connection.driver_connection
        opened: dict[str, Any] = {}

        def write_batch(columns: Mapping[str, Any], rows: int) -> int:
            fixed, coded = _split_columns(table, columns, rows)
            names = [*fixed, *(name for name, _ in coded)]
            if not opened:
                cursor = stack.enter_context(raw.cursor())
                copy = stack.enter_context(cursor.copy(_binary_copy_sql(conn, table, names)))
                sender = stack.enter_context(_CopySender(copy))
                sender.send([PGCOPY_HEADER])
                opened.update(sender=sender, names=names)
            elif names != opened["names"]:
                raise WarehouseError(
                    f"bulk writer to {table.name}: a batch gave the columns {names}, "
                    f"the first gave {opened['names']}"
                )
            blocks = _binary_blocks(table, fixed, coded, rows)
            opened["sender"].send([memoryview(block).cast("B") for block in blocks])
            return rows

        yield ColumnWriter(write_batch)
        if opened:
            opened["sender"].send([PGCOPY_TRAILER])


COPY_BATCHES_AHEAD = 2


class _CopySender:
    """Writes batches of COPY data from a thread, at most `COPY_BATCHES_AHEAD` batches behind.

    A context manager: leaving it waits for every queued batch and raises the sender's error.
    """

    def __init__(self, copy: Any) -> None:
        self._copy = copy
        self._batches: queue.Queue = queue.Queue(maxsize=COPY_BATCHES_AHEAD)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._send, name="copy-sender", daemon=True)

    def __enter__(self) -> _CopySender:
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


def _decoded_frame(columns: Mapping[str, Any], rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            name: value.decoded() if isinstance(value, CodedColumn) else value
            for name, value in columns.items()
        },
        index=pd.RangeIndex(rows),
    )


def _split_columns(
    table: Table, columns: Mapping[str, Any], rows: int
) -> tuple[dict[str, np.ndarray], tuple[tuple[str, CodedColumn], ...]]:
    """Fixed-width array columns, and the coded ones (constants become one-value codes)."""
    fixed: dict[str, np.ndarray] = {}
    coded: dict[str, CodedColumn] = {}
    for name, value in columns.items():
        if isinstance(value, CodedColumn):
            coded[name] = value
        elif isinstance(value, np.ndarray):
            if _wire_dtype(table.c[name]) is None:
                raise WarehouseError(f"column {name} of {table.name} needs a CodedColumn")
            days = _as_days(value) if isinstance(table.c[name].type, Date) else value
            if days is None:
                raise WarehouseError(f"column {name} of {table.name} holds missing dates")
            fixed[name] = days
        else:
            coded[name] = CodedColumn(np.zeros(rows, dtype=np.int8), (value,))
    return fixed, tuple(coded.items())


def _wire_dtype(column: Column) -> str | None:
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


def _as_days(values) -> np.ndarray | None:
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


def _binary_frame_columns(table: Table, frame: pd.DataFrame) -> dict[str, np.ndarray] | None:
    """The frame's columns as wire-ready arrays, or None when one needs the text path."""
    out: dict[str, np.ndarray] = {}
    for name in frame.columns:
        if name not in table.c:
            return None
        wire = _wire_dtype(table.c[name])
        column = frame[name]
        if wire is None or column.isna().any():
            return None
        if isinstance(table.c[name].type, Date):
            days = _as_days(column.to_numpy())
            if days is None:
                return None
            out[name] = days
        elif wire == "u1":
            if not pd.api.types.is_bool_dtype(column):
                return None
            out[name] = column.to_numpy(dtype=bool)
        elif pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            values = column.to_numpy()
            if wire != ">f8" and (values.dtype.kind not in "iu" or not _fits(values, wire)):
                return None  # the text path lets the server judge fractions and overflows
            out[name] = values
        else:
            return None
    return out


def _fits(values: np.ndarray, wire: str) -> bool:
    """Whether integer values fit the integer wire type."""
    limits = np.iinfo(np.dtype(wire))
    return not len(values) or (values.min() >= limits.min and values.max() <= limits.max)


def _field_bytes(column: Column, value: Any) -> bytes:
    """One value's binary COPY field (length word, then the data) for a table column."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return NULL_FIELD
    wire = _wire_dtype(column)
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


def _binary_copy_sql(conn: Connection, table: Table, names: list[str]) -> str:
    preparer = conn.dialect.identifier_preparer
    column_list = ", ".join(preparer.quote(name) for name in names)
    return f"COPY {qualified_name(conn, table)} ({column_list}) FROM STDIN WITH (FORMAT binary)"


def _binary_blocks(
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
        prefix_fields += [(f"l{index}", ">i4"), (f"v{index}", _wire_dtype(table.c[name]))]
    prefix = np.empty(rows, dtype=np.dtype(prefix_fields))
    prefix["count"] = len(fixed) + len(coded)
    for index, (name, values) in enumerate(fixed.items()):
        prefix[f"l{index}"] = np.dtype(_wire_dtype(table.c[name])).itemsize
        prefix[f"v{index}"] = values
    width = prefix.dtype.itemsize
    prefix_rows = prefix.view(np.uint8).reshape(rows, width)
    if not coded:
        return [prefix_rows]
    encoded = [
        [_field_bytes(table.c[name], v) for v in column.values] + [NULL_FIELD]
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


def _copy_binary(
    conn: Connection,
    table: Table,
    fixed: Mapping[str, np.ndarray],
    coded: tuple[tuple[str, CodedColumn], ...],
) -> int:
    """One binary COPY of fixed-width columns then coded ones (rows grouped by their codes)."""
    rows = len(next(iter(fixed.values()))) if fixed else len(coded[0][1].codes)
    names = [*fixed, *(name for name, _ in coded)]
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(_binary_copy_sql(conn, table, names)) as copy:
        copy.write(PGCOPY_HEADER)
        for block in _binary_blocks(table, fixed, coded, rows):
            for start in range(0, len(block), WRITE_SLICE_ROWS):
                copy.write(memoryview(block[start : start + WRITE_SLICE_ROWS]).cast("B"))
        copy.write(PGCOPY_TRAILER)
    return rows


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or value is pd.NA
        or value is pd.NaT
        or (isinstance(value, float) and np.isnan(value))
    )


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_frame(
    bind: Engine | Connection, statement, params: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """A small query result as a frame (reports, ledgers; not for populations)."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return read_frame(conn, statement, params)
    result = bind.execute(
        statement if not isinstance(statement, str) else text(statement), dict(params or {})
    )
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def load_source_sql(name: str, bind: Engine | Connection, tables: WarehouseTables) -> str:
    """A source query from `sql/sources/`, ready to run with bound parameters."""
    return render_sql(f"sources/{name}", bind, tables).strip().rstrip(";")


@dataclass(frozen=True)
class Warehouse:
    """The engine and the table definitions of one warehouse: what IO code is handed."""

    engine: Engine
    tables: WarehouseTables


def open_warehouse(settings: Settings) -> Warehouse:
    """The warehouse the settings point at (nothing is created)."""
    engine = engine_from_settings(settings)
    return Warehouse(engine, build_tables(settings, engine.dialect.name))


def init_warehouse(settings: Settings) -> Warehouse:
    """Open the warehouse and create its tables and views if missing (idempotent)."""
    warehouse = open_warehouse(settings)
    create_tables(warehouse.engine, warehouse.tables)
    return warehouse
