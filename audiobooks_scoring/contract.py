"""The feature contract: column names, order and the row-level rules with stable reason codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd

CUSTOMER_ID = "customer_id"
WINDOW_END = "window_end"
LABEL = "converted"

FEATURES: tuple[str, ...] = (
    "book_length_avg_min",
    "book_length_total_min",
    "price_avg",
    "price_total",
    "review",
    "review_score",
    "completion",
    "minutes_listened",
    "support_requests",
    "last_visit_days_after_purchase",
)

ACTIVITY_COLUMNS: tuple[str, ...] = (CUSTOMER_ID, WINDOW_END, *FEATURES)
TRAINING_COLUMNS: tuple[str, ...] = (*ACTIVITY_COLUMNS, LABEL)

REVIEW_SCORE_DEFAULT = 8.91

NON_NEGATIVE: tuple[str, ...] = (
    "book_length_avg_min",
    "book_length_total_min",
    "price_avg",
    "price_total",
    "minutes_listened",
    "support_requests",
    "last_visit_days_after_purchase",
)

# Reason codes of a score: code 2*j is feature j's "_high", 2*j + 1 its "_low".
SCORE_REASON_LABELS: dict[str, str] = {
    "book_length_avg_min_high": "buys long books",
    "book_length_avg_min_low": "buys short books",
    "book_length_total_min_high": "has bought many hours of audio",
    "book_length_total_min_low": "has bought few hours of audio",
    "price_avg_high": "pays high prices per book",
    "price_avg_low": "pays low prices per book",
    "price_total_high": "has spent a lot in total",
    "price_total_low": "has spent little in total",
    "review_high": "left a review",
    "review_low": "has not left a review",
    "review_score_high": "rated their books highly",
    "review_score_low": "rated their books low",
    "completion_high": "listened to most of what they bought",
    "completion_low": "listened to little of what they bought",
    "minutes_listened_high": "listened for many minutes",
    "minutes_listened_low": "listened for few minutes",
    "support_requests_high": "contacted support",
    "support_requests_low": "has not needed support",
    "last_visit_days_after_purchase_high": "visited long after purchase",
    "last_visit_days_after_purchase_low": "visited soon after purchase",
}
SCORE_REASON_CODES: tuple[str, ...] = tuple(
    f"{name}_{side}" for name in FEATURES for side in ("high", "low")
)

REJECT_REASONS: dict[str, str] = {
    "missing_customer_id": "customer_id is missing or not a whole number",
    "not_numeric": "a feature holds text that is not a number",
    "missing_value": "a feature is missing (NULL or NaN)",
    "infinite_value": "a feature is +/- infinity",
    "negative_value": "a length, price, minutes, requests or days value is negative",
    "completion_out_of_range": "completion is outside [0, 1]",
    "review_not_binary": "review is not 0 or 1",
    "review_score_out_of_range": "review_score is outside [1, 10]",
    "average_above_total": "an average (book length or price) is above its total",
    "duplicate_customer_id": "the customer_id appears more than once in the population",
}


class ContractError(ValueError):
    """Input that breaks the feature contract at run level (column, rule and a sample)."""


@dataclass(frozen=True)
class ChunkValidation:
    """A chunk split into rows that pass the contract and rows rejected with a reason."""

    valid: pd.DataFrame
    rejected: pd.DataFrame


def check_columns(columns: list[str] | tuple[str, ...], required: tuple[str, ...]) -> list[str]:
    """Raise `ContractError` naming any missing column; return the extra columns (ignored)."""
    missing = [name for name in required if name not in columns]
    if missing:
        raise ContractError(
            f"missing column(s) {', '.join(missing)}: rule 'required column'; "
            f"the source returned {', '.join(columns) or 'no columns'}"
        )
    return [name for name in columns if name not in required]


def _numeric(column: pd.Series) -> tuple[np.ndarray, np.ndarray | None]:
    """Float values of a column and a mask of non-null values that were not numbers (or None).

    A numpy float or integer column is read as is (a view, not to be written to) and can hold
    no text, so its mask is None.
    """
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "fiu":
        return column.to_numpy(dtype=np.float64), None
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype="float64", na_value=np.nan), None
    coerced = pd.to_numeric(column, errors="coerce")
    values = coerced.to_numpy(dtype="float64", na_value=np.nan, copy=True)
    text = column.notna().to_numpy() & np.isnan(values)
    if text.any():
        spelled = column[text].astype(str).str.strip().str.lower()
        special = {
            "nan": np.nan,
            "inf": np.inf,
            "+inf": np.inf,
            "-inf": -np.inf,
            "infinity": np.inf,
            "+infinity": np.inf,
            "-infinity": -np.inf,
        }
        known = spelled.isin(list(special)).to_numpy()
        index = np.flatnonzero(text)
        values[index[known]] = spelled[known].map(special).to_numpy(dtype="float64")
        text[index[known]] = False
    return values, text if text.any() else None


def _row_rules(
    ids: np.ndarray,
    id_text: np.ndarray | None,
    values: dict[str, np.ndarray],
    texts: dict[str, np.ndarray | None],
) -> Iterator[tuple[np.ndarray, str, str]]:
    """The contract's row rules in precedence order: (mask of failing rows, code, detail).

    Every rule is elementwise, so it gives the same answer on all rows or on a subset.
    """
    bad_id = ~np.isfinite(ids) | (ids != np.round(ids))
    if id_text is not None:
        bad_id |= id_text
    yield bad_id, "missing_customer_id", f"{CUSTOMER_ID}: {REJECT_REASONS['missing_customer_id']}"
    for name in FEATURES:
        text = texts[name]
        if text is not None:
            yield text, "not_numeric", f"{name}: not a number"
    for name in FEATURES:
        yield np.isnan(values[name]), "missing_value", f"{name}: missing"
    for name in FEATURES:
        yield np.isinf(values[name]), "infinite_value", f"{name}: infinite"
    for name in NON_NEGATIVE:
        yield values[name] < 0, "negative_value", f"{name}: negative"
    completion = values["completion"]
    yield (
        (completion < 0) | (completion > 1),
        "completion_out_of_range",
        "completion: outside [0, 1]",
    )
    review = values["review"]
    yield (
        (review != 0.0) & (review != 1.0) & np.isfinite(review),
        "review_not_binary",
        "review: not 0 or 1",
    )
    score = values["review_score"]
    yield (
        (score < 1) | (score > 10),
        "review_score_out_of_range",
        "review_score: outside [1, 10]",
    )
    yield (
        values["book_length_avg_min"] > values["book_length_total_min"] + 1e-9,
        "average_above_total",
        "book_length_avg_min > book_length_total_min",
    )
    yield (
        values["price_avg"] > values["price_total"] + 1e-9,
        "average_above_total",
        "price_avg > price_total",
    )


def validate_chunk(frame: pd.DataFrame, run_id: str, rejected_at) -> ChunkValidation:
    """Split a population chunk into contract-passing rows and rejected rows with reason codes.

    A row is rejected with the first rule it fails. All rules are checked vectorised on every
    row first; reasons are then worked out on the rejected rows only.
    """
    ids, id_text = _numeric(frame[CUSTOMER_ID])
    values: dict[str, np.ndarray] = {}
    texts: dict[str, np.ndarray | None] = {}
    for name in FEATURES:
        values[name], texts[name] = _numeric(frame[name])

    bad = np.zeros(len(frame), dtype=bool)
    with np.errstate(invalid="ignore"):
        for mask, _, _ in _row_rules(ids, id_text, values, texts):
            bad |= mask
    rejected = np.flatnonzero(bad)
    reason = np.full(len(rejected), "", dtype=object)
    detail = np.full(len(rejected), "", dtype=object)
    if len(rejected):
        assigned = np.zeros(len(rejected), dtype=bool)
        subset = {name: column[rejected] for name, column in values.items()}
        subset_texts = {
            name: None if text is None else text[rejected] for name, text in texts.items()
        }
        subset_id_text = None if id_text is None else id_text[rejected]
        with np.errstate(invalid="ignore"):
            rules = _row_rules(ids[rejected], subset_id_text, subset, subset_texts)
            for mask, code, text in rules:
                new = mask & ~assigned
                if new.any():
                    reason[new] = code
                    detail[new] = text
                    assigned |= new

    if len(rejected):
        keep = ~bad
        columns: dict[str, Any] = {CUSTOMER_ID: ids[keep].astype(np.int64)}
        if WINDOW_END in frame.columns:
            columns[WINDOW_END] = as_dates(frame[WINDOW_END].to_numpy()[keep])
        columns.update({name: values[name][keep] for name in FEATURES})
    else:
        columns = {CUSTOMER_ID: ids.astype(np.int64)}
        if WINDOW_END in frame.columns:
            dates = frame[WINDOW_END]
            columns[WINDOW_END] = _unless_shared(dates, as_dates(dates.to_numpy()))
        columns.update({name: _unless_shared(frame[name], values[name]) for name in FEATURES})
    clean = pd.DataFrame(columns, copy=False)
    return ChunkValidation(
        valid=clean,
        rejected=rejected_frame(frame.iloc[rejected], reason, detail, run_id, rejected_at),
    )


def _unless_shared(column: pd.Series, values: np.ndarray) -> pd.Series | np.ndarray:
    """`column` renumbered from 0 (no copy) if `values` are its numpy values, else `values`."""
    if column.dtype == values.dtype and np.may_share_memory(column.to_numpy(), values):
        return column.reset_index(drop=True)
    return values


def as_dates(values: np.ndarray) -> np.ndarray:
    """Window ends as `datetime.date` objects (None where missing or unreadable)."""
    if len(values) and all(isinstance(v, date) and not isinstance(v, datetime) for v in values[:1]):
        return values
    parsed = pd.to_datetime(pd.Series(values), errors="coerce")
    return np.array([None if pd.isna(v) else v.date() for v in parsed], dtype=object)


def rejected_frame(
    rows: pd.DataFrame, reason_codes, details, run_id: str, rejected_at
) -> pd.DataFrame:
    """Rows for the `rejected_rows` table: run id, customer id, reason code and text, raw values."""
    columns = [name for name in ACTIVITY_COLUMNS if name in rows.columns]
    raw_json: list[str] = []
    ids: list | None = [] if CUSTOMER_ID in columns else None
    if len(rows):  # an empty chunk of rejects skips the (fixed) cost of the object frame
        raw = rows[columns].astype(object).where(rows[columns].notna(), None)
        raw_json = [
            json.dumps({key: _json_value(v) for key, v in zip(columns, record, strict=True)})
            for record in raw.itertuples(index=False, name=None)
        ]
        if ids is not None:
            ids = [None if v is None else str(_json_value(v)) for v in raw[CUSTOMER_ID]]
    return pd.DataFrame(
        {
            "run_id": run_id,
            CUSTOMER_ID: ids,
            "reason_code": list(reason_codes),
            "reason": list(details),
            "raw_values": raw_json,
            "rejected_at": rejected_at,
        }
    )


def _json_value(value):
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if np.isnan(value):
            return "NaN"
        if np.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        if value.is_integer():
            return int(value)
        return value
    if isinstance(value, int | str | bool):
        return value
    return str(value)
