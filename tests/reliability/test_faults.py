"""Faults while publishing: a killed process, a lost connection, a server restart, retries.

Every test checks the tables after the fault: the previous list intact (full ordered dump),
rows_in = rows_scored + rows_rejected in the ledger, no `<scores>_next`/`_old` side tables or
foreign staged rows left once the next run is done, and no run lock held.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from audiobooks_scoring.model.scoring_model import load_scoring_model
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.publishing.retry import with_retries
from audiobooks_scoring.warehouse import (
    PostgresAdapter,
    PublicationError,
    SQLiteAdapter,
    init_warehouse,
)
from tests.conftest import make_settings, require_postgres
from tests.helpers import run_scoring
from tests.reliability.helpers import (
    AS_OF,
    advisory_locks,
    assert_no_held_lock,
    assert_one_whole_list,
    assert_settled,
    fill_activity,
    history_counts,
    kill_process,
    ledger,
    leftover_tables,
    save_model_file,
    scores_dump,
    start_scoring_process,
    wait_for_marker,
    wait_until,
)

STAGES = ("after_staging", "during_swap", "before_commit")


@pytest.fixture(scope="module")
def scoring_model(trained_store_dir):
    """The trained champion, verified and loaded once for every run of this module."""
    store = ModelStore(trained_store_dir)
    return load_scoring_model(store, store.champion())


@pytest.fixture(scope="module")
def model_file(scoring_model, tmp_path_factory) -> Path:
    """The champion handed to subprocess runs."""
    return save_model_file(scoring_model, tmp_path_factory.mktemp("model") / "model.pickle")


@pytest.fixture
def pg_settings(tmp_path, postgres_schema, trained_store_dir):
    """Settings of a fresh PostgreSQL schema."""
    return make_settings(
        tmp_path, "postgres", postgres_schema, model_store_dir=trained_store_dir, chunk_size=1_000
    )


@pytest.fixture
def pg_warehouse(pg_settings):
    """An initialised PostgreSQL warehouse with demo activity and one published list."""
    warehouse = init_warehouse(pg_settings)
    fill_activity(warehouse)
    yield warehouse
    warehouse.engine.dispose()


def backend_pids(warehouse, condition: str, **params) -> list[int]:
    """Backends of this database whose pg_stat_activity row matches `condition`."""
    with warehouse.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    f"AND pid <> pg_backend_pid() AND {condition}"
                ),
                params,
            ).scalars()
        )


def terminate(warehouse, pid: int) -> None:
    """pg_terminate_backend, waiting until the backend is gone."""
    with warehouse.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    wait_until(lambda: not backend_pids(warehouse, "pid = :pid", pid=pid), 10, "backend exit")


# ----------------------------------------------------------------------------- killed process


@pytest.mark.parametrize("stage", STAGES)
def test_killed_mid_publish_keeps_the_list_and_the_next_run_cleans_up(
    settings, warehouse, scoring_model, model_file, tmp_path, stage
):
    fill_activity(warehouse)
    run_scoring(settings, warehouse, "before", AS_OF, model=scoring_model)
    before = scores_dump(warehouse)

    marker = tmp_path / "paused"
    process = start_scoring_process(settings, "killed", model_file, f"{stage}:60", marker)
    assert wait_for_marker(marker, process) == stage
    kill_process(process)

    pd.testing.assert_frame_equal(scores_dump(warehouse), before)
    assert_no_held_lock(warehouse)
    assert "killed" not in history_counts(warehouse)
    assert ledger(warehouse).loc["killed", "status"] == "running"  # it died mid-way

    figures = run_scoring(settings, warehouse, "next", AS_OF, model=scoring_model)
    assert figures["status"] == "succeeded"
    runs = ledger(warehouse)
    assert runs.loc["killed", "status"] == "abandoned"
    assert not runs.loc["killed", "published"]
    assert set(history_counts(warehouse)) == {"before", "next"}
    assert_one_whole_list(warehouse, "next")
    assert_settled(warehouse, {"next"})


# ----------------------------------------------------------------------------- lost connection


def run_in_thread(pg_settings, warehouse, run_id, model, **changes):
    """Start run_scoring in a thread; its future."""
    executor = ThreadPoolExecutor(max_workers=1)
    run_settings = pg_settings.model_copy(update=changes)
    future = executor.submit(run_scoring, run_settings, warehouse, run_id, AS_OF, model=model)
    executor.shutdown(wait=False)
    return future


def swap_backend(warehouse) -> int:
    """The backend of the publication paused inside its swap transaction."""
    live = f"{warehouse.tables.schema}.{warehouse.tables.scores.name} RENAME TO"
    pids = backend_pids(
        warehouse, "state = 'idle in transaction' AND query LIKE :pattern", pattern=f"%{live}%"
    )
    assert len(pids) == 1, pids
    return pids[0]


def test_terminated_swap_backend_fails_cleanly_and_a_retry_succeeds(
    pg_settings, pg_warehouse, scoring_model, tmp_path, monkeypatch
):
    run_scoring(pg_settings, pg_warehouse, "before", AS_OF, model=scoring_model)
    before = scores_dump(pg_warehouse)
    marker = tmp_path / "paused"
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_AT", "during_swap:1.5")
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_MARKER", str(marker))
    future = run_in_thread(pg_settings, pg_warehouse, "cut", scoring_model, publish_retries=0)
    wait_until(marker.exists, 60, "the swap to pause")
    terminate(pg_warehouse, swap_backend(pg_warehouse))

    with pytest.raises(PublicationError, match="not published.*previous list is untouched"):
        future.result(timeout=60)
    pd.testing.assert_frame_equal(scores_dump(pg_warehouse), before)
    runs = ledger(pg_warehouse)
    assert runs.loc["cut", "status"] == "failed" and not runs.loc["cut", "published"]
    assert "terminat" in runs.loc["cut", "message"]
    assert "cut" not in history_counts(pg_warehouse)
    assert_no_held_lock(pg_warehouse)

    monkeypatch.delenv("AUDIOBOOKS_TEST_PAUSE_AT")
    figures = run_scoring(pg_settings, pg_warehouse, "cut", AS_OF, model=scoring_model)
    assert figures["status"] == "succeeded"
    assert_one_whole_list(pg_warehouse, "cut")
    assert_settled(pg_warehouse, {"cut"})


def test_terminated_swap_backend_is_retried_with_backoff_within_the_run(
    pg_settings, pg_warehouse, scoring_model, tmp_path, monkeypatch, caplog
):
    run_scoring(pg_settings, pg_warehouse, "before", AS_OF, model=scoring_model)
    marker = tmp_path / "paused"
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_AT", "during_swap:1")
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_MARKER", str(marker))
    caplog.set_level(logging.WARNING, logger="audiobooks_scoring.publishing")
    future = run_in_thread(pg_settings, pg_warehouse, "cut", scoring_model, publish_retries=2)
    wait_until(marker.exists, 60, "the swap to pause")
    terminate(pg_warehouse, swap_backend(pg_warehouse))

    figures = future.result(timeout=60)
    assert figures["status"] == "succeeded"
    assert "swapping in the new list failed with a transient error" in caplog.text
    assert "retry 1/2 in 0.5s" in caplog.text
    assert_one_whole_list(pg_warehouse, "cut")
    assert_settled(pg_warehouse, {"cut"})


def test_lost_run_lock_session_publishes_nothing_and_a_retry_succeeds(
    pg_settings, pg_warehouse, scoring_model, tmp_path, monkeypatch
):
    run_scoring(pg_settings, pg_warehouse, "before", AS_OF, model=scoring_model)
    before = scores_dump(pg_warehouse)
    marker = tmp_path / "paused"
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_AT", "after_staging:1")
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_MARKER", str(marker))
    future = run_in_thread(pg_settings, pg_warehouse, "orphan", scoring_model)
    wait_until(marker.exists, 60, "the publication to pause")
    holders = advisory_locks(pg_warehouse.engine, pg_warehouse)
    assert len(holders) == 1 and holders[0][1]
    terminate(pg_warehouse, holders[0][0])

    with pytest.raises(PublicationError, match="run lock was lost"):
        future.result(timeout=60)
    pd.testing.assert_frame_equal(scores_dump(pg_warehouse), before)
    assert leftover_tables(pg_warehouse) == ["customer_scores_next"]  # for the next run to drop
    assert ledger(pg_warehouse).loc["orphan", "status"] == "failed"
    assert "orphan" not in history_counts(pg_warehouse)
    assert_no_held_lock(pg_warehouse)

    monkeypatch.delenv("AUDIOBOOKS_TEST_PAUSE_AT")
    run_scoring(pg_settings, pg_warehouse, "again", AS_OF, model=scoring_model)
    assert_one_whole_list(pg_warehouse, "again")
    assert_settled(pg_warehouse, {"again"})


# ----------------------------------------------------------------------------- server restart


def restart_postgres() -> None:
    """Restart the test server (AUDIOBOOKS_TEST_POSTGRES_RESTART, else the local cluster)."""
    command = os.environ.get("AUDIOBOOKS_TEST_POSTGRES_RESTART")
    if command:
        subprocess.run(shlex.split(command), check=True, timeout=120)
        return
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        timeout=120,
        capture_output=True,
    )


def server_accepts(url: str) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def test_server_restart_between_runs_needs_no_manual_action(
    pg_settings, pg_warehouse, scoring_model
):
    url = require_postgres()
    run_scoring(pg_settings, pg_warehouse, "before", AS_OF, model=scoring_model)
    with pg_warehouse.engine.connect() as conn:  # the pool now holds a connection to lose
        pid_before = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    try:
        restart_postgres()
    finally:
        wait_until(lambda: server_accepts(url), 60, "PostgreSQL to accept connections")

    figures = run_scoring(pg_settings, pg_warehouse, "after", AS_OF, model=scoring_model)
    assert figures["status"] == "succeeded"
    with pg_warehouse.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid_before
    assert_one_whole_list(pg_warehouse, "after")
    assert_settled(pg_warehouse, {"after"})


# ----------------------------------------------------------------------------- retry policy


def error_from(engine, *statements: str) -> DBAPIError:
    """The DBAPIError the server raises for the last of `statements`."""
    with engine.connect() as conn:
        for statement in statements[:-1]:
            conn.execute(text(statement))
        with pytest.raises(DBAPIError) as raised:
            conn.execute(text(statements[-1]))
        conn.rollback()
    return raised.value


@pytest.fixture
def pg_engine(postgres_engine):
    engine, schema = postgres_engine
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {schema}.t (id int PRIMARY KEY, v int NOT NULL)"))
        conn.execute(text(f"INSERT INTO {schema}.t VALUES (1, 1)"))
    return engine, schema


@pytest.fixture
def pg_adapter(postgres_schema, tmp_path):
    """A PostgreSQL adapter of the test server: it classifies errors for `with_retries`."""
    adapter = PostgresAdapter.open(make_settings(tmp_path, "postgres", postgres_schema))
    yield adapter
    adapter.dispose()


def test_permanent_postgres_errors_are_not_transient(pg_engine, pg_adapter):
    engine, schema = pg_engine
    cases = {
        "42601": ("SELEC 1",),
        "42P01": ("SELECT * FROM no_such_table",),
        "23505": (f"INSERT INTO {schema}.t VALUES (1, 2)",),
        "23502": (f"INSERT INTO {schema}.t VALUES (2, NULL)",),
        "22012": ("SELECT 1 / 0",),
        "57014": ("SET statement_timeout = 50", "SELECT pg_sleep(1)"),
    }
    for state, statements in cases.items():
        error = error_from(engine, *statements)
        assert error.orig.sqlstate == state
        assert not pg_adapter.is_transient(error), state


def test_lock_timeout_serialization_and_lost_connection_are_transient(pg_engine, pg_adapter):
    engine, schema = pg_engine
    is_transient = pg_adapter.is_transient
    with engine.connect() as holder:
        holder.execute(text(f"LOCK TABLE {schema}.t IN ACCESS EXCLUSIVE MODE"))
        timeout = error_from(engine, "SET lock_timeout = 50", f"SELECT * FROM {schema}.t")
        holder.rollback()
    assert timeout.orig.sqlstate == "55P03" and is_transient(timeout)

    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as first:
        first.execute(text(f"SELECT v FROM {schema}.t"))
        with engine.begin() as second:
            second.execute(text(f"UPDATE {schema}.t SET v = v + 1"))
        with pytest.raises(DBAPIError) as raised:
            first.execute(text(f"UPDATE {schema}.t SET v = v + 1"))
    assert raised.value.orig.sqlstate == "40001" and is_transient(raised.value)

    lost = error_from(engine, "SELECT pg_terminate_backend(pg_backend_pid())")
    assert lost.connection_invalidated and is_transient(lost)

    refused = PostgresAdapter.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    with pytest.raises(DBAPIError) as raised:
        refused.connect()
    assert is_transient(raised.value)  # a server that is restarting is worth waiting for


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://no_such_role:pw@127.0.0.1:5432/test",
        "postgresql+psycopg://postgres@127.0.0.1:5432/no_such_database",
    ],
)
def test_connection_refused_by_the_server_is_not_transient(url, tmp_path):
    require_postgres()
    adapter = PostgresAdapter.open(make_settings(tmp_path, "postgres", (url, "public")))
    with pytest.raises(OperationalError) as raised:
        adapter.engine.connect()
    assert "does not exist" in str(raised.value) and not adapter.is_transient(raised.value)
    adapter.dispose()


def test_deadlock_is_transient(pg_engine, pg_adapter):
    engine, schema = pg_engine
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {schema}.u (id int)"))
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def lock_both(first: str, second: str) -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text(f"LOCK TABLE {schema}.{first} IN ACCESS EXCLUSIVE MODE"))
                barrier.wait()
                conn.execute(text(f"LOCK TABLE {schema}.{second} IN ACCESS EXCLUSIVE MODE"))
        except DBAPIError as error:
            errors.append(error)

    threads = [threading.Thread(target=lock_both, args=pair) for pair in (("t", "u"), ("u", "t"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 1
    assert errors[0].orig.sqlstate == "40P01" and pg_adapter.is_transient(errors[0])


def test_sqlite_locked_is_transient_and_bad_sql_is_not(tmp_path):
    adapter = SQLiteAdapter.open(make_settings(tmp_path, "sqlite", None))
    engine, is_transient = adapter.engine, adapter.is_transient
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with engine.connect() as writer:
        writer.exec_driver_sql("BEGIN IMMEDIATE")
        locked = error_from(engine, "PRAGMA busy_timeout = 0", "INSERT INTO t VALUES (2)")
        writer.rollback()
    assert "database is locked" in str(locked) and is_transient(locked)
    for statement in ("SELECT * FROM no_such_table", "SELEC 1", "INSERT INTO t VALUES (1)"):
        assert not is_transient(error_from(engine, statement)), statement
    engine.dispose()


def test_with_retries_backs_off_on_transient_errors_until_success(pg_engine, pg_adapter, caplog):
    engine, schema = pg_engine
    calls: list[float] = []
    caplog.set_level(logging.WARNING, logger="audiobooks_scoring.publishing")
    with engine.connect() as holder:
        holder.execute(text(f"LOCK TABLE {schema}.t IN ACCESS EXCLUSIVE MODE"))

        def read() -> int:
            calls.append(time.monotonic())
            if len(calls) == 3:
                holder.rollback()  # the blocking reader finally lets go
            with engine.connect() as conn:
                conn.execute(text("SET lock_timeout = 20"))
                return conn.execute(text(f"SELECT count(*) FROM {schema}.t")).scalar_one()

        assert with_retries(pg_adapter, read, attempts=3, what="reading", base_delay=0.05) == 1
    assert len(calls) == 3
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.10  # exponential: base, then twice the base
    assert "retry 1/3" in caplog.text and "retry 2/3" in caplog.text
    assert "55P03" in caplog.text


def test_with_retries_gives_up_after_its_attempts_and_never_retries_permanent_errors(
    pg_engine, pg_adapter
):
    engine, schema = pg_engine
    calls = []

    def insert_duplicate() -> None:
        calls.append(1)
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {schema}.t VALUES (1, 1)"))

    with pytest.raises(IntegrityError):
        with_retries(pg_adapter, insert_duplicate, attempts=3, what="inserting", base_delay=0.05)
    assert len(calls) == 1

    calls.clear()
    with engine.connect() as holder:
        holder.execute(text(f"LOCK TABLE {schema}.t IN ACCESS EXCLUSIVE MODE"))

        def blocked() -> None:
            calls.append(1)
            with engine.connect() as conn:
                conn.execute(text("SET lock_timeout = 20"))
                conn.execute(text(f"SELECT * FROM {schema}.t"))

        with pytest.raises(OperationalError) as raised:
            with_retries(pg_adapter, blocked, attempts=2, what="reading", base_delay=0.01)
        holder.rollback()
    assert len(calls) == 3 and raised.value.orig.sqlstate == "55P03"
