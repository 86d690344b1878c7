"""SQLite: the embedded default warehouse of the demo (a file under `data_dir`).

Bulk path: executemany in one transaction, values passed through their column types'
bind processors once. WAL journal, so readers keep their snapshot while a run publishes.
The run lock is an exclusive `flock` on a file beside the database. Every list has a
unique customer index (it is the duplicate check of the warehouse-ranked path).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ClassVar

import pandas as pd
from sqlalchemy import Engine, Table, event
from sqlalchemy.engine import Connection

from audiobooks_scoring.warehouse.adapter import RunLockHandle, WarehouseAdapter, _create_engine
from audiobooks_scoring.warehouse.columns import executemany_column_rows, executemany_rows
from audiobooks_scoring.warehouse.errors import AnotherRunPublishing

BUSY_TIMEOUT_MS = 30_000


def _configure_connection(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class _FileLock(RunLockHandle):
    def __init__(self, handle: IO[str]) -> None:
        self.handle: IO[str] | None = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class SQLiteAdapter(WarehouseAdapter):
    """A SQLite file: executemany writes, a file lock, a transactional copy swap."""

    name: ClassVar[str] = "sqlite"
    dialects: ClassVar[tuple[str, ...]] = ("sqlite",)
    supports_schemas: ClassVar[bool] = False
    customer_index_always: ClassVar[bool] = True
    write_batch_rows: ClassVar[int] = 250_000

    @classmethod
    def create_engine(cls, url: str) -> Engine:
        """An engine on the file (its folder created), in WAL mode with a busy timeout."""
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = _create_engine(url)
        event.listen(engine, "connect", _configure_connection)
        return engine

    def lock_path(self) -> Path:
        """The file whose `flock` is the run lock."""
        return Path(f"{self.engine.url.database or 'memory'}.{self.tables.scores.name}.lock")

    @contextmanager
    def run_lock(self) -> Iterator[RunLockHandle]:
        """An exclusive, non-blocking `flock` on the lock file."""
        handle = open(self.lock_path(), "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise AnotherRunPublishing("another run is publishing (lock file is held)") from None
        lock = _FileLock(handle)
        try:
            yield lock
        finally:
            lock.release()

    def check_run_lock(self, conn: Connection) -> None:
        """A file lock lives as long as its process: nothing can take it away mid-run."""

    def write_frame(self, conn: Connection, table: Table, frame: pd.DataFrame) -> int:
        """executemany of plain rows (values already through their bind processors)."""
        if frame.empty:
            return 0
        insert_sql = self._insert_sql(table, list(frame.columns))
        for start in range(0, len(frame), self.write_batch_rows):
            piece = frame.iloc[start : start + self.write_batch_rows]
            conn.exec_driver_sql(insert_sql, executemany_rows(self.dialect, table, piece))
        return len(frame)

    def write_columns(
        self, conn: Connection, table: Table, columns: Mapping[str, Any], rows: int
    ) -> int:
        """executemany of a column batch; coded values and constants converted once each."""
        if rows == 0:
            return 0
        insert_sql = self._insert_sql(table, list(columns))
        conn.exec_driver_sql(
            insert_sql, executemany_column_rows(self.dialect, table, columns, rows)
        )
        return rows

    def _insert_sql(self, table: Table, names: list[str]) -> str:
        return (
            f"INSERT INTO {self.qualified_name(table)} "
            f"({', '.join(self.quote(name) for name in names)}) "
            f"VALUES ({', '.join('?' for _ in names)})"
        )
