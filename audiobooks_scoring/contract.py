"""The feature contract: column names, order and the row-level rules with stable reason codes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime

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

REASON_CODES: dict[str, str] = {
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


def _numeric(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Float values of a column and a mask of non-null values that were not numbers."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype="float64", na_value=np.nan), np.zeros(len(column), bool)
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
    return values, text


def validate_chunk(frame: pd.DataFrame, run_id: str, rejected_at) -> ChunkValidation:
    """Split a population chunk into contract-passing rows and rejected rows with reason codes."""
    count = len(frame)
    reason = np.full(count, "", dtype=object)
    detail = np.full(count, "", dtype=object)

    def flag(mask: np.ndarray, code: str, text_of) -> None:
        new = mask & (reason == "")
        if new.any():
            reason[new] = code
            detail[new] = text_of(new)

    ids, id_text = _numeric(frame[CUSTOMER_ID])
    bad_id = np.isnan(ids) | id_text | ~np.isfinite(ids) | (ids != np.round(ids))
    flag(
        bad_id,
        "missing_customer_id",
        lambda m: f"{CUSTOMER_ID}: {REASON_CODES['missing_customer_id']}",
    )

    values = {}
    for name in FEATURES:
        column, text = _numeric(frame[name])
        values[name] = column
        flag(text, "not_numeric", lambda m, n=name: f"{n}: not a number")
    for name in FEATURES:
        flag(np.isnan(values[name]), "missing_value", lambda m, n=name: f"{n}: missing")
    for name in FEATURES:
        flag(np.isinf(values[name]), "infinite_value", lambda m, n=name: f"{n}: infinite")
    with np.errstate(invalid="ignore"):
        for name in NON_NEGATIVE:
            flag(values[name] < 0, "negative_value", lambda m, n=name: f"{n}: negative")
        completion = values["completion"]
        flag(
            (completion < 0) | (completion > 1),
            "completion_out_of_range",
            lambda m: "completion: outside [0, 1]",
        )
        flag(
            ~np.isin(values["review"], (0.0, 1.0)) & np.isfinite(values["review"]),
            "review_not_binary",
            lambda m: "review: not 0 or 1",
        )
        score = values["review_score"]
        flag(
            (score < 1) | (score > 10),
            "review_score_out_of_range",
            lambda m: "review_score: outside [1, 10]",
        )
        flag(
            values["book_length_avg_min"] > values["book_length_total_min"] + 1e-9,
            "average_above_total",
            lambda m: "book_length_avg_min > book_length_total_min",
        )
        flag(
            values["price_avg"] > values["price_total"] + 1e-9,
            "average_above_total",
            lambda m: "price_avg > price_total",
        )

    bad = reason != ""
    clean = pd.DataFrame({CUSTOMER_ID: ids[~bad].astype(np.int64)})
    if WINDOW_END in frame.columns:
        clean[WINDOW_END] = as_dates(frame[WINDOW_END].to_numpy()[~bad])
    for name in FEATURES:
        clean[name] = values[name][~bad]
    return ChunkValidation(
        valid=clean,
        rejected=rejected_frame(frame[bad], reason[bad], detail[bad], run_id, rejected_at),
    )


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
    raw = rows[columns].astype(object).where(rows[columns].notna(), None)
    raw_json = [
        json.dumps({key: _json_value(value) for key, value in zip(columns, record, strict=True)})
        for record in raw.itertuples(index=False, name=None)
    ]
    return pd.DataFrame(
        {
            "run_id": run_id,
            CUSTOMER_ID: [None if v is None else str(_json_value(v)) for v in raw[CUSTOMER_ID]]
            if CUSTOMER_ID in raw
            else None,
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
