"""The outcome loop on a real warehouse of every test engine: a scored run, its purchases
(some of them bad), the measurement against scikit-learn and a pandas hand computation, the
outcome tables, their view and example queries, idempotence and maturity."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score
from sqlalchemy import func, select

from audiobooks_scoring.contract import CUSTOMER_ID
from audiobooks_scoring.inputs.demo_data import iter_demo_activity
from audiobooks_scoring.inputs.demo_outcomes import (
    load_demo_earlier_window,
    load_demo_purchases,
    simulate_purchases,
)
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.outcomes.loop import (
    SUMMARY_KEYS,
    OutcomesError,
    OutcomesJob,
    PublishedRun,
    RunCustomers,
    find_runs_to_measure,
    judge_outcome,
    label_purchase_chunks,
    ledger_summaries,
    read_outcome_ledger,
    read_run_customers,
    run_outcomes,
)
from audiobooks_scoring.outcomes.measures import (
    label_outcomes,
    measure_outcome,
    newcombe_interval,
)
from audiobooks_scoring.settings import Settings
from tests.helpers import run_scoring

AS_OF = date(2026, 3, 2)
HORIZON = 183
CUSTOMERS = 1_500
UNKNOWN_ID = 9_999_999


def fill_activity(warehouse, window_end: date = AS_OF, customers: int = CUSTOMERS) -> None:
    frame = pd.concat(list(iter_demo_activity(customers, 5, window_end, 100_000)))
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, frame)


def scored(warehouse, run_id: str) -> pd.DataFrame:
    history = warehouse.tables.history
    return warehouse.read_frame(
        select(
            history.c.customer_id,
            history.c.probability,
            history.c.decile,
            history.c.is_target,
            history.c.holdout,
        ).where(history.c.run_id == run_id)
    )


def at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, 30)


def write_purchases(warehouse, scores: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """Buyers drawn from the scores (targets a little more), and every kind of bad row."""
    rng = np.random.default_rng(seed)
    chance = np.minimum(scores["probability"] + 0.1 * scores["is_target"].astype(bool), 1.0)
    buyers = scores.loc[rng.random(len(scores)) < chance, CUSTOMER_ID].to_numpy()
    days = rng.integers(1, HORIZON + 1, buyers.size)
    good = [(int(c), at(AS_OF + timedelta(days=int(d)))) for c, d in zip(buyers, days, strict=True)]
    some = scores[CUSTOMER_ID].to_numpy()[:6]
    bad = [
        (int(buyers[0]), at(AS_OF + timedelta(days=3), hour=9)),  # a second purchase
        (UNKNOWN_ID, at(AS_OF + timedelta(days=10))),  # not scored in the run
        (UNKNOWN_ID + 1, at(AS_OF + timedelta(days=20))),
        (int(some[0]), None),  # no date
        (None, at(AS_OF + timedelta(days=5))),  # no customer
        (int(some[1]), at(AS_OF - timedelta(days=30))),  # before the run
        (int(some[2]), at(AS_OF, hour=23)),  # on the as-of date: before the run
        (int(some[3]), at(AS_OF + timedelta(days=HORIZON), hour=23)),  # the last day: used
        (int(some[4]), at(AS_OF + timedelta(days=HORIZON + 1), hour=0)),  # after: not read
    ]
    frame = pd.DataFrame(good + bad, columns=[CUSTOMER_ID, "purchased_at"])
    frame[CUSTOMER_ID] = pd.Series(
        [None if c is None else int(c) for c, _ in good + bad], dtype=object
    )
    frame["purchased_at"] = pd.to_datetime(frame["purchased_at"])
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.purchases, frame)
    return frame


def expected_outcome(scores: pd.DataFrame, purchases: pd.DataFrame, last_day: date) -> dict:
    """What the run achieved, computed by hand with pandas and scikit-learn."""
    known = purchases.dropna()
    day = known["purchased_at"].dt.date
    inside = known[(day > AS_OF) & (day <= last_day)]
    frame = scores.copy()
    frame["converted"] = frame[CUSTOMER_ID].isin(set(inside[CUSTOMER_ID].astype(int)))
    frame["converted"] = frame["converted"].astype(int)
    control = frame[frame["holdout"].astype(bool)]
    targeted = frame[frame["is_target"].astype(bool)]
    comparable = control[control["probability"] >= targeted["probability"].min()]
    x1, n1 = int(targeted["converted"].sum()), len(targeted)
    x2, n2 = int(comparable["converted"].sum()), len(comparable)
    return {
        "realized_auc": roc_auc_score(control["converted"], control["probability"]),
        "brier": brier_score_loss(control["converted"], control["probability"]),
        "uplift": x1 / n1 - x2 / n2,
        "ci": newcombe_interval(x1, n1, x2, n2),
        "targeted": n1,
        "targeted_rate": x1 / n1,
        "control": n2,
        "control_rate": x2 / n2,
    }


def outcome_rows(warehouse) -> pd.DataFrame:
    return read_outcome_ledger(warehouse)


@pytest.fixture
def tolerant(settings):
    """Settings that never raise a decay alert (these tests check the figures, not the alert)."""
    return settings.model_copy(update={"decay_auc_tolerance": 1.0})


def test_a_mature_run_matches_sklearn_and_a_hand_computation(tolerant, warehouse):
    fill_activity(warehouse)
    run_scoring(tolerant, warehouse, "run-a", AS_OF, publish=True)
    scores = scored(warehouse, "run-a")
    purchases = write_purchases(warehouse, scores)
    measured_on = AS_OF + timedelta(days=200)

    result = run_outcomes(OutcomesJob(tolerant, warehouse, measured_on))

    (measurement,) = result.measurements
    row = outcome_rows(warehouse).iloc[0]
    want = expected_outcome(scores, purchases, AS_OF + timedelta(days=HORIZON))
    assert row["run_id"] == "run-a" and row["maturity"] == 1.0
    assert not bool(row["provisional"]) and row["status"] == "final"
    assert row["realized_auc"] == pytest.approx(want["realized_auc"], abs=1e-12)
    assert row["brier"] == pytest.approx(want["brier"], abs=1e-12)
    assert row["uplift"] == pytest.approx(want["uplift"], abs=1e-12)
    assert (row["uplift_ci_low"], row["uplift_ci_high"]) == pytest.approx(want["ci"], abs=1e-12)
    for key in ("targeted", "targeted_rate", "control", "control_rate"):
        assert row[key] == pytest.approx(want[key]), key
    assert row["incremental_conversions"] == pytest.approx(want["uplift"] * want["targeted"])
    assert row["expected_auc"] == pytest.approx(measurement.outcome.expected_auc)
    assert 0.5 < row["expected_auc"] < 1.0  # the champion's stored test-split AUC
    # every bad row ignored and counted; the purchase after the horizon is never read
    assert row["purchases_unknown_customer"] == 2
    assert row["purchases_missing_date"] == 2
    assert row["purchases_before_run"] == 2
    assert row["purchases_after_horizon"] == 0
    assert row["purchases_used"] == len(purchases) - 7
    # one decile row per decile, adding up to the run
    deciles = warehouse.read_frame(select(warehouse.tables.outcome_deciles))
    assert sorted(deciles["decile"]) == list(range(1, 11))
    assert deciles["targeted"].sum() == want["targeted"]
    assert deciles["control"].sum() == want["control"]
    # the report names the ignored purchases and is linked from the row
    html = result.report.html_path.read_text()
    assert "Ignored and counted, never used: 4 bad purchase rows" in html and "run-a" in html
    assert row["report_path"] == str(result.report.html_path)
    assert ledger_summaries(outcome_rows(warehouse)) == [measurement.summary()]
    assert list(measurement.summary()) == list(SUMMARY_KEYS)


def test_measuring_again_replaces_the_rows_and_a_final_run_is_left_alone(tolerant, warehouse):
    fill_activity(warehouse)
    run_scoring(tolerant, warehouse, "run-a", AS_OF)
    write_purchases(warehouse, scored(warehouse, "run-a"))
    measured_on = AS_OF + timedelta(days=200)
    job = OutcomesJob(tolerant, warehouse, measured_on)
    first = run_outcomes(job, write_report=False).measurements[0].ledger_row()

    assert find_runs_to_measure(job) == []  # final: not measured again unless asked
    again = run_outcomes(
        OutcomesJob(tolerant, warehouse, measured_on, run_id="run-a"), write_report=False
    )
    assert len(again.measurements) == 1
    rows = outcome_rows(warehouse)
    assert len(rows) == 1
    assert warehouse.count_rows(warehouse.tables.outcome_deciles) == 10
    for key in ("uplift", "realized_auc", "brier", "purchases_used", "maturity"):
        assert rows.iloc[0][key] == pytest.approx(first[key]), key
    with pytest.raises(OutcomesError, match="no-such-run"):
        find_runs_to_measure(OutcomesJob(tolerant, warehouse, measured_on, run_id="no-such-run"))


def test_an_immature_run_is_provisional_and_sees_only_purchases_until_the_measurement(
    tolerant, warehouse
):
    fill_activity(warehouse)
    run_scoring(tolerant, warehouse, "run-a", AS_OF)
    scores = scored(warehouse, "run-a")
    purchases = write_purchases(warehouse, scores)
    measured_on = AS_OF + timedelta(days=61)

    run_outcomes(OutcomesJob(tolerant, warehouse, measured_on), write_report=False)
    row = outcome_rows(warehouse).iloc[0]
    want = expected_outcome(scores, purchases, measured_on)
    assert row["maturity"] == pytest.approx(61 / HORIZON)
    assert bool(row["provisional"]) and row["status"] == "provisional"
    assert "provisional" in row["reason"]
    assert row["uplift"] == pytest.approx(want["uplift"], abs=1e-12)
    assert row["realized_auc"] == pytest.approx(want["realized_auc"], abs=1e-12)

    # re-measured on every run of the measurement until mature, then final
    job = OutcomesJob(tolerant, warehouse, AS_OF + timedelta(days=HORIZON))
    assert [run.run_id for run in find_runs_to_measure(job)] == ["run-a"]
    run_outcomes(job, write_report=False)
    row = outcome_rows(warehouse).iloc[0]
    assert row["maturity"] == 1.0 and not bool(row["provisional"])
    assert find_runs_to_measure(job) == []


def test_runs_not_yet_begun_or_not_published_are_not_measured(tolerant, warehouse):
    fill_activity(warehouse)
    run_scoring(tolerant, warehouse, "run-a", AS_OF)
    assert find_runs_to_measure(OutcomesJob(tolerant, warehouse, AS_OF)) == []
    result = run_outcomes(OutcomesJob(tolerant, warehouse, AS_OF - timedelta(days=1)))
    assert result.measurements == [] and outcome_rows(warehouse).empty
    assert "No run was due" in result.report.html_path.read_text()


def test_a_run_without_control_customers_reports_no_uplift_and_says_why(settings, warehouse):
    no_holdout = settings.model_copy(update={"holdout_share": 0.0})
    fill_activity(warehouse)
    run_scoring(no_holdout, warehouse, "run-a", AS_OF)
    write_purchases(warehouse, scored(warehouse, "run-a"))

    result = run_outcomes(OutcomesJob(no_holdout, warehouse, AS_OF + timedelta(days=200)))
    row = outcome_rows(warehouse).iloc[0]
    assert row["control"] == 0 and row["control_customers"] == 0
    for key in ("uplift", "uplift_ci_low", "uplift_ci_high", "realized_auc", "brier"):
        assert pd.isna(row[key]), key
    assert row["uplift_note"] == "no control customers in the run; uplift cannot be measured"
    assert "no control customers" in result.report.markdown
    view = warehouse.read_frame(warehouse.render_sql("marketing/campaign_uplift"))
    assert view["verdict"].tolist() == ["not measurable"]


def test_the_view_and_the_example_queries_read_the_outcomes(tolerant, warehouse):
    fill_activity(warehouse)
    run_scoring(tolerant, warehouse, "run-a", AS_OF)
    write_purchases(warehouse, scored(warehouse, "run-a"))
    run_outcomes(OutcomesJob(tolerant, warehouse, AS_OF + timedelta(days=200)), write_report=False)
    row = outcome_rows(warehouse).iloc[0]

    view = warehouse.read_frame(warehouse.render_sql("marketing/campaign_uplift"))
    assert view["run_id"].tolist() == ["run-a"]
    assert float(view["uplift_points"].iloc[0]) == pytest.approx(100 * row["uplift"], abs=0.006)
    low, high = row["uplift_ci_low"], row["uplift_ci_high"]
    verdict = "more buyers" if low > 0 else "fewer buyers" if high < 0 else "no clear"
    assert view["verdict"].iloc[0].startswith(verdict)
    by_decile = warehouse.read_frame(
        warehouse.render_sql("marketing/uplift_by_decile"), {"run_id": "run-a"}
    )
    assert by_decile["targeted"].sum() == row["targeted"] and (by_decile["targeted"] > 0).all()
    performance = warehouse.read_frame(warehouse.render_sql("marketing/model_performance"))
    assert performance["auc_shortfall"].iloc[0] == pytest.approx(
        row["expected_auc"] - row["realized_auc"]
    )
    # the views are recreated by every publication: the next run keeps campaign_uplift
    fill_activity(warehouse, AS_OF + timedelta(days=7))
    run_scoring(tolerant, warehouse, "run-b", AS_OF + timedelta(days=7))
    assert len(warehouse.read_frame(warehouse.render_sql("marketing/campaign_uplift"))) == 1


def test_the_demo_purchases_carry_an_effect_the_measurement_finds(tolerant, warehouse):
    earlier = AS_OF
    load_demo_earlier_window(warehouse, CUSTOMERS, 7, earlier, 1_000)
    run_scoring(tolerant, warehouse, "earlier", earlier, publish=False)
    simulated = load_demo_purchases(warehouse, "earlier", earlier, HORIZON, effect=0.05, seed=3)
    assert warehouse.count_rows(warehouse.tables.purchases) == len(simulated.frame) > 0
    assert simulated.true_uplift == 0.05

    job = OutcomesJob(tolerant, warehouse, earlier + timedelta(days=200))
    result = run_outcomes(job, write_report=False)
    (measurement,) = result.measurements
    outcome = measurement.outcome
    assert measurement.maturity == 1.0 and measurement.purchases["used"] == len(simulated.frame)
    assert outcome.uplift_ci_low <= simulated.true_uplift <= outcome.uplift_ci_high


# ---------------------------------------------------------------- pure parts, no warehouse


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 1_000])
def test_chunked_labels_equal_label_outcomes_on_the_whole(dense: bool, chunk: int):
    rng = np.random.default_rng(chunk)
    ids = rng.permutation(500).astype(np.int64) * (1 if dense else 10**12 + 3)
    picked = rng.choice(ids, 400)
    values: list[object] = [*picked[:300], *rng.integers(0, 10**6, 50), None, 5.0, "7", -3, 2.5]
    values += [float(v) for v in picked[300:]]
    start = pd.Timestamp(AS_OF) - pd.Timedelta(days=30)
    stamps = start + pd.to_timedelta(rng.integers(0, 260, len(values)), unit="D")
    purchases = pd.DataFrame({CUSTOMER_ID: pd.Series(values, dtype=object), "purchased_at": stamps})
    purchases.loc[::17, "purchased_at"] = pd.NaT
    pieces = [purchases.iloc[i : i + chunk] for i in range(0, len(purchases), chunk)]

    whole = label_outcomes(ids, AS_OF, HORIZON, purchases)
    chunked = label_purchase_chunks(ids, AS_OF, HORIZON, pieces)
    assert chunked.counts() == whole.counts()
    np.testing.assert_array_equal(chunked.converted, whole.converted)


def test_chunked_labels_refuse_repeated_run_customers():
    with pytest.raises(ValueError, match="unique"):
        label_purchase_chunks(np.array([1, 2, 2]), AS_OF, HORIZON, [])


def test_simulated_purchases_add_the_effect_to_every_targeted_customer():
    size = 200_000
    rng = np.random.default_rng(0)
    customers = RunCustomers(
        customer_id=np.arange(size, dtype=np.int64),
        probability=np.where(np.arange(size) % 2 == 0, 0.2, 1.0),
        decile=np.ones(size, dtype=np.int16),
        is_target=rng.random(size) < 0.5,
        holdout=np.zeros(size, dtype=bool),
    )
    simulated = simulate_purchases(customers, AS_OF, HORIZON, 0.05, seed=1)
    assert simulated.true_uplift == 0.05 and simulated.targeted == customers.is_target.sum()
    bought = np.isin(customers.customer_id, simulated.frame[CUSTOMER_ID])
    target = customers.is_target
    for probability in (0.2, 1.0):
        same = customers.probability == probability
        base = 0.95 * probability
        assert bought[~target & same].mean() == pytest.approx(base, abs=0.006)
        assert bought[target & same].mean() == pytest.approx(base + 0.05, abs=0.006)
    days = (simulated.frame["purchased_at"].dt.date - AS_OF).map(lambda d: d.days)
    assert days.min() >= 1 and days.max() <= HORIZON
    again = simulate_purchases(customers, AS_OF, HORIZON, 0.05, seed=1)
    pd.testing.assert_frame_equal(again.frame, simulated.frame)
    with pytest.raises(ValueError, match="effect"):
        simulate_purchases(customers, AS_OF, HORIZON, 1.0, seed=1)


def test_run_customers_of_an_unknown_run_are_empty(warehouse):
    customers = read_run_customers(warehouse, "nothing", 1_000)
    assert customers.customer_id.size == 0 and customers.holdout.dtype == bool
    assert (
        warehouse.read_frame(select(func.count()).select_from(warehouse.tables.outcomes)).iloc[0, 0]
        == 0
    )


def tiny_outcome(realized: float | None, promised: float | None):
    outcome = measure_outcome(
        np.array([0.9, 0.2, 0.8, 0.1]),
        np.array([1, 2, 1, 2]),
        np.array([True, False, False, False]),
        np.array([False, False, True, True]),
        np.array([1, 0, 1, 0]),
        promised,
    )
    return dataclasses.replace(outcome, realized_auc=realized)


@pytest.mark.parametrize(
    ("share", "realized", "promised", "model", "last", "status", "retrain", "words"),
    [
        (0.5, 0.60, 0.90, "champion", None, "provisional", False, "not yet mature enough"),
        (1.0, 0.88, 0.90, "champion", None, "final", False, "within the tolerance"),
        (1.0, 0.60, 0.90, "champion", None, "decay", True, "retrain requested"),
        (1.0, 0.60, 0.90, "v-old", None, "decay", False, "no longer the champion"),
        (1.0, 0.60, 0.90, "champion", "decay", "decay", False, "already reported"),
        (1.0, None, 0.90, "champion", None, "final", False, "no realized AUC"),
        (1.0, 0.60, None, "champion", None, "final", False, "promised AUC is unknown"),
    ],
)
def test_decay_needs_maturity_a_shortfall_beyond_tolerance_and_the_champion(
    trained_store_dir, share, realized, promised, model, last, status, retrain, words
):
    settings = Settings(model_store_dir=trained_store_dir, decay_min_maturity=0.8)
    champion = ModelStore(trained_store_dir).champion()
    run = PublishedRun("run-a", AS_OF, champion if model == "champion" else model, True, last)
    measured_on = AS_OF + timedelta(days=round(share * HORIZON))
    got = judge_outcome(settings, run, tiny_outcome(realized, promised), share, measured_on)
    assert got[0] == status and got[2] is retrain
    assert words in got[1]
