"""Warehouse layer on a real warehouse of every test engine: DDL, streaming, bulk writes."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy import func, inspect, select, text

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, WINDOW_END
from audiobooks_scoring.inputs.loading import load_csv
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import (
    CodedColumn,
    PostgresAdapter,
    WarehouseError,
    init_warehouse,
)
from audiobooks_scoring.warehouse.pgcopy import leading_ids
from tests.conftest import REAL_CSV, make_settings
from tests.helpers import stream_peak


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
    warehouse.create_tables()
    warehouse.create_tables()
    inspector = inspect(warehouse.engine)
    schema = warehouse.tables.metadata.schema
    names = set(inspector.get_table_names(schema=schema))
    views = set(inspector.get_view_names(schema=schema))
    # every table the job reads or writes (MySQL/MariaDB: the live list is a view of history)
    assert {t.name for t in warehouse.tables.metadata.sorted_tables} <= names | views
    assert warehouse.tables.history.name in names
    assert {"campaign_targets", "decile_summary"} <= views


def test_bulk_write_round_trip_is_exact(warehouse):
    frame = activity_frame(5_000)
    frame.loc[7, "price_avg"] = 0.1 + 0.2
    frame.loc[8, "completion"] = 1e-300
    with warehouse.engine.begin() as conn:
        assert warehouse.write_frame(conn, warehouse.tables.activity, frame) == len(frame)
    activity = warehouse.tables.activity
    back = warehouse.read_frame(select(activity).order_by(activity.c[CUSTOMER_ID]))
    back[WINDOW_END] = pd.to_datetime(back[WINDOW_END]).dt.date
    pd.testing.assert_frame_equal(back, frame, check_exact=True, check_dtype=False)


FEATURE_TYPES = {name: pa.float64() for name in FEATURES}


def test_streaming_memory_is_bounded_by_the_chunk_not_the_table(warehouse):
    small, large, chunk_size = 20_000, 100_000, 5_000
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, activity_frame(small))
        warehouse.write_frame(
            conn,
            warehouse.tables.activity,
            activity_frame(large).assign(**{WINDOW_END: date(2026, 11, 20)}),
        )
    small_peak, small_sizes = stream_peak(warehouse, date(2026, 11, 10), chunk_size, FEATURE_TYPES)
    large_peak, large_sizes = stream_peak(warehouse, date(2026, 11, 25), chunk_size, FEATURE_TYPES)
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
            warehouse.write_frame(conn, warehouse.tables.activity, frame)
    sql = warehouse.source_sql("customer_activity")
    rows = pd.concat(warehouse.stream_query(sql, {"as_of": date(2026, 11, 25)}, 1000))
    assert len(rows) == 7
    rows = pd.concat(warehouse.stream_query(sql, {"as_of": date(2026, 6, 1)}, 1000))
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
    rows = warehouse.read_frame(select(training))
    assert len(rows) == 14_084
    assert (rows["book_length_avg_min"] <= rows["book_length_total_min"]).all()
    assert (rows["price_avg"] <= rows["price_total"]).all()
    assert rows["converted"].sum() == 2_237


def test_engine_errors_and_reprs_never_show_the_password():
    engine = PostgresAdapter.create_engine("postgresql+psycopg://ads:s3cr3t-XYZ@127.0.0.1:1/none")
    assert "s3cr3t-XYZ" not in repr(engine)
    with pytest.raises(Exception) as raised:
        engine.connect()
    assert "s3cr3t-XYZ" not in str(raised.value)


FIXED_COLUMNS = ("id", "i4", "i2", "f4", "f8", "flag", "day")
COPY_CHUNK = 4


@pytest.fixture
def fixed_width_table(postgres_engine):
    """A PostgreSQL table of every fixed-width type the binary COPY path reads."""
    engine, schema = postgres_engine
    settings = Settings(warehouse_url=str(engine.url.render_as_string(hide_password=False)))
    adapter = PostgresAdapter.open(settings.model_copy(update={"warehouse_schema": schema}))
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {schema}.fixed (seq integer, id bigint, i4 integer, i2 smallint,"
                " f4 real, f8 double precision, flag boolean, day date, label text)"
            )
        )
    yield adapter, f"{schema}.fixed"
    adapter.dispose()


def fixed_rows(count: int, nulls: set[int]) -> list[tuple]:
    """Rows whose position p, if in `nulls`, holds a NULL in column p % 8 (7: in every column)."""
    rows = []
    for p in range(count):
        row = [2**40 + p, -p, 3 * p, p * 0.25, p / 3, p % 2 == 0, date(2026, 1, 1), f"c{p}"]
        row[6] += timedelta(days=p)
        if p in nulls:
            row = [None] * len(row) if p % 8 == 7 else [*row[: p % 8], None, *row[p % 8 + 1 :]]
        rows.append(tuple(row))
    return rows


def fill_fixed(fixed_width_table, rows: list[tuple]) -> None:
    adapter, table = fixed_width_table
    if not rows:
        return
    names = (*FIXED_COLUMNS, "label")
    with adapter.engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {table} (seq, {', '.join(names)})"
                f" VALUES (:seq, {', '.join(':' + name for name in names)})"
            ),
            [dict(zip(names, row, strict=True), seq=p) for p, row in enumerate(rows)],
        )


def frame_values(frame: pd.DataFrame) -> list[tuple]:
    """Rows as Python values, NULL (NaN or None) as None."""
    return [
        tuple(None if value is None or value != value else value for value in row)
        for row in frame.itertuples(index=False, name=None)
    ]


COPY_CASES = {
    "no rows": (0, set()),
    "one chunk exactly": (COPY_CHUNK, set()),
    "two chunks exactly": (2 * COPY_CHUNK, set()),
    "a short last chunk": (2 * COPY_CHUNK + 1, set()),
    "nulls mid, at chunk ends and starts": (2 * COPY_CHUNK, {1, 3, 4, 7}),
    "a null in every row": (2 * COPY_CHUNK, set(range(2 * COPY_CHUNK))),
    "a null in the only row": (1, {0}),
    "a last chunk of one null row": (COPY_CHUNK + 1, {COPY_CHUNK}),
}


@pytest.mark.parametrize(("count", "nulls"), COPY_CASES.values(), ids=COPY_CASES.keys())
def test_binary_copy_streams_every_row_in_order_with_its_nulls(fixed_width_table, count, nulls):
    rows = fixed_rows(count, nulls)
    fill_fixed(fixed_width_table, rows)
    adapter, table = fixed_width_table
    sql = f"SELECT {', '.join(FIXED_COLUMNS)} FROM {table} ORDER BY seq"
    sizes = [min(COPY_CHUNK, count - start) for start in range(0, count, COPY_CHUNK)]

    frames = list(adapter.stream_query(sql, {}, COPY_CHUNK))
    assert [len(frame) for frame in frames] == sizes
    assert all(tuple(frame.columns) == FIXED_COLUMNS for frame in frames)
    got = [value for frame in frames for value in frame_values(frame)]
    assert got == [row[: len(FIXED_COLUMNS)] for row in rows]

    chunks = list(adapter.stream_copy_chunks(sql, {}, COPY_CHUNK))
    assert [chunk.rows for chunk in chunks] == sizes
    starts = range(0, count, COPY_CHUNK)
    irregular = [
        start + position
        for start, chunk in zip(starts, chunks, strict=True)
        for position, _ in chunk.irregular
    ]
    assert irregular == sorted(nulls)
    ids = np.concatenate([leading_ids(chunk) for chunk in chunks]) if chunks else []
    assert list(ids) == [row[0] or 0 for row in rows]


def test_text_columns_stream_through_csv_copy(fixed_width_table):
    rows = fixed_rows(2 * COPY_CHUNK + 1, {1, 4})
    fill_fixed(fixed_width_table, rows)
    adapter, table = fixed_width_table
    sql = f"SELECT id, i4, label FROM {table} ORDER BY seq"
    frames = list(adapter.stream_query(sql, {}, COPY_CHUNK))
    assert [len(frame) for frame in frames] == [COPY_CHUNK, COPY_CHUNK, 1]
    got = [value for frame in frames for value in frame_values(frame)]
    assert got == [(row[0], row[1], row[7]) for row in rows]
    with pytest.raises(WarehouseError, match="fixed-width"):
        next(adapter.stream_copy_chunks(sql, {}, COPY_CHUNK))


def test_bulk_writer_appends_every_batch_and_commits_once(warehouse):
    activity = warehouse.tables.activity
    frame = activity_frame(9_000)
    with warehouse.bulk_writer(activity) as writer:
        for start in range(0, len(frame), 2_000):
            piece = frame.iloc[start : start + 2_000]
            columns = {name: piece[name].to_numpy() for name in (CUSTOMER_ID, *FEATURES)}
            columns[WINDOW_END] = CodedColumn(
                np.zeros(len(piece), dtype=np.int64), (date(2026, 11, 1),)
            )
            writer.write(columns, len(piece))
    assert writer.rows == len(frame)
    back = warehouse.read_frame(select(activity).order_by(activity.c[CUSTOMER_ID]))
    back[WINDOW_END] = pd.to_datetime(back[WINDOW_END]).dt.date
    pd.testing.assert_frame_equal(back, frame, check_exact=True, check_dtype=False)


def test_bulk_writer_failing_batch_writes_nothing_on_postgres(tmp_path, postgres_schema):
    """One COPY transaction on PostgreSQL (SQLite commits each batch on its own)."""
    warehouse = init_warehouse(make_settings(tmp_path, "postgres", postgres_schema))
    scores = warehouse.tables.staging
    good = {
        "run_id": "r",
        CUSTOMER_ID: np.arange(3),
        "probability": np.full(3, 0.5),
        "holdout": np.zeros(3, dtype=bool),
        "partition_no": 0,
    }
    with pytest.raises(Exception, match="null value|not-null"):
        with warehouse.bulk_writer(scores) as writer:
            for _ in range(5):
                writer.write(good, 3)
            writer.write({**good, "run_id": None}, 3)  # NOT NULL column: the server refuses
            for _ in range(5):
                writer.write(good, 3)
    count = warehouse.read_frame(select(func.count()).select_from(scores)).iloc[0, 0]
    assert count == 0
    warehouse.dispose()
