"""The warehouse: one adapter per engine behind one interface (`WarehouseAdapter`).

`open_warehouse(settings)` picks the adapter from the URL's dialect, or the one named by
`AUDIOBOOKS_WAREHOUSE_ADAPTER` (`generic` runs any engine through portable Core).
"""

from __future__ import annotations

from importlib import import_module

from sqlalchemy.engine import make_url

from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse.adapter import WarehouseAdapter, read_frame
from audiobooks_scoring.warehouse.columns import CodedColumn, ColumnWriter
from audiobooks_scoring.warehouse.errors import (
    AnotherRunPublishing,
    DuplicateCustomers,
    PublicationError,
    RunLockLost,
    WarehouseError,
)
from audiobooks_scoring.warehouse.generic import GenericAdapter
from audiobooks_scoring.warehouse.postgres import PostgresAdapter
from audiobooks_scoring.warehouse.sql_text import reasons_column
from audiobooks_scoring.warehouse.sqlite import SQLiteAdapter
from audiobooks_scoring.warehouse.tables import LIST_COLUMNS, VIEW_NAMES, WarehouseTables

ADAPTERS: dict[str, str] = {
    "sqlite": "audiobooks_scoring.warehouse.sqlite:SQLiteAdapter",
    "postgresql": "audiobooks_scoring.warehouse.postgres:PostgresAdapter",
    "duckdb": "audiobooks_scoring.warehouse.duckdb:DuckDBAdapter",
    "mysql": "audiobooks_scoring.warehouse.mysql:MySQLAdapter",
    "generic": "audiobooks_scoring.warehouse.generic:GenericAdapter",
}
"""Adapter names and classes, imported when chosen (their drivers are optional extras)."""

DIALECT_ADAPTERS = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "duckdb": "duckdb",
    "mysql": "mysql",
    "mariadb": "mysql",
}
"""The adapter of each SQLAlchemy dialect; any other dialect gets the generic adapter."""


def adapter_class(settings: Settings) -> type[WarehouseAdapter]:
    """The adapter the settings name, else the one of the URL's dialect, else the generic one."""
    name = settings.warehouse_adapter
    if not name:
        dialect = make_url(settings.warehouse_url_value).get_backend_name()
        name = DIALECT_ADAPTERS.get(dialect, "generic")
    module, _, class_name = ADAPTERS[name].partition(":")
    adapter: type[WarehouseAdapter] = getattr(import_module(module), class_name)
    return adapter


def open_warehouse(settings: Settings) -> WarehouseAdapter:
    """The warehouse the settings point at (nothing is created)."""
    return adapter_class(settings).open(settings)


def init_warehouse(settings: Settings) -> WarehouseAdapter:
    """Open the warehouse and create its tables and views if missing (idempotent)."""
    warehouse = open_warehouse(settings)
    warehouse.create_tables()
    return warehouse


__all__ = [
    "ADAPTERS",
    "AnotherRunPublishing",
    "CodedColumn",
    "ColumnWriter",
    "DuplicateCustomers",
    "GenericAdapter",
    "LIST_COLUMNS",
    "PostgresAdapter",
    "PublicationError",
    "RunLockLost",
    "SQLiteAdapter",
    "VIEW_NAMES",
    "WarehouseAdapter",
    "WarehouseError",
    "WarehouseTables",
    "adapter_class",
    "init_warehouse",
    "open_warehouse",
    "read_frame",
    "reasons_column",
]
