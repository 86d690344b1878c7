"""Outcome statistics: conversion labels, maturity, Wilson and Newcombe intervals, realized
performance against scikit-learn, uplift against a hand computation and interval coverage."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from statistics import NormalDist
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad
from scipy.stats import beta as beta_distribution
from sklearn.metrics import brier_score_loss, roc_auc_score

from audiobooks_scoring.outcomes.measures import (
    DEFAULT_HORIZON_DAYS,
    OutcomeLabels,
    is_provisional,
    label_outcomes,
    maturity,
    measure_outcome,
    newcombe_interval,
    purchase_days,
    wilson_interval,
)

AS_OF = date(2026, 1, 1)
HORIZON = DEFAULT_HORIZON_DAYS
LAST_DAY = AS_OF + timedelta(days=HORIZON)

# Newcombe RG (1998) Statistics in Medicine 17:873-890, Table II, method 10 (hybrid score
# interval without continuity correction), 95%: x1/n1 - x2/n2 -> (lower, upper), 4 decimals.
NEWCOMBE_TABLE_II = [
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926),
    (0, 10, 0, 20, -0.1611, 0.2775),
    (0, 10, 0, 10, -0.2775, 0.2775),
    (10, 10, 0, 20, 0.6791, 1.0000),
    (10, 10, 0, 10, 0.6075, 1.0000),
]
ROUNDING = 5e-5 + 1e-9

COVERAGE_SEEDS = 400
# Coverage of a 95% interval over 400 independent runs is Binomial(400, 0.95) / 400: standard
# error 0.0109, so [0.92, 0.98] is about +-2.75 standard errors (a correct interval lands
# outside with probability about 0.6%); a 90% or 99% interval would fall outside it.
COVERAGE_BAND = (0.92, 0.98)


def purchases_frame(rows: list[tuple[object, object]]) -> pd.DataFrame:
    """A purchases frame from (customer_id, purchased_at) pairs, both columns of Python objects."""
    return pd.DataFrame(
        {
            "customer_id": pd.Series([row[0] for row in rows], dtype=object),
            "purchased_at": pd.Series([row[1] for row in rows], dtype=object),
        }
    )


def reference_labels(
    customer_ids: list[object], as_of: date, horizon_days: int, rows: list[tuple[object, object]]
) -> tuple[list[int], dict[str, int]]:
    """Row-by-row labels and buckets straight from the definitions (test oracle only)."""
    last_day = as_of + timedelta(days=horizon_days)
    known = set(customer_ids)
    converted: set[object] = set()
    counts = dict.fromkeys(
        ["used", "unknown_customer", "missing_date", "before_run", "after_horizon"], 0
    )
    for customer, stamp in rows:
        if customer is None or stamp is None or stamp is pd.NaT:
            counts["missing_date"] += 1
            continue
        day = stamp.date() if isinstance(stamp, datetime) else stamp
        if customer not in known:
            counts["unknown_customer"] += 1
        elif day <= as_of:
            counts["before_run"] += 1
        elif day > last_day:
            counts["after_horizon"] += 1
        else:
            counts["used"] += 1
            converted.add(customer)
    return [int(c in converted) for c in customer_ids], counts


def bucket_counts(labels: OutcomeLabels) -> dict[str, int]:
    """The purchase buckets of `labels`, checking they account for every row."""
    counts = labels.counts()
    assert sum(counts.values()) == labels.purchases
    return counts


def test_label_outcomes_buckets_every_kind_of_purchase() -> None:
    rows: list[tuple[object, object]] = [
        (10, AS_OF + timedelta(days=1)),
        (10, datetime.combine(AS_OF + timedelta(days=40), datetime.min.time())),
        (10, pd.Timestamp(AS_OF + timedelta(days=90))),
        (20, datetime(AS_OF.year, AS_OF.month, AS_OF.day, 23, 59)),
        (20, AS_OF - timedelta(days=10)),
        (30, datetime.combine(LAST_DAY, datetime.max.time())),
        (40, LAST_DAY + timedelta(days=1)),
        (99, AS_OF + timedelta(days=3)),
        (40, None),
        (40, pd.NaT),
        (None, AS_OF + timedelta(days=3)),
    ]
    labels = label_outcomes(np.array([10, 20, 30, 40, 50]), AS_OF, HORIZON, purchases_frame(rows))

    assert labels.converted.dtype == np.int8
    assert labels.converted.tolist() == [1, 0, 1, 0, 0]
    assert bucket_counts(labels) == {
        "used": 4,
        "unknown_customer": 1,
        "missing_date": 3,
        "before_run": 2,
        "after_horizon": 1,
    }
    assert labels.purchases == len(rows)


@pytest.mark.parametrize(
    ("stamp", "converted"),
    [
        # 00:30 at +02:00 is the day after the run on its own clock but the run's day in UTC.
        (datetime(2026, 1, 2, 0, 30, tzinfo=timezone(timedelta(hours=2))), 1),
        # 23:30 at -05:00 is the run's day on its own clock but the day after in UTC.
        (datetime(2026, 1, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5))), 0),
        (pd.Timestamp("2026-01-02 00:30", tz="Europe/Berlin"), 1),
        (pd.Timestamp("2026-07-04 00:30", tz="Asia/Tokyo"), 0),
        (pd.Timestamp("2026-07-03 23:30", tz="America/New_York"), 1),
    ],
)
def test_label_outcomes_reads_tz_aware_timestamps_on_their_own_date(
    stamp: datetime, converted: int
) -> None:
    labels = label_outcomes(np.array([7]), AS_OF, HORIZON, purchases_frame([(7, stamp)]))

    assert LAST_DAY == date(2026, 7, 3)
    assert labels.converted.tolist() == [converted]
    assert labels.used == converted


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(lambda s: s.astype(object), id="python-objects"),
        pytest.param(lambda s: pd.to_datetime(s), id="datetime64"),
        pytest.param(lambda s: pd.to_datetime(s).dt.tz_localize("Europe/Berlin"), id="tz-aware"),
        pytest.param(
            lambda s: pd.to_datetime(s).dt.tz_localize("Europe/Berlin").astype(object),
            id="tz-aware-objects",
        ),
    ],
)
def test_label_outcomes_accepts_every_timestamp_column_type(
    column: Callable[[pd.Series], pd.Series],
) -> None:
    naive = pd.Series(
        [
            datetime(2026, 1, 1, 23, 0),
            datetime(2026, 1, 2, 0, 15),
            datetime(2026, 7, 3, 23, 45),
            datetime(2026, 7, 4, 0, 5),
            None,
        ],
        dtype=object,
    )
    purchases = pd.DataFrame({"customer_id": [1, 2, 3, 4, 5], "purchased_at": column(naive)})

    labels = label_outcomes(np.array([1, 2, 3, 4, 5]), AS_OF, HORIZON, purchases)

    assert labels.converted.tolist() == [0, 1, 1, 0, 0]
    assert bucket_counts(labels) == {
        "used": 2,
        "unknown_customer": 0,
        "missing_date": 1,
        "before_run": 1,
        "after_horizon": 1,
    }


def test_label_outcomes_mixed_time_zones_and_offsets() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    rows: list[tuple[object, object]] = [
        (1, datetime(2026, 1, 2, 0, 30, tzinfo=timezone(timedelta(hours=1)))),
        (2, datetime(2026, 7, 3, 23, 30, tzinfo=timezone(timedelta(hours=2)))),
        (3, datetime(2026, 7, 4, 0, 10, tzinfo=berlin)),
        (4, datetime(2026, 3, 1, 12, 0)),
        (5, date(2026, 1, 1)),
    ]
    labels = label_outcomes(np.arange(1, 6), AS_OF, HORIZON, purchases_frame(rows))

    assert labels.converted.tolist() == [1, 1, 0, 1, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_outcomes_matches_row_by_row_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    customer_ids = [int(v) for v in rng.choice(10_000, size=300, replace=False)]
    zones = [None, UTC, timezone(timedelta(hours=-7)), ZoneInfo("Asia/Kolkata")]
    rows: list[tuple[object, object]] = []
    for _ in range(2_000):
        known = rng.random() < 0.85
        customer = int(rng.choice(customer_ids)) if known else int(rng.integers(10**5))
        offset = timedelta(
            days=int(rng.integers(-30, HORIZON + 30)), minutes=int(rng.integers(1440))
        )
        stamp = datetime.combine(AS_OF, datetime.min.time()) + offset
        kind = rng.integers(6)
        value: object = stamp
        if kind == 0:
            value = stamp.date()
        elif kind == 1:
            value = None
        elif kind == 2:
            value = pd.Timestamp(stamp)
        else:
            value = stamp.replace(tzinfo=zones[int(kind) - 2])
        rows.append((None if rng.random() < 0.02 else customer, value))

    labels = label_outcomes(np.array(customer_ids), AS_OF, HORIZON, purchases_frame(rows))
    expected_converted, expected_counts = reference_labels(customer_ids, AS_OF, HORIZON, rows)

    assert labels.converted.tolist() == expected_converted
    assert bucket_counts(labels) == expected_counts
    assert labels.purchases == len(rows)
    assert min(expected_counts.values()) > 0


def test_label_outcomes_string_ids_float_ids_and_empty_inputs() -> None:
    strings = pd.DataFrame(
        {"customer_id": ["a", "b", None, "z"], "purchased_at": [AS_OF + timedelta(days=2)] * 4}
    )
    labels = label_outcomes(np.array(["b", "a", "c"]), AS_OF, HORIZON, strings)
    assert labels.converted.tolist() == [1, 1, 0]
    assert (labels.missing_date, labels.unknown_customer, labels.used) == (1, 1, 2)

    floats = pd.DataFrame(
        {"customer_id": [3.0, np.nan, 5.0], "purchased_at": [AS_OF + timedelta(days=2)] * 3}
    )
    labels = label_outcomes(np.array([5, 4, 3]), AS_OF, HORIZON, floats)
    assert labels.converted.tolist() == [1, 0, 1]
    assert labels.missing_date == 1

    nullable = floats.assign(customer_id=pd.array([3, None, 5], dtype="Int64"))
    labels = label_outcomes(np.array([5, 4, 3]), AS_OF, HORIZON, nullable)
    assert labels.converted.tolist() == [1, 0, 1]
    assert labels.missing_date == 1

    empty = pd.DataFrame({"customer_id": [], "purchased_at": []})
    labels = label_outcomes(np.array([1, 2]), AS_OF, HORIZON, empty)
    assert labels.converted.tolist() == [0, 0]
    assert labels.purchases == 0

    labels = label_outcomes(np.array([], dtype=np.int64), AS_OF, HORIZON, floats)
    assert labels.converted.size == 0
    assert (labels.unknown_customer, labels.missing_date) == (2, 1)


@pytest.mark.parametrize(
    ("customer_ids", "purchases", "horizon_days", "message"),
    [
        (np.array([1, 1]), pd.DataFrame({"customer_id": [], "purchased_at": []}), 183, "unique"),
        (np.array([1]), pd.DataFrame({"customer_id": [1]}), 183, "columns"),
        (np.array([1]), pd.DataFrame({"customer_id": [1], "purchased_at": [3]}), 183, "dates"),
        (np.array([1]), pd.DataFrame({"customer_id": [], "purchased_at": []}), 0, "horizon"),
    ],
)
def test_label_outcomes_rejects_bad_input(
    customer_ids: np.ndarray, purchases: pd.DataFrame, horizon_days: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        label_outcomes(customer_ids, AS_OF, horizon_days, purchases)


@pytest.mark.parametrize(
    ("days_elapsed", "expected"),
    [(-5, 0.0), (0, 0.0), (61, 61 / 183), (182, 182 / 183), (183, 1.0), (400, 1.0)],
)
def test_maturity_is_the_clipped_share_of_the_horizon(days_elapsed: int, expected: float) -> None:
    measured_on = AS_OF + timedelta(days=days_elapsed)

    assert maturity(AS_OF, measured_on, 183) == pytest.approx(expected)
    assert is_provisional(AS_OF, measured_on, 183) is (expected < 1.0)


def test_maturity_rejects_an_empty_horizon() -> None:
    with pytest.raises(ValueError, match="horizon"):
        maturity(AS_OF, AS_OF, 0)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2", "low", "high"), NEWCOMBE_TABLE_II)
def test_newcombe_matches_newcombe_1998_table_ii(
    x1: int, n1: int, x2: int, n2: int, low: float, high: float
) -> None:
    interval = newcombe_interval(x1, n1, x2, n2)

    assert interval == pytest.approx((low, high), abs=ROUNDING)
    assert interval[0] <= x1 / n1 - x2 / n2 <= interval[1]


@pytest.mark.parametrize(("successes", "n", "high"), [(0, 10, 0.2775), (0, 20, 0.1611)])
def test_wilson_upper_limits_of_zero_successes_in_newcombe_table_ii(
    successes: int, n: int, high: float
) -> None:
    assert wilson_interval(successes, n) == pytest.approx((0.0, high), abs=ROUNDING)
    assert wilson_interval(n - successes, n) == pytest.approx((1.0 - high, 1.0), abs=ROUNDING)


@pytest.mark.parametrize(("successes", "n"), [(1, 1), (3, 10), (56, 70), (48, 80), (500, 2000)])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_limits_are_where_the_score_test_reaches_z(
    successes: int, n: int, confidence: float
) -> None:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    observed = successes / n
    for limit in wilson_interval(successes, n, confidence):
        if limit in (0.0, 1.0):
            continue
        score = (observed - limit) / math.sqrt(limit * (1 - limit) / n)
        assert abs(score) == pytest.approx(z, rel=1e-9)


@pytest.mark.parametrize(
    "args",
    [(0, 0), (0, -3), (4, 3), (-1, 3), (1, 3, 0.0), (1, 3, 1.0)],
)
def test_wilson_rejects_bad_counts(args: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        wilson_interval(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [(1, 0, 1, 5), (1, 5, 0, 0), (6, 5, 1, 5)])
def test_newcombe_rejects_bad_counts(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        newcombe_interval(*args)


def random_run(seed: int, customers: int = 3_000, ties: bool = True) -> dict[str, np.ndarray]:
    """A run with a random control group, the top of the rest targeted and random conversions."""
    rng = np.random.default_rng(seed)
    probability = rng.beta(0.6, 3.0, customers)
    if ties:
        probability = np.round(probability, 2)
    control = rng.random(customers) < 0.2
    eligible = np.flatnonzero(~control)
    ranked = eligible[np.argsort(-probability[eligible], kind="stable")]
    is_target = np.zeros(customers, dtype=bool)
    is_target[ranked[: int(0.3 * eligible.size)]] = True
    converted = (rng.random(customers) < probability + 0.05 * is_target).astype(np.int8)
    return {
        "probability": probability,
        "decile": ntile_deciles(probability),
        "is_target": is_target,
        "control": control,
        "converted": converted,
    }


def ntile_deciles(probability: np.ndarray) -> np.ndarray:
    """Deciles 1 (highest probability) to 10 like SQL's ntile(10) over the descending ranking."""
    order = np.argsort(-probability, kind="stable")
    deciles = np.empty(probability.size, dtype=np.int64)
    deciles[order] = np.arange(probability.size) * 10 // probability.size + 1
    return deciles


@pytest.mark.parametrize("seed", range(5))
def test_realized_auc_and_brier_match_sklearn_on_control(seed: int) -> None:
    run = random_run(seed)
    outcome = measure_outcome(**run, promised_auc=0.71)
    control = run["control"]
    labels = run["converted"][control]
    scores = run["probability"][control]

    assert len(np.unique(scores)) < scores.size
    assert outcome.realized_auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert outcome.brier == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)
    assert outcome.control_customers == control.sum()
    assert outcome.control_base_rate == pytest.approx(labels.mean())
    assert outcome.mean_predicted == pytest.approx(scores.mean())
    assert outcome.expected_auc == 0.71


@pytest.mark.parametrize("seed", range(5))
def test_uplift_matches_a_pandas_hand_computation(seed: int) -> None:
    run = random_run(seed)
    outcome = measure_outcome(**run, promised_auc=None)
    frame = pd.DataFrame(run)
    targeted = frame[frame["is_target"]]
    floor = targeted["probability"].min()
    comparable = frame[frame["control"] & (frame["probability"] >= floor)]
    uplift = targeted["converted"].mean() - comparable["converted"].mean()

    assert (comparable["probability"] == floor).any()
    assert outcome.lowest_targeted_probability == floor
    assert outcome.targeted == len(targeted)
    assert outcome.targeted_conversions == targeted["converted"].sum()
    assert outcome.control == len(comparable)
    assert outcome.control_conversions == comparable["converted"].sum()
    assert outcome.targeted_rate == pytest.approx(targeted["converted"].mean())
    assert outcome.control_rate == pytest.approx(comparable["converted"].mean())
    assert outcome.uplift == pytest.approx(uplift, abs=1e-12)
    assert outcome.incremental_conversions == pytest.approx(uplift * len(targeted))
    assert (outcome.uplift_ci_low, outcome.uplift_ci_high) == newcombe_interval(
        int(targeted["converted"].sum()),
        len(targeted),
        int(comparable["converted"].sum()),
        len(comparable),
    )
    assert outcome.uplift_note is None

    rows = {row.decile: row for row in outcome.deciles}
    by_decile_target = targeted.groupby("decile")["converted"].agg(["size", "mean"])
    by_decile_control = comparable.groupby("decile")["converted"].agg(["size", "mean"])
    for decile, row in rows.items():
        n1 = int(by_decile_target["size"].get(decile, 0))
        n2 = int(by_decile_control["size"].get(decile, 0))
        assert (row.targeted, row.control) == (n1, n2)
        if n1 and n2:
            expected = by_decile_target.loc[decile, "mean"] - by_decile_control.loc[decile, "mean"]
            assert row.uplift == pytest.approx(expected, abs=1e-12)
            assert row.uplift_ci_low is not None and row.uplift_ci_high is not None
            assert row.uplift_ci_low <= row.uplift <= row.uplift_ci_high
        else:
            assert row.uplift is None and row.uplift_ci_low is None and row.uplift_ci_high is None
    assert sum(row.targeted for row in outcome.deciles) == outcome.targeted


@pytest.mark.parametrize("seed", range(3))
def test_decile_rows_match_a_pandas_hand_computation(seed: int) -> None:
    run = random_run(seed)
    outcome = measure_outcome(**run, promised_auc=None)
    frame = pd.DataFrame(run)
    control = frame[frame["control"]]
    grouped = control.groupby("decile").agg(
        customers=("converted", "size"),
        observed=("converted", "sum"),
        predicted=("probability", "sum"),
    )
    realized = grouped["observed"].cumsum() / control["converted"].sum()
    promised = grouped["predicted"].cumsum() / control["probability"].sum()

    assert [row.decile for row in outcome.deciles] == list(range(1, 11))
    for row in outcome.deciles:
        assert row.customers == grouped.loc[row.decile, "customers"]
        assert row.observed_rate == pytest.approx(
            grouped.loc[row.decile, "observed"] / grouped.loc[row.decile, "customers"]
        )
        assert row.mean_predicted == pytest.approx(
            grouped.loc[row.decile, "predicted"] / grouped.loc[row.decile, "customers"]
        )
        assert row.cumulative_gain_realized == pytest.approx(realized.loc[row.decile])
        assert row.cumulative_gain_promised == pytest.approx(promised.loc[row.decile])
    assert outcome.deciles[-1].cumulative_gain_realized == pytest.approx(1.0)
    assert outcome.deciles[-1].cumulative_gain_promised == pytest.approx(1.0)


def test_a_control_customer_at_the_lowest_targeted_probability_is_comparable() -> None:
    outcome = measure_outcome(
        probability=np.array([0.9, 0.6, 0.6, 0.59, 0.2, 0.95]),
        decile=np.array([2, 3, 4, 5, 6, 1]),
        is_target=np.array([1, 1, 0, 0, 0, 0]),
        control=np.array([0, 0, 1, 1, 1, 1]),
        converted=np.array([1, 0, 0, 1, 1, 1]),
        promised_auc=None,
    )

    assert (outcome.control, outcome.control_conversions) == (2, 1)
    assert outcome.uplift == pytest.approx(0.5 - 0.5)
    assert outcome.control_customers == 4
    assert [row.decile for row in outcome.deciles] == [1, 2, 3, 4, 5, 6]
    assert outcome.deciles[1].customers == 0
    assert outcome.deciles[1].observed_rate is None
    assert outcome.deciles[1].cumulative_gain_realized == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("is_target", "control", "note"),
    [
        ([0, 0, 0, 0], [0, 1, 1, 0], "no targeted customers in the run"),
        ([1, 1, 0, 0], [0, 0, 0, 0], "no control customers in the run"),
        (
            [1, 0, 0, 0],
            [0, 0, 1, 1],
            "no control customers with a probability at least the lowest targeted "
            "probability (0.8000); uplift cannot be measured",
        ),
    ],
)
def test_uplift_is_none_with_a_reason_when_a_side_is_empty(
    is_target: list[int], control: list[int], note: str
) -> None:
    outcome = measure_outcome(
        probability=np.array([0.8, 0.7, 0.3, 0.1]),
        decile=np.array([1, 2, 3, 4]),
        is_target=np.array(is_target),
        control=np.array(control),
        converted=np.array([1, 0, 1, 0]),
        promised_auc=0.7,
    )

    assert note in (outcome.uplift_note or "")
    assert outcome.uplift is None
    assert outcome.uplift_ci_low is None and outcome.uplift_ci_high is None
    assert outcome.incremental_conversions is None
    assert all(row.uplift is None for row in outcome.deciles)


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_control_has_no_realized_auc(label: int) -> None:
    outcome = measure_outcome(
        probability=np.array([0.9, 0.7, 0.5, 0.3]),
        decile=np.array([1, 2, 3, 4]),
        is_target=np.array([1, 0, 0, 0]),
        control=np.array([0, 1, 1, 1]),
        converted=np.array([1, label, label, label]),
        promised_auc=0.7,
    )

    assert outcome.realized_auc is None
    assert outcome.brier == pytest.approx(np.mean((np.array([0.7, 0.5, 0.3]) - label) ** 2))
    assert outcome.control_base_rate == label


def test_an_empty_run_measures_nothing() -> None:
    empty = np.array([], dtype=np.float64)
    outcome = measure_outcome(empty, empty, empty, empty, empty, promised_auc=None)

    assert (outcome.customers, outcome.targeted, outcome.control_customers) == (0, 0, 0)
    assert outcome.realized_auc is None and outcome.brier is None
    assert outcome.deciles == ()
    assert outcome.uplift_note is not None


def test_to_dict_is_plain_json() -> None:
    outcome = measure_outcome(**random_run(0), promised_auc=np.float64(0.7))
    values = outcome.to_dict()

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, float, str)

    assert plain(values)
    assert json.loads(json.dumps(values)) == values
    assert len(values["deciles"]) == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probability": np.array([0.5, 1.5, 0.1])}, "probability"),
        ({"probability": np.array([0.5, np.nan, 0.1])}, "probability"),
        ({"decile": np.array([0, 1, 2])}, "decile"),
        ({"decile": np.array([1, 2])}, "decile"),
        ({"converted": np.array([0, 2, 1])}, "converted"),
        ({"control": np.array([1, 0, 0])}, "control customer cannot be targeted"),
    ],
)
def test_measure_outcome_rejects_bad_input(change: dict[str, np.ndarray], message: str) -> None:
    run = {
        "probability": np.array([0.5, 0.4, 0.1]),
        "decile": np.array([1, 2, 3]),
        "is_target": np.array([1, 0, 0]),
        "control": np.array([0, 0, 1]),
        "converted": np.array([0, 1, 1]),
    }
    with pytest.raises(ValueError, match=message):
        measure_outcome(**(run | change), promised_auc=None)


def simulate_campaign(
    seed: int, delta: float, customers: int = 20_000
) -> tuple[dict[str, np.ndarray], float]:
    """A run whose campaign adds `delta` to each target's chance, and its true uplift.

    Targets are the top 20% of non-control customers by probability; the control group is a
    random 10%. Given the lowest targeted probability t, targeted and comparable control
    customers are both i.i.d. draws of Beta(0.6, 3) truncated to p >= t, so their rates are
    E[min(p + delta, 1) | p >= t] and E[p | p >= t]: the true uplift is delta minus the part of
    the effect the cap at 1 removes, E[(p + delta - 1)+ | p >= t] (below 1e-6 here).
    """
    rng = np.random.default_rng(seed)
    probability = rng.beta(0.6, 3.0, customers)
    control = np.zeros(customers, dtype=bool)
    control[rng.choice(customers, size=customers // 10, replace=False)] = True
    eligible = np.flatnonzero(~control)
    ranked = eligible[np.argsort(-probability[eligible], kind="stable")]
    is_target = np.zeros(customers, dtype=bool)
    is_target[ranked[: math.ceil(0.2 * eligible.size)]] = True
    chance = np.where(is_target, np.minimum(probability + delta, 1.0), probability)
    converted = rng.random(customers) < chance
    run = {
        "probability": probability,
        "decile": ntile_deciles(probability),
        "is_target": is_target,
        "control": control,
        "converted": converted,
    }
    return run, true_uplift(float(probability[is_target].min()), delta)


def true_uplift(threshold: float, delta: float, a: float = 0.6, b: float = 3.0) -> float:
    """delta - E[(p + delta - 1)+ | p >= threshold] for p ~ Beta(a, b)."""
    if delta == 0:
        return 0.0
    start = max(threshold, 1.0 - delta)
    mean = a / (a + b)
    capped = mean * beta_distribution.sf(start, a + 1, b) - (1.0 - delta) * beta_distribution.sf(
        start, a, b
    )
    return delta - capped / beta_distribution.sf(threshold, a, b)


def coverage(delta: float, seeds: range) -> tuple[float, float, float]:
    """Share of simulated runs whose interval covers the true uplift, mean error and its SE."""
    covered = 0
    errors = []
    for seed in seeds:
        run, truth = simulate_campaign(seed, delta)
        outcome = measure_outcome(**run, promised_auc=None)
        assert outcome.uplift_ci_low is not None and outcome.uplift_ci_high is not None
        assert outcome.uplift is not None
        covered += outcome.uplift_ci_low <= truth <= outcome.uplift_ci_high
        errors.append(outcome.uplift - truth)
    spread = float(np.std(errors, ddof=1)) / math.sqrt(len(errors))
    return covered / len(seeds), float(np.mean(errors)), spread


@pytest.mark.parametrize(
    ("delta", "seeds"),
    [(0.03, range(COVERAGE_SEEDS)), (0.0, range(10_000, 10_000 + COVERAGE_SEEDS))],
)
def test_uplift_interval_covers_the_true_uplift_about_95_percent(
    delta: float, seeds: range
) -> None:
    share, bias, standard_error = coverage(delta, seeds)

    assert COVERAGE_BAND[0] <= share <= COVERAGE_BAND[1], share
    assert abs(bias) < 4 * standard_error, (bias, standard_error)


@pytest.mark.parametrize(("threshold", "delta"), [(0.3, 0.03), (0.9, 0.2), (0.98, 0.03)])
def test_true_uplift_is_delta_less_the_capped_part(threshold: float, delta: float) -> None:
    effect, _ = quad(
        lambda p: (min(p + delta, 1.0) - p) * beta_distribution.pdf(p, 0.6, 3.0),
        threshold,
        1.0,
        points=[1.0 - delta],
        epsabs=1e-14,
    )
    expected = effect / beta_distribution.sf(threshold, 0.6, 3.0)

    assert true_uplift(threshold, delta) == pytest.approx(expected, rel=1e-6)
    assert true_uplift(threshold, delta) < delta


def test_purchase_dates_in_mixed_text_formats_are_read_and_garbage_is_missing():
    values = pd.Series(["2027-01-10", "2027-01-15 10:00:00", "2027-01-16T23:59:59", "soon", None])
    days = purchase_days(values)
    assert [str(day) for day in days[:3]] == ["2027-01-10", "2027-01-15", "2027-01-16"]
    assert np.isnat(days[3]) and np.isnat(days[4])
