"""PostgreSQL: the reference server warehouse (psycopg 3).

- Reads: one `COPY (query) TO STDOUT` per stream, binary when every column is fixed-width
  (parsed by numpy per chunk), else CSV (parsed by Arrow).
- Writes: binary COPY; the list through `list_writers` sessions at once, each fed by a
  sender thread at most two batches behind.
- The history is partitioned `LIST (run_id)` and a run's list is written once: built as
  `<scores>_next` with the run's constants as catalog defaults, then, in one transaction
  under `lock_timeout`, the live table is renamed to its history partition's name, the built
  one becomes `customer_scores` and is attached as the run's partition; a re-run replaces
  its own partition. Views are recreated and grants copied onto the new relations.
- The run lock is a session advisory lock; publication checks, inside its transaction,
  that this process's session still holds it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Generator, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import pyarrow as pa
from sqlalchemy import Engine, Table, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import pgcopy
from audiobooks_scoring.warehouse.adapter import (
    RunLockHandle,
    SessionLock,
    WarehouseAdapter,
    _create_engine,
    pause_at,
)
from audiobooks_scoring.warehouse.columns import CodedColumn, ColumnWriter
from audiobooks_scoring.warehouse.errors import (
    PublicationError,
    RunLockLost,
    WarehouseError,
)
from audiobooks_scoring.warehouse.tables import VIEW_NAMES, TableLayout, WarehouseTables

logger = logging.getLogger(__name__)

LIST_STATISTICS_TARGET = 10  # ANALYZE samples 300 rows per unit of target
TRANSIENT_SQLSTATES = ("08", "40001", "40P01", "55P03", "57P01", "57P02", "57P03")
GRANTABLE_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
)

_LOCK_HOLDERS_SQL = text(
    "SELECT l.pid, a.application_name, a.client_addr, a.backend_start FROM pg_locks AS l "
    "LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid::bigint = :high AND l.objid::bigint = :low"
)
_PARTITION_OF_RUN_SQL = text(
    "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass(:history) "
    "AND pg_get_expr(c.relpartbound, c.oid) = :bound"
)
_PARTITION_BOUND_SQL = text(
    "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits AS i "
    "JOIN pg_class AS c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass(:history) AND c.oid = to_regclass(:relation)"
)
_GRANTS_SQL = text(
    "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE r.rolname END AS grantee, "
    "a.privilege_type, a.is_grantable "
    "FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a "
    "LEFT JOIN pg_roles AS r ON r.oid = a.grantee "
    "WHERE c.oid = to_regclass(:relation) AND a.grantee <> c.relowner"
)


def _driver_connection(conn: Connection) -> Any:
    """The psycopg connection under a SQLAlchemy connection (for COPY)."""
    raw = conn.connection.driver_connection
    if raw is None:
        raise WarehouseError("the connection has no driver connection (it was invalidated)")
    return raw


def lock_key(tables: WarehouseTables) -> int:
    """A stable 63-bit advisory-lock key for the configured scores table."""
    name = f"{tables.schema or ''}.{tables.scores.name}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def _key_parts(key: int) -> dict[str, int]:
    return {"high": key >> 32, "low": key & 0xFFFFFFFF}


def partition_bound(literal: str) -> str:
    """A history partition bound for a run id literal, spelled as `pg_get_expr` prints it."""
    return f"FOR VALUES IN ({literal})"


class PostgresAdapter(WarehouseAdapter):
    """PostgreSQL over psycopg 3: binary COPY both ways, partition swap, advisory lock."""

    name: ClassVar[str] = "postgresql"
    dialects: ClassVar[tuple[str, ...]] = ("postgresql",)
    native_enum: ClassVar[bool] = True
    history_partitioned: ClassVar[bool] = True
    constants_as_defaults: ClassVar[bool] = True
    list_writers: ClassVar[int] = 2
    write_batch_rows: ClassVar[int] = pgcopy.WRITE_SLICE_ROWS

    @classmethod
    def create_engine(cls, url: str) -> Engine:
        """An engine whose sessions name the application (seen in `pg_stat_activity`)."""
        return _create_engine(
            url, pool_pre_ping=True, connect_args={"application_name": "audiobooks-scoring"}
        )

    @classmethod
    def table_layout(cls, settings: Settings) -> TableLayout:
        """Partitioned history, an enum for reason codes, an unlogged staging table."""
        layout = super().table_layout(settings)
        return TableLayout(
            schema=layout.schema,
            native_enum=True,
            history_partitioned=True,
            scores_index=settings.customer_index,
            staging_prefixes=("UNLOGGED",),
        )

    def create_tables(self) -> None:
        """The tables and views; a history table of an earlier layout is refused."""
        with self.engine.connect() as conn:
            kind = conn.execute(
                text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:name)"),
                {"name": self.qualified_name(self.tables.history)},
            ).scalar()
        if kind is not None and kind != "p":
            raise WarehouseError(
                f"{self.tables.history.name} exists but is not partitioned by run (an earlier "
                f"layout); rename it (and {self.tables.scores.name}) aside and run init again, "
                "then copy old runs back if they are needed"
            )
        super().create_tables()

    def analyze(self, table: Table) -> None:
        """`ANALYZE` the table."""
        with self.engine.begin() as conn:
            conn.execute(text(f"ANALYZE {self.qualified_name(table)}"))

    def _type_oids(self, sql: str, params: Mapping[str, Any]) -> dict[str, int]:
        with self.engine.connect() as conn:
            result = conn.execute(
                text(f"SELECT * FROM ({sql}) AS source_query LIMIT 0"), dict(params)
            )
            description = result.cursor.description
            result.close()
        return {col[0]: int(cast(Any, col[1])) for col in description}

    def query_columns(self, sql: str, params: Mapping[str, Any]) -> dict[str, bool]:
        """The query's columns, numeric where the server types them as numbers."""
        oids = self._type_oids(sql, params)
        return {name: oid in pgcopy.NUMERIC_TYPE_OIDS for name, oid in oids.items()}

    def _copy_sql(self, sql: str, params: Mapping[str, Any], copy_format: str):
        compiled = text(sql).bindparams(**dict(params)).compile(dialect=self.dialect)
        return (
            f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT {copy_format})",
            compiled.params,
        )

    def stream_query(
        self,
        sql: str,
        params: Mapping[str, Any],
        chunk_size: int,
        column_types: Mapping[str, pa.DataType] | None = None,
    ) -> Generator[pd.DataFrame, None, None]:
        """COPY TO STDOUT in binary when every column is fixed-width (else CSV), per chunk."""
        oids = self._type_oids(sql, params)
        names = list(oids)
        types = {name: kind for name, kind in (column_types or {}).items() if name in names}
        parse = pgcopy.BinaryRowParser(oids, types) if pgcopy.binary_readable(oids, types) else None
        copy_sql, bound = self._copy_sql(sql, params, "binary" if parse else "csv")
        with self.engine.connect() as conn:
            raw = _driver_connection(conn)
            with raw.cursor() as cursor, cursor.copy(copy_sql, bound) as copy:
                if parse:
                    width = parse.row_dtype.itemsize
                    for chunk in pgcopy.copy_out_chunks(raw, copy, chunk_size, width):
                        yield parse(chunk)
                else:
                    for rows in pgcopy.copy_out_batches(copy, chunk_size):
                        yield pgcopy.parse_csv_rows(rows, names, types)
            conn.rollback()

    def stream_copy_chunks(
        self, sql: str, params: Mapping[str, Any], chunk_size: int
    ) -> Iterator[pgcopy.CopyChunk]:
        """Binary COPY rows of a query of fixed-width columns, unparsed, per chunk."""
        oids = self._type_oids(sql, params)
        if not all(oid in pgcopy.BINARY_TYPES for oid in oids.values()):
            raise WarehouseError("binary COPY chunks need a query of fixed-width columns only")
        width = pgcopy.BinaryRowParser(oids, {}).row_dtype.itemsize
        copy_sql, bound = self._copy_sql(sql, params, "binary")
        with self.engine.connect() as conn:
            raw = _driver_connection(conn)
            with raw.cursor() as cursor, cursor.copy(copy_sql, bound) as copy:
                yield from pgcopy.copy_out_chunks(raw, copy, chunk_size, width)
            conn.rollback()

    def stream_customer_ids(
        self, sql: str, params: Mapping[str, Any], chunk_size: int
    ) -> Iterator[np.ndarray]:
        """The leading bigint of each binary COPY row, without parsing the rest."""
        for chunk in self.stream_copy_chunks(sql, params, chunk_size):
            yield pgcopy.leading_ids(chunk)

    def _copy_in_sql(self, table: Table, names: list[str], copy_format: str) -> str:
        column_list = ", ".join(self.quote(name) for name in names)
        return (
            f"COPY {self.qualified_name(table)} ({column_list}) "
            f"FROM STDIN WITH (FORMAT {copy_format})"
        )

    def write_frame(self, conn: Connection, table: Table, frame: pd.DataFrame) -> int:
        """Binary COPY when every column is fixed-width and complete, else CSV COPY."""
        if frame.empty:
            return 0
        binary = pgcopy.binary_frame_columns(table, frame)
        if binary is not None:
            return self._copy_binary(conn, table, binary, ())
        raw = _driver_connection(conn)
        copy_sql = self._copy_in_sql(table, list(frame.columns), "csv")
        with raw.cursor() as cursor, cursor.copy(copy_sql) as copy:
            for start in range(0, len(frame), self.write_batch_rows):
                copy.write(pgcopy.frame_to_csv(frame.iloc[start : start + self.write_batch_rows]))
        return len(frame)

    def write_columns(
        self, conn: Connection, table: Table, columns: Mapping[str, Any], rows: int
    ) -> int:
        """One binary COPY; rows are grouped by their coded values (row order is not kept)."""
        if rows == 0:
            return 0
        fixed, coded = pgcopy.split_columns(table, columns, rows)
        return self._copy_binary(conn, table, fixed, coded)

    def _copy_binary(
        self,
        conn: Connection,
        table: Table,
        fixed: Mapping[str, np.ndarray],
        coded: tuple[tuple[str, CodedColumn], ...],
    ) -> int:
        rows = len(next(iter(fixed.values()))) if fixed else len(coded[0][1].codes)
        names = [*fixed, *(name for name, _ in coded)]
        raw = _driver_connection(conn)
        with raw.cursor() as cursor, cursor.copy(self._copy_in_sql(table, names, "binary")) as copy:
            copy.write(pgcopy.PGCOPY_HEADER)
            for block in pgcopy.binary_blocks(table, fixed, coded, rows):
                for start in range(0, len(block), self.write_batch_rows):
                    copy.write(block[start : start + self.write_batch_rows].data.cast("B"))
            copy.write(pgcopy.PGCOPY_TRAILER)
        return rows

    @contextmanager
    def bulk_writer(self, table: Table) -> Iterator[ColumnWriter]:
        """One binary COPY kept open across batches, committed at the end.

        A sender thread feeds the server while the caller prepares the next batch, at most
        `COPY_BATCHES_AHEAD` batches behind. Every batch must give the same columns.
        """
        with self.engine.begin() as conn, ExitStack() as stack:
            raw = _driver_connection(conn)
            opened: dict[str, Any] = {}

            def write_batch(columns: Mapping[str, Any], rows: int) -> int:
                fixed, coded = pgcopy.split_columns(table, columns, rows)
                names = [*fixed, *(name for name, _ in coded)]
                if not opened:
                    cursor = stack.enter_context(raw.cursor())
                    copy_sql = self._copy_in_sql(table, names, "binary")
                    copy = stack.enter_context(cursor.copy(copy_sql))
                    sender = stack.enter_context(pgcopy.CopySender(copy))
                    sender.send([pgcopy.PGCOPY_HEADER])
                    opened.update(sender=sender, names=names)
                elif names != opened["names"]:
                    raise WarehouseError(
                        f"bulk writer to {table.name}: a batch gave the columns {names}, "
                        f"the first gave {opened['names']}"
                    )
                blocks = pgcopy.binary_blocks(table, fixed, coded, rows)
                opened["sender"].send([block.data.cast("B") for block in blocks])
                return rows

            yield ColumnWriter(write_batch)
            if opened:
                opened["sender"].send([pgcopy.PGCOPY_TRAILER])

    def _engine_key(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def run_lock_holders(self, conn: Connection | None = None) -> list[int]:
        """Backend pids holding this warehouse's run lock (empty when it is free)."""
        if conn is None:
            with self.engine.connect() as own:
                return self.run_lock_holders(own)
        rows = conn.execute(_LOCK_HOLDERS_SQL, _key_parts(lock_key(self.tables))).all()
        return [int(row.pid) for row in rows]

    def _describe_holder(self, conn: Connection) -> str:
        try:
            row = conn.execute(_LOCK_HOLDERS_SQL, _key_parts(lock_key(self.tables))).first()
        except DBAPIError:
            return "advisory lock is held"
        if row is None:
            return "advisory lock is held"
        return (
            f"advisory lock held by backend pid {row.pid} ({row.application_name or 'unknown app'}"
            f" from {row.client_addr or 'local socket'}, connected {row.backend_start})"
        )

    def run_lock(self) -> AbstractContextManager[RunLockHandle]:
        """A session advisory lock, held by a connection kept open for the run."""
        key = lock_key(self.tables)
        return SessionLock.hold(
            self.engine,
            (self._engine_key(), key),
            (
                "SELECT pg_try_advisory_lock(:key)",
                "SELECT pg_backend_pid()",
                "SELECT pg_advisory_unlock(:key)",
            ),
            {"key": key},
            self._describe_holder,
        )

    def check_run_lock(self, conn: Connection) -> None:
        """Raise `RunLockLost` unless this process's lock session still holds the lock."""
        pid = SessionLock.session_holding((self._engine_key(), lock_key(self.tables)))
        if pid not in self.run_lock_holders(conn):
            raise RunLockLost(
                f"the run lock was lost (its database session, backend pid {pid}, ended or was "
                "terminated), so another run may be publishing; nothing was published by this run"
            )

    def clear_staging(self, run_id: str) -> int:
        """Truncate the staging table (no dead rows left behind) and drop this run's rejects."""
        with self.engine.begin() as conn:
            staging = self.tables.staging
            removed = conn.execute(select(func.count()).select_from(staging)).scalar_one()
            if removed:
                conn.execute(text(f"TRUNCATE {self.qualified_name(staging)}"))
            rejected = self.tables.rejected
            conn.execute(rejected.delete().where(rejected.c.run_id == run_id))
        return int(removed or 0)

    def insert_ranked(self, conn: Connection, table: Table, ranked, constants) -> int:
        """The ranking window in memory (256 MB work_mem, no JIT), then the base insert."""
        conn.execute(text("SET LOCAL work_mem = '256MB'"))
        conn.execute(text("SET LOCAL jit = off"))
        return super().insert_ranked(conn, table, ranked, constants)

    def finish_list(
        self,
        conn: Connection,
        table: Table,
        constants: Mapping[str, Any],
        ids_checked: bool,
        customer_index: bool = False,
    ) -> None:
        """Constants as catalog defaults and the partition check, ids, then a light ANALYZE."""
        self._add_run_constants(conn, table, constants)
        super().finish_list(conn, table, constants, ids_checked, customer_index)
        conn.execute(text(f"SET LOCAL default_statistics_target = {LIST_STATISTICS_TARGET}"))
        conn.execute(text(f"ANALYZE {self.qualified_name(table)}"))

    def _add_run_constants(
        self, conn: Connection, table: Table, constants: Mapping[str, Any]
    ) -> None:
        """The run's constant columns as catalog defaults (no rewrite) and the partition check."""
        name = self.qualified_name(table)
        scores = self.tables.scores
        literals = {
            column: self.literal(value, scores.c[column].type)
            for column, value in constants.items()
        }
        added = ", ".join(
            f"ADD COLUMN {self.quote(column)} "
            f"{scores.c[column].type.compile(dialect=self.dialect)} NOT NULL DEFAULT {value}"
            for column, value in literals.items()
        )
        check = self.quote(f"{table.name}_run"[:60])
        conn.execute(
            text(
                f"ALTER TABLE {name} {added}, "
                f"ADD CONSTRAINT {check} CHECK (run_id = {literals['run_id']})"
            )
        )
        dropped = ", ".join(
            f"ALTER COLUMN {self.quote(column)} DROP DEFAULT" for column in literals
        )
        conn.execute(text(f"ALTER TABLE {name} {dropped}"))

    def history_partition_name(self, bound: str) -> str:
        """The name a history partition gets once it is not the live list (from its bound)."""
        digest = hashlib.sha256(bound.encode()).hexdigest()[:12]
        return f"{self.tables.history.name[:48]}_{digest}"

    def swap_list(self, run_id: str, replace_current: bool) -> None:
        """Rename the live list into history, the built one into place, attach it; one commit."""
        next_table = self.list_table()
        pause_at("after_staging")
        with self.engine.begin() as conn:
            conn.execute(text(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}"))
            conn.execute(text("SET LOCAL standard_conforming_strings = on"))  # bound spelling
            self.check_run_lock(conn)
            history = self.qualified_name(self.tables.history)
            live = self.qualified_name(self.tables.scores)
            built = self.qualified_name(next_table)
            if conn.execute(text("SELECT to_regclass(:name)"), {"name": built}).scalar() is None:
                raise PublicationError(
                    f"no built list {next_table.name} to publish for run {run_id}"
                )
            bound = partition_bound(self.literal(run_id))
            live_bound = conn.execute(
                _PARTITION_BOUND_SQL, {"history": history, "relation": live}
            ).scalar()
            replace = replace_current or live_bound == bound  # re-running the live run
            relations = [live, *(self.qualified_name(view) for view in VIEW_NAMES)]
            grants = {relation: self._relation_grants(conn, relation) for relation in relations}
            if replace:
                self.drop_views(conn)
            earlier = conn.execute(_PARTITION_OF_RUN_SQL, {"history": history, "bound": bound})
            for (name,) in earlier.all():
                partition = self.qualified_name(name)
                conn.execute(text(f"ALTER TABLE {history} DETACH PARTITION {partition}"))
                conn.execute(text(f"DROP TABLE {partition}"))
            scores_name = self.tables.scores.name
            target_name = scores_name if replace else self.history_partition_name(bound)
            if replace:
                if live_bound is not None and live_bound != bound:
                    self._rename_with_index(
                        conn, scores_name, self.history_partition_name(live_bound)
                    )
                elif live_bound is None:
                    conn.execute(text(f"DROP TABLE IF EXISTS {live}"))  # the empty one of init
                pause_at("during_swap")
            self._rename_with_index(conn, next_table.name, target_name)
            target = self.qualified_name(target_name)
            conn.execute(text(f"ALTER TABLE {history} ATTACH PARTITION {target} {bound}"))
            if replace:
                self.create_views(conn)
                for relation, granted in grants.items():
                    self._grant(conn, relation, granted)
            self.check_run_lock(conn)
            pause_at("before_commit")

    def _rename_with_index(self, conn: Connection, old: str, new: str) -> None:
        """Rename a list table and its customer index (`<name>_customer`)."""
        old_index = self.qualified_name(f"{old}_customer"[:60])
        new_index = self.quote(f"{new}_customer"[:60])
        conn.execute(text(f"ALTER INDEX IF EXISTS {old_index} RENAME TO {new_index}"))
        conn.execute(text(f"ALTER TABLE {self.qualified_name(old)} RENAME TO {self.quote(new)}"))

    def _relation_grants(
        self, conn: Connection, relation: str
    ) -> list[tuple[str | None, str, bool]]:
        """Privileges granted on a table or view to roles other than its owner (None = PUBLIC)."""
        rows = conn.execute(_GRANTS_SQL, {"relation": relation}).all()
        return [(row.grantee, row.privilege_type, bool(row.is_grantable)) for row in rows]

    def _grant(self, conn: Connection, relation: str, grants) -> None:
        """Give the swapped-in table (or recreated view) the privileges its predecessor had."""
        for grantee, privilege, grantable in grants:
            if privilege not in GRANTABLE_PRIVILEGES:
                continue
            role = "PUBLIC" if grantee is None else self.quote(grantee)
            option = " WITH GRANT OPTION" if grantable and grantee is not None else ""
            conn.execute(text(f"GRANT {privilege} ON {relation} TO {role}{option}"))

    def is_transient(self, error: BaseException) -> bool:
        """Connection loss, lock timeout, deadlock, serialization failure, server shutdown."""
        state = str(getattr(getattr(error, "orig", None), "sqlstate", "") or "")
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if state:
            return state.startswith(TRANSIENT_SQLSTATES)
        return super().is_transient(error)

    def is_unique_violation(self, error: DBAPIError) -> bool:
        """SQLSTATE 23505."""
        state = str(getattr(error.orig, "sqlstate", "") or "")
        return state == "23505" if state else super().is_unique_violation(error)
