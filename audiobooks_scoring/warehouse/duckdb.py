"""DuckDB: an embedded analytical warehouse in one file (`duckdb` + `duckdb-engine`).

- Reads go through DuckDB's Arrow path: the query's `:name` parameters compiled by
  SQLAlchemy to DuckDB's `$n` markers (values are bound, never written into the SQL), the
  result streamed by `to_arrow_reader` and cut into frames of exactly `chunk_size` rows, so
  memory is bounded by a chunk and one Arrow batch, never the population.
  `query_columns` reads the Arrow schema of the query's `LIMIT 0`: a text column is told
  from a numeric one by its type. `stream_customer_ids` reads the id column alone.
- Writes register a batch as an Arrow table on the raw DuckDB connection and run one
  `INSERT INTO t (...) SELECT CAST(...) ... FROM batch` in the caller's transaction: coded
  columns (reason codes, window ends) travel as Arrow dictionaries and a run's constants
  as bound parameters, nothing is expanded row by row in Python. A `bulk_writer` is one
  transaction committed when it closes (a failing batch writes nothing). One list
  writer: a DuckDB file has one writer.
- The list is built beside the live one as `<scores>_next` and published in one
  transaction (DuckDB's DDL is transactional): the views are dropped, the live table is
  dropped, `<scores>_next` is renamed to the live name, the run's history rows are
  replaced from it and the views are created again. DuckDB cannot rename a table that has
  an index, so with `customer_index` the built list's unique index (its duplicate check)
  is dropped before the rename and made again on the live list; without it, repeated ids
  are found by a query. Readers see the whole old list or the whole new one. History has
  no secondary (ART) indexes: maintaining them made each 1M-row publication's commit
  2.5 s slower, and DuckDB's zone maps already skip the row groups of other runs.
- The run lock is an exclusive `flock` on `<database>.<scores>.lock` beside the file, as
  on SQLite, not the portable lock-table row: taking a row needs the database file, which
  another process may be holding (a second run would then fail with DuckDB's file-lock
  error rather than stop with "another run is publishing"), and a row left by a killed
  run has to be taken over by a lease, while the kernel frees a `flock` with its process.

A partitioned run (`partitions` > 1) scores its partitions in the run's own process, one
after the other (`shared_by_processes` is false): Dask worker processes could not open the
file the run holds. The flow logs a warning saying so; the list is the same.

What DuckDB's single-writer file lock means for marketers who query the file: a DuckDB
file is open in one read-write process, or in several read-only processes, never both,
and the operating system's lock lasts as long as any connection of that process is open.
The job therefore pools no connections: outside a run it opens the file only for the
length of each operation, and a scoring run holds it open from taking the run lock to
releasing it (so no session can slip in between two steps of a run). While a run holds
it, a marketer's DuckDB session (the CLI, a notebook, `read_only` or not) fails to open
with `IO Error: Could not set lock on file ... Conflicting lock is held in ... (PID n)`:
a clear error, never a partial list, because the list is published in one transaction.
Between runs marketers read freely and see the last published list whole. Conversely, a
session a marketer keeps open blocks the job: each time the job opens the file it waits
up to `lock_timeout_ms` for it (and DuckDB's lock errors are transient to the retries of
`publish_retries`); a run that cannot open the file when it starts fails with that error
before writing anything, so the previous list stays whole. Marketers should close their
sessions promptly, or query a copy of the file.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import time
import uuid
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ClassVar

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Engine, Index, Table, event, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from audiobooks_scoring.contract import CUSTOMER_ID
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse.adapter import (
    RunLockHandle,
    WarehouseAdapter,
    _create_engine,
    check_unique_customers,
    pause_at,
)
from audiobooks_scoring.warehouse.columns import CodedColumn, ColumnWriter
from audiobooks_scoring.warehouse.errors import (
    AnotherRunPublishing,
    DuplicateCustomers,
    PublicationError,
    RunLockLost,
    WarehouseError,
)
from audiobooks_scoring.warehouse.tables import WarehouseTables, build_tables

logger = logging.getLogger(__name__)

DEFAULT_LOCK_WAIT_MS = 5_000
"""How long opening the file waits for another process to let it go (`lock_timeout_ms`)."""

FILE_LOCK_MARKERS = ("could not set lock on file", "conflicting lock")
"""DuckDB's messages when another process holds the database file."""

TRANSIENT_MARKERS = (
    *FILE_LOCK_MARKERS,
    "write-write conflict",
    "conflict on tuple",
    "transaction conflict",
)
"""Errors that waiting can heal: the file held elsewhere, a conflict between transactions."""

# Run locks held by this process, by lock file path.
_HELD: set[str] = set()


def is_file_lock_error(error: BaseException) -> bool:
    """Whether an error says that another process holds the database file."""
    message = str(getattr(error, "orig", error)).lower()
    return any(marker in message for marker in FILE_LOCK_MARKERS)


def _wait_for_file(dialect, _record, cargs, cparams, wait_ms: int):
    """Open the file, waiting up to `wait_ms` while another process holds it."""
    deadline = time.monotonic() + wait_ms / 1000
    delay = 0.02
    while True:
        try:
            return dialect.connect(*cargs, **copy.deepcopy(cparams))
        except duckdb.IOException as error:
            if not is_file_lock_error(error) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def driver_connection(conn: Connection):
    """The `duckdb.DuckDBPyConnection` under a SQLAlchemy connection (duckdb-engine wraps it)."""
    return _unwrapped(conn.connection.driver_connection)


def _unwrapped(wrapper: Any):
    """The DuckDB connection inside duckdb-engine's `ConnectionWrapper`."""
    return getattr(wrapper, "_ConnectionWrapper__c", wrapper)


class _FileLock(RunLockHandle):
    def __init__(self, handle: IO[str], path: str, pinned: Any) -> None:
        self.handle: IO[str] | None = handle
        self.path = path
        self.pinned = pinned

    def release(self) -> None:
        if self.pinned is not None:
            pinned, self.pinned = self.pinned, None
            try:
                pinned.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not hide the lock
                logger.warning("could not close the connection that held the warehouse file")
        if self.handle is not None:
            _HELD.discard(self.path)
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class DuckDBAdapter(WarehouseAdapter):
    """A DuckDB file: Arrow reads and writes, a rename swap in one transaction, a file lock."""

    name: ClassVar[str] = "duckdb"
    dialects: ClassVar[tuple[str, ...]] = ("duckdb",)
    supports_schemas: ClassVar[bool] = True
    transactional_ddl: ClassVar[bool] = True
    native_enum: ClassVar[bool] = False  # VARCHAR of few values is dictionary-compressed anyway
    history_partitioned: ClassVar[bool] = False
    constants_as_defaults: ClassVar[bool] = False
    customer_index_always: ClassVar[bool] = False  # ids are checked by a query, not an index
    list_writers: ClassVar[int] = 1  # one writer per file
    write_batch_rows: ClassVar[int] = 250_000  # rows per Arrow insert of a large frame
    shared_by_processes: ClassVar[bool] = False  # a run holds the file open for its lock
    single_process_reason: ClassVar[str] = (
        "DuckDB is a single-writer file, held open by the run's process"
    )

    def __init__(self, engine: Engine, tables: WarehouseTables, settings: Settings) -> None:
        super().__init__(engine, tables, settings)
        # No ART indexes on history: maintaining them made every 1M-row publication commit
        # 2.5 s slower, and DuckDB's zone maps already skip the row groups of other runs.
        for index in list(tables.history.indexes):
            tables.history.indexes.discard(index)

    @classmethod
    def open(cls, settings: Settings) -> DuckDBAdapter:
        """The adapter over a new engine that waits `lock_timeout_ms` for the file."""
        engine = cls.create_engine(settings.warehouse_url_value, settings.lock_timeout_ms)
        return cls(engine, build_tables(settings, cls.table_layout(settings)), settings)

    @classmethod
    def create_engine(cls, url: str, lock_wait_ms: int = DEFAULT_LOCK_WAIT_MS) -> Engine:
        """An engine that opens the file per operation (no pool) and waits for its lock.

        An in-memory database is opened once per engine and every connection is a cursor
        of it (DuckDB's own connections to one database), so threads share its tables.
        """
        from sqlalchemy.engine import make_url

        database = make_url(url).database or ":memory:"
        engine = _create_engine(url, poolclass=NullPool)
        if database.startswith(":memory:"):
            shared: list[Any] = []

            def cursor_of_shared(dialect, _record, cargs, cparams):
                from duckdb_engine import ConnectionWrapper

                if not shared:
                    shared.append(dialect.connect(*cargs, **copy.deepcopy(cparams)))
                return ConnectionWrapper(_unwrapped(shared[0]).cursor())

            event.listen(engine, "do_connect", cursor_of_shared)
            return engine
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        event.listen(
            engine,
            "do_connect",
            lambda dialect, record, cargs, cparams: _wait_for_file(
                dialect, record, cargs, cparams, lock_wait_ms
            ),
        )
        return engine

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _driver_errors(self, statement: str) -> Iterator[None]:
        """DuckDB's own errors raised as SQLAlchemy's `DBAPIError`s (what callers catch)."""
        try:
            yield
        except duckdb.Error as error:
            raise DBAPIError.instance(
                statement,
                None,
                error,
                duckdb.Error,
                hide_parameters=True,
                dialect=self.dialect,
            ) from error

    def _compiled(self, sql: str, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """A query with `:name` parameters as DuckDB SQL with `$n` markers and their values."""
        compiled = text(sql).bindparams(**dict(params)).compile(dialect=self.dialect)
        values = [compiled.params[name] for name in compiled.positiontup or ()]
        return compiled.string, values

    def _arrow_reader(self, duck, sql: str, values: list[Any], batch_rows: int):
        with self._driver_errors(sql):
            return duck.sql(sql, params=values or None).to_arrow_reader(batch_rows)

    def _type_sql(self, table: Table, name: str) -> str:
        return table.c[name].type.compile(dialect=self.dialect)

    # ------------------------------------------------------------------ reads

    def query_columns(self, sql: str, params: Mapping[str, Any]) -> dict[str, bool]:
        """The query's columns, numeric where DuckDB types them as numbers (Arrow schema)."""
        statement, values = self._compiled(f"SELECT * FROM ({sql}) AS source_query LIMIT 0", params)
        with self.engine.connect() as conn:
            duck = driver_connection(conn)
            with self._driver_errors(statement):
                schema = duck.sql(statement, params=values or None).to_arrow_table().schema
        return {field.name: _is_numeric(field.type) for field in schema}

    def stream_query(
        self,
        sql: str,
        params: Mapping[str, Any],
        chunk_size: int,
        column_types: Mapping[str, pa.DataType] | None = None,
    ) -> Generator[pd.DataFrame, None, None]:
        """Arrow batches of the query, cut into frames of `chunk_size` rows, cast as asked."""
        statement, values = self._compiled(sql, params)
        types = dict(column_types or {})
        for table in self._stream_tables(statement, values, chunk_size):
            yield _to_frame(table, types)

    def stream_customer_ids(
        self, sql: str, params: Mapping[str, Any], chunk_size: int
    ) -> Iterator[np.ndarray]:
        """Only the query's `customer_id` column (DuckDB reads no other), per chunk."""
        column = self.quote(CUSTOMER_ID)
        statement, values = self._compiled(
            f"SELECT source_query.{column} FROM ({sql}) AS source_query", params
        )
        for table in self._stream_tables(statement, values, chunk_size):
            ids = table.column(0)
            if ids.null_count:
                raise WarehouseError(f"the query returned {ids.null_count} NULL customer ids")
            yield ids.to_numpy().astype(np.int64, copy=False)

    def _stream_tables(self, statement: str, values: list[Any], chunk_size: int):
        """Arrow tables of exactly `chunk_size` rows (the last one shorter) from a query."""
        with self.engine.connect() as conn:
            duck = driver_connection(conn)
            reader = self._arrow_reader(duck, statement, values, chunk_size)
            try:
                pending: list[pa.RecordBatch] = []
                rows = 0
                with self._driver_errors(statement):
                    for batch in reader:
                        if batch.num_rows == 0:
                            continue
                        pending.append(batch)
                        rows += batch.num_rows
                        while rows >= chunk_size:
                            table = pa.Table.from_batches(pending)
                            yield table.slice(0, chunk_size)
                            rest = table.slice(chunk_size)
                            pending = rest.to_batches() if rest.num_rows else []
                            rows -= chunk_size
                if rows:
                    yield pa.Table.from_batches(pending)
            finally:
                reader.close()

    # ------------------------------------------------------------------ writes

    def _insert_arrow(
        self,
        conn: Connection,
        table: Table,
        batch: pa.Table,
        constants: Mapping[str, Any],
    ) -> None:
        """One `INSERT ... SELECT` of a registered Arrow table and bound constants."""
        duck = driver_connection(conn)
        source = f"__audiobooks_batch_{uuid.uuid4().hex}"
        names = [*batch.column_names, *constants]
        selected = [
            f"CAST({self.quote(source)}.{self.quote(name)} AS {self._type_sql(table, name)})"
            for name in batch.column_names
        ]
        selected += [
            f"CAST(${index} AS {self._type_sql(table, name)})"
            for index, name in enumerate(constants, start=1)
        ]
        statement = (
            f"INSERT INTO {self.qualified_name(table)} "
            f"({', '.join(self.quote(name) for name in names)}) "
            f"SELECT {', '.join(selected)} FROM {self.quote(source)}"
        )
        with self._driver_errors(statement):
            duck.register(source, batch)
            try:
                duck.execute(statement, [_plain(value) for value in constants.values()] or None)
            finally:
                try:
                    duck.unregister(source)
                except duckdb.Error:  # an aborted transaction: its rollback drops the name
                    pass

    def write_frame(self, conn: Connection, table: Table, frame: pd.DataFrame) -> int:
        """The frame as Arrow columns, one `INSERT ... SELECT` in the caller's transaction."""
        for start in range(0, len(frame), self.write_batch_rows):
            piece = frame.iloc[start : start + self.write_batch_rows]
            arrays = {name: _series_array(table, name, piece[name]) for name in piece.columns}
            self._insert_arrow(conn, table, pa.table(arrays), {})
        return len(frame)

    def write_columns(
        self, conn: Connection, table: Table, columns: Mapping[str, Any], rows: int
    ) -> int:
        """Arrays, coded columns (as Arrow dictionaries) and constants (as bound parameters)."""
        if rows == 0:
            return 0
        arrays, constants = self._arrow_batch(table, columns, rows)
        self._insert_arrow(conn, table, pa.table(arrays), constants)
        return rows

    def _arrow_batch(
        self, table: Table, columns: Mapping[str, Any], rows: int
    ) -> tuple[dict[str, pa.Array], dict[str, Any]]:
        """A column batch as Arrow arrays and constants (to bind as parameters)."""
        arrays: dict[str, pa.Array] = {}
        constants: dict[str, Any] = {}
        for name, value in columns.items():
            if isinstance(value, CodedColumn):
                arrays[name] = _dictionary_array(value)
            elif isinstance(value, np.ndarray | pd.Series | pa.Array | pa.ChunkedArray | list):
                arrays[name] = _values_array(table, name, value)
            else:
                constants[name] = value
            if name in arrays and len(arrays[name]) != rows:
                raise WarehouseError(
                    f"column {name} of a batch for {table.name} has {len(arrays[name])} rows, "
                    f"not {rows}"
                )
        if not arrays:
            raise WarehouseError(f"a batch for {table.name} gives no column of values")
        return arrays, constants

    @contextmanager
    def bulk_writer(self, table: Table) -> Iterator[ColumnWriter]:
        """Batches appended on one connection in one transaction, committed at the end.

        A failing batch rolls the writer's transaction back: nothing of it is committed.
        Measured and left out: a sender thread inserting while the caller prepares the
        next batch (as on PostgreSQL), and gathering the merge's 50,000-row blocks into
        larger inserts; neither was faster, DuckDB's append already uses every core.
        """
        with self.engine.begin() as conn:

            def write_batch(columns: Mapping[str, Any], rows: int) -> int:
                return self.write_columns(conn, table, columns, rows)

            yield ColumnWriter(write_batch)

    # ------------------------------------------------------------------ the run lock

    def lock_path(self) -> Path:
        """The file whose `flock` is the run lock (beside the database file)."""
        return Path(f"{self.engine.url.database or 'memory'}.{self.tables.scores.name}.lock")

    @contextmanager
    def run_lock(self) -> Iterator[RunLockHandle]:
        """An exclusive, non-blocking `flock`; the database file is held open while it is held.

        Holding the file for the run keeps other processes from opening it half-way through
        (they get DuckDB's clear lock error) and saves reopening it at every step.
        """
        path = self.lock_path()
        handle = open(path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise AnotherRunPublishing("another run is publishing (lock file is held)") from None
        try:
            pinned = self.engine.connect()  # idle, no transaction: only holds the file
        except DBAPIError as error:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise WarehouseError(
                "cannot open the warehouse file for the run, another process holds it "
                f"({self.describe_error(error)}); nothing was written"
            ) from None
        except BaseException:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise
        _HELD.add(str(path))
        lock = _FileLock(handle, str(path), pinned)
        try:
            yield lock
        finally:
            lock.release()

    def check_run_lock(self, conn: Connection) -> None:
        """Raise unless this process holds the run lock (a `flock` cannot be taken away)."""
        if str(self.lock_path()) not in _HELD:
            raise RunLockLost(
                "publishing needs the run lock: build and publish the list under the run lock"
            )

    # ------------------------------------------------------------------ the list

    def create_customer_index(self, conn: Connection, table: Table) -> None:
        """A unique `customer_id` index, after a query found no repeated id.

        The query comes first: over rows written in the same transaction DuckDB reports a
        repeated key only at the commit, and it has no savepoint to recover from a failure.
        """
        check_unique_customers(conn, table)
        index = Index(f"{table.name}_customer"[:60], table.c[CUSTOMER_ID], unique=True)
        try:
            index.create(conn)
        except DBAPIError as error:
            if self.is_unique_violation(error):
                raise DuplicateCustomers(f"{table.name}: a customer id is repeated") from error
            raise

    def _indexes_of(self, conn: Connection, name: str) -> list[str]:
        """Names of the indexes DuckDB keeps on a table of the warehouse schema."""
        rows = conn.execute(
            text(
                "SELECT index_name FROM duckdb_indexes() WHERE table_name = :name "
                "AND schema_name = coalesce(:schema, current_schema()) "
                "AND database_name = current_database()"
            ),
            {"name": name, "schema": self.tables.schema},
        )
        return [row[0] for row in rows]

    def swap_list(self, run_id: str, replace_current: bool) -> None:
        """Publish the built list in one transaction: rename it into place, copy it to history.

        The views are dropped, the live table is dropped, the built one renamed into its
        place (DuckDB cannot rename an indexed table: a built list's customer index is
        dropped first and made again on the live list), the run's history rows replaced
        from it and the views created again; nothing is visible before the commit. A
        backfill (`replace_current` false) only replaces the run's rows of history.
        """
        built = self.list_table()
        scores, history = self.tables.scores, self.tables.history
        columns = ", ".join(self.quote(c.name) for c in scores.columns)
        live, built_name = self.qualified_name(scores), self.qualified_name(built)
        with self.engine.begin() as conn:
            self.check_run_lock(conn)
            pause_at("after_staging")
            if not inspect(conn).has_table(built.name, schema=self.tables.schema):
                raise PublicationError(f"no built list {built.name} to publish for run {run_id}")
            conn.execute(history.delete().where(history.c.run_id == run_id))
            source = built_name
            if replace_current:
                built_indexes = self._indexes_of(conn, built.name)
                for index in built_indexes:
                    conn.execute(text(f"DROP INDEX {self.qualified_name(index)}"))
                self.drop_views(conn)
                conn.execute(text(f"DROP TABLE IF EXISTS {live}"))
                pause_at("during_swap")
                conn.execute(text(f"ALTER TABLE {built_name} RENAME TO {self.quote(scores.name)}"))
                if built_indexes or any(index.unique for index in scores.indexes):
                    conn.execute(
                        text(
                            f"CREATE UNIQUE INDEX {self.quote(f'{scores.name}_customer'[:60])} "
                            f"ON {live} ({self.quote(CUSTOMER_ID)})"
                        )
                    )
                source = live
            conn.execute(
                text(
                    f"INSERT INTO {self.qualified_name(history)} ({columns}) "
                    f"SELECT {columns} FROM {source}"
                )
            )
            if replace_current:
                self.create_views(conn)
            else:
                conn.execute(text(f"DROP TABLE {built_name}"))
            pause_at("before_commit")

    # ------------------------------------------------------------------ errors

    def is_transient(self, error: BaseException) -> bool:
        """The file held by another process (its lock), a conflict between transactions."""
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        message = str(getattr(error, "orig", error)).lower()
        return any(marker in message for marker in TRANSIENT_MARKERS)

    def is_unique_violation(self, error: DBAPIError) -> bool:
        """DuckDB's constraint errors on a duplicate key."""
        message = str(getattr(error, "orig", error)).lower()
        return "duplicate" in message or "unique" in message


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _to_frame(table: pa.Table, types: Mapping[str, pa.DataType]) -> pd.DataFrame:
    """An Arrow chunk as a frame, its columns cast to the requested types first."""
    if types:
        columns = [
            pc.cast(table.column(name), types[name], safe=False)
            if name in types and table.schema.field(name).type != types[name]
            else table.column(name)
            for name in table.column_names
        ]
        table = pa.table(dict(zip(table.column_names, columns, strict=True)))
    return table.to_pandas(split_blocks=True)


def _plain(value: Any) -> Any:
    """A constant as the plain Python value DuckDB binds (numpy scalars unwrapped)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value


def _is_text(table: Table, name: str) -> bool:
    try:
        return table.c[name].type.python_type is str
    except (NotImplementedError, KeyError):
        return False


def _dictionary_array(column: CodedColumn) -> pa.Array:
    """A coded column as an Arrow dictionary (code -1 is NULL), its codes copied as int32."""
    codes = np.asarray(column.codes)
    if not column.values:
        return pa.nulls(len(codes))
    indices = pa.array(codes.astype(np.int32), mask=codes < 0)
    values = pa.array([_plain(value) for value in column.values])
    return pa.DictionaryArray.from_arrays(indices, values)


def _values_array(table: Table, name: str, values: Any) -> pa.Array:
    """Values as an Arrow array (numeric arrays are shared, not copied, where they can be)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, pd.Series):
        return _series_array(table, name, values)
    array = np.asarray(values)
    if array.dtype == object:
        return _series_array(table, name, pd.Series(array))
    return pa.array(array)


def _series_array(table: Table, name: str, series: pd.Series) -> pa.Array:
    """A frame column as Arrow (NaN and None become NULL); objects of a text column as text."""
    if series.dtype == object:
        if _is_text(table, name):
            return pa.array(
                [None if _missing(value) else str(_plain(value)) for value in series],
                type=pa.string(),
            )
        return pa.array([None if _missing(value) else _plain(value) for value in series])
    return pa.Array.from_pandas(series)


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and value != value


__all__ = ["DuckDBAdapter", "driver_connection", "is_file_lock_error"]
