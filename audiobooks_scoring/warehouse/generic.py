"""Any other SQLAlchemy dialect (Snowflake, BigQuery, Redshift, Trino...): portable Core only.

What it does: streaming reads through the driver's cursor (`stream_results`), batched
executemany inserts with bound parameters, the list built beside the live one and copied
into it in one transaction (the live table, its grants and the views stay in place), a run
lock held as a row of `<scores>_run_lock`. Limits: no bulk path of the engine's own (loads
run at executemany speed), no native enum (reason codes are VARCHAR), no secondary indexes
(Snowflake outside hybrid tables, BigQuery, Redshift and Trino have none: the list's customer
ids are checked unique by a query), and the swap needs transactions that give readers a
snapshot; where DDL is not transactional the built table is dropped after the commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from sqlalchemy import Engine, Table
from sqlalchemy.engine import Connection

from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse.adapter import WarehouseAdapter
from audiobooks_scoring.warehouse.tables import WarehouseTables


class GenericAdapter(WarehouseAdapter):
    """Portable SQLAlchemy Core on any dialect; the adapter the others are measured against."""

    name: ClassVar[str] = "generic"
    dialects: ClassVar[tuple[str, ...]] = ()

    def __init__(self, engine: Engine, tables: WarehouseTables, settings: Settings) -> None:
        super().__init__(engine, tables, settings)
        for table in tables.metadata.tables.values():
            for index in list(table.indexes):
                table.indexes.discard(index)

    def finish_list(
        self,
        conn: Connection,
        table: Table,
        constants: Mapping[str, Any],
        ids_checked: bool,
        customer_index: bool = False,
    ) -> None:
        """Customer ids checked unique by a query (no index: not every engine has them)."""
        super().finish_list(conn, table, constants, ids_checked, customer_index=False)
