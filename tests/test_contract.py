"""Feature contract: each rule's reason code, first-failing-rule order, raw values kept."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    FEATURES,
    REASON_CODES,
    ContractError,
    check_columns,
    validate_chunk,
)

GOOD = {
    "customer_id": 1,
    "window_end": date(2026, 11, 1),
    "book_length_avg_min": 1620.0,
    "book_length_total_min": 3240.0,
    "price_avg": 10.0,
    "price_total": 20.0,
    "review": 1.0,
    "review_score": 9.0,
    "completion": 0.5,
    "minutes_listened": 1620.0,
    "support_requests": 0.0,
    "last_visit_days_after_purchase": 12.0,
}
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def frame_of(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame([{**GOOD, "customer_id": i + 1, **row} for i, row in enumerate(rows)])


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"customer_id": None}, "missing_customer_id"),
        ({"customer_id": 1.5}, "missing_customer_id"),
        ({"price_avg": None}, "missing_value"),
        ({"completion": np.nan}, "missing_value"),
        ({"minutes_listened": np.inf}, "infinite_value"),
        ({"price_total": -np.inf}, "infinite_value"),
        ({"book_length_total_min": -1.0}, "negative_value"),
        ({"support_requests": -2.0}, "negative_value"),
        ({"last_visit_days_after_purchase": -5.0}, "negative_value"),
        ({"completion": 1.2}, "completion_out_of_range"),
        ({"review": 2.0}, "review_not_binary"),
        ({"review_score": 0.5}, "review_score_out_of_range"),
        ({"review_score": 10.5}, "review_score_out_of_range"),
        ({"book_length_avg_min": 4000.0}, "average_above_total"),
        ({"price_avg": 25.0}, "average_above_total"),
        ({"price_avg": "twelve"}, "not_numeric"),
    ],
)
def test_each_rule_rejects_with_its_reason_code(change, code):
    frame = frame_of({}, change, {})
    checked = validate_chunk(frame, "run-1", NOW)
    assert len(checked.valid) == 2
    assert list(checked.rejected["reason_code"]) == [code]
    assert code in REASON_CODES
    rejected = checked.rejected.iloc[0]
    assert rejected["run_id"] == "run-1"
    assert set(json.loads(rejected["raw_values"])) == set(ACTIVITY_COLUMNS)


def test_every_row_is_either_valid_or_rejected_and_input_is_untouched():
    frame = frame_of({}, {"price_avg": None}, {"completion": 2.0}, {}, {"review": -1.0})
    before = frame.copy()
    checked = validate_chunk(frame, "run-1", NOW)
    assert len(checked.valid) + len(checked.rejected) == len(frame)
    pd.testing.assert_frame_equal(frame, before)
    assert list(checked.valid["customer_id"]) == [1, 4]
    assert checked.valid[list(FEATURES)].dtypes.unique().tolist() == [np.dtype("float64")]


def test_text_spelled_infinity_counts_as_infinite_not_as_text():
    frame = frame_of({"price_total": "Infinity"}, {"price_total": "abc"}, {"price_total": "20"})
    checked = validate_chunk(frame, "r", NOW)
    assert list(checked.rejected["reason_code"]) == ["infinite_value", "not_numeric"]
    assert list(checked.valid["customer_id"]) == [3]


def test_raw_values_keep_what_the_source_held():
    checked = validate_chunk(frame_of({"completion": 1.5}), "r", NOW)
    raw = json.loads(checked.rejected.iloc[0]["raw_values"])
    assert raw["completion"] == 1.5 and raw["customer_id"] == 1


def test_missing_column_names_the_column():
    with pytest.raises(ContractError, match="completion"):
        check_columns(tuple(c for c in ACTIVITY_COLUMNS if c != "completion"), ACTIVITY_COLUMNS)


def test_extra_columns_are_returned_to_be_ignored():
    assert check_columns((*ACTIVITY_COLUMNS, "segment"), ACTIVITY_COLUMNS) == ["segment"]
