"""The DuckDB adapter on a real DuckDB file: Arrow reads and writes, the swap, the file locks.

These tests always run on DuckDB (whatever AUDIOBOOKS_TEST_ENGINES says); the shared
engine-parametrized tests run on DuckDB too (one of the default AUDIOBOOKS_TEST_ENGINES).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

try:
    import duckdb  # noqa: F401 - the engine
    import duckdb_engine  # noqa: F401 - the SQLAlchemy dialect the adapter runs on
except ImportError:  # pragma: no cover - CI installs them, so there it fails instead
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "duckdb and duckdb-engine are not installed (pip install duckdb duckdb-engine)",
        allow_module_level=True,
    )

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, SCORE_REASON_CODES, WINDOW_END
from audiobooks_scoring.inputs.demo_data import iter_demo_activity
from audiobooks_scoring.warehouse import (
    AnotherRunPublishing,
    CodedColumn,
    GenericAdapter,
    RunLockLost,
    WarehouseError,
    init_warehouse,
    open_warehouse,
)
from audiobooks_scoring.warehouse.duckdb import DuckDBAdapter, is_file_lock_error
from tests.conftest import make_settings
from tests.helpers import run_scoring, stream_peak
from tests.test_pipeline import VALID_ROW

AS_OF = date(2026, 11, 25)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def duck_settings(tmp_path):
    """Settings of a DuckDB file (no model store: the tests that score ask for one)."""
    return make_settings(tmp_path, "duckdb", None, chunk_size=1_000)


@pytest.fixture
def duck(duck_settings):
    """An initialised DuckDB warehouse."""
    warehouse = init_warehouse(duck_settings)
    yield warehouse
    warehouse.dispose()


@pytest.fixture
def scoring_settings(tmp_path, trained_store_dir):
    """Settings of a DuckDB file with the shared trained model store."""
    return make_settings(
        tmp_path, "duckdb", None, model_store_dir=trained_store_dir, chunk_size=1_000
    )


def database_path(warehouse) -> str:
    return warehouse.engine.url.database


def activity_frame(count: int, window_end: date = date(2026, 11, 1), seed: int = 0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({CUSTOMER_ID: np.arange(1, count + 1, dtype=np.int64)})
    frame[WINDOW_END] = window_end
    for name in FEATURES:
        frame[name] = rng.random(count) * 1000
    return frame


def fill_demo(warehouse, customers: int, window_end: date, seed: int = 5) -> int:
    frame = pd.concat(list(iter_demo_activity(customers, seed, window_end, 100_000)))
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, frame)
    return len(frame)


def count_cursor_executes(engine) -> list[str]:
    """Statements SQLAlchemy sends through the DB-API cursor from now on."""
    seen: list[str] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: seen.append(statement),
    )
    return seen


def run_python(code: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **env},
    )


# ----------------------------------------------------------------------------- the adapter


def test_a_duckdb_url_opens_the_duckdb_adapter_without_a_pool(duck):
    assert isinstance(duck, DuckDBAdapter)
    assert (duck.name, duck.dialect.name, duck.list_writers) == ("duckdb", "duckdb", 1)
    assert isinstance(duck.engine.pool, NullPool)
    assert not duck.tables.history.indexes  # zone maps, not ART indexes, find a run's rows
    with duck.engine.connect() as conn:
        views = conn.execute(text("SELECT view_name FROM duckdb_views() WHERE NOT internal"))
        assert {row[0] for row in views} >= {"campaign_targets", "decile_summary"}
    # nothing holds the file between operations: another process opens it at once
    opened = run_python(
        f"import duckdb; duckdb.connect({database_path(duck)!r}).close(); print('opened')"
    )
    assert opened.stdout.strip() == "opened", opened.stderr


# ----------------------------------------------------------------------------- reads


class CountingReader:
    """An Arrow reader that counts the rows DuckDB has handed over so far."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.rows = 0

    def __iter__(self):
        for batch in self.reader:
            self.rows += batch.num_rows
            yield batch

    def close(self) -> None:
        self.reader.close()


def test_arrow_reads_stream_exact_chunks_pulled_as_they_are_consumed(duck, monkeypatch):
    rows, chunk_size = 250_000, 100_000  # DuckDB's own batches (~122,880 rows) do not align
    with duck.engine.begin() as conn:
        duck.write_frame(conn, duck.tables.activity, activity_frame(rows))
    readers: list[CountingReader] = []
    arrow_reader = DuckDBAdapter._arrow_reader

    def counting(self, *args):
        readers.append(CountingReader(arrow_reader(self, *args)))
        return readers[-1]

    monkeypatch.setattr(DuckDBAdapter, "_arrow_reader", counting)
    sql = duck.source_sql("customer_activity")
    types = {CUSTOMER_ID: pa.float64(), WINDOW_END: pa.date32()}
    statements = count_cursor_executes(duck.engine)
    sizes, pulled_when_yielded = [], []
    for chunk in duck.stream_query(sql, {"as_of": AS_OF}, chunk_size, types):
        sizes.append(len(chunk))
        pulled_when_yielded.append(readers[0].rows)
        assert chunk[CUSTOMER_ID].dtype == np.float64  # cast as asked
        assert isinstance(chunk[WINDOW_END].iloc[0], date)
    assert sizes == [100_000, 100_000, 50_000]
    # pulled from DuckDB as consumed: never more than the chunk plus one of DuckDB's batches
    for index, pulled in enumerate(pulled_when_yielded):
        assert pulled < (index + 1) * chunk_size + 131_072, pulled_when_yielded
    assert pulled_when_yielded[0] < rows
    assert statements == []  # nothing went through SQLAlchemy's row-by-row cursor

    ids = np.concatenate(list(duck.stream_customer_ids(sql, {"as_of": AS_OF}, 7_000)))
    assert ids.dtype == np.int64 and np.array_equal(np.sort(ids), np.arange(1, rows + 1))


def test_read_memory_is_bounded_by_the_chunk_not_the_population(duck):
    small, large, chunk_size = 30_000, 300_000, 10_000
    with duck.engine.begin() as conn:
        duck.write_frame(conn, duck.tables.activity, activity_frame(small, date(2026, 10, 1)))
        duck.write_frame(conn, duck.tables.activity, activity_frame(large, date(2026, 11, 1)))
    small_peak, small_sizes = stream_peak(duck, date(2026, 10, 15), chunk_size)
    large_peak, large_sizes = stream_peak(duck, AS_OF, chunk_size)
    assert (sum(small_sizes), sum(large_sizes)) == (small, large)
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)
    assert large_peak < large * len(FEATURES) * 8 / 5  # far below the population's size


def test_query_columns_reads_numeric_and_text_types_from_the_arrow_schema(duck):
    sql = (
        "SELECT CAST(customer_id AS VARCHAR) AS customer_id, price_avg, "
        "CAST(review AS DECIMAL(6, 2)) AS review, CAST(completion AS INTEGER) AS completion, "
        f"window_end FROM {duck.qualified_name(duck.tables.activity)} "
        "WHERE window_end <= :as_of"
    )
    assert duck.query_columns(sql, {"as_of": AS_OF}) == {
        CUSTOMER_ID: False,
        "price_avg": True,
        "review": True,
        "completion": True,
        WINDOW_END: False,
    }


def test_parameters_are_bound_never_written_into_the_sql(duck):
    odd = "it's; DROP TABLE customer_activity; --"
    frames = list(
        duck.stream_query(
            "SELECT :text AS text, :day AS day, :text = :text AS same",
            {"text": odd, "day": AS_OF},
            10,
        )
    )
    assert frames[0].to_dict("records") == [{"text": odd, "day": AS_OF, "same": True}]
    assert duck.count_rows(duck.tables.activity) == 0  # still there, and empty


# ----------------------------------------------------------------------------- writes


def test_write_frame_round_trips_exactly_through_arrow(duck):
    frame = activity_frame(1_000)
    extremes = [0.1 + 0.2, 1e-300, 5e-324, -0.0, 1.7976931348623157e308, 2.0**53 + 1]
    frame.loc[: len(extremes) - 1, "price_avg"] = extremes
    frame.loc[10, "completion"] = np.nan  # NaN is stored as NULL
    frame.loc[11, WINDOW_END] = None
    statements = count_cursor_executes(duck.engine)
    with duck.engine.begin() as conn:
        assert duck.write_frame(conn, duck.tables.activity, frame) == len(frame)
    assert statements == []  # one Arrow insert on the raw connection, no executemany
    activity = duck.tables.activity
    back = duck.read_frame(select(activity).order_by(activity.c[CUSTOMER_ID]))
    assert np.array_equal(
        back["price_avg"].to_numpy()[: len(extremes)].view(np.int64),
        np.array(extremes).view(np.int64),  # bit for bit (-0.0 and subnormals included)
    )
    assert pd.isna(back.loc[10, "completion"]) and pd.isna(back.loc[11, WINDOW_END])
    back[WINDOW_END] = [None if pd.isna(v) else pd.Timestamp(v).date() for v in back[WINDOW_END]]
    pd.testing.assert_frame_equal(back, frame, check_exact=True, check_dtype=False)

    rejected_at = datetime(2026, 11, 25, 6, 30, 1, 123456, tzinfo=UTC)
    texts = pd.DataFrame(
        {
            "run_id": ["run-'1'", 'run-"2"'],
            CUSTOMER_ID: ["12", None],
            "reason_code": ["missing_value", "négatif ✓"],
            "reason": ["a\nnew line", "a; DROP TABLE x; --"],
            "raw_values": ['{"a": 1}', "{}"],
            "rejected_at": rejected_at,
        }
    )
    with duck.engine.begin() as conn:
        duck.write_frame(conn, duck.tables.rejected, texts)
    rejected = duck.tables.rejected
    back = duck.read_frame(select(rejected).order_by(rejected.c.run_id.desc()))
    assert back.drop(columns="rejected_at").to_dict("records") == texts.drop(
        columns="rejected_at"
    ).to_dict("records")
    assert [pd.Timestamp(v) for v in back["rejected_at"]] == [pd.Timestamp(rejected_at)] * 2


def test_write_columns_stores_codes_and_constants_exactly(duck):
    rows = 20_000
    rng = np.random.default_rng(1)
    reasons = rng.integers(-1, len(SCORE_REASON_CODES), size=(rows, 3))
    windows = rng.integers(-1, 2, size=rows)
    ids = rng.permutation(rows).astype(np.int64) + 10**12
    probability = rng.random(rows)
    columns = {
        "run_id": "it's run 7",
        CUSTOMER_ID: ids,
        WINDOW_END: CodedColumn(windows, (date(2026, 11, 1), date(2026, 5, 1))),
        "probability": probability,
        "holdout": probability < 0.1,
        "partition_no": np.int16(3),
    }
    for slot in range(3):
        columns[f"reason_{slot + 1}"] = CodedColumn(reasons[:, slot], SCORE_REASON_CODES)
    with duck.bulk_writer(duck.tables.staging) as writer:
        writer.write(columns, rows)
    staging = duck.tables.staging
    back = duck.read_frame(select(staging).order_by(staging.c[CUSTOMER_ID]))
    order = np.argsort(ids)
    assert np.array_equal(back[CUSTOMER_ID].to_numpy(), ids[order])
    assert np.array_equal(back["probability"].to_numpy(), probability[order])
    assert np.array_equal(back["holdout"].to_numpy(dtype=bool), (probability < 0.1)[order])
    assert set(back["run_id"]) == {"it's run 7"} and set(back["partition_no"]) == {3}
    for slot in range(3):
        expected = CodedColumn(reasons[:, slot], SCORE_REASON_CODES).decoded()[order]
        got = back[f"reason_{slot + 1}"].to_numpy(dtype=object)
        assert [None if pd.isna(v) else v for v in got] == list(expected)
    dates = [None if pd.isna(v) else pd.Timestamp(v).date() for v in back[WINDOW_END]]
    assert dates == list(
        CodedColumn(windows, (date(2026, 11, 1), date(2026, 5, 1))).decoded()[order]
    )


def test_a_bulk_writer_is_one_transaction_so_a_failing_batch_writes_nothing(duck):
    good = {
        "run_id": "r",
        CUSTOMER_ID: np.arange(3),
        "probability": np.full(3, 0.5),
        "holdout": np.zeros(3, dtype=bool),
        "partition_no": 0,
    }
    with pytest.raises(DBAPIError, match="NOT NULL"):
        with duck.bulk_writer(duck.tables.staging) as writer:
            for _ in range(5):
                writer.write(good, 3)
            writer.write({**good, "run_id": None}, 3)  # NOT NULL column: DuckDB refuses
    assert duck.count_rows(duck.tables.staging) == 0


# ----------------------------------------------------------------------------- the lock


def test_the_run_lock_is_a_file_lock_and_holds_the_database_file(duck, duck_settings):
    path = database_path(duck)
    other_run = f"""
        from audiobooks_scoring.settings import Settings
        from audiobooks_scoring.warehouse import AnotherRunPublishing, open_warehouse
        warehouse = open_warehouse(Settings(warehouse_url={duck_settings.warehouse_url_value!r}))
        try:
            with warehouse.run_lock():
                print("locked")
        except AnotherRunPublishing as busy:
            print("skipped:", busy)
    """
    reader = f"""
        import duckdb
        try:
            duckdb.connect({path!r}, read_only=True).close()
            print("opened")
        except duckdb.IOException as error:
            print("refused:", error)
    """
    with duck.run_lock():
        assert duck.lock_path() == Path(f"{path}.customer_scores.lock")
        with pytest.raises(AnotherRunPublishing, match="another run is publishing"):
            with duck.run_lock():
                pass
        second = run_python(other_run)
        assert second.stdout.startswith("skipped: another run is publishing"), second.stderr
        refused = run_python(reader)
        assert refused.stdout.startswith("refused:") and "Could not set lock" in refused.stdout
    assert run_python(reader).stdout.strip() == "opened"
    assert run_python(other_run).stdout.strip() == "locked"
    with pytest.raises(RunLockLost, match="under the run lock"):
        duck.swap_list("no-lock", True)


def hold_file(path: str, seconds: float) -> subprocess.Popen:
    """A marketer's read-only session holding the file for `seconds`; ready once it prints."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time, duckdb
                con = duckdb.connect({path!r}, read_only=True)
                print(con.execute("SELECT count(*) FROM customer_scores").fetchone()[0], flush=True)
                time.sleep({seconds})
                con.close()
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip().isdigit()
    return process


def test_a_reader_holding_the_file_delays_the_job_a_bounded_time(duck, duck_settings):
    path = database_path(duck)
    reader = hold_file(path, 1.0)
    started = time.monotonic()
    with duck.run_lock():  # waits for the reader (lock_timeout_ms is 5 s), then holds the file
        waited = time.monotonic() - started
    reader.wait(timeout=30)
    assert 0.5 < waited < 5.0, waited

    impatient = DuckDBAdapter.open(duck_settings.model_copy(update={"lock_timeout_ms": 300}))
    reader = hold_file(path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(WarehouseError, match="Could not set lock on file") as refused:
            with impatient.run_lock():
                pass
        assert time.monotonic() - started < 3.0
        assert "nothing was written" in str(refused.value)
        assert not impatient.lock_path().exists() or _flock_is_free(impatient.lock_path())
        with pytest.raises(DBAPIError) as raised:
            impatient.count_rows(impatient.tables.scores)
        assert is_file_lock_error(raised.value)
        assert impatient.is_transient(raised.value)  # the publication retries these
    finally:
        reader.kill()
        reader.wait()
    with duck.engine.connect() as conn, pytest.raises(DBAPIError) as syntax:
        conn.execute(text("SELEC 1"))
    assert not duck.is_transient(syntax.value)


def _flock_is_free(path: Path) -> bool:
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


# ----------------------------------------------------------------------------- publishing

READER = """
import json, sys, time, duckdb
path, stop = sys.argv[1], sys.argv[2]
import os
while not os.path.exists(stop):
    try:
        con = duckdb.connect(path, read_only=True)
        try:
            row = con.execute(
                "SELECT count(*), count(DISTINCT run_id), min(run_id), min(rank), max(rank), "
                "count(DISTINCT rank) FROM customer_scores"
            ).fetchone()
            deciles = con.execute("SELECT sum(customers) FROM decile_summary").fetchone()[0]
            targets = con.execute("SELECT count(*) FROM campaign_targets").fetchone()[0]
        finally:
            con.close()
        print(json.dumps({"rows": row[0], "runs": row[1], "run_id": row[2], "min_rank": row[3],
                          "max_rank": row[4], "ranks": row[5], "deciles": int(deciles or 0),
                          "targets": targets}), flush=True)
    except duckdb.Error as error:
        print(json.dumps({"error": str(error)}), flush=True)
    time.sleep(0.01)
"""


def test_a_reader_process_sees_the_old_or_the_new_whole_list_or_a_lock_error(
    scoring_settings, tmp_path, monkeypatch
):
    warehouse = init_warehouse(scoring_settings)
    fill_demo(warehouse, 1_500, date(2026, 11, 1))
    old = run_scoring(scoring_settings, warehouse, "old", date(2026, 11, 10))
    fill_demo(warehouse, 2_000, date(2026, 11, 20), seed=6)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, database_path(warehouse), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = [json.loads(reader.stdout.readline())]
    monkeypatch.setenv("AUDIOBOOKS_TEST_PAUSE_AT", "during_swap:0.5")
    new = run_scoring(scoring_settings, warehouse, "new", AS_OF)
    monkeypatch.delenv("AUDIOBOOKS_TEST_PAUSE_AT")
    while seen[-1].get("run_id") != "new":
        seen.append(json.loads(reader.stdout.readline()))
    stop.touch()
    seen += [json.loads(line) for line in reader.stdout]
    reader.wait(timeout=30)

    lists = {"old": old, "new": new}
    kinds = []
    for observed in seen:
        if "error" in observed:
            assert "Could not set lock on file" in observed["error"], observed
            kinds.append("locked")
            continue
        figures = lists.get(observed["run_id"])
        assert figures is not None, f"neither the old nor the new whole list: {observed}"
        assert observed == {
            "rows": figures["rows_scored"],
            "runs": 1,
            "run_id": observed["run_id"],
            "min_rank": 1,
            "max_rank": figures["rows_scored"],
            "ranks": figures["rows_scored"],
            "deciles": figures["rows_scored"],
            "targets": figures["targets"],
        }
        kinds.append(observed["run_id"])
    assert old["rows_scored"] != new["rows_scored"]
    assert kinds[0] == "old" and kinds[-1] == "new" and "locked" in kinds
    assert kinds.index("new") > max(i for i, kind in enumerate(kinds) if kind == "old")
    warehouse.dispose()


def test_customer_index_is_made_on_the_live_list_after_the_rename(scoring_settings):
    settings = scoring_settings.model_copy(update={"customer_index": True})
    warehouse = init_warehouse(settings)
    fill_demo(warehouse, 600, date(2026, 11, 1))
    valid = {**VALID_ROW, CUSTOMER_ID: 900_100}
    twice = pd.DataFrame([valid, {**valid, "price_avg": 5.0}])
    with warehouse.engine.begin() as conn:  # one id twice: ranked again in the warehouse
        warehouse.write_frame(conn, warehouse.tables.activity, twice)
    first = run_scoring(settings, warehouse, "first", AS_OF)
    assert (first["rows_in"], first["rows_rejected"]) == (662, 2)
    second = run_scoring(settings, warehouse, "second", AS_OF)
    with warehouse.engine.connect() as conn:
        indexes = conn.execute(
            text("SELECT table_name, index_name, is_unique FROM duckdb_indexes() ORDER BY 1, 2")
        ).all()
        tables = {row[0] for row in conn.execute(text("SELECT table_name FROM duckdb_tables()"))}
    assert ("customer_scores", "customer_scores_customer", True) in indexes
    assert not [row for row in indexes if row[0] == "customer_score_history"]
    assert "customer_scores_next" not in tables
    history = warehouse.tables.history
    counts = warehouse.read_frame(
        select(history.c.run_id, func.count()).group_by(history.c.run_id).order_by("run_id")
    )
    assert counts.values.tolist() == [["first", 660], ["second", 660]]
    assert first["rows_scored"] == second["rows_scored"] == 660
    warehouse.dispose()


def test_the_generic_adapter_runs_a_whole_scoring_run_on_duckdb(scoring_settings):
    duck = init_warehouse(scoring_settings)
    fill_demo(duck, 400, date(2026, 11, 1))
    run_scoring(scoring_settings, duck, "duck", AS_OF)
    by_duck = duck.read_frame(select(duck.tables.scores).order_by(duck.tables.scores.c.rank))
    duck.dispose()

    generic_settings = scoring_settings.model_copy(update={"warehouse_adapter": "generic"})
    generic = open_warehouse(generic_settings)
    assert type(generic) is GenericAdapter and generic.dialect.name == "duckdb"
    figures = run_scoring(generic_settings, generic, "generic", AS_OF)
    scores = generic.tables.scores
    by_generic = generic.read_frame(select(scores).order_by(scores.c.rank))
    assert figures["status"] == "succeeded" and figures["rows_scored"] == len(by_duck) == 440
    assert set(by_generic["run_id"]) == {"generic"}
    for column in (CUSTOMER_ID, "rank", "decile", "probability", "is_target", "holdout"):
        assert by_generic[column].tolist() == by_duck[column].tolist(), column
    history = generic.tables.history
    runs = generic.read_frame(
        select(history.c.run_id, func.count()).group_by(history.c.run_id).order_by("run_id")
    )
    assert runs.values.tolist() == [["duck", 440], ["generic", 440]]
    targets = generic.read_frame("SELECT count(*) AS n FROM campaign_targets").iloc[0, 0]
    assert targets == figures["targets"]
    lock_rows = generic.read_frame("SELECT count(*) AS n FROM customer_scores_run_lock")
    assert lock_rows.iloc[0, 0] == 0  # the portable lock row is gone after the run
    generic.dispose()


def test_views_create_and_compute_on_duckdb(duck):
    frame = pd.DataFrame(
        {
            CUSTOMER_ID: [1, 2, 3],
            WINDOW_END: date(2026, 11, 1),
            "probability": [0.123456789, 0.5, 0.9],
            "rank": [3, 2, 1],
            "decile": [1, 1, 1],
            "is_target": [False, True, True],
            "holdout": [True, False, False],
            "reason_1": [SCORE_REASON_CODES[0], None, SCORE_REASON_CODES[1]],
            "reason_2": None,
            "reason_3": None,
            "model_version": "v",
            "run_id": "r",
            "scored_at": datetime(2026, 11, 25, tzinfo=UTC),
        }
    )
    with duck.engine.begin() as conn:
        duck.write_frame(conn, duck.tables.scores, frame)
    summary = duck.read_frame("SELECT * FROM decile_summary").iloc[0]
    assert summary["customers"] == 3 and summary["targets"] == 2
    assert float(summary["min_probability"]) == 0.1235
    assert summary["expected_buyers"] == pytest.approx(0.123456789 + 0.5 + 0.9, abs=0)
    targets = duck.read_frame("SELECT * FROM campaign_targets ORDER BY rank")
    assert targets[CUSTOMER_ID].tolist() == [3, 2]
    explained = duck.read_frame("SELECT customer_id, reasons FROM customer_scores_explained")
    assert explained.set_index(CUSTOMER_ID)["reasons"].notna().tolist() == [True, False, True]
