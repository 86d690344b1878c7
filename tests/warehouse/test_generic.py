"""The generic adapter (portable Core only), forced on the engines the tests run."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, insert, select

from audiobooks_scoring.warehouse import (
    AnotherRunPublishing,
    GenericAdapter,
    RunLockLost,
    init_warehouse,
)
from audiobooks_scoring.warehouse.lock_table import lock_table
from tests.helpers import run_scoring
from tests.test_pipeline import AS_OF, bad_reason_codes, bad_rows, fill_activity, scores_dump


@pytest.fixture
def generic(settings):
    """The test warehouse of `dialect`, reached through the generic adapter."""
    forced = settings.model_copy(update={"warehouse_adapter": "generic"})
    warehouse = init_warehouse(forced)
    assert isinstance(warehouse, GenericAdapter)
    yield forced, warehouse
    warehouse.dispose()


def test_a_whole_run_publishes_through_portable_core(generic, dialect):
    settings, warehouse = generic
    rows_in = fill_activity(warehouse, customers=1_500, bad_rows=bad_rows(dialect))
    figures = run_scoring(settings, warehouse, "generic-a", AS_OF)
    assert figures["rows_in"] == rows_in == figures["rows_scored"] + figures["rows_rejected"]
    assert figures["rows_rejected"] == len(bad_reason_codes(dialect))
    rejected = warehouse.read_frame(select(warehouse.tables.rejected))
    assert sorted(rejected["reason_code"]) == bad_reason_codes(dialect)
    scores = scores_dump(warehouse)
    assert len(scores) == figures["rows_scored"]
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert scores["customer_id"].is_unique and set(scores["run_id"]) == {"generic-a"}
    sizes = scores.groupby("decile").size()
    assert list(sizes.index) == list(range(1, 11)) and sizes.max() - sizes.min() <= 1

    second = run_scoring(settings, warehouse, "generic-b", AS_OF)
    assert set(scores_dump(warehouse)["run_id"]) == {"generic-b"}
    history = warehouse.tables.history
    counts = warehouse.read_frame(select(history.c.run_id))["run_id"].value_counts()
    assert counts.to_dict() == {"generic-a": len(scores), "generic-b": second["rows_scored"]}
    assert warehouse.read_frame(select(lock_table(warehouse))).empty


def test_the_lock_row_admits_one_run_and_names_its_holder(generic):
    _, warehouse = generic
    with warehouse.run_lock():
        with pytest.raises(AnotherRunPublishing, match=socket.gethostname()):
            with warehouse.run_lock():
                pass
        with warehouse.engine.begin() as conn:
            warehouse.check_run_lock(conn)
    with warehouse.run_lock():
        pass


def test_a_removed_lock_row_stops_publication(generic):
    _, warehouse = generic
    table = lock_table(warehouse)
    with warehouse.run_lock():
        with warehouse.engine.begin() as conn:
            conn.execute(delete(table))
        with pytest.raises(RunLockLost, match="lock was lost"):
            with warehouse.engine.begin() as conn:
                warehouse.check_run_lock(conn)


@pytest.mark.parametrize(
    ("holder", "age", "taken_over"),
    [
        (f"{socket.gethostname()}:999999999", timedelta(minutes=1), True),  # a dead process here
        ("another-host:1", timedelta(minutes=1), False),  # alive as far as we can tell
        ("another-host:1", timedelta(hours=13), True),  # older than the lease
    ],
)
def test_a_lock_row_left_by_a_dead_run_is_taken_over(generic, holder, age, taken_over):
    _, warehouse = generic
    table = lock_table(warehouse)
    table.create(warehouse.engine, checkfirst=True)
    name = f"{warehouse.tables.schema or ''}.{warehouse.tables.scores.name}"
    with warehouse.engine.begin() as conn:
        conn.execute(
            insert(table).values(
                lock_name=name, holder=holder, token="left", acquired_at=datetime.now(UTC) - age
            )
        )
    if taken_over:
        with warehouse.run_lock():
            tokens = warehouse.read_frame(select(table.c.token))["token"].tolist()
            assert tokens != ["left"] and len(tokens) == 1
    else:
        with pytest.raises(AnotherRunPublishing, match="another-host:1"):
            with warehouse.run_lock():
                pass


def test_asking_for_a_customer_index_still_publishes_a_whole_list(generic):
    settings, warehouse = generic
    indexed = settings.model_copy(update={"customer_index": True})
    fill_activity(warehouse, customers=300)
    figures = run_scoring(indexed, warehouse, "generic-indexed", AS_OF)
    assert figures["status"] == "succeeded"
    scores = scores_dump(warehouse)
    assert len(scores) == figures["rows_scored"] and scores["customer_id"].is_unique
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
