"""Any other SQLAlchemy dialect (Snowflake, BigQuery, Redshift, Trino...): portable Core only.

What it does: streaming reads through the driver's cursor (`stream_results`), batched
executemany inserts with bound parameters, the list built beside the live one and copied
into it in one transaction (the live table, its grants and the views stay in place), a run
lock held as a row of `<scores>_run_lock`. Limits: no bulk path of the engine's own (loads
run at executemany speed), no native enum (reason codes are VARCHAR), and the swap needs
transactions that give readers a snapshot; where DDL is not transactional the built table
is dropped after the commit.
"""

from __future__ import annotations

from typing import ClassVar

from audiobooks_scoring.warehouse.adapter import WarehouseAdapter


class GenericAdapter(WarehouseAdapter):
    """Portable SQLAlchemy Core on any dialect; the adapter the others are measured against."""

    name: ClassVar[str] = "generic"
    dialects: ClassVar[tuple[str, ...]] = ()
