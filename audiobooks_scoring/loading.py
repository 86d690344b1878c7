"""Filling the input tables: the public CSV into training examples, and synthetic demo data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select

from audiobooks_scoring.contract import WINDOW_END
from audiobooks_scoring.csv_loading import read_audiobooks_csv
from audiobooks_scoring.demo_data import iter_demo_activity, iter_demo_training
from audiobooks_scoring.warehouse import Warehouse, table_row_count, write_frame

logger = logging.getLogger(__name__)

DEMO_WINDOW_GAP = timedelta(days=182)


@dataclass(frozen=True)
class LoadResult:
    """Rows written per table."""

    training_rows: int
    activity_rows: int


def load_csv(warehouse: Warehouse, path: Path, window_end: date) -> int:
    """Replace the training examples of `window_end` with a public-format CSV; rows loaded."""
    frame = read_audiobooks_csv(path, window_end)
    training = warehouse.tables.training
    with warehouse.engine.begin() as conn:
        conn.execute(delete(training).where(training.c[WINDOW_END] == window_end))
        write_frame(conn, training, frame)
    logger.info("loaded %s rows from %s into %s", len(frame), path.name, training.name)
    return len(frame)


def load_demo_data(
    warehouse: Warehouse, customers: int, seed: int, as_of: date, chunk_size: int = 200_000
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
            training_rows += write_frame(conn, tables.training, chunk)
    activity_rows = 0
    for chunk in iter_demo_activity(customers, seed, as_of, chunk_size):
        with warehouse.engine.begin() as conn:
            activity_rows += write_frame(conn, tables.activity, chunk)
    logger.info("demo data: %s training rows, %s activity rows", training_rows, activity_rows)
    return LoadResult(training_rows, activity_rows)


def input_row_counts(warehouse: Warehouse) -> LoadResult:
    """Rows currently in the two input tables."""
    return LoadResult(
        table_row_count(warehouse.engine, warehouse.tables.training),
        table_row_count(warehouse.engine, warehouse.tables.activity),
    )


def latest_activity_window(warehouse: Warehouse) -> date | None:
    """The latest `window_end` in the activity table."""
    activity = warehouse.tables.activity
    with warehouse.engine.connect() as conn:
        value = conn.execute(select(func.max(activity.c[WINDOW_END]))).scalar_one_or_none()
    return date.fromisoformat(value) if isinstance(value, str) else value
