"""Partitioned scoring on a local Dask cluster publishes exactly the single-process list.

On DuckDB (a single-writer file the run holds open) the partitions are scored in the
flow's process instead, with a warning that says why; the list is the same.
"""

from __future__ import annotations

import logging
from datetime import date

import pandas as pd
import pytest
from sqlalchemy import select

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, WINDOW_END
from audiobooks_scoring.inputs.loading import load_demo_data
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import init_warehouse, reasons_column
from tests.conftest import make_settings, server_of
from tests.test_pipeline import VALID_ROW

AS_OF = date(2026, 11, 25)
CUSTOMERS = 2_000
PUBLISHED = ["probability", "rank", "decile", "is_target", "holdout", "reasons"]


def odd_rows() -> pd.DataFrame:
    """Rows that partitions must handle like the single process: rejects and a duplicate id."""
    base = {**VALID_ROW, WINDOW_END: AS_OF}
    rows = [
        {**base, CUSTOMER_ID: 900_001, "completion": 1.5},
        {**base, CUSTOMER_ID: 900_002, "price_avg": None},
        {**base, CUSTOMER_ID: 900_003},
        {**base, CUSTOMER_ID: 900_003, "price_avg": 5.0},
    ]
    return pd.DataFrame(rows)[[CUSTOMER_ID, WINDOW_END, *FEATURES]]


def use_settings(monkeypatch, settings: Settings, **extra) -> None:
    """Point the flow (which reads the environment) at the test warehouse and store."""
    values = {
        "WAREHOUSE_URL": settings.warehouse_url_value,
        "WAREHOUSE_SCHEMA": settings.warehouse_schema or "",
        "DATA_DIR": str(settings.data_dir),
        "MODEL_STORE_DIR": str(settings.model_store_path),
        "CHUNK_SIZE": str(settings.chunk_size),
        **{key.upper(): str(value) for key, value in extra.items()},
    }
    for key, value in values.items():
        monkeypatch.setenv(f"AUDIOBOOKS_{key}", value)


def published_list(warehouse) -> pd.DataFrame:
    scores = warehouse.tables.scores
    columns = [
        scores.c[CUSTOMER_ID],
        *(scores.c[name] for name in PUBLISHED if name != "reasons"),
        reasons_column(),
    ]
    frame = warehouse.read_frame(select(*columns).order_by(scores.c[CUSTOMER_ID]))
    return frame.reset_index(drop=True)


@pytest.mark.slow
def test_two_partitions_on_two_dask_workers_publish_the_single_process_list(
    prefect_harness, request, dialect, tmp_path, trained_store_dir, monkeypatch, caplog
):
    from audiobooks_scoring.flows.score_customers import score_customers

    server = server_of(request, dialect)
    settings = make_settings(
        tmp_path, dialect, server, model_store_dir=trained_store_dir, chunk_size=1_000
    )
    warehouse = init_warehouse(settings)
    load_demo_data(warehouse, CUSTOMERS, seed=21, as_of=AS_OF, chunk_size=1_000)
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, odd_rows())

    use_settings(monkeypatch, settings, partitions=1)
    single = score_customers(as_of=AS_OF, run_id="single")
    single_list = published_list(warehouse)

    use_settings(monkeypatch, settings, partitions=2, dask_workers=2)
    with caplog.at_level(logging.WARNING):
        parted = score_customers(as_of=AS_OF, run_id="parted")
    parted_list = published_list(warehouse)
    in_one_process = [
        record.getMessage()
        for record in caplog.records
        if "scoring the 2 partitions in one process" in record.getMessage()
    ]
    if dialect == "duckdb":  # no other process can open the file the run holds
        assert len(in_one_process) == 1
        assert in_one_process[0].startswith("DuckDB is a single-writer file")
    else:  # the partitions went to the Dask workers
        assert in_one_process == []

    population = CUSTOMERS + round(CUSTOMERS * 0.1) + len(odd_rows())
    for figures in (single, parted):
        assert figures["rows_in"] == population
        assert figures["rows_rejected"] == 4  # completion, missing price, both copies of 900003
        assert figures["rows_scored"] == population - 4
    assert len(parted_list) == population - 4
    pd.testing.assert_frame_equal(parted_list, single_list, check_exact=True)
    staging = warehouse.tables.staging
    partitions = warehouse.read_frame(
        select(staging.c.partition_no).where(staging.c.run_id == "parted").distinct(),
    )
    assert set(partitions["partition_no"]) == {0, 1}
    warehouse.engine.dispose()
