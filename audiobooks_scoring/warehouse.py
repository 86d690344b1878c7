"""Warehouse IO: engine, table definitions, streaming reads and bulk writes (SQLite, PostgreSQL)."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
    Index,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy import (
    table as table_clause,
)
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateSchema

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, LABEL, WINDOW_END
from audiobooks_scoring.settings import Settings, check_identifier

logger = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
COPY_BLOCK_BYTES = 4 << 20
WRITE_SLICE_ROWS = 250_000
NUMERIC_TYPE_OIDS = {20, 21, 23, 700, 701, 1700}


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


def score_columns() -> list[Column]:
    """Columns shared by `customer_scores` and the history table."""
    return [
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date),
        Column("probability", Double, nullable=False),
        Column("rank", BigInteger, nullable=False),
        Column("decile", SmallInteger, nullable=False),
        Column("is_target", Boolean, nullable=False),
        Column("holdout", Boolean, nullable=False),
        Column("reason_1", String(48)),
        Column("reason_2", String(48)),
        Column("reason_3", String(48)),
        Column("reasons", Text),
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
    scores = Table(settings.scores_table, metadata, *score_columns())
    history = Table(
        settings.history_table,
        metadata,
        *score_columns(),
        Index(f"ix_{settings.history_table}_run"[:60], "run_id"),
        Index(f"ix_{settings.history_table}_customer"[:60], CUSTOMER_ID),
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
        Column("reason_1", String(48)),
        Column("reason_2", String(48)),
        Column("reason_3", String(48)),
        Column("partition_no", SmallInteger, nullable=False),
        Index(f"ix_{settings.scores_table}_staging_run"[:60], "run_id"),
        prefixes=["UNLOGGED"] if dialect_name == "postgresql" else [],
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


VIEW_NAMES = ("campaign_targets", "decile_summary")
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
        if key not in relations:
            raise WarehouseError(f"{path.name}: unknown placeholder {{{key}}}")
        return qualified_name(bind, relations[key])

    return PLACEHOLDER.sub(substitute, strip_comments(path.read_text()))


def strip_comments(sql_text: str) -> str:
    """SQL text without its `--` comment lines (they may mention placeholders)."""
    return "\n".join(line for line in sql_text.splitlines() if not line.lstrip().startswith("--"))


def split_statements(sql_text: str) -> list[str]:
    """The `;`-separated statements of a SQL file, without comments-only pieces."""
    return [piece.strip() for piece in strip_comments(sql_text).split(";") if piece.strip()]


def create_tables(engine: Engine, tables: WarehouseTables) -> None:
    """Create the schema, the tables and the marketing views if missing (idempotent)."""
    with engine.begin() as conn:
        if is_postgres(conn) and tables.metadata.schema:
            conn.execute(CreateSchema(tables.metadata.schema, if_not_exists=True))
        tables.metadata.create_all(conn, checkfirst=True)
        create_views(conn, tables)


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


def _stream_postgres(
    engine: Engine,
    sql: str,
    params: Mapping[str, Any],
    chunk_size: int,
    column_types: Mapping[str, pa.DataType] | None,
) -> Iterator[pd.DataFrame]:
    names = list(query_columns(engine, sql, params))
    compiled = text(sql).bindparams(**dict(params)).compile(dialect=engine.dialect)
    copy_sql = f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT csv)"
    types = {name: kind for name, kind in (column_types or {}).items() if name in names}
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor, cursor.copy(copy_sql, compiled.params) as copy:
            rows: list = []
            for row in copy:  # libpq hands COPY OUT data over one whole row at a time
                rows.append(row)
                if len(rows) == chunk_size:
                    yield _parse_csv_rows(rows, names, types)
                    rows = []
            if rows:
                yield _parse_csv_rows(rows, names, types)
        conn.rollback()


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
