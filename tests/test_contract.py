"""Feature contract: each rule's reason code, first-failing-rule order, raw values kept."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    CUSTOMER_ID,
    FEATURES,
    REJECT_REASONS,
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
    assert code in REJECT_REASONS
    rejected = checked.rejected.iloc[0]
    assert rejected["run_id"] == "run-1"
    assert set(json.loads(rejected["raw_values"])) == set(ACTIVITY_COLUMNS)


@pytest.mark.parametrize(
    ("change", "code", "detail"),
    [
        (
            {"customer_id": None, "price_avg": "twelve"},
            "missing_customer_id",
            "customer_id: customer_id is missing or not a whole number",
        ),
        ({"completion": "x", "price_avg": "y"}, "not_numeric", "price_avg: not a number"),
        ({"price_avg": "twelve", "completion": None}, "not_numeric", "price_avg: not a number"),
        ({"completion": None, "price_total": np.inf}, "missing_value", "completion: missing"),
        ({"review": None, "price_avg": None}, "missing_value", "price_avg: missing"),
        ({"review": -np.inf}, "infinite_value", "review: infinite"),
        (
            {"minutes_listened": np.inf, "support_requests": -1.0},
            "infinite_value",
            "minutes_listened: infinite",
        ),
        ({"price_total": -1.0, "price_avg": -2.0}, "negative_value", "price_avg: negative"),
        ({"price_total": -1.0, "completion": 1.5}, "negative_value", "price_total: negative"),
        (
            {"completion": 1.5, "review": 2.0},
            "completion_out_of_range",
            "completion: outside [0, 1]",
        ),
        ({"review": 2.0, "review_score": 11.0}, "review_not_binary", "review: not 0 or 1"),
        (
            {"review_score": 0.0, "price_avg": 25.0},
            "review_score_out_of_range",
            "review_score: outside [1, 10]",
        ),
        (
            {"book_length_avg_min": 4000.0, "price_avg": 25.0},
            "average_above_total",
            "book_length_avg_min > book_length_total_min",
        ),
        ({"price_avg": 25.0}, "average_above_total", "price_avg > price_total"),
    ],
)
def test_the_first_failing_rule_gives_the_reason(change, code, detail):
    checked = validate_chunk(frame_of({}, change, {}), "run-1", NOW)
    assert checked.rejected[["reason_code", "reason"]].values.tolist() == [[code, detail]]
    assert checked.rejected[CUSTOMER_ID].tolist() == [
        None if change.get(CUSTOMER_ID, 2) is None else "2"
    ]
    assert list(checked.valid[CUSTOMER_ID]) == [1, 3]


def test_a_clean_chunk_gives_a_valid_frame_of_its_own():
    frame = frame_of({}, {}, {})
    frame.index = [10, 11, 12]
    before = frame.copy()
    checked = validate_chunk(frame, "run-1", NOW)
    assert checked.rejected.empty
    valid = checked.valid
    assert list(valid.index) == [0, 1, 2] and list(valid.columns) == list(ACTIVITY_COLUMNS)
    assert valid[CUSTOMER_ID].dtype == np.dtype("int64")
    valid.loc[0, "price_avg"] = 99.0
    valid["completion"] += 0.25
    pd.testing.assert_frame_equal(frame, before)
    assert valid["price_avg"].tolist() == [99.0, 10.0, 10.0]
    assert valid["completion"].tolist() == [0.75, 0.75, 0.75]


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
