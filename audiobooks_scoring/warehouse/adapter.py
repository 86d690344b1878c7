"""The one interface every warehouse engine is reached through, with portable defaults.

An adapter declares what its engine can do as class attributes and overrides only its
quirks; the rest of the code never asks which engine it talks to. The defaults here use
portable SQLAlchemy Core only (bound parameters, batched executemany inserts, a
transactional copy into the live list), which is what the generic adapter runs on any
other dialect.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from sqlalchemy import (
    Engine,
    Index,
    Table,
    delete,
    func,
    insert,
    literal,
    select,
    text,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.schema import CreateSchema
from sqlalchemy.sql import Select

from audiobooks_scoring.contract import CUSTOMER_ID
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import sql_text
from audiobooks_scoring.warehouse.columns import (
    CodedColumn,
    ColumnWriter,
    decoded_frame,
    executemany_rows,
)
from audiobooks_scoring.warehouse.errors import (
    AnotherRunPublishing,
    DuplicateCustomers,
    RunLockLost,
    WarehouseError,
)
from audiobooks_scoring.warehouse.tables import (
    LIST_COLUMNS,
    TableLayout,
    WarehouseTables,
    build_tables,
    next_list_table,
)

logger = logging.getLogger(__name__)

# Connection failures carry no SQLSTATE; these ones will not heal by waiting.
PERMANENT_CONNECTION_ERRORS = (
    "authentication failed",
    "access denied",
    "does not exist",
    "unknown database",
    "no pg_hba.conf entry",
    "permission denied",
)


class RunLockHandle:
    """A held run lock; `release` frees it (idempotent)."""

    def release(self) -> None:
        """Free the lock."""


# The session id holding each run lock of this process, by (masked URL, lock key or name).
_HELD_SESSION_LOCKS: dict[tuple[str, Any], int] = {}


class SessionLock(RunLockHandle):
    """A run lock held by a database session kept open for the run (advisory or named lock).

    While it is held, the session's id is registered under `key`, so publication can check,
    inside its own transaction, that the session still holds the lock.
    """

    def __init__(
        self, connection: Connection, unlock: str, params: Mapping[str, Any], key: Any
    ) -> None:
        self.connection: Connection | None = connection
        self.unlock = unlock
        self.params = dict(params)
        self.key = key

    @classmethod
    @contextmanager
    def hold(
        cls,
        engine: Engine,
        key: tuple[str, Any],
        statements: tuple[str, str, str],
        params: Mapping[str, Any],
        describe_holder: Callable[[Connection], str],
    ) -> Iterator[SessionLock]:
        """Take the lock on a new session kept open while it is held.

        `statements` are (try to lock: true when taken, this session's id, unlock). A lock
        another session holds raises `AnotherRunPublishing`, naming the holder.
        """
        try_lock, session_id, unlock = statements
        connection = engine.connect()
        try:
            if not connection.execute(text(try_lock), dict(params)).scalar():
                holder = describe_holder(connection)
                raise AnotherRunPublishing(f"another run is publishing ({holder})")
            session = int(connection.execute(text(session_id)).scalar_one())
            connection.commit()
        except BaseException:
            connection.close()
            raise
        _HELD_SESSION_LOCKS[key] = session
        lock = cls(connection, unlock, params, key)
        try:
            yield lock
        finally:
            lock.release()

    @staticmethod
    def session_holding(key: tuple[str, Any]) -> int:
        """The id of this process's session holding the lock `key` (`RunLockLost` if none)."""
        session = _HELD_SESSION_LOCKS.get(key)
        if session is None:
            raise RunLockLost(
                "publishing needs the run lock: build and publish the list under the run lock"
            )
        return session

    def release(self) -> None:
        """Unlock, then close the session (closing it frees the lock anyway)."""
        _HELD_SESSION_LOCKS.pop(self.key, None)
        if self.connection is None:
            return
        try:
            self.connection.execute(text(self.unlock), self.params)
            self.connection.commit()
        except DBAPIError:
            logger.warning("could not release the run lock; closing its session frees it")
            self.connection.invalidate()
        finally:
            self.connection.close()
            self.connection = None


class WarehouseAdapter:
    """One warehouse engine: streaming reads, bulk writes, the list's build and swap, the lock."""

    name: ClassVar[str] = "generic"
    dialects: ClassVar[tuple[str, ...]] = ()
    supports_schemas: ClassVar[bool] = True
    transactional_ddl: ClassVar[bool] = True
    native_enum: ClassVar[bool] = False
    history_partitioned: ClassVar[bool] = False
    constants_as_defaults: ClassVar[bool] = False
    customer_index_always: ClassVar[bool] = False
    live_list_view: ClassVar[bool] = False
    """Whether the live list is a view of its run in history (it then has no index of its own)."""
    list_writers: ClassVar[int] = 1
    write_batch_rows: ClassVar[int] = 10_000
    shared_by_processes: ClassVar[bool] = True
    """Whether other processes can open the warehouse while a run holds it (Dask workers)."""
    single_process_reason: ClassVar[str] = ""
    """Why not, when `shared_by_processes` is false (said in the run's warning)."""

    def __init__(self, engine: Engine, tables: WarehouseTables, settings: Settings) -> None:
        self.engine = engine
        self.tables = tables
        self.settings = settings
        self.lock_timeout_ms = settings.lock_timeout_ms

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine.url.render_as_string(hide_password=True)})"

    def __reduce__(self):
        """Pickled as its settings (an engine cannot travel): reopened where it lands."""
        return (type(self).open, (self.settings,))

    @classmethod
    def open(cls, settings: Settings) -> WarehouseAdapter:
        """The adapter over a new engine for the settings' warehouse (nothing is created)."""
        engine = cls.create_engine(settings.warehouse_url_value)
        return cls(engine, build_tables(settings, cls.table_layout(settings)), settings)

    @classmethod
    def create_engine(cls, url: str) -> Engine:
        """An engine for `url` that never shows bound parameters or the password."""
        return _create_engine(url, pool_pre_ping=True)

    @classmethod
    def table_layout(cls, settings: Settings) -> TableLayout:
        """How this engine lays the tables out."""
        return TableLayout(
            schema=settings.warehouse_schema if cls.supports_schemas else None,
            native_enum=cls.native_enum,
            history_partitioned=cls.history_partitioned,
            scores_index=settings.customer_index or cls.customer_index_always,
        )

    @property
    def dialect(self) -> Dialect:
        """The engine's SQLAlchemy dialect."""
        return self.engine.dialect

    def describe(self) -> str:
        """The engine and the adapter, for reports (e.g. "postgresql, postgresql adapter")."""
        return f"{self.engine.dialect.name}, {self.name} adapter"

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    def qualified_name(self, relation: Table | str) -> str:
        """A table's (or a name's, in the warehouse schema) quoted, schema-qualified name."""
        return sql_text.qualified_name(self.dialect, relation, self.tables.schema)

    def quote(self, name: str) -> str:
        """A column, index or role name quoted for this engine."""
        return sql_text.quote_identifier(self.dialect, name)

    def literal(self, value: Any, type_: Any = None) -> str:
        """A value as a SQL literal of this engine (DDL and view text only)."""
        return sql_text.sql_literal(self.dialect, value, type_)

    def render_sql(self, name: str) -> str:
        """The text of `sql/<name>.sql` with quoted table names."""
        return sql_text.render_sql(name, self.dialect, self.tables)

    def source_sql(self, name: str) -> str:
        """A source query of `sql/sources/`, ready to run with bound parameters."""
        return sql_text.load_source_sql(name, self.dialect, self.tables)

    def create_tables(self) -> None:
        """Create the schema, the tables and the marketing views if missing (idempotent)."""
        with self.engine.begin() as conn:
            if self.tables.schema:
                conn.execute(CreateSchema(self.tables.schema, if_not_exists=True))
            self.tables.metadata.create_all(conn, checkfirst=True)
            self.create_views(conn)

    def create_views(self, conn: Connection) -> None:
        """(Re)create the marketing views over the live list inside the caller's transaction."""
        self.drop_views(conn)
        for statement in sql_text.split_statements(self.render_sql("marketing/views")):
            conn.execute(text(statement))

    def drop_views(self, conn: Connection) -> None:
        """Drop the marketing views inside the caller's transaction."""
        for statement in sql_text.split_statements(self.render_sql("marketing/drop_views")):
            conn.execute(text(statement))

    def read_frame(self, statement: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """A small query result as a frame (reports, ledgers; not for populations)."""
        with self.engine.connect() as conn:
            return read_frame(conn, statement, params)

    def count_rows(self, table: Table) -> int:
        """Number of rows in a table."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def analyze(self, table: Table) -> None:
        """Refresh the planner's statistics of a table (where the engine keeps them)."""

    def query_columns(self, sql: str, params: Mapping[str, Any]) -> dict[str, bool]:
        """The columns a query returns, each mapped to whether the engine types it as numeric.

        Portable SQL cannot tell, so every column counts as numeric; text in a numeric
        column is still caught row by row by the feature contract.
        """
        with self.engine.connect() as conn:
            result = conn.execute(
                text(f"SELECT * FROM ({sql}) AS source_query LIMIT 0"), dict(params)
            )
            names = list(result.keys())
            result.close()
        return {name: True for name in names}

    def stream_query(
        self,
        sql: str,
        params: Mapping[str, Any],
        chunk_size: int,
        column_types: Mapping[str, pa.DataType] | None = None,
    ) -> Generator[pd.DataFrame, None, None]:
        """Frames of at most `chunk_size` rows from a query; memory is bounded by the chunk."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(
                text(sql), dict(params)
            )
            keys = list(result.keys())
            for rows in result.partitions(chunk_size):
                # plain tuples: pandas probes every Row for namedtuple fields, 5x slower
                yield pd.DataFrame.from_records(list(map(tuple, rows)), columns=keys)

    def stream_customer_ids(
        self, sql: str, params: Mapping[str, Any], chunk_size: int
    ) -> Iterator[np.ndarray]:
        """The customer ids a query returns, per chunk, by this engine's fastest read."""
        for chunk in self.stream_query(sql, params, chunk_size):
            yield chunk[CUSTOMER_ID].to_numpy(dtype=np.int64)

    def write_frame(self, conn: Connection, table: Table, frame: pd.DataFrame) -> int:
        """Append a frame inside the caller's transaction by this engine's bulk path."""
        if frame.empty:
            return 0
        names = list(frame.columns)
        statement = insert(table)
        for start in range(0, len(frame), self.write_batch_rows):
            piece = frame.iloc[start : start + self.write_batch_rows]
            rows = executemany_rows(None, table, piece)
            conn.execute(statement, [dict(zip(names, row, strict=True)) for row in rows])
        return len(frame)

    def write_columns(
        self, conn: Connection, table: Table, columns: Mapping[str, Any], rows: int
    ) -> int:
        """Append `rows` rows given column by column (arrays, `CodedColumn`s or constants)."""
        if rows == 0:
            return 0
        return self.write_frame(conn, table, decoded_frame(columns, rows))

    @contextmanager
    def bulk_writer(self, table: Table) -> Iterator[ColumnWriter]:
        """A writer of column batches to `table`; each batch is committed as it is written."""

        def write_committed(columns: Mapping[str, Any], rows: int) -> int:
            with self.engine.begin() as conn:
                return self.write_columns(conn, table, columns, rows)

        yield ColumnWriter(write_committed)

    def run_lock(self) -> AbstractContextManager[RunLockHandle]:
        """Hold the one-run-at-a-time lock; raises `AnotherRunPublishing` when it is taken."""
        from audiobooks_scoring.warehouse.lock_table import lock_table_run_lock

        return lock_table_run_lock(self)

    def check_run_lock(self, conn: Connection) -> None:
        """Raise `LostRunLock` unless this process still holds the run lock."""
        from audiobooks_scoring.warehouse.lock_table import check_lock_table

        check_lock_table(self, conn)

    def clear_staging(self, run_id: str) -> int:
        """Remove every staged row (leftovers of killed runs too) and this run's earlier rejects."""
        with self.engine.begin() as conn:
            removed = conn.execute(delete(self.tables.staging)).rowcount
            conn.execute(
                delete(self.tables.rejected).where(self.tables.rejected.c.run_id == run_id)
            )
        return int(removed or 0)

    def list_table(self) -> Table:
        """`<scores>_next` as this engine builds it (without the run's constants if defaults)."""
        return next_list_table(self.tables, LIST_COLUMNS if self.constants_as_defaults else None)

    def create_list_table(self, conn: Connection) -> Table:
        """A new, empty `<scores>_next` (an earlier one is dropped)."""
        table = self.list_table()
        table.drop(conn, checkfirst=True)
        table.create(conn)
        return table

    def per_row_constants(self, constants: Mapping[str, Any]) -> dict[str, Any]:
        """The run's constants the list stores in every row (none when they are defaults)."""
        return {} if self.constants_as_defaults else dict(constants)

    def insert_ranked(
        self, conn: Connection, table: Table, ranked: Select, constants: Mapping[str, Any]
    ) -> int:
        """Fill the built list from a ranking SELECT inside the caller's transaction."""
        stored = self.per_row_constants(constants)
        selected = ranked.add_columns(
            *[
                literal(value, type_=self.tables.scores.c[name].type).label(name)
                for name, value in stored.items()
            ]
        )
        names = [*LIST_COLUMNS, *stored]
        return int(conn.execute(insert(table).from_select(names, selected)).rowcount)

    def finish_list(
        self,
        conn: Connection,
        table: Table,
        constants: Mapping[str, Any],
        ids_checked: bool,
        customer_index: bool = False,
    ) -> None:
        """Make a built list ready to swap in: constants, unique ids, indexes, statistics.

        Raises `DuplicateCustomers` when a customer id is in it twice (unless the ids were
        already checked on the scoring machine). `customer_index` asks for a unique index.
        """
        if customer_index or self.customer_index_always:
            self.create_customer_index(conn, table)
        elif not ids_checked:
            check_unique_customers(conn, table)

    def create_customer_index(self, conn: Connection, table: Table) -> None:
        """A unique `customer_id` index on a built list; `DuplicateCustomers` if one repeats."""
        index = Index(f"{table.name}_customer"[:60], table.c[CUSTOMER_ID], unique=True)
        try:
            with conn.begin_nested():
                index.create(conn)
        except DBAPIError as error:
            if self.is_unique_violation(error):
                raise DuplicateCustomers(f"{table.name}: a customer id is staged twice") from error
            raise

    def forget_run_history(self, run_id: str) -> None:
        """Remove a run's rows from history (the bench's reset; runs never call it)."""
        history = self.tables.history
        with self.engine.begin() as conn:
            conn.execute(delete(history).where(history.c.run_id == run_id))

    def discard_list(self) -> None:
        """Drop a built but unpublished list (a run that fails its gates publishes nothing)."""
        with self.engine.begin() as conn:
            self.list_table().drop(conn, checkfirst=True)

    def swap_list(self, run_id: str, replace_current: bool) -> None:
        """Publish the built list atomically: the live list (unless a backfill) and history.

        Portable: one transaction deletes the live rows and copies the built ones in, and
        replaces the run's rows of history. Readers see the old list or the new one; the
        live table, its grants and the views stay in place.
        """
        built = self.list_table()
        scores, history = self.tables.scores, self.tables.history
        columns = [c.name for c in scores.columns]
        rows = select(*[built.c[name] for name in columns])
        with self.engine.begin() as conn:
            self.check_run_lock(conn)
            pause_at("after_staging")
            if replace_current:
                conn.execute(delete(scores))
                pause_at("during_swap")
                conn.execute(insert(scores).from_select(columns, rows))
            conn.execute(delete(history).where(history.c.run_id == run_id))
            conn.execute(insert(history).from_select(columns, rows))
            if self.transactional_ddl:
                built.drop(conn)
            pause_at("before_commit")
        if not self.transactional_ddl:
            self.discard_list()

    def is_transient(self, error: BaseException) -> bool:
        """Whether a database error is worth retrying (lost connection, lock timeout, deadlock)."""
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, OperationalError):
            message = str(getattr(error, "orig", error)).lower()
            if any(marker in message for marker in PERMANENT_CONNECTION_ERRORS):
                return False
            return "connection" in message or "deadlock" in message or "lock" in message
        return False

    def is_unique_violation(self, error: DBAPIError) -> bool:
        """Whether an error is a unique-constraint violation."""
        message = str(getattr(error, "orig", error)).lower()
        return "unique" in message or "duplicate" in message

    def describe_error(self, error: DBAPIError) -> str:
        """The driver's first line of an error (never the statement or its parameters)."""
        first_line = (str(error.orig).strip().splitlines() or ["?"])[0]
        return f"{type(error.orig).__name__}: {first_line}"


def read_frame(
    conn: Connection, statement: Any, params: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """A small query result as a frame, on an open connection."""
    result = conn.execute(
        statement if not isinstance(statement, str) else text(statement), dict(params or {})
    )
    return pd.DataFrame(list(map(tuple, result)), columns=list(result.keys()))


def check_unique_customers(conn: Connection, table: Table) -> None:
    """Raise `DuplicateCustomers` when a customer id is in a built list twice."""
    repeated = conn.execute(
        select(table.c[CUSTOMER_ID])
        .group_by(table.c[CUSTOMER_ID])
        .having(func.count() > 1)
        .limit(1)
    ).first()
    if repeated is not None:
        raise DuplicateCustomers(f"{table.name}: a customer id is staged twice")


def _create_engine(url: str, **options: Any) -> Engine:
    from sqlalchemy import create_engine

    try:
        return create_engine(url, hide_parameters=True, **options)
    except Exception as error:  # noqa: BLE001 - the URL itself may hold the password
        raise WarehouseError(f"cannot create a warehouse engine: {type(error).__name__}") from None


def pause_at(stage: str) -> None:
    """Fault-injection hook: sleep at a publication stage named in AUDIOBOOKS_TEST_PAUSE_AT.

    `AUDIOBOOKS_TEST_PAUSE_AT=stage:seconds` (stages: after_staging, during_swap,
    before_commit; MySQL also during_switch, between its exchange and its view switch); the
    reliability tests kill or disturb a real run paused there.
    """
    wanted = os.environ.get("AUDIOBOOKS_TEST_PAUSE_AT", "")
    if wanted.split(":")[0] == stage:
        seconds = float(wanted.split(":")[1]) if ":" in wanted else 30.0
        marker = os.environ.get("AUDIOBOOKS_TEST_PAUSE_MARKER")
        if marker:
            Path(marker).write_text(stage)
        time.sleep(seconds)


__all__ = ["CodedColumn", "WarehouseAdapter", "RunLockHandle", "read_frame", "pause_at"]
