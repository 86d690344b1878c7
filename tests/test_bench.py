"""The bench on a small population of a real warehouse of every test engine."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import func, select

from audiobooks_scoring.bench import (
    BENCH_AS_OF,
    BenchError,
    BenchReport,
    demo_population,
    demo_returning_customers,
    floor_columns,
    floor_table,
    run_bench,
)
from audiobooks_scoring.inputs.loading import load_demo_data
from audiobooks_scoring.warehouse import LIST_COLUMNS, init_warehouse
from tests.conftest import make_settings, server_of

JSON_KEYS = {"customers", "floor_s", "pipeline_s", "naive_s", "model_rows_per_s", "peak_rss_mb"}


@pytest.fixture
def bench_settings(request, dialect, tmp_path, trained_store_dir):
    server = server_of(request, dialect)
    return make_settings(
        tmp_path, dialect, server, model_store_dir=trained_store_dir, chunk_size=1_000
    )


@pytest.mark.slow
def test_small_bench_fills_the_warehouse_and_reports_sane_figures(bench_settings):
    report = run_bench(bench_settings, 3_000, repeats=2)

    assert report.customers == 3_000 == report.rows_scored + report.rows_rejected
    for seconds in (report.floor_s, report.pipeline_s, report.naive_s):
        assert 0 < seconds < 120
    assert report.naive_rows == 3_000 and not report.naive_sampled
    assert report.model_rows_per_s > 0 and report.reason_rows_per_s > 0
    assert set(report.pipeline_steps) == {"clear", "stage", "rank", "publish"}
    assert report.peak_rss_mb > 50
    assert report.repeats == 2 and "best of 2 rounds" in report.describe()

    figures = json.loads(json.dumps(report.to_json()))
    assert JSON_KEYS <= set(figures)
    assert figures["customers"] == 3_000
    assert figures["pipeline_over_floor"] == pytest.approx(report.pipeline_s / report.floor_s, 1e-2)
    text = report.describe()
    for word in ("floor", "pipeline", "naive", "rows/s", "peak RSS", "pipeline / floor"):
        assert word in text

    warehouse = init_warehouse(bench_settings)
    scores = warehouse.tables.scores
    with warehouse.engine.connect() as conn:
        published = conn.execute(select(func.count()).select_from(scores)).scalar_one()
        tables = set(warehouse.engine.dialect.get_table_names(conn, schema=scores.schema))
    assert published == report.rows_scored
    assert not {"bench_floor", "bench_naive"} & tables, "scratch tables are dropped"

    again = run_bench(bench_settings, 3_000, repeats=1)  # the loaded population is reused
    assert again.customers == 3_000
    warehouse.engine.dispose()


def test_bench_refuses_input_tables_it_did_not_fill(bench_settings):
    warehouse = init_warehouse(bench_settings)
    load_demo_data(warehouse, 500, seed=3, as_of=BENCH_AS_OF, chunk_size=1_000)
    with pytest.raises(BenchError, match="schema or database of its own"):
        run_bench(bench_settings, 2_000)
    warehouse.engine.dispose()


@pytest.mark.parametrize("customers", [1_000, 5_000, 1_000_000, 1_234_567])
def test_demo_population_is_as_close_as_the_generator_allows(customers):
    returning = demo_returning_customers(customers)
    assert abs(demo_population(returning) - customers) <= 1


def test_report_ratios_and_sampling_note():
    report = BenchReport(
        customers=1_000_000,
        dialect="postgresql",
        machine="test",
        floor_s=2.0,
        pipeline_s=4.0,
        naive_s=80.0,
        naive_rows=200_000,
        model_rows_per_s=5e6,
        reason_rows_per_s=1e6,
        peak_rss_mb=900.0,
        pipeline_peak_rss_mb=None,
    )
    assert report.pipeline_over_floor == 2.0 and report.naive_over_pipeline == 20.0
    assert report.naive_sampled and "scaled x5.0" in report.describe()
    assert report.to_json()["naive_sampled"] is True


def test_floor_writes_rows_shaped_like_the_stored_list(dialect, tmp_path, request):
    server = server_of(request, dialect)
    warehouse = init_warehouse(make_settings(tmp_path, dialect, server))
    scores = warehouse.tables.scores
    table = floor_table(warehouse)
    # a built list holds every column of the live one, or only those that vary by customer
    # where the adapter adds the run's constants as column defaults (PostgreSQL, MariaDB)
    stored = [
        c.name for c in scores.c if not warehouse.constants_as_defaults or c.name in LIST_COLUMNS
    ]
    with warehouse.engine.begin() as conn:
        built = warehouse.create_list_table(conn)
    columns_built = warehouse.read_frame(f"SELECT * FROM {warehouse.qualified_name(built)}").columns
    warehouse.discard_list()
    assert list(columns_built) == stored  # the list the adapter really builds
    assert [c.name for c in table.c] == stored
    for column in table.c:
        assert type(column.type) is type(scores.c[column.name].type)
    columns = floor_columns(table, np.arange(4, dtype=np.int64), 11, datetime.now(UTC))
    assert set(columns) == set(stored)
    assert list(columns["rank"]) == [11, 12, 13, 14]
    warehouse.engine.dispose()
