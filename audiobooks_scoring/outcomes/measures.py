"""Outcome statistics of one published list: conversion labels from later purchases, how far
its horizon has elapsed, realized AUC and Brier score on the control group, and the campaign's
uplift over comparable control customers with Newcombe's hybrid score interval.

A customer converted when they bought after the run's as-of date and no later than the end of
its horizon, compared on calendar dates (a tz-aware timestamp counts on its own wall-clock date).
Comparable control customers are control customers whose probability is at least the lowest
targeted probability: the campaign targets the top of the non-control ranking and the control
group is a random sample, so both sides then share one distribution of probabilities.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from datetime import date, datetime
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

DEFAULT_HORIZON_DAYS = 183
DEFAULT_CONFIDENCE = 0.95
DECILES = 10


@dataclass(frozen=True, eq=False)
class OutcomeLabels:
    """Conversion flags aligned with a run's customers and the bucket of every purchase row.

    Each purchase row lands in exactly one bucket, checked in this order: `missing_date` (no
    customer id or no purchase date), `unknown_customer` (not scored in the run), `before_run`
    (on or before the as-of date), `after_horizon` (after the horizon's last day), `used`.
    """

    converted: np.ndarray
    used: int
    unknown_customer: int
    missing_date: int
    before_run: int
    after_horizon: int

    @property
    def purchases(self) -> int:
        """The number of purchase rows examined."""
        return (
            self.used
            + self.unknown_customer
            + self.missing_date
            + self.before_run
            + self.after_horizon
        )

    def counts(self) -> dict[str, int]:
        """Return the purchase-row buckets as plain JSON-ready counts."""
        return {
            "used": self.used,
            "unknown_customer": self.unknown_customer,
            "missing_date": self.missing_date,
            "before_run": self.before_run,
            "after_horizon": self.after_horizon,
        }


@dataclass(frozen=True)
class DecileOutcome:
    """One decile's realized calibration and gains on control customers and its uplift."""

    decile: int
    customers: int
    mean_predicted: float | None
    observed_rate: float | None
    cumulative_gain_realized: float | None
    cumulative_gain_promised: float | None
    targeted: int
    targeted_rate: float | None
    control: int
    control_rate: float | None
    uplift: float | None
    uplift_ci_low: float | None
    uplift_ci_high: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return the decile row as plain JSON-ready values."""
        return {
            "decile": self.decile,
            "customers": self.customers,
            "mean_predicted": self.mean_predicted,
            "observed_rate": self.observed_rate,
            "cumulative_gain_realized": self.cumulative_gain_realized,
            "cumulative_gain_promised": self.cumulative_gain_promised,
            "targeted": self.targeted,
            "targeted_rate": self.targeted_rate,
            "control": self.control,
            "control_rate": self.control_rate,
            "uplift": self.uplift,
            "uplift_ci_low": self.uplift_ci_low,
            "uplift_ci_high": self.uplift_ci_high,
        }


@dataclass(frozen=True)
class RunOutcome:
    """What one run's list achieved: campaign uplift and the model's realized performance.

    `control`, `control_conversions` and `control_rate` cover the comparable control customers
    only; `control_customers`, `control_base_rate`, `mean_predicted`, `realized_auc` and `brier`
    cover the whole control group.
    """

    customers: int
    confidence: float
    targeted: int
    targeted_conversions: int
    targeted_rate: float | None
    lowest_targeted_probability: float | None
    control: int
    control_conversions: int
    control_rate: float | None
    uplift: float | None
    uplift_ci_low: float | None
    uplift_ci_high: float | None
    incremental_conversions: float | None
    uplift_note: str | None
    control_customers: int
    control_base_rate: float | None
    mean_predicted: float | None
    realized_auc: float | None
    expected_auc: float | None
    brier: float | None
    deciles: tuple[DecileOutcome, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the outcome as plain JSON-ready values."""
        return {
            "customers": self.customers,
            "confidence": self.confidence,
            "targeted": self.targeted,
            "targeted_conversions": self.targeted_conversions,
            "targeted_rate": self.targeted_rate,
            "lowest_targeted_probability": self.lowest_targeted_probability,
            "control": self.control,
            "control_conversions": self.control_conversions,
            "control_rate": self.control_rate,
            "uplift": self.uplift,
            "uplift_ci_low": self.uplift_ci_low,
            "uplift_ci_high": self.uplift_ci_high,
            "incremental_conversions": self.incremental_conversions,
            "uplift_note": self.uplift_note,
            "control_customers": self.control_customers,
            "control_base_rate": self.control_base_rate,
            "mean_predicted": self.mean_predicted,
            "realized_auc": self.realized_auc,
            "expected_auc": self.expected_auc,
            "brier": self.brier,
            "deciles": [row.to_dict() for row in self.deciles],
        }


def label_outcomes(
    customer_ids: np.ndarray,
    as_of: date,
    horizon_days: int,
    purchases: pd.DataFrame,
) -> OutcomeLabels:
    """Flag the customers who bought within the horizon after `as_of` and bucket every purchase."""
    if horizon_days <= 0:
        raise ValueError(f"horizon_days must be positive, got {horizon_days}")
    missing_columns = {"customer_id", "purchased_at"} - set(purchases.columns)
    if missing_columns:
        raise ValueError(f"purchases lack the columns {sorted(missing_columns)}")
    run_ids = np.asarray(customer_ids)
    if run_ids.ndim != 1:
        raise ValueError("customer_ids must be one-dimensional")
    index = pd.Index(run_ids)
    if not index.is_unique:
        raise ValueError("customer_ids must be unique within a run")

    ids = purchases["customer_id"]
    days = purchase_days(purchases["purchased_at"])
    missing = ids.isna().to_numpy(dtype=bool) | np.isnat(days)
    present = np.flatnonzero(~missing)
    positions = np.asarray(index.get_indexer(ids.iloc[present].to_numpy()))
    known = positions >= 0

    first_day = np.datetime64(_as_date(as_of), "D")
    last_day = first_day + np.timedelta64(horizon_days, "D")
    known_days = days[present[known]]
    before = known_days <= first_day
    after = known_days > last_day
    inside = ~(before | after)

    converted = np.zeros(run_ids.size, dtype=np.int8)
    converted[positions[known][inside]] = 1
    return OutcomeLabels(
        converted=converted,
        used=int(np.count_nonzero(inside)),
        unknown_customer=int(known.size - np.count_nonzero(known)),
        missing_date=int(np.count_nonzero(missing)),
        before_run=int(np.count_nonzero(before)),
        after_horizon=int(np.count_nonzero(after)),
    )


def purchase_days(values: pd.Series) -> np.ndarray:
    """Return the calendar date of each purchase timestamp as datetime64[D] (NaT where missing)."""
    if pd.api.types.is_numeric_dtype(values.dtype) and bool(values.notna().any()):
        raise ValueError(f"purchased_at must hold dates or timestamps, not {values.dtype}")
    try:
        stamps = pd.to_datetime(values)
    except (ValueError, TypeError):
        # Mixed time zones or text formats (SQLite stores dates as text): each value is read
        # on its own, at its wall-clock time; text that is no date becomes NaT (counted).
        logger.debug("purchased_at mixes formats or time zones; reading each value on its own")
        stamps = pd.to_datetime(values.map(_wall_clock), format="mixed", errors="coerce")
    if isinstance(stamps.dtype, pd.DatetimeTZDtype):
        stamps = stamps.dt.tz_localize(None)
    return np.asarray(stamps.to_numpy()).astype("datetime64[D]")


def maturity(as_of: date, measured_on: date, horizon_days: int) -> float:
    """Return the share of the run's horizon elapsed on `measured_on`, clipped to [0, 1]."""
    if horizon_days <= 0:
        raise ValueError(f"horizon_days must be positive, got {horizon_days}")
    elapsed = (_as_date(measured_on) - _as_date(as_of)).days
    return min(max(elapsed / horizon_days, 0.0), 1.0)


def is_provisional(as_of: date, measured_on: date, horizon_days: int) -> bool:
    """Return whether the run's horizon has not fully elapsed on `measured_on`."""
    return maturity(as_of, measured_on, horizon_days) < 1.0


def wilson_interval(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Return the Wilson score interval (no continuity correction) for a binomial proportion."""
    successes = operator.index(successes)
    n = operator.index(n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    z = _z(confidence)
    z2 = z * z
    centre = (successes + z2 / 2) / (n + z2)
    half = z * math.sqrt(successes * (n - successes) / n + z2 / 4) / (n + z2)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def newcombe_interval(
    x1: int, n1: int, x2: int, n2: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Return Newcombe's hybrid score interval (1998, method 10) for x1/n1 - x2/n2."""
    low1, high1 = wilson_interval(x1, n1, confidence)
    low2, high2 = wilson_interval(x2, n2, confidence)
    p1 = operator.index(x1) / operator.index(n1)
    p2 = operator.index(x2) / operator.index(n2)
    difference = p1 - p2
    low = difference - math.hypot(p1 - low1, high2 - p2)
    high = difference + math.hypot(high1 - p1, p2 - low2)
    return max(-1.0, low), min(1.0, high)


def measure_outcome(
    probability: np.ndarray,
    decile: np.ndarray,
    is_target: np.ndarray,
    control: np.ndarray,
    converted: np.ndarray,
    promised_auc: float | None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
) -> RunOutcome:
    """Measure one run's uplift over comparable control customers and its realized performance."""
    scores = np.asarray(probability, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError("probability must be one-dimensional")
    if not bool(np.all((scores >= 0.0) & (scores <= 1.0))):
        raise ValueError("probability must lie in [0, 1] (no NaN)")
    size = scores.size
    deciles = _deciles(decile, size)
    target = _flags(is_target, "is_target", size)
    in_control = _flags(control, "control", size)
    bought = _flags(converted, "converted", size)
    if bool(np.any(target & in_control)):
        raise ValueError("a control customer cannot be targeted")
    _z(confidence)

    targeted = int(np.count_nonzero(target))
    targeted_conversions = int(np.count_nonzero(target & bought))
    lowest: float | None = float(scores[target].min()) if targeted else None
    comparable = in_control & (scores >= lowest) if lowest is not None else np.zeros(size, bool)
    compared = int(np.count_nonzero(comparable))
    compared_conversions = int(np.count_nonzero(comparable & bought))
    control_customers = int(np.count_nonzero(in_control))

    uplift: float | None = None
    low: float | None = None
    high: float | None = None
    incremental: float | None = None
    note: str | None = None
    if lowest is None:
        note = "no targeted customers in the run; uplift cannot be measured"
    elif not control_customers:
        note = "no control customers in the run; uplift cannot be measured"
    elif not compared:
        note = (
            "no control customers with a probability at least the lowest targeted probability "
            f"({lowest:.4f}); uplift cannot be measured"
        )
    else:
        uplift = targeted_conversions / targeted - compared_conversions / compared
        low, high = newcombe_interval(
            targeted_conversions, targeted, compared_conversions, compared, confidence
        )
        incremental = uplift * targeted

    control_scores = scores[in_control]
    control_bought = bought[in_control]
    return RunOutcome(
        customers=size,
        confidence=float(confidence),
        targeted=targeted,
        targeted_conversions=targeted_conversions,
        targeted_rate=_ratio(targeted_conversions, targeted),
        lowest_targeted_probability=lowest,
        control=compared,
        control_conversions=compared_conversions,
        control_rate=_ratio(compared_conversions, compared),
        uplift=uplift,
        uplift_ci_low=low,
        uplift_ci_high=high,
        incremental_conversions=incremental,
        uplift_note=note,
        control_customers=control_customers,
        control_base_rate=_mean(control_bought),
        mean_predicted=_mean(control_scores),
        realized_auc=mann_whitney_auc(control_bought, control_scores),
        expected_auc=None if promised_auc is None else float(promised_auc),
        brier=_mean((control_scores - control_bought) ** 2),
        deciles=_decile_rows(scores, deciles, target, in_control, comparable, bought, confidence),
    )


def mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Return the ROC AUC of scores for 0/1 labels (ties count one half); None for one class."""
    positive = np.asarray(labels).astype(bool)
    positives = int(np.count_nonzero(positive))
    negatives = positive.size - positives
    if positives == 0 or negatives == 0:
        return None
    _, group, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    positive_counts = np.bincount(group, weights=positive.astype(np.float64), minlength=counts.size)
    negative_counts = counts - positive_counts
    negatives_below = np.cumsum(negative_counts) - negative_counts
    wins = float(np.dot(positive_counts, negatives_below + 0.5 * negative_counts))
    return wins / (positives * negatives)


def _decile_rows(
    scores: np.ndarray,
    deciles: np.ndarray,
    target: np.ndarray,
    in_control: np.ndarray,
    comparable: np.ndarray,
    bought: np.ndarray,
    confidence: float,
) -> tuple[DecileOutcome, ...]:
    """Per-decile calibration, cumulative gains and uplift rows for the deciles present."""
    bins = DECILES + 1
    present = np.bincount(deciles, minlength=bins)
    customers = np.bincount(deciles[in_control], minlength=bins)
    predicted = np.bincount(deciles[in_control], weights=scores[in_control], minlength=bins)
    observed = np.bincount(deciles[in_control & bought], minlength=bins)
    targeted = np.bincount(deciles[target], minlength=bins)
    targeted_bought = np.bincount(deciles[target & bought], minlength=bins)
    compared = np.bincount(deciles[comparable], minlength=bins)
    compared_bought = np.bincount(deciles[comparable & bought], minlength=bins)
    total_observed = int(observed.sum())
    total_predicted = float(predicted.sum())
    gain_realized = np.cumsum(observed)
    gain_promised = np.cumsum(predicted)

    rows: list[DecileOutcome] = []
    for d in range(1, bins):
        if not present[d]:
            continue
        n1, x1 = int(targeted[d]), int(targeted_bought[d])
        n2, x2 = int(compared[d]), int(compared_bought[d])
        uplift: float | None = None
        low: float | None = None
        high: float | None = None
        if n1 and n2:
            uplift = x1 / n1 - x2 / n2
            low, high = newcombe_interval(x1, n1, x2, n2, confidence)
        rows.append(
            DecileOutcome(
                decile=d,
                customers=int(customers[d]),
                mean_predicted=_ratio(float(predicted[d]), int(customers[d])),
                observed_rate=_ratio(int(observed[d]), int(customers[d])),
                cumulative_gain_realized=_ratio(int(gain_realized[d]), total_observed),
                cumulative_gain_promised=_ratio(float(gain_promised[d]), total_predicted),
                targeted=n1,
                targeted_rate=_ratio(x1, n1),
                control=n2,
                control_rate=_ratio(x2, n2),
                uplift=uplift,
                uplift_ci_low=low,
                uplift_ci_high=high,
            )
        )
    return tuple(rows)


def _z(confidence: float) -> float:
    """The two-sided standard normal quantile of `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _flags(values: np.ndarray, name: str, size: int) -> np.ndarray:
    """A boolean array from 0/1 or boolean values of the run's length."""
    array = np.asarray(values)
    if array.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not bool(np.all((array == 0) | (array == 1))):
        raise ValueError(f"{name} must hold only 0/1 or booleans")
    return array == 1


def _deciles(values: np.ndarray, size: int) -> np.ndarray:
    """Integer deciles 1..10 of the run's length."""
    array = np.asarray(values)
    if array.shape != (size,):
        raise ValueError(f"decile must have shape ({size},), got {array.shape}")
    if not bool(np.all((array >= 1) & (array <= DECILES) & (array == np.floor(array)))):
        raise ValueError(f"decile must hold whole numbers from 1 to {DECILES}")
    return array.astype(np.intp)


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator as a float, or None when the denominator is zero."""
    return float(numerator / denominator) if denominator else None


def _mean(values: np.ndarray) -> float | None:
    """The mean as a float, or None when there are no values."""
    return float(values.mean()) if values.size else None


def _as_date(value: date) -> date:
    """The calendar date of a date or datetime."""
    return value.date() if isinstance(value, datetime) else value


def _wall_clock(value: object) -> object:
    """A datetime without its time zone (keeping its wall-clock time); other values unchanged."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.replace(tzinfo=None)
    return value
