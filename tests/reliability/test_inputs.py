"""Bad inputs through the real pipeline, on every test engine: each row scored or rejected.

After every run: rows_in = rows_scored + rows_rejected in the ledger, every bad row is in
`rejected_rows` with its reason code, and a run that cannot be trusted publishes nothing.
"""

from __future__ import annotations

import json
import math
from datetime import date

import pandas as pd
import pytest
from sqlalchemy import Column, Date, Double, MetaData, Table, Text, select, text, update

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, WINDOW_END, ContractError
from audiobooks_scoring.model.scoring_model import load_scoring_model
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.scoring.gates import RunGateError
from tests.conftest import stores_infinity
from tests.helpers import run_scoring
from tests.reliability.helpers import (
    AS_OF,
    WINDOW,
    assert_accounting,
    assert_no_held_lock,
    fill_activity,
    history_counts,
    ledger,
    leftover_tables,
    rejected_counts,
    scores_dump,
    staged_counts,
)

GOOD = {
    WINDOW_END: WINDOW,
    "book_length_avg_min": 1620.0,
    "book_length_total_min": 3240.0,
    "price_avg": 10.0,
    "price_total": 20.0,
    "review": 1.0,
    "review_score": 9.0,
    "completion": 0.5,
    "minutes_listened": 810.0,
    "support_requests": 0.0,
    "last_visit_days_after_purchase": 3.0,
}
NAN, INF = float("nan"), float("inf")

# (change to a good row, expected reason code); each row gets its own customer id.
BAD_ROWS = [
    ({"price_avg": None}, "missing_value"),
    ({"completion": NAN}, "missing_value"),
    ({"minutes_listened": INF}, "infinite_value"),
    ({"book_length_total_min": -INF}, "infinite_value"),
    ({"support_requests": -1.0}, "negative_value"),
    ({"last_visit_days_after_purchase": -3.0}, "negative_value"),
    ({"completion": 1.5}, "completion_out_of_range"),
    ({"completion": -0.1}, "completion_out_of_range"),
    ({"review": 3.0}, "review_not_binary"),
    ({"review_score": 11.0}, "review_score_out_of_range"),
    ({"review_score": 0.0}, "review_score_out_of_range"),
    ({"price_avg": 99.0}, "average_above_total"),
    ({"book_length_avg_min": 5000.0}, "average_above_total"),
]
BAD_ID_BASE = 900_000
GOOD_CUSTOMERS = 600


@pytest.fixture(scope="module")
def scoring_model(trained_store_dir):
    """The trained champion, verified and loaded once for every run of this module."""
    store = ModelStore(trained_store_dir)
    return load_scoring_model(store, store.champion())


def rejected_rows(warehouse, run_id: str) -> pd.DataFrame:
    rejected = warehouse.tables.rejected
    return warehouse.read_frame(select(rejected).where(rejected.c.run_id == run_id))


def assert_nothing_published(warehouse, run_id: str, before: pd.DataFrame) -> pd.Series:
    """The failed run left the list as it was and is recorded as failed, not published."""
    pd.testing.assert_frame_equal(scores_dump(warehouse), before)
    run = ledger(warehouse).loc[run_id]
    assert run["status"] == "failed" and not run["published"]
    assert run_id not in history_counts(warehouse)
    assert leftover_tables(warehouse) == []
    assert_no_held_lock(warehouse)
    assert_accounting(warehouse)
    return run


def bad_rows_of(dialect: str) -> list[tuple[dict, str]]:
    """`BAD_ROWS` the engine can hold: MySQL/MariaDB cannot store an infinite number at all."""
    if stores_infinity(dialect):
        return BAD_ROWS
    return [(change, code) for change, code in BAD_ROWS if code != "infinite_value"]


def test_every_bad_row_is_rejected_with_its_reason_and_the_rest_published(
    settings, warehouse, dialect, scoring_model
):
    rows_in = fill_activity(warehouse, customers=GOOD_CUSTOMERS)
    kinds = bad_rows_of(dialect)
    assert len(kinds) == len(BAD_ROWS) - (0 if stores_infinity(dialect) else 2)
    bad = [{**GOOD, **change, CUSTOMER_ID: BAD_ID_BASE + i} for i, (change, _) in enumerate(kinds)]
    expected = {BAD_ID_BASE + i: code for i, (_, code) in enumerate(kinds)}
    extra = [
        {**GOOD, CUSTOMER_ID: None},  # no customer id
        {**GOOD, CUSTOMER_ID: 910_000},  # two clean copies: both rejected as duplicates
        {**GOOD, CUSTOMER_ID: 910_000, "price_avg": 5.0},
        {**GOOD, CUSTOMER_ID: 910_001},  # a clean copy and a broken one: the clean one scored
        {**GOOD, CUSTOMER_ID: 910_001, "completion": NAN},
        {**GOOD, CUSTOMER_ID: 910_002, WINDOW_END: date(2026, 10, 1)},  # older window
        {**GOOD, CUSTOMER_ID: 910_003, WINDOW_END: None},  # no window: not in the population
    ]
    expected.update({910_000: "duplicate_customer_id", 910_001: "missing_value"})
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, pd.DataFrame(bad + extra))
    in_population = rows_in + len(bad) + 5

    figures = run_scoring(settings, warehouse, "bad-rows", AS_OF, model=scoring_model)

    assert figures["status"] == "succeeded"
    assert figures["rows_in"] == in_population
    assert figures["rows_rejected"] == len(bad) + 1 + 2 + 1
    rejected = rejected_rows(warehouse, "bad-rows")
    assert len(rejected) == figures["rows_rejected"]
    no_id = rejected[rejected[CUSTOMER_ID].isna()]
    assert no_id["reason_code"].tolist() == ["missing_customer_id"]
    by_id = rejected.dropna(subset=[CUSTOMER_ID])
    assert sorted(by_id[CUSTOMER_ID].astype(int)) == sorted(
        [*expected, 910_000]  # both copies of the duplicate
    )
    for customer, code in zip(by_id[CUSTOMER_ID].astype(int), by_id["reason_code"], strict=True):
        assert code == expected[customer], customer
    for raw in rejected["raw_values"]:
        assert set(json.loads(raw)) >= {CUSTOMER_ID, *FEATURES}  # the row as it came in

    scores = scores_dump(warehouse)
    assert len(scores) == figures["rows_scored"] == rows_in + 1
    assert 910_001 in set(scores[CUSTOMER_ID])
    assert set(scores[CUSTOMER_ID]).isdisjoint({*range(BAD_ID_BASE, BAD_ID_BASE + 99), 910_000})
    assert scores["probability"].between(0, 1).all()
    assert not scores["probability"].isna().any()
    runs = assert_accounting(warehouse)
    assert runs.loc["bad-rows", "rows_in"] == in_population


def text_activity_table(warehouse) -> Table:
    """The activity table re-created with customer_id and price_avg as TEXT columns."""
    name = warehouse.tables.activity.name
    schema = warehouse.tables.schema
    columns = [
        Column(CUSTOMER_ID, Text),
        Column(WINDOW_END, Date),
        *[Column(f, Text if f == "price_avg" else Double) for f in FEATURES],
    ]
    table = Table(name, MetaData(schema=schema), *columns)
    with warehouse.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {warehouse.qualified_name(warehouse.tables.activity)}"))
        table.create(conn)
    return table


# (customer_id text, price_avg text, expected reason code or None when the row is scored)
TEXT_ROWS = [
    ("800001", "abc", "not_numeric"),
    ("800002", "12,5", "not_numeric"),
    ("800003", "", "not_numeric"),
    ("800004", "NaN", "missing_value"),
    ("800005", "Infinity", "infinite_value"),
    ("800006", "-1", "negative_value"),
    ("800007", "12.5", None),
    ("800008", "1e1", None),
    ("12.5", "10", "missing_customer_id"),
    ("abc", "10", "missing_customer_id"),
]


def test_text_in_numeric_columns_is_parsed_or_rejected_row_by_row(
    settings, warehouse, scoring_model
):
    table = text_activity_table(warehouse)
    good = [{**GOOD, CUSTOMER_ID: str(i), "price_avg": "10"} for i in range(1, 400)]
    rows = [{**GOOD, CUSTOMER_ID: customer, "price_avg": price} for customer, price, _ in TEXT_ROWS]
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, table, pd.DataFrame(good + rows))

    figures = run_scoring(settings, warehouse, "text", AS_OF, model=scoring_model)

    expected = {customer: code for customer, _, code in TEXT_ROWS if code}
    rejected = rejected_rows(warehouse, "text")
    assert dict(zip(rejected[CUSTOMER_ID], rejected["reason_code"], strict=True)) == expected
    assert figures["rows_in"] == len(good) + len(TEXT_ROWS)
    assert figures["rows_rejected"] == len(expected)
    scores = scores_dump(warehouse).set_index(CUSTOMER_ID)
    assert {800007, 800008} <= set(scores.index)
    assert len(scores) == figures["rows_scored"]
    assert_accounting(warehouse)


def test_duplicate_customer_ids_in_a_text_id_column_are_rejected(
    settings, warehouse, scoring_model
):
    table = text_activity_table(warehouse)
    good = [{**GOOD, CUSTOMER_ID: str(i), "price_avg": "10"} for i in range(1, 400)]
    copies = [{**GOOD, CUSTOMER_ID: "700001", "price_avg": "10"}] * 2
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, table, pd.DataFrame(good + copies))

    figures = run_scoring(settings, warehouse, "text-dups", AS_OF, model=scoring_model)

    rejected = rejected_rows(warehouse, "text-dups")
    assert rejected["reason_code"].tolist() == ["duplicate_customer_id"] * 2
    assert figures["rows_scored"] == len(good) and figures["rows_rejected"] == 2
    assert_accounting(warehouse)


def set_completion(warehouse, customer_ids: list[int], value: float) -> None:
    """Set `completion` of the given customers' activity rows (bound parameters, any engine)."""
    activity = warehouse.tables.activity
    with warehouse.engine.begin() as conn:
        conn.execute(
            update(activity)
            .where(activity.c[CUSTOMER_ID].in_(customer_ids))
            .values(completion=value)
        )


def alter(warehouse, statement: str) -> None:
    with warehouse.engine.begin() as conn:
        activity = warehouse.qualified_name(warehouse.tables.activity)
        conn.execute(text(statement.format(activity=activity)))


def test_an_extra_column_is_ignored(settings, warehouse, scoring_model):
    rows_in = fill_activity(warehouse, customers=GOOD_CUSTOMERS)
    alter(warehouse, "ALTER TABLE {activity} ADD COLUMN favourite_genre TEXT")
    alter(warehouse, "UPDATE {activity} SET favourite_genre = 'crime; DROP TABLE x'")
    figures = run_scoring(settings, warehouse, "extra", AS_OF, model=scoring_model)
    assert figures["rows_in"] == figures["rows_scored"] == rows_in
    assert len(scores_dump(warehouse)) == rows_in
    assert_accounting(warehouse)


def published_before(settings, warehouse, scoring_model) -> pd.DataFrame:
    """Publish a good list first; its full dump."""
    fill_activity(warehouse, customers=GOOD_CUSTOMERS)
    run_scoring(settings, warehouse, "good", AS_OF, model=scoring_model)
    return scores_dump(warehouse)


@pytest.mark.parametrize("column", ["completion", CUSTOMER_ID])
def test_a_missing_column_fails_naming_it_and_publishes_nothing(
    settings, warehouse, scoring_model, column
):
    before = published_before(settings, warehouse, scoring_model)
    alter(warehouse, f"ALTER TABLE {{activity}} DROP COLUMN {column}")
    with pytest.raises(ContractError, match="rule 'required column'") as raised:
        run_scoring(settings, warehouse, "missing", AS_OF, model=scoring_model)
    assert column in str(raised.value)
    run = assert_nothing_published(warehouse, "missing", before)
    assert column in run["message"] and "required column" in run["message"]
    assert "missing" not in staged_counts(warehouse) | rejected_counts(warehouse)


def test_an_empty_population_fails_and_publishes_nothing(settings, warehouse, scoring_model):
    before = published_before(settings, warehouse, scoring_model)
    alter(warehouse, "DELETE FROM {activity}")
    with pytest.raises(RunGateError, match="population is empty"):
        run_scoring(settings, warehouse, "empty", AS_OF, model=scoring_model)
    run = assert_nothing_published(warehouse, "empty", before)
    assert (run["rows_in"], run["rows_scored"], run["rows_rejected"]) == (0, 0, 0)


def test_every_row_bad_fails_the_reject_gate_and_publishes_nothing(
    settings, warehouse, scoring_model
):
    before = published_before(settings, warehouse, scoring_model)
    alter(warehouse, "UPDATE {activity} SET review_score = 42")
    with pytest.raises(RunGateError, match="100.0%.*max_reject_share.*review_score_out_of_range: "):
        run_scoring(settings, warehouse, "all-bad", AS_OF, model=scoring_model)
    run = assert_nothing_published(warehouse, "all-bad", before)
    assert run["rows_in"] == run["rows_rejected"] == len(before) and run["rows_scored"] == 0
    rejected = rejected_rows(warehouse, "all-bad")
    assert len(rejected) == len(before)
    assert set(rejected["reason_code"]) == {"review_score_out_of_range"}


def test_rejects_just_above_the_gate_fail_and_just_below_publish(
    settings, warehouse, scoring_model
):
    before = published_before(settings, warehouse, scoring_model)
    limit = math.floor(settings.max_reject_share * len(before))
    # the ids are read first and bound: MariaDB refuses LIMIT in an IN subquery (1235) and
    # a subquery on the table being updated (1093)
    activity = warehouse.tables.activity
    customer = activity.c[CUSTOMER_ID]
    first_ids = warehouse.read_frame(select(customer).order_by(customer).limit(limit + 1))
    broken = [int(value) for value in first_ids[CUSTOMER_ID]]
    assert len(broken) == limit + 1
    set_completion(warehouse, broken, 2.0)
    with pytest.raises(RunGateError, match="completion_out_of_range"):
        run_scoring(settings, warehouse, "above", AS_OF, model=scoring_model)
    assert_nothing_published(warehouse, "above", before)
    set_completion(warehouse, [min(broken)], 0.5)
    figures = run_scoring(settings, warehouse, "below", AS_OF, model=scoring_model)
    assert figures["rows_rejected"] == limit and figures["status"] == "succeeded"
    assert_accounting(warehouse)
