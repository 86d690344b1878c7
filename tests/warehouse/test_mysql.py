"""The MySQL/MariaDB adapter on a real MariaDB: bulk paths, streaming, the swap, the lock.

Each test gets its own database (`mariadb_database`); in CI an unreachable server fails.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, SCORE_REASON_CODES, WINDOW_END
from audiobooks_scoring.model.scoring_model import load_scoring_model
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.warehouse import (
    AnotherRunPublishing,
    CodedColumn,
    PublicationError,
    RunLockLost,
    WarehouseError,
    init_warehouse,
    open_warehouse,
)
from audiobooks_scoring.warehouse.mysql import MySQLAdapter
from tests.conftest import make_settings
from tests.helpers import run_scoring, stream_peak
from tests.reliability.helpers import (
    AS_OF,
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


@pytest.fixture
def my_settings(tmp_path, mariadb_database, trained_store_dir):
    return make_settings(
        tmp_path, "mariadb", mariadb_database, model_store_dir=trained_store_dir, chunk_size=1_000
    )


@pytest.fixture
def mysql(my_settings):
    warehouse = init_warehouse(my_settings)
    assert isinstance(warehouse, MySQLAdapter)
    yield warehouse
    warehouse.dispose()


@pytest.fixture(scope="module")
def scoring_model(trained_store_dir):
    store = ModelStore(trained_store_dir)
    return load_scoring_model(store, store.champion())


def activity_rows(count: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({CUSTOMER_ID: np.arange(1, count + 1, dtype=np.int64)})
    frame[WINDOW_END] = date(2026, 11, 1)
    for name in FEATURES:
        frame[name] = rng.standard_normal(count) * 10.0 ** rng.integers(-300, 300, count)
    return frame


# ----------------------------------------------------------------------------- bulk paths


def test_load_data_and_bulk_read_round_trip_exactly(mysql):
    frame = activity_rows(3_000)
    frame.loc[3, "price_avg"] = 0.1 + 0.2
    frame.loc[4, "completion"] = 5e-324  # the smallest subnormal
    frame.loc[5, "review"] = 1.7976931348623157e308
    frame.loc[6, "minutes_listened"] = np.nan  # NaN is stored as NULL
    frame.loc[7, WINDOW_END] = None
    frame.loc[8, CUSTOMER_ID] = -(2**62)
    with mysql.engine.begin() as conn:
        assert mysql.write_frame(conn, mysql.tables.activity, frame) == len(frame)

    sql = f"SELECT * FROM {mysql.qualified_name(mysql.tables.activity)} ORDER BY customer_id"
    chunks = list(mysql.stream_query(sql, {}, 1_000))
    back = pd.concat(chunks, ignore_index=True)
    expected = frame.sort_values(CUSTOMER_ID, ignore_index=True)
    assert [len(chunk) for chunk in chunks] == [1_000, 1_000, 1_000]
    assert back[CUSTOMER_ID].dtype == np.int64 and back["price_avg"].dtype == np.float64
    assert list(back[CUSTOMER_ID]) == list(expected[CUSTOMER_ID])
    assert list(back[WINDOW_END]) == list(expected[WINDOW_END])
    for name in FEATURES:  # bit for bit, NULL where NaN went in
        got, want = back[name].to_numpy(), expected[name].to_numpy()
        assert np.array_equal(
            got.view(np.int64)[~np.isnan(want)], want.view(np.int64)[~np.isnan(want)]
        )
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
    ids = np.concatenate(list(mysql.stream_customer_ids(sql, {}, 1_000)))
    assert np.array_equal(ids, expected[CUSTOMER_ID].to_numpy())


def test_text_dates_times_and_nulls_survive_load_data(mysql):
    nasty = ["tab\there", "new\nline", "back\\slash", "quote'\"", "\\N", "", "ünïcødé ✓", None]
    rejected_at = datetime(2026, 11, 25, 10, 11, 12, tzinfo=UTC)
    frame = pd.DataFrame(
        {
            "run_id": "run-x",
            CUSTOMER_ID: nasty,
            "reason_code": "not_numeric",
            "reason": ["none" if value is None else value for value in nasty[::-1]],
            "raw_values": [f'{{"v": "{i}\\\\t"}}' for i in range(len(nasty))],
            "rejected_at": rejected_at,
        }
    )
    with mysql.engine.begin() as conn:
        mysql.write_frame(conn, mysql.tables.rejected, frame)
    rejected = mysql.tables.rejected
    back = mysql.read_frame(select(rejected).order_by(rejected.c.raw_values))
    assert [None if pd.isna(v) else v for v in back[CUSTOMER_ID]] == nasty  # NULL stays NULL
    assert back["reason"].tolist() == frame["reason"].tolist()
    assert back["raw_values"].tolist() == frame["raw_values"].tolist()
    assert set(back["rejected_at"]) == {rejected_at.replace(tzinfo=None)}


def test_text_columns_stream_row_by_row_in_bounded_chunks(mysql):
    frame = pd.DataFrame({"run_id": "r", CUSTOMER_ID: [f"id\t{i}" for i in range(25)]})
    frame = frame.assign(
        reason_code="x", reason="y", raw_values="{}", rejected_at=datetime.now(UTC)
    )
    with mysql.engine.begin() as conn:
        mysql.write_frame(conn, mysql.tables.rejected, frame)
    sql = f"SELECT customer_id FROM {mysql.qualified_name(mysql.tables.rejected)}"
    chunks = list(mysql.stream_query(sql, {}, 10, {CUSTOMER_ID: pa.string()}))
    assert [len(chunk) for chunk in chunks] == [10, 10, 5]
    assert sorted(pd.concat(chunks)[CUSTOMER_ID]) == sorted(frame[CUSTOMER_ID])


def test_bulk_writer_batches_coded_columns_and_a_failing_batch_writes_nothing(mysql):
    staging = mysql.tables.staging
    rows = 4
    good = {
        "run_id": "r",
        CUSTOMER_ID: np.arange(rows),
        WINDOW_END: CodedColumn(np.array([0, -1, 0, 0]), (date(2026, 11, 1),)),
        "probability": np.linspace(0, 1, rows),
        "holdout": np.array([True, False, False, True]),
        "reason_1": CodedColumn(np.array([0, 1, -1, 2]), SCORE_REASON_CODES),
        "partition_no": 0,
    }
    with mysql.bulk_writer(staging) as writer:
        for _ in range(3):
            writer.write(good, rows)
    back = mysql.read_frame(select(staging).order_by(staging.c.customer_id))
    assert len(back) == 3 * rows
    assert back["reason_1"].tolist()[:4] == [
        SCORE_REASON_CODES[0],
        SCORE_REASON_CODES[0],
        SCORE_REASON_CODES[0],
        SCORE_REASON_CODES[1],
    ]
    assert back[WINDOW_END].isna().sum() == 3

    with pytest.raises(WarehouseError, match="cannot be null|refused"):
        with mysql.bulk_writer(staging) as writer:
            writer.write(good, rows)
            writer.write({**good, "run_id": None}, rows)  # NOT NULL: the load's warning fails it
            writer.write(good, rows)
    assert mysql.count_rows(staging) == 3 * rows  # the failed writer's batches rolled back
    with pytest.raises(WarehouseError, match="infinite"):
        with mysql.engine.begin() as conn:
            mysql.write_frame(conn, mysql.tables.activity, activity_rows(3).assign(review=np.inf))


def test_the_server_cannot_read_client_files_outside_the_adapters_loads(mysql):
    runs = mysql.tables.runs
    with pytest.raises(Exception, match="LOAD_LOCAL|local_infile|sequence"):
        with mysql.engine.begin() as conn:
            conn.exec_driver_sql(
                f"LOAD DATA LOCAL INFILE '/etc/hostname' "
                f"INTO TABLE {mysql.qualified_name(runs)} (run_id)"
            )
    assert mysql.count_rows(runs) == 0  # the file was never sent


def test_streaming_memory_is_bounded_by_the_chunk_and_early_close_frees_the_connection(mysql):
    with mysql.engine.begin() as conn:
        mysql.write_frame(conn, mysql.tables.activity, activity_rows(10_000))
    small_peak, small_sizes = stream_peak(mysql, AS_OF, 2_000)
    with mysql.engine.begin() as conn:
        more = activity_rows(70_000, seed=1)
        mysql.write_frame(
            conn, mysql.tables.activity, more.assign(customer_id=more.customer_id + 10_000)
        )
    large_peak, large_sizes = stream_peak(mysql, AS_OF, 2_000)
    assert small_sizes == [2_000] * 5 and large_sizes == [2_000] * 40
    # 8x the rows; a reader holding the table would peak about 8x higher. Socket reads vary
    # in size with the server's pace, so the bound leaves room for that, not for the table.
    assert large_peak < 2.5 * small_peak, (small_peak, large_peak)

    sql = mysql.source_sql("customer_activity")
    chunks = mysql.stream_query(sql, {"as_of": AS_OF}, 2_000)
    assert len(next(chunks)) == 2_000
    chunks.close()  # the rest is never read: the connection is discarded, not reused
    assert mysql.count_rows(mysql.tables.activity) == 80_000


# ----------------------------------------------------------------------------- the swap


def build_list(warehouse, run_id: str, rows: int) -> None:
    """A ranked list of `rows` customers built as `<scores>_next`, as a run builds it."""
    with warehouse.engine.begin() as conn:
        table = warehouse.create_list_table(conn)
    ids = np.random.default_rng(rows).permutation(rows) + 1
    columns = {
        CUSTOMER_ID: ids,
        WINDOW_END: CodedColumn(np.zeros(rows, dtype=np.int64), (date(2026, 11, 1),)),
        "probability": np.linspace(1, 0, rows),
        "rank": np.arange(1, rows + 1),
        "decile": np.minimum(np.arange(rows) * 10 // rows + 1, 10).astype(np.int16),
        "is_target": np.arange(rows) < rows // 10,
        "holdout": np.zeros(rows, dtype=bool),
        "reason_1": CodedColumn(np.zeros(rows, dtype=np.int64), SCORE_REASON_CODES),
        "reason_2": CodedColumn(np.full(rows, -1), SCORE_REASON_CODES),
        "reason_3": CodedColumn(np.full(rows, -1), SCORE_REASON_CODES),
    }
    constants = {"model_version": "m1", "run_id": run_id, "scored_at": datetime.now(UTC)}
    columns.update(warehouse.per_row_constants(constants))
    with warehouse.bulk_writer(table) as writer:
        writer.write(columns, rows)
    with warehouse.engine.begin() as conn:
        warehouse.finish_list(conn, table, constants, True)


def test_the_swap_is_atomic_for_a_concurrent_reader(mysql):
    sizes = {"a": 20_000, "b": 30_000}
    seen: list[tuple] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    live = mysql.qualified_name(mysql.tables.scores)
    view = f"{mysql.quote(mysql.tables.schema)}.campaign_targets"

    def read() -> None:
        engine = create_engine(mysql.engine.url)
        try:
            with engine.connect() as conn:
                while not stop.is_set():
                    listed = conn.execute(
                        text(
                            f"SELECT count(*), count(DISTINCT run_id), min(run_id), "
                            f"min(`rank`), max(`rank`), sum(`rank`) FROM {live}"
                        )
                    ).one()
                    targets = conn.execute(text(f"SELECT count(*), min(run_id) FROM {view}")).one()
                    seen.append((*listed, *targets))
                    conn.commit()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            engine.dispose()

    with mysql.run_lock():
        build_list(mysql, "a", sizes["a"])
        mysql.swap_list("a", True)
        reader = threading.Thread(target=read)
        reader.start()
        for run_id in ("b", "a", "b", "a"):
            build_list(mysql, run_id, sizes[run_id])
            mysql.swap_list(run_id, True)
        stop.set()
        reader.join(timeout=60)
    assert not errors, errors
    assert len(seen) > 5
    for count, runs, run_id, low, high, total, targets, target_run in seen:
        assert runs == 1 and count == sizes[run_id], (count, run_id)  # never empty or mixed
        assert (low, high, total) == (1, count, count * (count + 1) // 2)  # never partial
        assert targets == sizes[target_run] // 10  # the view reads whichever list is live
    assert {row[2] for row in seen} == {"a", "b"}
    assert history_counts(mysql) == sizes
    assert leftover_tables(mysql) == []


def test_views_follow_the_switch_and_show_reasons_through_concat(mysql):
    with mysql.run_lock():
        build_list(mysql, "one", 100)
        mysql.swap_list("one", True)
        build_list(mysql, "two", 50)
        mysql.swap_list("two", True)
    schema = mysql.quote(mysql.tables.schema)
    explained = mysql.read_frame(f"SELECT run_id, reasons FROM {schema}.customer_scores_explained")
    assert set(explained["run_id"]) == {"two"} and len(explained) == 50
    assert explained["reasons"].str.len().min() > 0  # one reason label per row
    definition = mysql.read_frame(f"SHOW CREATE VIEW {schema}.customer_scores_explained")
    assert "concat(" in definition.iloc[0, 1].lower() and "||" not in definition.iloc[0, 1]


def test_the_live_view_reads_only_its_runs_partition_and_a_list_is_written_once(mysql):
    with mysql.run_lock():
        for run_id in ("p1", "p2", "p3"):
            build_list(mysql, run_id, 60)
            mysql.swap_list(run_id, True)
    live = mysql.qualified_name(mysql.tables.scores)
    plan = mysql.read_frame(f"EXPLAIN PARTITIONS SELECT count(*) FROM {live}")
    assert plan["partitions"].tolist() == [mysql.partition_name("p3")]
    assert history_counts(mysql) == {"p1": 60, "p2": 60, "p3": 60}
    tables = mysql.read_frame(
        "SELECT table_name, table_type FROM information_schema.TABLES WHERE table_schema = :db",
        {"db": mysql.database},
    )
    kinds = dict(zip(tables["table_name"], tables["table_type"], strict=True))
    assert kinds[mysql.tables.scores.name] == "VIEW"
    assert kinds[mysql.tables.history.name] == "BASE TABLE"
    assert leftover_tables(mysql) == []


def test_tables_of_the_earlier_layout_are_refused_by_name(my_settings):
    engine = create_engine(my_settings.warehouse_url_value)
    schema = my_settings.warehouse_schema
    with engine.begin() as conn:
        conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{schema}`"))
        conn.execute(text(f"CREATE TABLE `{schema}`.customer_scores (customer_id BIGINT)"))
    engine.dispose()
    with pytest.raises(WarehouseError, match="customer_scores in .* earlier layout"):
        init_warehouse(my_settings)


def test_table_grants_survive_the_swap(mysql):
    user = f"reader_{uuid.uuid4().hex[:8]}"
    schema = mysql.tables.schema
    with mysql.engine.begin() as conn:
        conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'"))
        conn.execute(
            text(f"GRANT SELECT ON {mysql.qualified_name(mysql.tables.scores)} TO '{user}'@'%'")
        )
    try:
        with mysql.run_lock():
            for run_id in ("g1", "g2"):
                build_list(mysql, run_id, 40)
                mysql.swap_list(run_id, True)
        granted = mysql.read_frame(
            "SELECT table_name, privilege_type FROM information_schema.TABLE_PRIVILEGES "
            "WHERE grantee = :grantee AND table_schema = :schema",
            {"grantee": f"'{user}'@'%'", "schema": schema},
        )
        assert granted.values.tolist() == [[mysql.tables.scores.name, "SELECT"]]
        url = mysql.engine.url.set(username=user, password=f"pw-{user}", database=schema)
        reader = create_engine(url)
        with reader.connect() as conn:
            runs = (
                conn.execute(
                    text(f"SELECT DISTINCT run_id FROM {mysql.qualified_name(mysql.tables.scores)}")
                )
                .scalars()
                .all()
            )
        reader.dispose()
        assert runs == ["g2"]  # the grant names the table: the swapped-in list is readable
    finally:
        with mysql.engine.begin() as conn:
            conn.execute(text(f"DROP USER '{user}'@'%'"))


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def model_file(scoring_model, tmp_path_factory):
    return save_model_file(scoring_model, tmp_path_factory.mktemp("model") / "model.pickle")


@pytest.mark.parametrize("stage", ["before_commit", "during_switch"])
def test_killed_mid_publish_leaves_a_whole_list_and_the_next_run_completes(
    my_settings, mysql, scoring_model, model_file, tmp_path, stage
):
    fill_activity(mysql, customers=800)
    run_scoring(my_settings, mysql, "before", AS_OF, model=scoring_model)
    before = scores_dump(mysql)
    marker = tmp_path / "paused"
    process = start_scoring_process(my_settings, "killed", model_file, f"{stage}:60", marker)
    assert wait_for_marker(marker, process) == stage
    kill_process(process)

    pd.testing.assert_frame_equal(scores_dump(mysql), before)  # readers still see it whole
    wait_until(lambda: mysql.run_lock_holder() is None, 10, "the killed run's lock to be freed")
    committed = stage == "during_switch"  # killed after its commit point, before the view
    assert ("killed" in history_counts(mysql)) == committed

    figures = run_scoring(my_settings, mysql, "next", AS_OF, model=scoring_model)
    assert figures["status"] == "succeeded"
    history = history_counts(mysql)
    assert set(history) == ({"before", "killed", "next"} if committed else {"before", "next"})
    assert history["next"] == figures["rows_scored"]
    scores = scores_dump(mysql)
    assert set(scores["run_id"]) == {"next"} and list(scores["rank"]) == list(
        range(1, len(scores) + 1)
    )
    assert ledger(mysql).loc["killed", "status"] == "abandoned"
    assert leftover_tables(mysql) == []
    assert mysql.read_frame(select(func.count()).select_from(mysql.swap_table())).iloc[0, 0] == 0


def test_a_second_run_is_refused_naming_the_lock_holder(my_settings, mysql, scoring_model):
    fill_activity(mysql, customers=300)
    with mysql.run_lock():
        holder = mysql.run_lock_holder()
        other = open_warehouse(my_settings)
        with pytest.raises(AnotherRunPublishing, match=f"connection id {holder}"):
            run_scoring(my_settings, other, "second", AS_OF, model=scoring_model)
        other.dispose()
    assert mysql.run_lock_holder() is None
    assert "second" not in ledger(mysql).index  # refused before anything was written


def test_a_killed_lock_session_fails_publication_with_run_lock_lost(
    my_settings, mysql, scoring_model, tmp_path, monkeypatch
):
    fill_activity(mysql, customers=300)
    run_scoring(my_settings, mysql, "before", AS_OF, model=scoring_model)
    before = scores_dump(mysql)
    marker = tmp_path / "paused"
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_AT", "after_staging:2")
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_MARKER", str(marker))
    outcome: dict = {}

    def run() -> None:
        try:
            run_scoring(my_settings, mysql, "orphan", AS_OF, model=scoring_model)
        except BaseException as error:  # noqa: BLE001 - checked below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(marker.exists, 60, "the publication to pause")
    holder = mysql.run_lock_holder()
    with mysql.engine.connect() as conn:
        conn.execute(text(f"KILL {int(holder)}"))
    thread.join(timeout=60)
    assert isinstance(outcome.get("error"), RunLockLost | PublicationError)
    assert "run lock was lost" in str(outcome["error"])
    pd.testing.assert_frame_equal(scores_dump(mysql), before)
    assert "orphan" not in history_counts(mysql)
    assert ledger(mysql).loc["orphan", "status"] == "failed"

    monkeypatch.delenv("AUDIOBOOKS_TEST_PAUSE_AT")
    run_scoring(my_settings, mysql, "again", AS_OF, model=scoring_model)
    assert set(scores_dump(mysql)["run_id"]) == {"again"}
    assert leftover_tables(mysql) == []


# ----------------------------------------------------------------------------- errors


def server_error(engine, *statements: str) -> DBAPIError:
    with engine.connect() as conn:
        for statement in statements[:-1]:
            conn.execute(text(statement))
        with pytest.raises(DBAPIError) as raised:
            conn.execute(text(statements[-1]))
    return raised.value


def test_transient_and_permanent_server_errors(mysql):
    engine, table = mysql.engine, mysql.qualified_name(mysql.tables.runs)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table}_t (id int PRIMARY KEY)"))
        conn.execute(text(f"INSERT INTO {table}_t VALUES (1), (2)"))
    with engine.connect() as holder:
        holder.execute(text(f"SELECT * FROM {table}_t WHERE id = 1 FOR UPDATE"))
        timeout = server_error(
            engine,
            "SET SESSION innodb_lock_wait_timeout = 1",
            f"SELECT * FROM {table}_t WHERE id = 1 FOR UPDATE",
        )
        holder.rollback()
    assert timeout.orig.args[0] == 1205 and mysql.is_transient(timeout)

    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def lock_both(first: int, second: int) -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text(f"SELECT * FROM {table}_t WHERE id = {first} FOR UPDATE"))
                barrier.wait()
                conn.execute(text(f"SELECT * FROM {table}_t WHERE id = {second} FOR UPDATE"))
        except DBAPIError as error:
            errors.append(error)

    threads = [threading.Thread(target=lock_both, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [error.orig.args[0] for error in errors] == [1213] and mysql.is_transient(errors[0])

    with engine.connect() as conn:
        own = conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        with engine.connect() as killer:
            killer.execute(text(f"KILL {own}"))
        with pytest.raises(DBAPIError) as raised:
            conn.execute(text("SELECT 1"))
    lost = raised.value
    assert lost.orig.args[0] in (2006, 2013) and mysql.is_transient(lost)

    url = mysql.engine.url
    cases = {
        2003: url.set(port=1),
        1045: url.set(username="no_such_user", password="x"),
        1049: url.set(database="no_such_database"),
    }
    for code, bad_url in cases.items():
        bad = MySQLAdapter.create_engine(bad_url.render_as_string(hide_password=False))
        with pytest.raises(DBAPIError) as raised:
            bad.connect()
        bad.dispose()
        assert raised.value.orig.args[0] == code
        assert mysql.is_transient(raised.value) == (code == 2003), code
    syntax = server_error(engine, "SELEC 1")
    assert not mysql.is_transient(syntax)


# ----------------------------------------------------------------------------- generic


def test_generic_adapter_runs_a_whole_scoring_run_on_mariadb(my_settings, scoring_model):
    settings = my_settings.model_copy(update={"warehouse_adapter": "generic"})
    warehouse = init_warehouse(settings)
    assert warehouse.name == "generic" and warehouse.dialect.name in ("mysql", "mariadb")
    rows = fill_activity(warehouse, customers=400)
    figures = run_scoring(settings, warehouse, "generic-run", AS_OF, model=scoring_model)
    assert figures["status"] == "succeeded" and figures["rows_in"] == rows
    scores = scores_dump(warehouse)
    assert len(scores) == figures["rows_scored"] and set(scores["run_id"]) == {"generic-run"}
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert history_counts(warehouse) == {"generic-run": len(scores)}
    warehouse.dispose()
