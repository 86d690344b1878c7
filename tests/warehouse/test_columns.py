"""Column batches turned into executemany rows: the per-batch path equals the frame path."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pytest

from audiobooks_scoring.contract import SCORE_REASON_CODES
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import CodedColumn, init_warehouse
from audiobooks_scoring.warehouse.adapter import decoded_frame
from audiobooks_scoring.warehouse.columns import executemany_column_rows, executemany_rows

SCORED_AT = datetime(2026, 11, 25, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def sqlite_warehouse(tmp_path):
    warehouse = init_warehouse(Settings(warehouse_url=f"sqlite:///{tmp_path / 'w.db'}"))
    yield warehouse
    warehouse.dispose()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("probability", np.array([0.25, np.nan, 1.0])),
        ("rank", np.array([1, 2, 3], dtype=np.int64)),
        ("is_target", np.array([True, False, True])),
        ("reason_1", CodedColumn(np.array([0, -1, 2]), SCORE_REASON_CODES)),
        ("window_end", CodedColumn(np.array([0, 0, -1]), (date(2026, 11, 1),))),
        ("scored_at", SCORED_AT),
        ("model_version", "v1"),
        ("model_version", None),
    ],
)
def test_column_rows_equal_the_rows_of_the_decoded_frame(sqlite_warehouse, name, value):
    table = sqlite_warehouse.list_table()
    dialect = sqlite_warehouse.dialect
    columns = {"customer_id": np.array([7, 8, 9], dtype=np.int64), name: value}
    expected = executemany_rows(dialect, table, decoded_frame(columns, 3))
    assert executemany_column_rows(dialect, table, columns, 3) == expected
    assert len(expected) == 3 and len(expected[0]) == 2
