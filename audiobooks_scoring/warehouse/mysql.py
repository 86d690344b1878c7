"""MySQL and MariaDB (PyMySQL): bulk text-protocol reads, LOAD DATA writes, lists written once.

- Reads: the query runs on an unbuffered (server-side) cursor; when every column is a
  number or a date, the row packets are read off the socket in blocks and parsed per chunk
  (packet framing in one tight loop, fields with numpy, values by Arrow's CSV parser), so
  memory is bounded by a chunk and no Python object is made per value. Other queries (text
  columns) are fetched row by row in chunks. Values arrive as text, which the server prints
  in the shortest form that reads back to the same double: floats are bit-exact.
- Writes: `LOAD DATA LOCAL INFILE` of a tab-separated batch written by Arrow to a temp file
  (measured 2x less server CPU than multi-row INSERTs). `LOAD DATA LOCAL` turns refused
  values into warnings, so any warning fails the write (and its transaction). The driver's
  local-file permission is switched on only for the adapter's own LOAD DATA statements.
  A `bulk_writer` is one transaction, fed by a sender thread at most one batch behind.
- Tables: reason codes are a native `ENUM` (one byte). History is partitioned
  `LIST COLUMNS (run_id)`, one partition a run, with a customer index; the live list
  `customer_scores` is a view of the live run's partition (`ALGORITHM = MERGE`, so queries
  on it prune to that partition and use the index). A list is written once: loaded into
  `<scores>_next` with what varies by customer, its constants then added as instant
  `ADD COLUMN ... DEFAULT` columns (no row is rewritten; the defaults are then dropped), so
  it has history's columns and index, and exchanged into its run's partition. Customer ids
  are checked unique by the spill merge or a query (history's unique keys would have to
  include `run_id`, and a non-unique index loads faster). In MySQL a schema is a
  database: `warehouse_schema` names it and tables are qualified `db.table`. MariaDB
  allows 8,192 partitions a table, so history holds at most that many runs (22 years of
  nightly runs).
- Run lock: `GET_LOCK('audiobooks-scoring:<db>.<scores>', 0)` on a connection kept open for
  the run; publication checks that `IS_USED_LOCK` still names that connection's id
  (`RunLockLost` otherwise). A killed session or a dead client frees it.

Publication (DDL is not transactional in MySQL; each statement below is atomic):

1. Under the run lock, the intent row `(run_id, replace, scored_at of the built list)` is
   committed to `<scores>_swap`, and the run's history partition added if missing.
2. `ALTER TABLE history EXCHANGE PARTITION <run's> WITH TABLE <scores>_next`: the built list
   becomes the run's history (its earlier rows, if any, land in `_next`). This is the
   publication's commit point.
3. `CREATE OR REPLACE VIEW customer_scores ... WHERE run_id = <run>` (not for a backfill),
   then `_next` is dropped and the intent row deleted.

Views and grants name the live view and the job's views read it at query time, so they
follow the switch (tests check both). A crash, kill or lost connection:

| cut | readers see | history | the next attempt (a retry, or the next run's start) |
| --- | --- | --- | --- |
| before the EXCHANGE (all pause stages) | the previous list | unchanged | drops `_next` |
| after the EXCHANGE, before the view | the previous list | has the run | points the view at it |
| after the view | the new list, whole | has the run | drops `_next`, the intent |

Whether the EXCHANGE happened is read from history: the intent's `scored_at` (to the
microsecond) is in the run's partition only once it did. Readers never see an empty,
partial or mixed list. The EXCHANGE waits for running queries on history up to
`lock_timeout_ms` (rounded up to a second) and a timeout (1205) is retried.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import tempfile
import threading
from collections.abc import Generator, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, date, datetime
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateSchema, CreateTable

from audiobooks_scoring.contract import CUSTOMER_ID
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse.adapter import (
    RunLockHandle,
    SessionLock,
    WarehouseAdapter,
    _create_engine,
    check_unique_customers,
    pause_at,
)
from audiobooks_scoring.warehouse.columns import CodedColumn, ColumnWriter
from audiobooks_scoring.warehouse.errors import (
    DuplicateCustomers,
    PublicationError,
    RunLockLost,
    WarehouseError,
)
from audiobooks_scoring.warehouse.tables import (
    LIST_COLUMNS,
    SCORED_AT_TYPE,
    TableLayout,
    list_shaped_table,
)

logger = logging.getLogger(__name__)

# Server error codes: lock wait timeout, deadlock, connection killed or lost, can't connect,
# too many connections, query interrupted by a shutdown; and those that waiting cannot heal.
TRANSIENT_ERRORS = frozenset({1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 1040, 1053, 4031})
PERMANENT_ERRORS = frozenset({1044, 1045, 1049, 1142, 1146, 1064, 1062, 1048, 1364})
DUPLICATE_KEY = 1062
LOCK_PREFIX = "audiobooks-scoring:"
LOCK_NAME_MAX = 64  # MySQL refuses longer user-lock names
NO_RUN_PARTITION = "p_no_run"  # a LIST-partitioned table needs one partition to be created

# Result column types (MySQL protocol) the bulk reader parses, and their default Arrow types.
_INTEGER_TYPES = frozenset({1, 2, 3, 8, 9, 13})  # TINY, SHORT, LONG, LONGLONG, INT24, YEAR
_FLOAT_TYPES = frozenset({4, 5})  # FLOAT, DOUBLE
_DATE_TYPES = frozenset({10, 14})  # DATE, NEWDATE
_NUMERIC_TYPES = _INTEGER_TYPES | _FLOAT_TYPES | {0, 246}  # with DECIMAL, NEWDECIMAL
_UNSIGNED_FLAG = 32
_READ_BYTES = 1 << 20
_NULL_FIELD = 0xFB
_LONG_FIELD = 0xFC  # a field of 251 bytes or more: never a number or a date
_MAX_PACKET = 0xFFFFFF
_NEWLINE, _TAB = 10, 9


def lock_name(database: str, scores_table: str) -> str:
    """The `GET_LOCK` name of a warehouse's run lock (user locks are server-wide)."""
    name = f"{LOCK_PREFIX}{database}.{scores_table}"
    if len(name) <= LOCK_NAME_MAX:
        return name
    return LOCK_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:40]


def error_code(error: BaseException) -> int | None:
    """The server's (or client library's) numeric error code of a driver error, if any."""
    orig = getattr(error, "orig", None) or error
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class MySQLAdapter(WarehouseAdapter):
    """MySQL/MariaDB over PyMySQL: bulk reads, LOAD DATA, a partition exchange, GET_LOCK."""

    name: ClassVar[str] = "mysql"
    dialects: ClassVar[tuple[str, ...]] = ("mysql", "mariadb")
    supports_schemas: ClassVar[bool] = True
    transactional_ddl: ClassVar[bool] = False
    native_enum: ClassVar[bool] = True
    history_partitioned: ClassVar[bool] = True
    constants_as_defaults: ClassVar[bool] = True
    customer_index_always: ClassVar[bool] = False  # ids are checked by the merge or a query
    live_list_view: ClassVar[bool] = True
    list_writers: ClassVar[int] = 3  # measured at 1M: 3 sessions load faster than 2 or 4
    write_batch_rows: ClassVar[int] = 250_000

    @classmethod
    def create_engine(cls, url: str) -> Engine:
        """An engine whose connections may send local files (used by LOAD DATA only)."""
        driver = make_url(url).get_driver_name() if "://" in url else ""
        options = {"local_infile": True} if driver in ("pymysql", "mysqldb") else {}
        engine = _create_engine(url, pool_pre_ping=True, connect_args=options)
        if driver == "pymysql":
            event.listen(engine, "connect", _refuse_local_files)
        return engine

    @classmethod
    def table_layout(cls, settings: Settings) -> TableLayout:
        """Native ENUM reason codes; history partitioned by run; the live list is a view."""
        return TableLayout(
            schema=settings.warehouse_schema,
            native_enum=True,
            history_partitioned=True,
            scores_index=False,
        )

    @property
    def database(self) -> str:
        """The database (MySQL's schema) the tables live in."""
        return self.tables.schema or self.engine.url.database or ""

    def swap_table(self) -> Table:
        """`<scores>_swap`: the intent row of a publication until its list is live."""
        return Table(
            f"{self.tables.scores.name}_swap"[:60],
            MetaData(schema=self.tables.schema),
            Column("run_id", String(80), primary_key=True),
            Column("replace_current", Boolean, nullable=False),
            Column("scored_at", SCORED_AT_TYPE, nullable=False),
            Column("committed_at", DateTime(timezone=True), nullable=False),
        )

    def indexed_list_table(self, name: str, columns: tuple[str, ...] | None = None) -> Table:
        """A table of the list's columns (`columns`: the first ones) with a customer index."""
        table = list_shaped_table(self.tables, name, columns)
        # one name in both tables: EXCHANGE compares index names
        Index(f"{self.tables.scores.name}_customer"[:60], table.c[CUSTOMER_ID])
        return table

    def list_table(self) -> Table:
        """`<scores>_next`: what varies by customer, indexed as history is; constants later."""
        return self.indexed_list_table(f"{self.tables.scores.name}_next"[:60], LIST_COLUMNS)

    def finished_list_table(self) -> Table:
        """`<scores>_next` once finished: with the run's constants, as history has them."""
        return self.indexed_list_table(self.list_table().name)

    def create_tables(self) -> None:
        """The database, the partitioned history, the live view, the other tables and views.

        Idempotent. Tables of the earlier layout (a live table, an unpartitioned history)
        are refused, naming them.
        """
        tables = self.tables
        with self.engine.begin() as conn:
            if tables.schema:
                conn.execute(CreateSchema(tables.schema, if_not_exists=True))
            found = self._relation_types(conn, tables.scores.name, tables.history.name)
            self._refuse_earlier_layout(conn, found)
            others = [
                table
                for table in tables.metadata.sorted_tables
                if table.name not in (tables.scores.name, tables.history.name)
            ]
            tables.metadata.create_all(conn, tables=others, checkfirst=True)
            self.swap_table().create(conn, checkfirst=True)
            if tables.history.name not in found:
                history = self.indexed_list_table(tables.history.name)
                ddl = str(CreateTable(history).compile(dialect=self.dialect)).strip()
                conn.execute(
                    text(
                        f"{ddl} PARTITION BY LIST COLUMNS (run_id) "
                        f"(PARTITION {NO_RUN_PARTITION} VALUES IN (''))"
                    )
                )
                for index in history.indexes:
                    index.create(conn)
            if tables.scores.name not in found:
                self.point_live_view(conn, "")
            self.create_views(conn)

    def _relation_types(self, conn: Connection, *names: str) -> dict[str, str]:
        """'BASE TABLE' or 'VIEW' of each of the relations `names` that exists."""
        rows = conn.execute(
            text(
                "SELECT table_name, table_type FROM information_schema.TABLES "
                "WHERE table_schema = :db AND table_name IN :names"
            ).bindparams(bindparam("names", expanding=True)),
            {"db": self.database, "names": list(names)},
        ).all()
        return {str(name): str(kind) for name, kind in rows}

    def _refuse_earlier_layout(self, conn: Connection, found: Mapping[str, str]) -> None:
        """Refuse a live table or an unpartitioned history (this adapter's earlier layout)."""
        scores, history = self.tables.scores.name, self.tables.history.name
        earlier = [scores] if found.get(scores, "VIEW") != "VIEW" else []
        if history in found:
            partitioned = conn.execute(
                text(
                    "SELECT count(*) FROM information_schema.PARTITIONS WHERE table_schema = :db "
                    "AND table_name = :name AND partition_method IS NOT NULL"
                ),
                {"db": self.database, "name": history},
            ).scalar()
            if found[history] != "BASE TABLE" or not partitioned:
                earlier.append(history)
        if earlier:
            raise WarehouseError(
                f"{', '.join(earlier)} in {self.database} have an earlier layout (the live list "
                "is now a view of history, partitioned by run): rename or drop them, then run "
                "`audiobooks-scoring init` again"
            )

    def point_live_view(self, conn: Connection, run_id: str) -> None:
        """`CREATE OR REPLACE VIEW customer_scores` over the run's history partition (atomic)."""
        columns = ", ".join(self.quote(c.name) for c in self.tables.scores.columns)
        conn.execute(
            text(
                f"CREATE OR REPLACE ALGORITHM = MERGE SQL SECURITY DEFINER VIEW "
                f"{self.qualified_name(self.tables.scores)} AS SELECT {columns} "
                f"FROM {self.qualified_name(self.tables.history)} "
                f"WHERE {self.quote('run_id')} = {self.literal(run_id, String(80))}"
            )
        )

    def partition_name(self, run_id: str) -> str:
        """The name of a run's history partition (from a digest of its id)."""
        return "p_" + hashlib.sha256(run_id.encode()).hexdigest()[:24]

    def _partition_exists(self, conn: Connection, run_id: str) -> bool:
        return (
            conn.execute(
                text(
                    "SELECT 1 FROM information_schema.PARTITIONS WHERE table_schema = :db "
                    "AND table_name = :name AND partition_name = :partition"
                ),
                {
                    "db": self.database,
                    "name": self.tables.history.name,
                    "partition": self.partition_name(run_id),
                },
            ).first()
            is not None
        )

    def analyze(self, table: Table) -> None:
        """`ANALYZE TABLE`."""
        with self.engine.begin() as conn:
            conn.execute(text(f"ANALYZE TABLE {self.qualified_name(table)}")).all()

    # ------------------------------------------------------------------------------ reads

    def query_columns(self, sql: str, params: Mapping[str, Any]) -> dict[str, bool]:
        """The query's columns, numeric where the server types them as numbers."""
        with self.engine.connect() as conn:
            result = conn.execute(
                text(f"SELECT * FROM ({sql}) AS source_query LIMIT 0"), dict(params)
            )
            description = result.cursor.description
            result.close()
        return {col[0]: col[1] in _NUMERIC_TYPES for col in description}

    def _compiled(self, sql: str, params: Mapping[str, Any]) -> tuple[str, Any]:
        compiled = text(sql).bindparams(**dict(params)).compile(dialect=self.dialect)
        positional = compiled.positiontup
        if positional is not None:
            return compiled.string, tuple(compiled.params[name] for name in positional)
        return compiled.string, compiled.params

    @contextmanager
    def _unbuffered(self, sql: str, params: Mapping[str, Any]):
        """(connection, DBAPI cursor) of a query executed on a server-side (SS) cursor."""
        with self.engine.connect() as conn:
            raw: Any = conn.connection.driver_connection
            statement, bound = self._compiled(sql, params)
            cursor = raw.cursor(_ss_cursor_class(raw))
            try:
                cursor.execute(statement, bound)
            except self.dialect.loaded_dbapi.Error as error:
                raise DBAPIError.instance(
                    statement,
                    None,
                    error,
                    self.dialect.loaded_dbapi.Error,
                    hide_parameters=True,
                    dialect=self.dialect,
                ) from error
            yield conn, cursor

    def stream_query(
        self,
        sql: str,
        params: Mapping[str, Any],
        chunk_size: int,
        column_types: Mapping[str, pa.DataType] | None = None,
    ) -> Generator[pd.DataFrame, None, None]:
        """Frames of at most `chunk_size` rows; bulk-parsed when all are numbers or dates."""
        if self.dialect.driver != "pymysql":
            yield from super().stream_query(sql, params, chunk_size, column_types)
            return
        with self._unbuffered(sql, params) as (conn, cursor):
            names = [col[0] for col in cursor.description]
            types = _arrow_types(cursor, column_types or {})
            if types is None:
                yield from _fetched_frames(conn, cursor, names, chunk_size)
                return
            reader = _RowPackets(conn, cursor)
            with reader:
                for block in reader.blocks(chunk_size):
                    yield block.table(names, types).to_pandas()

    def stream_customer_ids(
        self, sql: str, params: Mapping[str, Any], chunk_size: int
    ) -> Iterator[np.ndarray]:
        """The leading column of each row (the population's rows are read whole), as int64."""
        if self.dialect.driver != "pymysql":
            yield from super().stream_customer_ids(sql, params, chunk_size)
            return
        with self._unbuffered(sql, params) as (conn, cursor):
            if cursor.description[0][0] != CUSTOMER_ID:
                raise WarehouseError(f"the query's first column is not {CUSTOMER_ID}")
            reader = _RowPackets(conn, cursor)
            with reader:
                for block in reader.blocks(chunk_size):
                    yield block.leading_integers()

    # ------------------------------------------------------------------------------ writes

    def write_frame(self, conn: Connection, table: Table, frame: pd.DataFrame) -> int:
        """LOAD DATA of the frame, in the caller's transaction (`write_batch_rows` a statement)."""
        if frame.empty:
            return 0
        for start in range(0, len(frame), self.write_batch_rows):
            piece = frame.iloc[start : start + self.write_batch_rows]
            columns = {name: piece[name] for name in piece.columns}
            self._load(conn, table, list(columns), _tsv_batch(table, columns, len(piece)))
        return len(frame)

    def write_columns(
        self, conn: Connection, table: Table, columns: Mapping[str, Any], rows: int
    ) -> int:
        """LOAD DATA of column arrays, coded columns (as Arrow dictionaries) and constants."""
        if rows == 0:
            return 0
        self._load(conn, table, list(columns), _tsv_batch(table, columns, rows))
        return rows

    @contextmanager
    def bulk_writer(self, table: Table) -> Iterator[ColumnWriter]:
        """One transaction, committed at the end; a sender thread loads the previous batch.

        Each batch is turned into its file on the caller's thread while the server loads
        the one before (at most one batch waits). A failing batch fails the writer and
        nothing it wrote is committed.
        """
        with self.engine.begin() as conn:
            sender = _LoadSender(self, conn, table)
            try:

                def write_batch(columns: Mapping[str, Any], rows: int) -> int:
                    sender.send(list(columns), _tsv_batch(table, columns, rows))
                    return rows

                yield ColumnWriter(write_batch)
            except BaseException:
                sender.stop()
                raise
            sender.finish()

    def _load(self, conn: Connection, table: Table, names: list[str], data: pa.Buffer) -> None:
        """LOAD DATA LOCAL INFILE of tab-separated `data`; any server warning fails it."""
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - removed below
            prefix="audiobooks-load-", suffix=".tsv", delete=False
        )
        try:
            with handle:
                handle.write(data)
            statement = (
                f"LOAD DATA LOCAL INFILE {self.literal(handle.name)} "
                f"INTO TABLE {self.qualified_name(table)} CHARACTER SET utf8mb4 "
                f"({', '.join(self.quote(name) for name in names)})"
            )
            raw = conn.connection.driver_connection
            with _local_files_allowed(raw):
                conn.exec_driver_sql(statement)
            warnings = [
                row
                for row in conn.exec_driver_sql("SHOW WARNINGS LIMIT 5").all()
                if str(row[0]).lower() != "note"
            ]
        finally:
            os.unlink(handle.name)
        if warnings:
            level, code, message = warnings[0][:3]
            if int(code) == DUPLICATE_KEY:
                raise DuplicateCustomers(f"{table.name}: {message}")
            raise WarehouseError(
                f"loading {table.name}: the server refused or changed values "
                f"({level} {code}: {message})"
            )

    def clear_staging(self, run_id: str) -> int:
        """Complete or clean an interrupted publication; empty staging; drop this run's rejects."""
        self.recover_publication()
        staging, rejected = self.tables.staging, self.tables.rejected
        with self.engine.connect() as conn:
            removed = int(conn.execute(select(func.count()).select_from(staging)).scalar_one())
            if removed:
                conn.execute(text(f"TRUNCATE TABLE {self.qualified_name(staging)}"))
            conn.execute(delete(rejected).where(rejected.c.run_id == run_id))
            conn.commit()
        return removed

    # ------------------------------------------------------------------------------ the list

    def create_list_table(self, conn: Connection) -> Table:
        """A new, empty `<scores>_next` with its customer index (an earlier one dropped).

        The index is there before the load (building it afterwards was measured 1.4 s slower
        at 1M rows).
        """
        self.recover_publication()  # a committed publication's leftovers go first
        table = self.list_table()
        conn.execute(text(f"DROP TABLE IF EXISTS {self.qualified_name(table)}"))
        table.create(conn)
        return table

    def finish_list(
        self,
        conn: Connection,
        table: Table,
        constants: Mapping[str, Any],
        ids_checked: bool,
        customer_index: bool = False,
    ) -> None:
        """Ids checked unique; the run's constants as instant columns (defaults, then dropped).

        `ADD COLUMN ... DEFAULT` rewrites no row (the value is kept once, in the table's
        metadata), and the columns end up as history's: the list can be exchanged into it.
        A unique index cannot be asked for: history's keys must include `run_id`.
        """
        if not ids_checked:
            check_unique_customers(conn, table)
        scores = self.tables.scores
        name = self.qualified_name(table)
        literals = {
            column: self._constant_literal(value, scores.c[column].type)
            for column, value in constants.items()
        }
        added = ", ".join(
            f"ADD COLUMN {self.quote(column)} "
            f"{scores.c[column].type.compile(dialect=self.dialect)} NOT NULL DEFAULT {value}"
            for column, value in literals.items()
        )
        conn.execute(text(f"ALTER TABLE {name} {added}"))
        dropped = ", ".join(
            f"ALTER COLUMN {self.quote(column)} DROP DEFAULT" for column in literals
        )
        conn.execute(text(f"ALTER TABLE {name} {dropped}"))

    def _constant_literal(self, value: Any, type_: Any) -> str:
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return self.literal(value.isoformat(sep=" "))
        return self.literal(value, type_)

    def forget_run_history(self, run_id: str) -> None:
        """Empty the run's history partition (`TRUNCATE PARTITION`: no rows left to purge)."""
        with self._ddl_connection() as conn:
            if self._partition_exists(conn, run_id):
                conn.execute(
                    text(
                        f"ALTER TABLE {self.qualified_name(self.tables.history)} "
                        f"TRUNCATE PARTITION {self.partition_name(run_id)}"
                    )
                )

    def discard_list(self) -> None:
        """Drop a built but unpublished list."""
        with self.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {self.qualified_name(self.list_table())}"))

    def _live_run_id(self, conn: Connection) -> str | None:
        scores = self.tables.scores
        return conn.execute(select(scores.c.run_id).limit(1)).scalar()

    def _ddl_connection(self) -> Connection:
        """A connection in autocommit (MariaDB 10.11's EXCHANGE waits on itself without it)."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def _wait_seconds(self) -> int:
        return max(1, math.ceil(self.lock_timeout_ms / 1000))

    def swap_list(self, run_id: str, replace_current: bool) -> None:
        """Commit the intent, exchange the list into history, point the view (see the module)."""
        self.recover_publication()  # e.g. this swap's own earlier attempt, cut after its commit
        built, swap = self.finished_list_table(), self.swap_table()
        with self.engine.connect() as conn:
            live_run = self._live_run_id(conn)
            if built.name not in self._relation_types(conn, built.name):
                if replace_current and live_run == run_id:
                    return  # an earlier attempt reached its commit point and was completed
                raise PublicationError(f"no built list {built.name} to publish for run {run_id}")
            scored_at = conn.execute(select(built.c.scored_at).limit(1)).scalar()
            if scored_at is None:
                raise PublicationError(f"the built list {built.name} of run {run_id} is empty")
        replace = replace_current or live_run == run_id  # a backfill of the live run replaces it
        pause_at("after_staging")
        with self.engine.begin() as conn:
            self.check_run_lock(conn)
            conn.execute(
                insert(swap).values(
                    run_id=run_id,
                    replace_current=replace,
                    scored_at=scored_at,
                    committed_at=datetime.now(UTC),
                )
            )
            pause_at("during_swap")
        with self._ddl_connection() as conn:
            self.check_run_lock(conn)
            if not self._partition_exists(conn, run_id):
                conn.execute(
                    text(
                        f"ALTER TABLE {self.qualified_name(self.tables.history)} ADD PARTITION "
                        f"(PARTITION {self.partition_name(run_id)} "
                        f"VALUES IN ({self.literal(run_id, String(80))}))"
                    )
                )
            pause_at("before_commit")
            self._exchange_in(conn, run_id, built)
            pause_at("during_switch")
        self.recover_publication()  # the commit point is passed: the view, `_next`, the intent

    def _exchange_in(self, conn: Connection, run_id: str, built: Table) -> None:
        """One atomic EXCHANGE: the built list becomes the run's history partition."""
        conn.execute(text(f"SET SESSION lock_wait_timeout = {self._wait_seconds()}"))
        try:
            conn.execute(
                text(
                    f"ALTER TABLE {self.qualified_name(self.tables.history)} EXCHANGE PARTITION "
                    f"{self.partition_name(run_id)} WITH TABLE {self.qualified_name(built)}"
                )
            )
        finally:
            conn.execute(text("SET SESSION lock_wait_timeout = DEFAULT"))

    def _exchanged(self, conn: Connection, run_id: str, scored_at: datetime) -> bool:
        """Whether the list scored at `scored_at` is the run's history (the EXCHANGE happened)."""
        history = self.tables.history
        found = conn.execute(
            select(history.c.run_id)
            .where(history.c.run_id == run_id, history.c.scored_at == scored_at)
            .limit(1)
        ).first()
        return found is not None

    def recover_publication(self) -> None:
        """Complete a publication whose EXCHANGE happened (the view, `_next`); forget the rest.

        Idempotent; called at every run's start, before a list is built and around a swap.
        An intent whose list is in history is completed: the live view points at its run
        (not for a backfill) and `_next`, holding the run's replaced rows, is dropped. An
        intent whose EXCHANGE did not happen is deleted: nothing of it is published.
        """
        swap, built = self.swap_table(), self.list_table()
        with self.engine.connect() as conn:
            if swap.name not in self._relation_types(conn, swap.name):
                return
            intent = conn.execute(select(swap)).first()
            if intent is None:
                return
            if self._exchanged(conn, intent.run_id, intent.scored_at):
                if intent.replace_current:
                    self.point_live_view(conn, intent.run_id)
                    logger.info("run %s: its list is now live", intent.run_id)
                conn.execute(text(f"DROP TABLE IF EXISTS {self.qualified_name(built)}"))
            conn.execute(delete(swap).where(swap.c.run_id == intent.run_id))
            conn.commit()

    # ------------------------------------------------------------------------------ run lock

    def _engine_key(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def _lock_name(self) -> str:
        return lock_name(self.database, self.tables.scores.name)

    def run_lock_holder(self, conn: Connection | None = None) -> int | None:
        """The connection id holding this warehouse's run lock (None when it is free)."""
        if conn is None:
            with self.engine.connect() as own:
                return self.run_lock_holder(own)
        holder = conn.execute(
            text("SELECT IS_USED_LOCK(:name)"), {"name": self._lock_name()}
        ).scalar()
        return None if holder is None else int(holder)

    def _describe_holder(self, conn: Connection) -> str:
        try:
            holder = self.run_lock_holder(conn)
            row = conn.execute(
                text("SELECT user, host, time FROM information_schema.PROCESSLIST WHERE id = :id"),
                {"id": holder},
            ).first()
        except DBAPIError:
            return f"GET_LOCK {self._lock_name()!r} is held"
        where = f" by {row.user}@{row.host}, connected {row.time} s" if row is not None else ""
        return f"GET_LOCK {self._lock_name()!r} held by connection id {holder}{where}"

    def run_lock(self) -> AbstractContextManager[RunLockHandle]:
        """`GET_LOCK(name, 0)` on a connection kept open for the run."""
        name = self._lock_name()
        return SessionLock.hold(
            self.engine,
            (self._engine_key(), name),
            ("SELECT GET_LOCK(:name, 0)", "SELECT CONNECTION_ID()", "SELECT RELEASE_LOCK(:name)"),
            {"name": name},
            self._describe_holder,
        )

    def check_run_lock(self, conn: Connection) -> None:
        """Raise `RunLockLost` unless this process's lock session still holds the lock."""
        held = SessionLock.session_holding((self._engine_key(), self._lock_name()))
        holder = self.run_lock_holder(conn)
        if holder != held:
            raise RunLockLost(
                f"the run lock was lost (its database session, connection id {held}, ended or "
                "was killed), so another run may be publishing; nothing was published by this run"
            )

    # ------------------------------------------------------------------------------ errors

    def is_transient(self, error: BaseException) -> bool:
        """Lock wait timeout, deadlock, lost or refused connection; not access or unknown db."""
        code = error_code(error)
        if code in PERMANENT_ERRORS:
            return False
        if code in TRANSIENT_ERRORS:
            return True
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        return False

    def is_unique_violation(self, error: DBAPIError) -> bool:
        """Error 1062 (duplicate entry)."""
        return error_code(error) == DUPLICATE_KEY


# ---------------------------------------------------------------------------- PyMySQL details


def _ss_cursor_class(raw: Any) -> Any:
    module = type(raw).__module__.split(".")[0]
    if module == "pymysql":
        import pymysql.cursors

        return pymysql.cursors.SSCursor
    import MySQLdb.cursors

    return MySQLdb.cursors.SSCursor


def _refuse_local_files(dbapi_connection, _record) -> None:
    """The server may ask for a local file only during the adapter's own LOAD DATA."""
    if hasattr(dbapi_connection, "_local_infile"):
        dbapi_connection._local_infile = False


@contextmanager
def _local_files_allowed(raw: Any):
    if not hasattr(raw, "_local_infile"):
        yield
        return
    raw._local_infile = True
    try:
        yield
    finally:
        raw._local_infile = False


def _arrow_types(cursor: Any, wanted: Mapping[str, pa.DataType]) -> list[pa.DataType] | None:
    """Arrow types to parse each result column with, or None when one is not a number or date."""
    fields = getattr(getattr(cursor, "_result", None), "fields", None)
    types = []
    for index, column in enumerate(cursor.description):
        name, code = column[0], column[1]
        asked = wanted.get(name)
        if asked is not None and not (
            pa.types.is_integer(asked) or pa.types.is_floating(asked) or pa.types.is_date(asked)
        ):
            return None  # text is kept as text, to be judged row by row
        if code in _INTEGER_TYPES:
            unsigned = fields is not None and fields[index].flags & _UNSIGNED_FLAG
            default = pa.uint64() if unsigned and code == 8 else pa.int64()
        elif code in _FLOAT_TYPES:
            default = pa.float64()
        elif code in _DATE_TYPES:
            default = pa.date32()
        else:
            return None
        if asked is not None and pa.types.is_date(asked) != (code in _DATE_TYPES):
            return None
        types.append(asked or default)
    return types


def _fetched_frames(conn: Connection, cursor: Any, names: list[str], chunk_size: int):
    """Row-by-row fetching (text columns), in frames of `chunk_size` rows."""
    finished = False
    try:
        while True:
            rows = cursor.fetchmany(chunk_size)
            if not rows:
                finished = True
                return
            yield pd.DataFrame.from_records(list(rows), columns=names)
    finally:
        if finished:
            cursor.close()
        else:
            conn.invalidate()  # the rest of the result would have to be read to reuse it


class _Block:
    """Complete row packets of one chunk: the bytes and where each row's payload starts."""

    def __init__(self, data: bytearray, starts: list[int], columns: int) -> None:
        self.data = data
        self.starts = np.asarray(starts, dtype=np.int64)
        self.columns = columns

    def _fields(self):
        """(start, length, null) of each column's field in every row, checked against framing."""
        raw = np.frombuffer(self.data, dtype=np.uint8)
        position = self.starts.copy()
        fields = []
        for _ in range(self.columns):
            prefix = raw[position]
            if (prefix >= _LONG_FIELD).any():
                raise WarehouseError("a numeric or date field of 251 bytes or more")
            null = prefix == _NULL_FIELD
            length = np.where(null, 0, prefix).astype(np.int64)
            fields.append((position, length, null))
            position = position + 1 + length
        ends = self.starts + _payload_lengths(raw, self.starts)
        if not np.array_equal(position, ends):
            raise WarehouseError("a result row did not have the expected fields")
        return raw, fields

    def table(self, names: list[str], types: list[pa.DataType]) -> pa.Table:
        """The rows as an Arrow table: length bytes become separators, then Arrow's CSV parser."""
        raw, fields = self._fields()  # a writable view of the block's own bytes
        for index, (position, _length, _null) in enumerate(fields):
            if index == 0:
                for back in range(5):  # the packet header and the first length byte
                    raw[position - back] = _NEWLINE
            else:
                raw[position] = _TAB
        return pacsv.read_csv(
            pa.py_buffer(self.data),
            read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 26),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=True
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict(zip(names, types, strict=True)),
                null_values=[""],
                strings_can_be_null=True,
            ),
        )

    def leading_integers(self) -> np.ndarray:
        """The first field of every row as int64 (NULL as 0), without parsing the rest."""
        raw = np.frombuffer(self.data, dtype=np.uint8)
        position = self.starts
        prefix = raw[position]
        null = prefix == _NULL_FIELD
        length = np.where(null, 0, prefix).astype(np.int64)
        width = int(length.max()) if len(length) else 0
        if width == 0:
            return np.zeros(len(length), dtype=np.int64)
        if width > 20:
            raise WarehouseError(f"{CUSTOMER_ID} is not an integer")
        index = position[:, None] + 1 + np.arange(width)[None, :]
        inside = np.arange(width)[None, :] < length[:, None]
        chars = np.where(inside, raw[np.minimum(index, len(raw) - 1)], ord("0")).astype(np.int64)
        negative = chars[:, 0] == ord("-")
        chars[negative, 0] = ord("0")
        digits = chars - ord("0")
        if ((digits < 0) | (digits > 9)).any():
            raise WarehouseError(f"{CUSTOMER_ID} is not an integer")
        values = np.zeros(len(length), dtype=np.int64)
        for column in range(width):
            values = np.where(inside[:, column], values * 10 + digits[:, column], values)
        return np.where(negative, -values, values)


def _payload_lengths(raw: np.ndarray, starts: np.ndarray) -> np.ndarray:
    header = starts - 4
    return (
        raw[header].astype(np.int64)
        | (raw[header + 1].astype(np.int64) << 8)
        | (raw[header + 2].astype(np.int64) << 16)
    )


class _RowPackets:
    """The row packets of an unbuffered PyMySQL result, read off its socket in blocks.

    The protocol: each row is a packet (3-byte length, 1-byte sequence number, then one
    length-prefixed field per column, 0xFB for NULL), ended by an EOF packet (0xFE, under
    9 bytes) or an error packet (0xFF). Leaving before the end closes the connection
    (what is left of the result would have to be read to use it again).
    """

    def __init__(self, conn: Connection, cursor: Any) -> None:
        self.conn = conn
        self.cursor = cursor
        self.raw = cursor.connection
        self.columns = len(cursor.description)
        self.finished = False
        self.sequence = self.raw._next_seq_id

    def __enter__(self) -> _RowPackets:
        return self

    def __exit__(self, *exc_info) -> None:
        result = self.cursor._result
        if self.finished:
            result.unbuffered_active = False
            result.connection = None
            self.raw._next_seq_id = self.sequence
            self.cursor.close()
        else:
            result.unbuffered_active = False
            result.connection = None
            self.conn.invalidate()

    def _read(self) -> bytes:
        try:
            data = self.raw._rfile.read1(_READ_BYTES)
        except OSError as error:
            self.raw._force_close()
            raise WarehouseError(f"lost connection to the server while reading: {error}") from None
        if not data:
            self.raw._force_close()
            raise WarehouseError("lost connection to the server while reading a result")
        return data

    def blocks(self, chunk_rows: int) -> Iterator[_Block]:
        """Blocks of at most `chunk_rows` complete rows, in order, until the result ends."""
        from pymysql import err as pymysql_errors

        data = bytearray()
        starts: list[int] = []
        position = 0
        while True:
            size = len(data)
            append = starts.append
            room = chunk_rows - len(starts)
            while room and position + 4 <= size:
                length = data[position] | (data[position + 1] << 8) | (data[position + 2] << 16)
                following = position + 4 + length
                if following > size:
                    break
                first = data[position + 4] if length else 0
                if first == 0xFE and length < 9:  # EOF: the result is complete
                    self.finished = True
                    self.sequence = (data[position + 3] + 1) % 256
                    break
                if first == 0xFF:  # an error ends the result (killed, interrupted...)
                    self.finished = True
                    pymysql_errors.raise_mysql_exception(bytes(data[position + 4 : following]))
                if length == _MAX_PACKET:
                    raise WarehouseError("a result row of 16 MB or more")
                append(position + 4)
                position = following
                room -= 1
            if self.finished or not room:
                if starts:
                    yield _Block(data[:position], starts, self.columns)
                if self.finished:
                    return
                data = data[position:]
                starts = []
                position = 0
                continue
            data += self._read()


# ---------------------------------------------------------------------------- LOAD DATA files


_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"), ("\x00", "\\0"))


def _escaped(array: pa.Array) -> pa.Array:
    for plain, escaped in _ESCAPES:
        array = pc.replace_substring(array, plain, escaped)
    return array


def _is_integer_type(type_: Any) -> bool:
    return isinstance(type_, Integer | BigInteger | SmallInteger)


def _text_value(value: Any, type_: Any) -> str | None:
    """One value as LOAD DATA text (None for NULL)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise WarehouseError("MySQL cannot store an infinite number")
        if _is_integer_type(type_):
            if not float(value).is_integer():
                raise WarehouseError(f"{value!r} is not an integer")
            return str(int(value))
        return repr(float(value))
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, datetime | pd.Timestamp):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _text_column(value: Any, type_: Any, rows: int) -> pa.Array | pa.Scalar:
    """A column (array, series, coded column or constant) as escaped LOAD DATA text."""
    if isinstance(value, CodedColumn):
        dictionary = pa.array([_text_value(v, type_) for v in value.values], type=pa.string())
        codes = np.asarray(value.codes)
        indices = pa.array(codes, mask=codes < 0, type=pa.int32())
        decoded = pa.DictionaryArray.from_arrays(indices, _escaped(dictionary)).cast(pa.string())
        return pc.fill_null(decoded, "\\N")
    if not isinstance(value, np.ndarray | pd.Series | list):
        text_value = _text_value(value, type_)
        if text_value is None:
            return pa.scalar("\\N")
        return _escaped(pa.array([text_value], type=pa.string()))[0]
    series = value if isinstance(value, pd.Series) else pd.Series(np.asarray(value))
    kind = series.dtype.kind
    if kind == "M" or isinstance(series.dtype, pd.DatetimeTZDtype):
        if getattr(series.dt, "tz", None) is not None:
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        array = pc.cast(pa.array(series, from_pandas=True), pa.string())
    elif kind == "b":
        array = pc.cast(pa.array(series.to_numpy(np.int8)), pa.string())
    elif kind in "iu":
        array = pc.cast(pa.array(series.to_numpy()), pa.string())
    elif kind == "f":
        values = series.to_numpy(np.float64)
        if np.isinf(values).any():
            raise WarehouseError("MySQL cannot store an infinite number")
        if _is_integer_type(type_):
            finite = ~np.isnan(values)
            if not np.array_equal(values[finite], np.trunc(values[finite])):
                raise WarehouseError("a fractional number in an integer column")
            array = pc.cast(
                pa.array(np.nan_to_num(values).astype(np.int64), mask=~finite), pa.string()
            )
        else:
            array = pc.cast(pa.array(values, from_pandas=True), pa.string())
    else:
        array = _escaped(
            pa.array([_text_value(v, type_) for v in series.to_numpy(object)], type=pa.string())
        )
    return pc.fill_null(array, "\\N")


def _tsv_batch(table: Table, columns: Mapping[str, Any], rows: int) -> pa.Buffer:
    """The batch in LOAD DATA's default format: tab-separated, `\\N` for NULL, a row a line."""
    texts = [_text_column(value, table.c[name].type, rows) for name, value in columns.items()]
    if all(isinstance(column, pa.Scalar) for column in texts):
        texts[0] = pa.array([texts[0].as_py()] * rows, type=pa.string())
    fields = pc.binary_join_element_wise(*texts, "\t")
    lines = pc.binary_join_element_wise(fields, pa.scalar(""), "\n")  # "fields\n"
    _, offset_buffer, data = lines.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=np.int32)[lines.offset :]
    first, last = int(offsets[0]), int(offsets[len(lines)])
    return data.slice(first, last - first)


class _LoadSender:
    """Runs a writer's LOAD DATA statements on its own thread, at most one batch behind."""

    def __init__(self, adapter: MySQLAdapter, conn: Connection, table: Table) -> None:
        self.adapter = adapter
        self.conn = conn
        self.table = table
        self.batches: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="load-data", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.batches.get()
            if item is None:
                return
            if self.error is not None:
                continue
            names, data = item
            try:
                self.adapter._load(self.conn, self.table, names, data)
            except BaseException as error:  # handed to the writer's thread
                self.error = error

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def send(self, names: list[str], data: pa.Buffer) -> None:
        self._raise()
        self.batches.put((names, data))

    def finish(self) -> None:
        self.batches.put(None)
        self.thread.join()
        self._raise()

    def stop(self) -> None:
        self.batches.put(None)
        self.thread.join()
