"""The scoring run end to end on a real warehouse of every test engine (no Prefect)."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, inspect, select

from audiobooks_scoring import pipeline, progress
from audiobooks_scoring.contract import CUSTOMER_ID, WINDOW_END
from audiobooks_scoring.inputs.demo_data import iter_demo_activity
from audiobooks_scoring.scoring.gates import RunGateError
from tests.conftest import stores_infinity
from tests.helpers import run_scoring, unique_indexes

AS_OF = date(2026, 11, 25)
CUSTOMERS = 3_000


def fill_activity(warehouse, customers: int = CUSTOMERS, seed: int = 5, bad_rows=None) -> int:
    frame = pd.concat(list(iter_demo_activity(customers, seed, date(2026, 11, 1), 100_000)))
    if bad_rows is not None:
        frame = pd.concat([frame, bad_rows], ignore_index=True)
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, frame)
    return len(frame)


def scores_dump(warehouse) -> pd.DataFrame:
    scores = warehouse.tables.scores
    return warehouse.read_frame(select(scores).order_by(scores.c.rank))


VALID_ROW = {
    WINDOW_END: date(2026, 11, 1),
    "book_length_avg_min": 1620.0,
    "book_length_total_min": 1620.0,
    "price_avg": 10.0,
    "price_total": 10.0,
    "review": 0.0,
    "review_score": 8.91,
    "completion": 0.5,
    "minutes_listened": 810.0,
    "support_requests": 0.0,
    "last_visit_days_after_purchase": 3.0,
}


# (change to a valid row, its reason code); each row gets its own customer id.
BAD_CHANGES = [
    ({"price_avg": None}, "missing_value"),
    ({"completion": float("nan")}, "missing_value"),
    ({"minutes_listened": float("inf")}, "infinite_value"),
    ({"support_requests": -1.0}, "negative_value"),
    ({"completion": 1.5}, "completion_out_of_range"),
    ({"review": 3.0}, "review_not_binary"),
    ({"review_score": 11.0}, "review_score_out_of_range"),
    ({"price_avg": 99.0}, "average_above_total"),
]


def bad_changes(dialect: str) -> list[tuple[dict, str]]:
    """Every bad-row kind the engine can hold (no infinite value where it cannot store one)."""
    if stores_infinity(dialect):
        return BAD_CHANGES
    return [(change, code) for change, code in BAD_CHANGES if code != "infinite_value"]


def bad_rows(dialect: str) -> pd.DataFrame:
    """One row per bad kind of `bad_changes`, then two copies of one customer id."""
    base = VALID_ROW
    rows = [
        {**base, **change, CUSTOMER_ID: 900_000 + i}
        for i, (change, _) in enumerate(bad_changes(dialect))
    ]
    duplicates = [{**base, CUSTOMER_ID: 900_100}, {**base, CUSTOMER_ID: 900_100, "price_avg": 5.0}]
    return pd.DataFrame(rows + duplicates)


def bad_reason_codes(dialect: str) -> list[str]:
    """The reason codes the rows of `bad_rows(dialect)` are rejected with, sorted."""
    codes = [code for _, code in bad_changes(dialect)]
    return sorted([*codes, "duplicate_customer_id", "duplicate_customer_id"])


@pytest.mark.parametrize("customer_index", [False, True])
def test_accounting_ranks_deciles_and_rejects(settings, warehouse, dialect, customer_index):
    settings = settings.model_copy(update={"customer_index": customer_index})
    rows_in = fill_activity(warehouse, bad_rows=bad_rows(dialect))
    expected_codes = bad_reason_codes(dialect)
    assert len(expected_codes) == (10 if stores_infinity(dialect) else 9)
    figures = run_scoring(settings, warehouse, "run-a", AS_OF)
    assert figures["rows_in"] == rows_in
    assert figures["rows_in"] == figures["rows_scored"] + figures["rows_rejected"]
    assert figures["rows_rejected"] == len(expected_codes)

    rejected = warehouse.read_frame(select(warehouse.tables.rejected))
    assert len(rejected) == len(expected_codes) and set(rejected["run_id"]) == {"run-a"}
    assert sorted(rejected["reason_code"]) == expected_codes

    scores = scores_dump(warehouse)
    assert len(scores) == figures["rows_scored"]
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert scores[CUSTOMER_ID].is_unique
    assert (np.diff(scores["probability"].to_numpy()) <= 0).all()
    sizes = scores.groupby("decile").size()
    assert list(sizes.index) == list(range(1, 11))
    assert sizes.max() - sizes.min() <= 1
    assert set(scores["run_id"]) == {"run-a"}

    ledger = warehouse.read_frame(select(warehouse.tables.runs)).iloc[0]
    assert ledger["status"] == "succeeded"
    assert ledger["rows_in"] == ledger["rows_scored"] + ledger["rows_rejected"]

    if warehouse.live_list_view:
        # MySQL/MariaDB: the live list is a view of history, whose customer index serves it
        history = warehouse.tables.history
        indexes = inspect(warehouse.engine).get_indexes(history.name, schema=history.schema)
        assert [CUSTOMER_ID] in [index["column_names"] for index in indexes]
    else:
        # a unique customer index on the live list when asked for, and always where the
        # adapter promises one (SQLite: it is its duplicate check)
        unique_on_id = [CUSTOMER_ID] in unique_indexes(warehouse, warehouse.tables.scores)
        assert unique_on_id == (customer_index or warehouse.customer_index_always)


def test_rerun_of_a_run_id_replaces_only_its_own_rows(settings, warehouse):
    fill_activity(warehouse)
    first = run_scoring(settings, warehouse, "run-a", AS_OF)
    run_scoring(settings, warehouse, "run-b", AS_OF)
    run_scoring(settings, warehouse, "run-a", AS_OF)
    history = warehouse.tables.history
    counts = dict(
        warehouse.read_frame(
            select(history.c.run_id, func.count()).group_by(history.c.run_id),
        ).itertuples(index=False)
    )
    assert counts == {"run-a": first["rows_scored"], "run-b": first["rows_scored"]}
    assert set(scores_dump(warehouse)["run_id"]) == {"run-a"}
    staging = warehouse.read_frame(select(func.count()).select_from(warehouse.tables.staging))
    assert staging.iloc[0, 0] == 0  # one process ranks its spilled runs, staging nothing
    assert not list((settings.data_dir / "spill").iterdir())  # and removes the spill files


@pytest.mark.parametrize("problem", ["empty", "all_bad", "missing_column"])
def test_a_failed_gate_leaves_the_previous_list_intact(settings, warehouse, problem):
    fill_activity(warehouse)
    run_scoring(settings, warehouse, "good", AS_OF)
    before = scores_dump(warehouse)
    activity = warehouse.tables.activity
    with warehouse.engine.begin() as conn:
        if problem == "empty":
            conn.execute(activity.delete())
        elif problem == "all_bad":
            conn.execute(activity.update().values(completion=7.0))
    if problem == "missing_column":
        from sqlalchemy import text

        with warehouse.engine.begin() as conn:
            conn.execute(
                text(f"ALTER TABLE {warehouse.qualified_name(activity)} DROP COLUMN completion")
            )
    with pytest.raises((RunGateError, ValueError)) as raised:
        run_scoring(settings, warehouse, "bad", AS_OF)
    expected = {"empty": "empty", "all_bad": "completion", "missing_column": "completion"}
    assert expected[problem] in str(raised.value)
    pd.testing.assert_frame_equal(scores_dump(warehouse), before)
    runs = warehouse.read_frame(select(warehouse.tables.runs)).set_index("run_id")
    assert runs.loc["bad", "status"] == "failed"
    assert not runs.loc["bad", "published"]


def test_backfill_writes_history_without_touching_the_current_list(settings, warehouse):
    fill_activity(warehouse)
    run_scoring(settings, warehouse, "current", AS_OF)
    before = scores_dump(warehouse)
    figures = run_scoring(settings, warehouse, "backfill", date(2026, 11, 2), publish=False)
    assert figures["status"] == "backfilled"
    pd.testing.assert_frame_equal(scores_dump(warehouse), before)
    history = warehouse.tables.history
    backfilled = warehouse.read_frame(select(history).where(history.c.run_id == "backfill"))
    assert len(backfilled) == figures["rows_scored"]


def test_holdout_is_excluded_from_targets_and_views(settings, warehouse):
    fill_activity(warehouse)
    figures = run_scoring(settings, warehouse, "run-a", AS_OF)
    scores = scores_dump(warehouse)
    assert not (scores["holdout"] & scores["is_target"]).any()
    assert scores["is_target"].sum() == figures["targets"]
    non_holdout = (~scores["holdout"]).sum()
    assert figures["targets"] == int(np.ceil(settings.campaign_value * non_holdout))
    targets = warehouse.read_frame(
        "SELECT * FROM campaign_targets"
        if warehouse.tables.metadata.schema is None
        else f"SELECT * FROM {warehouse.tables.metadata.schema}.campaign_targets",
    )
    assert len(targets) == figures["targets"]
    assert set(targets[CUSTOMER_ID]).isdisjoint(set(scores.loc[scores["holdout"], CUSTOMER_ID]))
    top = scores[~scores["holdout"]].head(figures["targets"])
    assert set(top[CUSTOMER_ID]) == set(targets[CUSTOMER_ID])


@pytest.mark.parametrize("odd_run_id", ["it's-a-run", "back\\slash'; DROP TABLE x; --"])
def test_run_ids_with_quotes_and_backslashes_replace_their_own_rows(
    settings, warehouse, odd_run_id
):
    fill_activity(warehouse, customers=600)
    first = run_scoring(settings, warehouse, odd_run_id, AS_OF)
    run_scoring(settings, warehouse, "plain", AS_OF)
    run_scoring(settings, warehouse, odd_run_id, AS_OF)  # a re-run replaces its partition
    history = warehouse.tables.history
    counts = dict(
        warehouse.read_frame(
            select(history.c.run_id, func.count()).group_by(history.c.run_id)
        ).itertuples(index=False)
    )
    assert counts == {odd_run_id: first["rows_scored"], "plain": first["rows_scored"]}
    assert set(scores_dump(warehouse)["run_id"]) == {odd_run_id}


class RecordingSteps(pipeline.StepRunner):
    """Records the name of every step the run calls, in order."""

    def __init__(self) -> None:
        self.called: list[str] = []

    def call(self, step, *args):
        self.called.append(step.__name__)
        return step(*args)


def test_the_run_calls_its_named_steps_in_order_through_the_runner(settings, warehouse):
    fill_activity(warehouse, customers=1_500)
    steps = RecordingSteps()
    run = pipeline.ScoringRun(settings, warehouse, "steps", AS_OF)
    outcome = pipeline.run_scoring(run, steps)
    assert steps.called == [
        "prepare_run",
        "load_champion",
        "stage_population",
        "build_target_list",
        "check_run_gates",
        "publish_target_list",
        "measure_drift",
        "record_run",
        "write_run_report",
    ]
    assert outcome.report is not None and outcome.report.html_path.is_file()
    assert outcome.figures["report_path"] == str(outcome.report.html_path)
    ledger = warehouse.read_frame(select(warehouse.tables.runs)).set_index("run_id")
    assert ledger.loc["steps", "status"] == "succeeded"
    assert ledger.loc["steps", "report_path"] == str(outcome.report.html_path)


def test_partitions_without_prefect_stage_one_after_the_other_and_rank_in_the_warehouse(
    settings, warehouse
):
    rows_in = fill_activity(warehouse, customers=1_500)
    single = run_scoring(settings, warehouse, "single", AS_OF)
    single_list = scores_dump(warehouse).drop(columns=["run_id", "scored_at"])
    parted_settings = settings.model_copy(update={"partitions": 3})
    parted = run_scoring(parted_settings, warehouse, "parted", AS_OF)
    parted_list = scores_dump(warehouse).drop(columns=["run_id", "scored_at"])
    assert single["rows_in"] == parted["rows_in"] == rows_in
    pd.testing.assert_frame_equal(parted_list, single_list, check_exact=True)


def test_scoring_reports_its_progress_to_listeners(settings, warehouse):
    rows_in = fill_activity(warehouse, customers=2_500)
    reports: list[tuple[str, float, float]] = []
    with progress.listening(lambda task, done, total: reports.append((task, done, total))):
        run_scoring(settings, warehouse, "watched", AS_OF)
    scoring = [(done, total) for task, done, total in reports if task == "scoring customers"]
    assert len(scoring) == -(-rows_in // settings.chunk_size)
    assert scoring[-1] == (rows_in, rows_in)
    assert [done for done, _ in scoring] == sorted(done for done, _ in scoring)


def test_the_counts_line_lists_reject_codes_only_when_there_are_rejects(
    settings, warehouse, caplog
):
    rows_in = fill_activity(warehouse, customers=1_500)
    with caplog.at_level("INFO", logger="audiobooks_scoring.pipeline"):
        run_scoring(settings, warehouse, "clean", AS_OF)
    counts = [r.getMessage() for r in caplog.records if "rows in:" in r.getMessage()]
    assert counts == [f"{rows_in} rows in: {rows_in} scored, 0 rejected"]


def test_decile_summary_returns_the_deciles_in_order_rounded_for_reading(settings, warehouse):
    fill_activity(warehouse)
    run_scoring(settings, warehouse, "deciles", AS_OF)
    summary = warehouse.read_frame(f"SELECT * FROM {warehouse.qualified_name('decile_summary')}")
    assert list(summary["decile"]) == list(range(1, 11))
    for column in ("min_probability", "max_probability", "mean_probability"):
        values = summary[column].astype(float)
        assert np.allclose(values, np.round(values, 4), rtol=0, atol=1e-12), column
    scores = scores_dump(warehouse)
    exact = scores.groupby("decile")["probability"].sum().to_numpy()
    assert np.allclose(summary["expected_buyers"].astype(float), exact, rtol=1e-12)
    assert not np.allclose(exact, np.round(exact, 4), rtol=0, atol=1e-12)
