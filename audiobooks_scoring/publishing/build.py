"""Building a run's list beside the live one: ranked, ids checked unique, ready to swap in."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy import and_, case, delete, func, not_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Select

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    CUSTOMER_ID,
    WINDOW_END,
    rejected_frame,
    validate_chunk,
)
from audiobooks_scoring.publishing.retry import failed_publication, with_retries
from audiobooks_scoring.scoring.gates import RunGateError
from audiobooks_scoring.scoring.ranking import (
    SpillFiles,
    campaign_limit,
    decile_bounds,
    ranked_columns,
)
from audiobooks_scoring.scoring.stage import population_column_types
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import DuplicateCustomers, WarehouseAdapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetList:
    """A run's ranked list, built beside the live one and not yet published."""

    run_id: str
    rows: int
    targets: int
    duplicates: int
    seconds: float


def build_target_list(
    warehouse: WarehouseAdapter,
    settings: Settings,
    run_id: str,
    model_version: str,
    as_of: date,
    spill: SpillFiles | None = None,
) -> TargetList:
    """Rank the run's scored rows into `<scores>_next`, beside the live list, ready to publish.

    Rows spilled to `spill` are merged on this machine and written once, in rank order
    (their reason codes computed on the way); otherwise the warehouse ranks the staged
    rows (partitioned runs). Customer ids are checked to be unique (a merge of the spilled
    ids, or a query of the built list): when one repeats, every copy of it is moved to
    `rejected_rows` and the list is built again from staging.
    """
    started = time.perf_counter()
    constants = {"model_version": model_version, "run_id": run_id, "scored_at": datetime.now(UTC)}
    retries = settings.publish_retries
    if spill is not None:
        try:
            rows, targets = with_retries(
                warehouse,
                lambda: _write_spilled_list(warehouse, settings, spill, constants),
                retries,
                "building the new list",
            )
            spill.remove()
            return TargetList(run_id, rows, targets, 0, time.perf_counter() - started)
        except DuplicateCustomers:
            logger.warning("a customer id was scored twice; ranking again in the warehouse")
            stage_spilled_rows(warehouse, spill, run_id)
            spill.remove()
        except DBAPIError as error:
            raise failed_publication(warehouse, error, retries, run_id, "built") from error
    duplicates = 0
    for attempt in range(2):
        population, non_holdout = count_staged(warehouse, run_id)
        ranked = ranked_scores_select(warehouse, settings, run_id, population, non_holdout)
        try:
            rows, targets = with_retries(
                warehouse,
                partial(_insert_ranked_list, warehouse, ranked, constants, settings.customer_index),
                retries,
                "building the new list",
            )
            break
        except DuplicateCustomers:
            if attempt:
                raise
            duplicates = reject_duplicates(warehouse, run_id, as_of, settings.chunk_size)
        except DBAPIError as error:
            raise failed_publication(warehouse, error, retries, run_id, "built") from error
    return TargetList(run_id, rows, targets, duplicates, time.perf_counter() - started)


def _write_spilled_list(
    warehouse: WarehouseAdapter,
    settings: Settings,
    spill: SpillFiles,
    constants: Mapping[str, Any],
) -> tuple[int, int]:
    """The merged spill written by the adapter's bulk writers; (rows, targets)."""
    if spill.repeats_customer_ids():
        raise DuplicateCustomers("a customer id was scored twice")
    with warehouse.engine.begin() as conn:
        warehouse.check_run_lock(conn)
        table = warehouse.create_list_table(conn)
    stored = warehouse.per_row_constants(constants)
    rows = targets = 0
    with ExitStack() as stack:
        writers = [
            stack.enter_context(warehouse.bulk_writer(table)) for _ in range(warehouse.list_writers)
        ]
        for batch, (columns, count) in enumerate(ranked_columns(spill, settings)):
            columns.update(stored)
            writers[batch % len(writers)].write(columns, count)
            rows += count
            targets += int(np.count_nonzero(columns["is_target"]))
    with warehouse.engine.begin() as conn:
        warehouse.check_run_lock(conn)
        warehouse.finish_list(conn, table, constants, True, settings.customer_index)
    return rows, targets


def _insert_ranked_list(
    warehouse: WarehouseAdapter,
    ranked: Select,
    constants: Mapping[str, Any],
    customer_index: bool,
) -> tuple[int, int]:
    """The staged rows ranked by one SQL window into a new list; (rows, targets)."""
    with warehouse.engine.begin() as conn:
        warehouse.check_run_lock(conn)
        table = warehouse.create_list_table(conn)
        rows = warehouse.insert_ranked(conn, table, ranked, constants)
        warehouse.finish_list(conn, table, constants, False, customer_index)
        targets = _count_targets(conn, table)
    return rows, targets


def _count_targets(conn: Connection, table) -> int:
    return int(conn.execute(select(func.count()).where(table.c.is_target)).scalar_one())


def stage_spilled_rows(warehouse: WarehouseAdapter, spill: SpillFiles, run_id: str) -> None:
    """Copy spilled rows into the staging table (to rank them in the warehouse instead)."""
    with warehouse.bulk_writer(warehouse.tables.staging) as writer:
        for block in spill.merged():
            columns = spill.columns_of(block)
            writer.write({**columns, "run_id": run_id, "partition_no": 0}, len(block))


def count_staged(warehouse: WarehouseAdapter, run_id: str) -> tuple[int, int]:
    """Staged rows of a run, and how many of them are not in the holdout."""
    staging = warehouse.tables.staging
    with warehouse.engine.connect() as conn:
        total, non_holdout = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((not_(staging.c.holdout), 1), else_=0)), 0),
            ).where(staging.c.run_id == run_id)
        ).one()
    return int(total), int(non_holdout)


def campaign_condition(settings: Settings, non_holdout_count: int, campaign_rank, probability):
    """The SQL condition that makes a non-holdout customer a campaign target."""
    limit = campaign_limit(settings, non_holdout_count)
    if limit is None:
        return probability >= settings.campaign_value
    return campaign_rank <= limit


def ranked_scores_select(
    warehouse: WarehouseAdapter,
    settings: Settings,
    run_id: str,
    population: int,
    non_holdout_count: int,
) -> Select:
    """SELECT of a run's staged rows with rank, decile and target flag (one sort, one window).

    Rank is 1 for the most likely buyer (ties: lower customer id first); deciles are
    `ntile(10)` of the rank, computed from the known population.
    """
    staging = warehouse.tables.staging
    order = (staging.c.probability.desc(), staging.c[CUSTOMER_ID].asc())
    ranked = (
        select(
            staging.c[CUSTOMER_ID],
            staging.c[WINDOW_END],
            staging.c.probability,
            staging.c.holdout,
            staging.c.reason_1,
            staging.c.reason_2,
            staging.c.reason_3,
            func.count().over(order_by=order, rows=(None, 0)).label("rank"),
            func.sum(case((not_(staging.c.holdout), 1), else_=0))
            .over(order_by=order, rows=(None, 0))
            .label("campaign_rank"),
        )
        .where(staging.c.run_id == run_id)
        .subquery("ranked")
    )
    decile = case(
        *[
            (ranked.c.rank <= bound, index + 1)
            for index, bound in enumerate(decile_bounds(population))
        ],
        else_=10,
    )
    is_target = and_(
        not_(ranked.c.holdout),
        campaign_condition(
            settings, non_holdout_count, ranked.c.campaign_rank, ranked.c.probability
        ),
    )
    return select(
        ranked.c[CUSTOMER_ID],
        ranked.c[WINDOW_END],
        ranked.c.probability,
        ranked.c.rank,
        decile.label("decile"),
        case((is_target, True), else_=False).label("is_target"),
        ranked.c.holdout,
        ranked.c.reason_1,
        ranked.c.reason_2,
        ranked.c.reason_3,
    )


def reject_duplicates(
    warehouse: WarehouseAdapter, run_id: str, as_of: date, chunk_size: int
) -> int:
    """Move every staged copy of a customer id staged more than once to `rejected_rows`."""
    duplicated = warehouse.render_sql("scoring/duplicated_customers").strip()
    with warehouse.engine.connect() as conn:
        ids = sorted({int(row[0]) for row in conn.execute(text(duplicated), {"run_id": run_id})})
    if not ids:
        return 0
    source = warehouse.source_sql("customer_activity")
    params = {"as_of": as_of}
    wanted = np.asarray(ids, dtype=np.int64)
    moved = 0
    types = population_column_types(warehouse, source, params)
    for chunk in warehouse.stream_query(source, params, chunk_size, types):
        now = datetime.now(UTC)
        valid = validate_chunk(chunk[list(ACTIVITY_COLUMNS)], run_id, now).valid
        copies = valid[np.isin(valid[CUSTOMER_ID].to_numpy(dtype=np.int64), wanted)]
        if copies.empty:
            continue
        rejected = rejected_frame(
            copies,
            ["duplicate_customer_id"] * len(copies),
            [f"{CUSTOMER_ID}: appears more than once in the population"] * len(copies),
            run_id,
            now,
        )
        with warehouse.engine.begin() as conn:
            warehouse.write_frame(conn, warehouse.tables.rejected, rejected)
        moved += len(rejected)
    staging = warehouse.tables.staging
    with warehouse.engine.begin() as conn:
        deleted = conn.execute(
            delete(staging).where(staging.c.run_id == run_id, staging.c[CUSTOMER_ID].in_(ids))
        ).rowcount
    if deleted != moved:
        raise RunGateError(
            f"duplicate accounting broken: {deleted} staged copies removed but {moved} "
            f"rows recorded as rejected"
        )
    logger.info("rejected %s staged rows whose customer id is duplicated", moved)
    return moved
