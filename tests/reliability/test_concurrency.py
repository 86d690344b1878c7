"""Concurrency: two runs at once, a retrain while scoring, readers during publication, grants.

Readers must always see one whole list from one run (never empty, partial or mixed, never an
error); a reader holding a long transaction delays the publisher by at most its lock timeout.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

from audiobooks_scoring.contract import CUSTOMER_ID, WINDOW_END
from audiobooks_scoring.model.scoring_model import load_scoring_model
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.publishing.build import build_target_list
from audiobooks_scoring.publishing.swap import publish_target_list
from audiobooks_scoring.warehouse import PublicationError, init_warehouse
from tests.conftest import make_settings
from tests.helpers import run_scoring
from tests.reliability.helpers import (
    AS_OF,
    REPO_ROOT,
    WINDOW,
    assert_no_held_lock,
    assert_one_whole_list,
    assert_settled,
    fill_activity,
    history_counts,
    ledger,
    outcome_of,
    save_model_file,
    scores_dump,
    start_scoring_process,
)

# Runs staged by hand for the publication loop: different sizes tell the lists apart.
LOOP_RUNS = {"loop-a": 400, "loop-b": 700, "loop-c": 1_000}


@pytest.fixture(scope="module")
def scoring_model(trained_store_dir):
    """The trained champion, verified and loaded once for every run of this module."""
    store = ModelStore(trained_store_dir)
    return load_scoring_model(store, store.champion())


@pytest.fixture(scope="module")
def model_file(scoring_model, tmp_path_factory) -> Path:
    """The champion handed to subprocess runs."""
    return save_model_file(scoring_model, tmp_path_factory.mktemp("model") / "model.pickle")


def stage_runs(warehouse, runs: dict[str, int]) -> None:
    """Staged rows for each run id (as if scored): `n` customers with distinct probabilities."""
    frames = []
    rng = np.random.default_rng(1)
    for run_id, n in runs.items():
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    CUSTOMER_ID: np.arange(1, n + 1, dtype=np.int64),
                    WINDOW_END: WINDOW,
                    "probability": rng.permutation(n) / n,
                    "holdout": np.arange(n) % 10 == 0,
                    "reason_1": "completion_high",
                    "reason_2": None,
                    "reason_3": None,
                    "partition_no": 0,
                }
            )
        )
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.staging, pd.concat(frames, ignore_index=True))


def publish(warehouse, settings, run_id: str):
    """Publish an already staged run under the run lock."""
    with warehouse.run_lock():
        built = build_target_list(warehouse, settings, run_id, "v-test", AS_OF)
        return publish_target_list(warehouse, settings, built)


# ----------------------------------------------------------------------------- two runs at once


def test_two_runs_started_together_publish_exactly_once(settings, warehouse, model_file, tmp_path):
    fill_activity(warehouse)
    go = tmp_path / "go"
    processes = [
        start_scoring_process(settings, "nightly", model_file, "after_staging:2", go_file=go)
        for _ in range(2)
    ]
    for process in processes:
        assert process.stdout.readline().startswith('{"ready"')
    go.touch()
    outcomes = sorted((outcome_of(p) for p in processes), key=lambda o: o["outcome"])

    assert [o["outcome"] for o in outcomes] == ["skipped", "succeeded"]
    skipped, succeeded = outcomes
    assert skipped["exit_code"] == 3 and "another run is publishing" in skipped["message"]
    if warehouse.name == "postgresql":
        assert "backend pid" in skipped["message"]  # says who holds the lock
    assert succeeded["exit_code"] == 0 and succeeded["published"]
    runs = ledger(warehouse)
    assert list(runs.index) == ["nightly"]  # the skipped run did not touch the winner's row
    assert runs.loc["nightly", "status"] == "succeeded"
    assert_one_whole_list(warehouse, "nightly")
    assert_settled(warehouse, {"nightly"})


# ----------------------------------------------------------------------------- retrain meanwhile

RETRAINER = textwrap.dedent(
    """
    import sys
    from audiobooks_scoring.model.store import ModelStore

    store = ModelStore(sys.argv[1])
    stored = store.load_version(store.champion())
    splits = store.load_splits(stored.version)
    reserved = ("version", "created_at", "library_versions")
    metadata = {k: v for k, v in stored.metadata.items() if k not in reserved}
    print("ready", flush=True)
    for index in range(int(sys.argv[2])):
        version = store.save_version(
            stored.model, stored.preprocessing_json, splits, metadata, version=f"retrain{index}"
        )
        store.promote(version, f"retrain {index}")
    """
)


def test_scoring_during_a_retrain_uses_complete_verified_versions(
    tmp_path, postgres_schema, trained_store_dir
):
    store_dir = tmp_path / "models"
    shutil.copytree(trained_store_dir, store_dir)
    settings = make_settings(
        tmp_path, "postgres", postgres_schema, model_store_dir=store_dir, chunk_size=1_000
    )
    warehouse = init_warehouse(settings)
    fill_activity(warehouse, customers=500)
    retrainer = subprocess.Popen(
        [sys.executable, "-c", RETRAINER, str(store_dir), "10"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert retrainer.stdout.readline().strip() == "ready"
    used = []
    while retrainer.poll() is None or not used:
        figures = run_scoring(settings, warehouse, f"r{len(used)}", AS_OF)  # loads the champion
        used.append(figures["model_version"])
    _, stderr = retrainer.communicate(timeout=60)
    assert retrainer.returncode == 0, stderr

    store = ModelStore(store_dir)
    assert len(used) >= 2
    for version in used:
        store.verify_version(version)  # complete and intact, as when it was scored
    assert set(used) <= {info.version for info in store.list_versions()}
    assert (ledger(warehouse)["status"] == "succeeded").all()
    assert_one_whole_list(warehouse, f"r{len(used) - 1}")
    assert_settled(warehouse, {f"r{len(used) - 1}"})
    warehouse.engine.dispose()


# ----------------------------------------------------------------------------- readers


def read_list(conn, scores: str) -> tuple:
    """(count, distinct run ids, min rank, max rank, a run id) of the current list, one query."""
    return tuple(
        conn.execute(
            text(
                "SELECT count(*), count(DISTINCT run_id), min(rank), max(rank), min(run_id) "
                f"FROM {scores}"
            )
        ).one()
    )


def test_readers_always_see_one_whole_list_while_runs_publish(settings, warehouse):
    stage_runs(warehouse, LOOP_RUNS)
    publish(warehouse, settings, "loop-a")
    scores = warehouse.qualified_name(warehouse.tables.scores)
    reader_engine = create_engine(settings.warehouse_url_value, pool_size=8)
    stop = threading.Event()
    reads: list[tuple] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with reader_engine.connect() as conn:
                while not stop.is_set():
                    reads.append(read_list(conn, scores))
                    conn.rollback()
        except BaseException as error:  # noqa: BLE001 - any error is a failure
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    published = []
    deadline = time.monotonic() + 6
    try:
        while time.monotonic() < deadline and not stop.is_set():
            run_id = list(LOOP_RUNS)[len(published) % len(LOOP_RUNS)]
            publish(warehouse, settings, run_id)
            published.append(run_id)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        reader_engine.dispose()

    assert errors == []
    assert len(published) >= 6 and len(reads) >= 100
    seen = set()
    for count, runs, low, high, run_id in reads:
        assert runs == 1 and low == 1 and high == count == LOOP_RUNS[run_id], (count, run_id)
        seen.add(run_id)
    assert len(seen) >= 2  # the readers really saw lists change under them
    assert_one_whole_list(warehouse, published[-1], LOOP_RUNS[published[-1]])
    assert_settled(warehouse, set(LOOP_RUNS))


@pytest.mark.parametrize("release_after", [None, 0.6])
def test_postgres_reader_in_a_long_transaction_delays_publishing_by_its_lock_timeout(
    tmp_path, postgres_schema, trained_store_dir, release_after
):
    settings = make_settings(
        tmp_path,
        "postgres",
        postgres_schema,
        model_store_dir=trained_store_dir,
        lock_timeout_ms=300,
        publish_retries=1,
    )
    warehouse = init_warehouse(settings)
    stage_runs(warehouse, LOOP_RUNS)
    publish(warehouse, settings, "loop-a")
    before = scores_dump(warehouse)
    scores = warehouse.qualified_name(warehouse.tables.scores)
    reader = warehouse.engine.connect()
    try:
        read_list(reader, scores)  # holds ACCESS SHARE on the list until its transaction ends
        if release_after is not None:
            threading.Timer(release_after, reader.rollback).start()

        started = time.monotonic()
        if release_after is None:
            with pytest.raises(PublicationError, match="LockNotAvailable"):
                publish(warehouse, settings, "loop-b")
        else:
            publish(warehouse, settings, "loop-b")
        elapsed = time.monotonic() - started

        # two attempts of at most 0.3 s each plus one back-off of 0.5 s, with slack for the build
        assert elapsed < 0.3 + 0.5 + 0.3 + 1.5
        if release_after is None:
            assert elapsed >= 0.3 + 0.5 + 0.3
            assert read_list(reader, scores)[4] == "loop-a"  # the reader was never disturbed
            reader.rollback()
            pd.testing.assert_frame_equal(scores_dump(warehouse), before)
            publish(warehouse, settings, "loop-b")
        else:
            assert elapsed >= release_after
    finally:
        reader.close()  # a failing test must not leave a lock that blocks dropping its schema
    assert scores_dump(warehouse)["run_id"].unique().tolist() == ["loop-b"]
    assert history_counts(warehouse)["loop-b"] == LOOP_RUNS["loop-b"]
    assert_no_held_lock(warehouse)
    warehouse.engine.dispose()


def test_sqlite_reader_in_a_long_transaction_keeps_its_snapshot_and_never_blocks(
    tmp_path, trained_store_dir
):
    settings = make_settings(tmp_path, "sqlite", None, model_store_dir=trained_store_dir)
    warehouse = init_warehouse(settings)
    stage_runs(warehouse, LOOP_RUNS)
    publish(warehouse, settings, "loop-a")
    reader = sqlite3.connect(warehouse.engine.url.database, isolation_level=None)
    reader.execute("BEGIN")
    first = reader.execute(
        "SELECT count(*), min(run_id) FROM customer_scores"
    ).fetchone()  # the read transaction now holds a WAL snapshot

    started = time.monotonic()
    publish(warehouse, settings, "loop-b")
    assert time.monotonic() - started < 2.0
    again = reader.execute("SELECT count(*), min(run_id) FROM customer_scores").fetchone()
    assert first == again == (LOOP_RUNS["loop-a"], "loop-a")
    reader.execute("COMMIT")
    fresh = reader.execute("SELECT count(*), min(run_id) FROM customer_scores").fetchone()
    assert fresh == (LOOP_RUNS["loop-b"], "loop-b")
    reader.close()
    assert_no_held_lock(warehouse)
    warehouse.engine.dispose()


def test_grants_of_the_ad_team_survive_each_publication(
    tmp_path, postgres_schema, trained_store_dir
):
    url, schema = postgres_schema
    settings = make_settings(
        tmp_path, "postgres", postgres_schema, model_store_dir=trained_store_dir
    )
    warehouse = init_warehouse(settings)
    stage_runs(warehouse, LOOP_RUNS)
    role = f"ad_team_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} NOLOGIN"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {role}"))
        for relation in ("customer_scores", "campaign_targets", "decile_summary"):
            conn.execute(text(f"GRANT SELECT ON {schema}.{relation} TO {role}"))
    try:
        for run_id in ("loop-a", "loop-b"):
            publish(warehouse, settings, run_id)
            with admin.connect() as conn:
                conn.execute(text(f"SET ROLE {role}"))
                count = conn.execute(text(f"SELECT count(*) FROM {schema}.customer_scores"))
                assert count.scalar_one() == LOOP_RUNS[run_id]
                targets = conn.execute(text(f"SELECT count(*) FROM {schema}.campaign_targets"))
                assert targets.scalar_one() > 0
                conn.execute(text(f"SELECT * FROM {schema}.decile_summary")).all()
                with pytest.raises(Exception, match="permission denied"):
                    conn.execute(text(f"DELETE FROM {schema}.customer_scores"))
                conn.rollback()
    finally:
        warehouse.engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()
