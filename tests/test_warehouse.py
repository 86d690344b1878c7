"""Warehouse layer on a real SQLite file and a real PostgreSQL: DDL, streaming, bulk writes."""

from __future__ import annotations

import tracemalloc
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy import inspect, select

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, WINDOW_END
from audiobooks_scoring.loading import load_csv
from audiobooks_scoring.warehouse import (
    create_tables,
    create_warehouse_engine,
    load_source_sql,
    read_frame,
    stream_query,
    write_frame,
)
from tests.conftest import REAL_CSV


def activity_frame(count: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({CUSTOMER_ID: np.arange(1, count + 1, dtype=np.int64)})
    frame[WINDOW_END] = date(2026, 11, 1)
    for name in FEATURES:
        frame[name] = (
            np.round(rng.random(count) * 1000, 2) if name != "completion" else rng.random(count)
        )
    return frame


def test_tables_and_views_are_created_twice_without_error(warehouse):
    create_tables(warehouse.engine, warehouse.tables)
    create_tables(warehouse.engine, warehouse.tables)
    inspector = inspect(warehouse.engine)
    schema = warehouse.tables.metadata.schema
    names = set(inspector.get_table_names(schema=schema))
    assert {t.name for t in warehouse.tables.metadata.sorted_tables} <= names
    assert {"campaign_targets", "decile_summary"} <= set(inspector.get_view_names(schema=schema))


def test_bulk_write_round_trip_is_exact(warehouse):
    frame = activity_frame(5_000)
    frame.loc[7, "price_avg"] = 0.1 + 0.2
    frame.loc[8, "completion"] = 1e-300
    with warehouse.engine.begin() as conn:
        assert write_frame(conn, warehouse.tables.activity, frame) == len(frame)
    back = read_frame(
        warehouse.engine,
        select(warehouse.tables.activity).order_by(warehouse.tables.activity.c[CUSTOMER_ID]),
    )
    back[WINDOW_END] = pd.to_datetime(back[WINDOW_END]).dt.date
    pd.testing.assert_frame_equal(back, frame, check_exact=True, check_dtype=False)


def stream_peak(warehouse, as_of: date, chunk_size: int) -> tuple[int, list[int]]:
    sql = load_source_sql("customer_activity", warehouse.engine, warehouse.tables)
    types = {name: pa.float64() for name in FEATURES}
    tracemalloc.start()
    tracemalloc.reset_peak()
    sizes = []
    for chunk in stream_query(warehouse.engine, sql, {"as_of": as_of}, chunk_size, types):
        sizes.append(len(chunk))
        del chunk
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, sizes


def test_streaming_memory_is_bounded_by_the_chunk_not_the_table(warehouse):
    small, large, chunk_size = 20_000, 100_000, 5_000
    with warehouse.engine.begin() as conn:
        write_frame(conn, warehouse.tables.activity, activity_frame(small))
        write_frame(
            conn,
            warehouse.tables.activity,
            activity_frame(large).assign(**{WINDOW_END: date(2026, 11, 20)}),
        )
    small_peak, small_sizes = stream_peak(warehouse, date(2026, 11, 10), chunk_size)
    large_peak, large_sizes = stream_peak(warehouse, date(2026, 11, 25), chunk_size)
    assert sum(small_sizes) == small and sum(large_sizes) == large
    assert max(large_sizes) == chunk_size and len(large_sizes) == large // chunk_size
    assert large_peak < 1.5 * small_peak, f"peak grew with the table: {small_peak} -> {large_peak}"
    assert large_peak < large * len(FEATURES) * 8, "peak is as large as the whole table"


def test_source_query_reads_the_latest_window_on_or_before_as_of(warehouse):
    older = activity_frame(10).assign(**{WINDOW_END: date(2026, 5, 1)})
    newer = activity_frame(7).assign(**{WINDOW_END: date(2026, 11, 1)})
    future = activity_frame(3).assign(**{WINDOW_END: date(2027, 5, 1)})
    with warehouse.engine.begin() as conn:
        for frame in (older, newer, future):
            write_frame(conn, warehouse.tables.activity, frame)
    sql = load_source_sql("customer_activity", warehouse.engine, warehouse.tables)
    rows = pd.concat(stream_query(warehouse.engine, sql, {"as_of": date(2026, 11, 25)}, 1000))
    assert len(rows) == 7
    rows = pd.concat(stream_query(warehouse.engine, sql, {"as_of": date(2026, 6, 1)}, 1000))
    assert len(rows) == 10


@pytest.mark.parametrize("with_header", [True, False])
def test_load_csv_maps_both_formats_into_training_examples(warehouse, tmp_path, with_header):
    path = REAL_CSV
    if not with_header:
        path = tmp_path / "headerless.csv"
        path.write_text("".join(REAL_CSV.read_text().splitlines(keepends=True)[1:]))
    assert load_csv(warehouse, path, date(2024, 6, 30)) == 14_084
    assert load_csv(warehouse, path, date(2024, 6, 30)) == 14_084
    training = warehouse.tables.training
    rows = read_frame(warehouse.engine, select(training))
    assert len(rows) == 14_084
    assert (rows["book_length_avg_min"] <= rows["book_length_total_min"]).all()
    assert (rows["price_avg"] <= rows["price_total"]).all()
    assert rows["converted"].sum() == 2_237


def test_engine_errors_and_reprs_never_show_the_password():
    engine = create_warehouse_engine("postgresql+psycopg://ads:s3cr3t-XYZ@127.0.0.1:1/none")
    assert "s3cr3t-XYZ" not in repr(engine)
    with pytest.raises(Exception) as raised:
        engine.connect()
    assert "s3cr3t-XYZ" not in str(raised.value)
