"""The run ledger (`scoring_runs`): one row per run, its status, counts and figures."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update

from audiobooks_scoring.warehouse import WarehouseAdapter

logger = logging.getLogger(__name__)


def record_run_start(
    warehouse: WarehouseAdapter,
    run_id: str,
    as_of: date,
    flow_run_id: str | None,
    status: str = "running",
) -> datetime:
    """Insert (or reset) this run's ledger row, closing rows of runs killed mid-way; its start.

    Called under the run lock, so any other row still `running` belongs to a run that died
    without finishing (killed, lost its machine): it is marked `abandoned`.
    """
    started = datetime.now(UTC)
    runs = warehouse.tables.runs
    with warehouse.engine.begin() as conn:
        abandoned = conn.execute(
            update(runs)
            .where(runs.c.status == "running", runs.c.run_id != run_id)
            .values(
                status="abandoned",
                finished_at=started,
                message=f"the run ended without recording an outcome; found by run {run_id}",
            )
        ).rowcount
        if abandoned:
            logger.warning("marked %s unfinished earlier run(s) as abandoned", abandoned)
        conn.execute(delete(runs).where(runs.c.run_id == run_id))
        conn.execute(
            insert(runs).values(
                run_id=run_id,
                flow_run_id=flow_run_id,
                as_of=as_of,
                started_at=started,
                status=status,
                published=False,
            )
        )
    return started


def record_run_end(warehouse: WarehouseAdapter, run_id: str, **figures: Any) -> None:
    """Update this run's ledger row with its outcome and figures."""
    runs = warehouse.tables.runs
    values = {"finished_at": datetime.now(UTC), **figures}
    with warehouse.engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))


def previous_published_run(warehouse: WarehouseAdapter, run_id: str) -> str | None:
    """The run id of the latest published run other than `run_id`."""
    runs = warehouse.tables.runs
    with warehouse.engine.connect() as conn:
        return conn.execute(
            select(runs.c.run_id)
            .where(runs.c.published, runs.c.run_id != run_id)
            .order_by(runs.c.finished_at.desc())
            .limit(1)
        ).scalar_one_or_none()
