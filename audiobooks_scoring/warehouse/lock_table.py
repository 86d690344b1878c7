"""The portable run lock: one row in a lock table, for engines without a session lock.

A run takes the lock by inserting its row and reading the lock's rows back: the earliest row
holds the lock (where the engine enforces the primary key a second row is refused; where it
does not, e.g. Snowflake, the later run sees the earlier row, deletes its own and stands
down). It frees the lock by deleting its own row. A row left by a process that died is taken
over when its holder ran on this machine and is gone, or when it is older than `LOCK_LEASE`.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Column, DateTime, MetaData, String, Table, delete, insert, select
from sqlalchemy.engine import Connection

from audiobooks_scoring.warehouse.adapter import RunLockHandle
from audiobooks_scoring.warehouse.errors import AnotherRunPublishing, RunLockLost, WarehouseError

if TYPE_CHECKING:
    from audiobooks_scoring.warehouse.adapter import WarehouseAdapter

LOCK_LEASE = timedelta(hours=12)
_HELD: dict[tuple[str, str], str] = {}


def lock_table(adapter: WarehouseAdapter) -> Table:
    """`<scores>_run_lock`: at most one row, the run that may publish."""
    return Table(
        f"{adapter.tables.scores.name}_run_lock"[:60],
        MetaData(schema=adapter.tables.schema),
        Column("lock_name", String(80), primary_key=True),
        Column("holder", String(200), nullable=False),
        Column("token", String(64), nullable=False),
        Column("acquired_at", DateTime(timezone=True), nullable=False),
    )


def _key(adapter: WarehouseAdapter) -> tuple[str, str]:
    url = adapter.engine.url.render_as_string(hide_password=True)
    return url, f"{adapter.tables.schema or ''}.{adapter.tables.scores.name}"


def _holder_is_gone(holder: str, acquired_at: datetime) -> bool:
    host, _, pid = holder.rpartition(":")
    if acquired_at.tzinfo is None:
        acquired_at = acquired_at.replace(tzinfo=UTC)
    if datetime.now(UTC) - acquired_at > LOCK_LEASE:
        return True
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _LockRow(RunLockHandle):
    def __init__(self, adapter: WarehouseAdapter, token: str) -> None:
        self.adapter = adapter
        self.token = token
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        _HELD.pop(_key(self.adapter), None)
        table = lock_table(self.adapter)
        with self.adapter.engine.begin() as conn:
            conn.execute(delete(table).where(table.c.token == self.token))


def _try_insert(adapter: WarehouseAdapter, table: Table, name: str, token: str) -> bool:
    """Whether this run's row is the lock's earliest (its row is removed when it is not)."""
    holder = f"{socket.gethostname()}:{os.getpid()}"
    try:
        with adapter.engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    lock_name=name, holder=holder, token=token, acquired_at=datetime.now(UTC)
                )
            )
    except Exception:  # noqa: BLE001 - the key refused it (each driver names it its own way)
        pass
    with adapter.engine.connect() as conn:
        tokens = (
            conn.execute(
                select(table.c.token)
                .where(table.c.lock_name == name)
                .order_by(table.c.acquired_at, table.c.token)
            )
            .scalars()
            .all()
        )
    if not tokens:
        raise WarehouseError(f"the run lock row could not be written to {table.name}")
    if tokens[0] == token:
        return True
    if token in tokens:
        with adapter.engine.begin() as conn:
            conn.execute(delete(table).where(table.c.token == token))
    return False


@contextmanager
def lock_table_run_lock(adapter: WarehouseAdapter) -> Iterator[RunLockHandle]:
    """Hold the run lock row; raises `AnotherRunPublishing` while another run holds it."""
    table = lock_table(adapter)
    table.create(adapter.engine, checkfirst=True)
    name = _key(adapter)[1][:80]
    token = uuid.uuid4().hex
    if not _try_insert(adapter, table, name, token):
        with adapter.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.lock_name == name)).first()
        if row is not None and _holder_is_gone(row.holder, row.acquired_at):
            with adapter.engine.begin() as conn:
                conn.execute(delete(table).where(table.c.token == row.token))
        if not _try_insert(adapter, table, name, token):
            who = f"{row.holder} since {row.acquired_at}" if row is not None else "another run"
            raise AnotherRunPublishing(f"another run is publishing (lock row held by {who})")
    _HELD[_key(adapter)] = token
    handle = _LockRow(adapter, token)
    try:
        yield handle
    finally:
        handle.release()


def check_lock_table(adapter: WarehouseAdapter, conn: Connection) -> None:
    """Raise unless this process's lock row is still there (inside the caller's transaction)."""
    token = _HELD.get(_key(adapter))
    if token is None:
        raise RunLockLost(
            "publishing needs the run lock: build and publish the list under the run lock"
        )
    table = lock_table(adapter)
    if conn.execute(select(table.c.token).where(table.c.token == token)).first() is None:
        raise RunLockLost(
            "the run lock was lost (its lock row was removed), so another run may be "
            "publishing; nothing was published by this run"
        )
