"""Filling the input tables: the public CSV into training examples, and synthetic demo data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import delete

from audiobooks_scoring import progress
from audiobooks_scoring.contract import WINDOW_END
from audiobooks_scoring.inputs.csv_file import read_audiobooks_csv
from audiobooks_scoring.inputs.demo_data import (
    NEW_CUSTOMER_SHARE,
    iter_demo_activity,
    iter_demo_training,
)
from audiobooks_scoring.warehouse import WarehouseAdapter

logger = logging.getLogger(__name__)

DEMO_WINDOW_GAP = timedelta(days=182)


@dataclass(frozen=True)
class LoadResult:
    """Rows written per table."""

    training_rows: int
    activity_rows: int


def load_csv(warehouse: WarehouseAdapter, path: Path, window_end: date) -> int:
    """Replace the training examples of `window_end` with a public-format CSV; rows loaded."""
    frame = read_audiobooks_csv(path, window_end)
    training = warehouse.tables.training
    with warehouse.engine.begin() as conn:
        conn.execute(delete(training).where(training.c[WINDOW_END] == window_end))
        warehouse.write_frame(conn, training, frame)
    logger.info("loaded %s rows from %s into %s", len(frame), path.name, training.name)
    return len(frame)


def load_demo_data(
    warehouse: WarehouseAdapter, customers: int, seed: int, as_of: date, chunk_size: int = 200_000
) -> LoadResult:
    """Replace both input tables with synthetic customers: a labeled window, then the current."""
    training_end = as_of - DEMO_WINDOW_GAP
    tables = warehouse.tables
    with warehouse.engine.begin() as conn:
        conn.execute(delete(tables.training))
        conn.execute(delete(tables.activity))
    training_rows = 0
    for chunk in iter_demo_training(customers, seed, training_end, chunk_size):
        with warehouse.engine.begin() as conn:
            training_rows += warehouse.write_frame(conn, tables.training, chunk)
        progress.report("writing training examples", training_rows, customers)
    activity_rows = 0
    expected = customers + round(customers * NEW_CUSTOMER_SHARE)
    for chunk in iter_demo_activity(customers, seed, as_of, chunk_size):
        with warehouse.engine.begin() as conn:
            activity_rows += warehouse.write_frame(conn, tables.activity, chunk)
        progress.report("writing customer activity", activity_rows, expected)
    logger.info("demo data: %s training rows, %s activity rows", training_rows, activity_rows)
    return LoadResult(training_rows, activity_rows)


def input_row_counts(warehouse: WarehouseAdapter) -> LoadResult:
    """Rows currently in the two input tables."""
    return LoadResult(
        warehouse.count_rows(warehouse.tables.training),
        warehouse.count_rows(warehouse.tables.activity),
    )
