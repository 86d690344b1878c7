"""Helpers of the reliability tests: a scoring run in a real subprocess, table dumps, state checks.

Run as a script, this module is one scoring run (`python -m tests.reliability.helpers --run-id
R --as-of D`), configured like production from `AUDIOBOOKS_*` environment variables. It calls
`audiobooks_scoring.pipeline.run_scoring`, the library sequence the `score_customers` flow
runs as tasks (run lock, ledger start, clearing staging, loading the champion, staging,
duplicate rejection, run gates, publication, ledger end). The last line it prints is a JSON
outcome; the exit code is 0 (succeeded), 3 (another run is publishing) or 1 (failed).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine, func, inspect, select, text

from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import AnotherRunPublishing, WarehouseAdapter
from audiobooks_scoring.warehouse.mysql import MySQLAdapter
from audiobooks_scoring.warehouse.postgres import lock_key

REPO_ROOT = Path(__file__).resolve().parents[2]
AS_OF = date(2026, 11, 25)
WINDOW = date(2026, 11, 1)
EXIT_SKIPPED = 3
LEFTOVER_SUFFIXES = ("_next", "_old")


# ----------------------------------------------------------------------------- warehouse data


def fill_activity(warehouse: WarehouseAdapter, customers: int = 1_500, seed: int = 5) -> int:
    """Write demo activity of `customers` customers; the number of rows written."""
    from audiobooks_scoring.inputs.demo_data import iter_demo_activity

    frame = pd.concat(list(iter_demo_activity(customers, seed, WINDOW, 100_000)))
    with warehouse.engine.begin() as conn:
        warehouse.write_frame(conn, warehouse.tables.activity, frame)
    return len(frame)


def scores_dump(warehouse: WarehouseAdapter) -> pd.DataFrame:
    """The whole current list, every column, in rank order."""
    scores = warehouse.tables.scores
    return warehouse.read_frame(select(scores).order_by(scores.c.rank, scores.c.customer_id))


def ledger(warehouse: WarehouseAdapter) -> pd.DataFrame:
    """The `scoring_runs` ledger indexed by run id."""
    return warehouse.read_frame(select(warehouse.tables.runs)).set_index("run_id")


def rejected_counts(warehouse: WarehouseAdapter) -> dict[str, int]:
    """Rows in `rejected_rows` per run id."""
    rejected = warehouse.tables.rejected
    frame = warehouse.read_frame(
        select(rejected.c.run_id, func.count().label("n")).group_by(rejected.c.run_id),
    )
    return dict(zip(frame["run_id"], frame["n"].astype(int), strict=True))


def staged_counts(warehouse: WarehouseAdapter) -> dict[str, int]:
    """Rows in the staging table per run id."""
    staging = warehouse.tables.staging
    frame = warehouse.read_frame(
        select(staging.c.run_id, func.count().label("n")).group_by(staging.c.run_id),
    )
    return dict(zip(frame["run_id"], frame["n"].astype(int), strict=True))


def history_counts(warehouse: WarehouseAdapter) -> dict[str, int]:
    """Rows in the history table per run id."""
    history = warehouse.tables.history
    frame = warehouse.read_frame(
        select(history.c.run_id, func.count().label("n")).group_by(history.c.run_id),
    )
    return dict(zip(frame["run_id"], frame["n"].astype(int), strict=True))


# ----------------------------------------------------------------------------- state checks


def assert_accounting(warehouse: WarehouseAdapter) -> pd.DataFrame:
    """Every ledger row with counts: rows_in = scored + rejected, and rejects are all stored."""
    runs = ledger(warehouse)
    rejected = rejected_counts(warehouse)
    counted = runs[runs["rows_in"].notna()]
    for run_id, row in counted.iterrows():
        assert row["rows_in"] == row["rows_scored"] + row["rows_rejected"], (run_id, row)
        assert rejected.get(run_id, 0) == row["rows_rejected"], (run_id, rejected)
    return runs


def leftover_tables(warehouse: WarehouseAdapter) -> list[str]:
    """Tables a publication builds or renames on the side (`<scores>_next`, `<scores>_old`)."""
    names = inspect(warehouse.engine).get_table_names(schema=warehouse.tables.schema)
    base = warehouse.tables.scores.name
    return sorted(name for name in names if name in {base + s for s in LEFTOVER_SUFFIXES})


def advisory_locks(engine: Engine, warehouse: WarehouseAdapter) -> list[tuple[int, bool]]:
    """(pid, granted) of every pg_locks entry on the run lock key of this warehouse."""
    key = lock_key(warehouse.tables)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
            ),
            {"high": key >> 32, "low": key & 0xFFFFFFFF},
        ).all()
    return [(int(pid), bool(granted)) for pid, granted in rows]


def run_lock_is_free(warehouse: WarehouseAdapter) -> bool:
    """Whether the run lock can be taken right now: taken through the adapter and freed.

    Whatever the lock is (a lock file, an advisory or named lock, a lock-table row), a lock
    that is free can be taken; `AnotherRunPublishing` means that something holds it.
    """
    try:
        with warehouse.run_lock():
            return True
    except AnotherRunPublishing:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 50 ms; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def assert_no_held_lock(warehouse: WarehouseAdapter, timeout: float = 10.0) -> None:
    """No session holds the run lock (a dead client's session may take a moment to end).

    On PostgreSQL no session holds or waits for the advisory lock (pg_locks); on MySQL and
    MariaDB `IS_USED_LOCK` names no session; on every engine the run lock can be taken.
    """
    if warehouse.name == "postgresql":
        wait_until(
            lambda: not advisory_locks(warehouse.engine, warehouse), timeout, "no advisory lock"
        )
    if isinstance(warehouse, MySQLAdapter):
        wait_until(lambda: warehouse.run_lock_holder() is None, timeout, "a free GET_LOCK lock")
    wait_until(lambda: run_lock_is_free(warehouse), timeout, "a free run lock")


def assert_settled(warehouse: WarehouseAdapter, staged_runs: set[str]) -> None:
    """No side tables, staging holds only `staged_runs`, no held lock, accounting holds."""
    assert leftover_tables(warehouse) == []
    assert set(staged_counts(warehouse)) <= staged_runs
    assert_no_held_lock(warehouse)
    assert_accounting(warehouse)


def assert_one_whole_list(
    warehouse: WarehouseAdapter, run_id: str, rows: int | None = None
) -> pd.DataFrame:
    """The current list is all of `run_id` (`rows`, else its ledger's rows_scored), ranked 1..n."""
    scores = scores_dump(warehouse)
    expected = int(ledger(warehouse).loc[run_id, "rows_scored"]) if rows is None else rows
    assert len(scores) == expected > 0
    assert set(scores["run_id"]) == {run_id}
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert scores["customer_id"].is_unique
    assert history_counts(warehouse)[run_id] == len(scores)
    return scores


# ----------------------------------------------------------------------------- subprocess runs


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a subprocess load `settings` (plus extra variables)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUDIOBOOKS_")}
    env.update(
        AUDIOBOOKS_DATA_DIR=str(settings.data_dir),
        AUDIOBOOKS_WAREHOUSE_URL=settings.warehouse_url_value,
        AUDIOBOOKS_CHUNK_SIZE=str(settings.chunk_size),
        AUDIOBOOKS_MODEL_STORE_DIR=str(settings.model_store_path),
        AUDIOBOOKS_LOCK_TIMEOUT_MS=str(settings.lock_timeout_ms),
        AUDIOBOOKS_PUBLISH_RETRIES=str(settings.publish_retries),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(REPO_ROOT),
    )
    if settings.warehouse_schema:
        env["AUDIOBOOKS_WAREHOUSE_SCHEMA"] = settings.warehouse_schema
    env.update(extra)
    return env


def start_scoring_process(
    settings: Settings,
    run_id: str,
    model_file: Path | None = None,
    pause: str | None = None,
    marker: Path | None = None,
    go_file: Path | None = None,
) -> subprocess.Popen:
    """A real scoring process, optionally pausing at a publication stage (`stage:seconds`)."""
    extra = {}
    if pause:
        extra["AUDIOBOOKS_TEST_PAUSE_AT"] = pause
    if marker:
        extra["AUDIOBOOKS_TEST_PAUSE_MARKER"] = str(marker)
    command = [sys.executable, "-m", "tests.reliability.helpers", "--run-id", run_id]
    command += ["--as-of", AS_OF.isoformat()]
    if model_file is not None:
        command += ["--model-file", str(model_file)]
    if go_file is not None:
        command += ["--go-file", str(go_file)]
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=settings_env(settings, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_marker(marker: Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The stage written to `marker` by a paused process; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()):
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"process ended ({process.returncode}) before pausing: {stderr}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"process did not pause within {timeout}s")
        time.sleep(0.02)
    return marker.read_text()


def kill_process(process: subprocess.Popen) -> None:
    """SIGKILL a process and reap it."""
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def outcome_of(process: subprocess.Popen, timeout: float = 120.0) -> dict:
    """The JSON outcome a finished scoring process printed last, with its exit code."""
    stdout, stderr = process.communicate(timeout=timeout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no outcome (exit {process.returncode}): {stderr[-3000:]}"
    return {**json.loads(lines[-1]), "exit_code": process.returncode, "stderr": stderr}


def save_model_file(model, path: Path) -> Path:
    """Hand a loaded `ScoringModel` to subprocesses (saves each one importing TensorFlow)."""
    path.write_bytes(pickle.dumps(model))
    return path


def emit(document: dict) -> None:
    """Write one JSON line to stdout for the parent test."""
    sys.stdout.write(json.dumps(document, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """One scoring run configured from the environment; prints a JSON outcome."""
    import logging

    from audiobooks_scoring.pipeline import ScoringRun, run_scoring
    from audiobooks_scoring.settings import load_settings
    from audiobooks_scoring.warehouse import open_warehouse

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--as-of", type=date.fromisoformat, required=True)
    parser.add_argument("--model-file", type=Path)
    parser.add_argument("--go-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = load_settings()
    warehouse = open_warehouse(settings)
    model = pickle.loads(args.model_file.read_bytes()) if args.model_file else None
    if args.go_file is not None:
        emit({"ready": True})
        while not args.go_file.exists():
            time.sleep(0.001)
    try:
        run = ScoringRun(settings, warehouse, args.run_id, args.as_of, publish=True)
        figures = run_scoring(run, model=model, write_report=False).to_dict()
    except AnotherRunPublishing as busy:
        emit({"outcome": "skipped", "message": str(busy)})
        return EXIT_SKIPPED
    except Exception as error:  # noqa: BLE001 - reported to the parent test
        outcome = {"outcome": "failed", "error": type(error).__name__, "message": str(error)}
        emit(outcome)
        return 1
    emit({"outcome": "succeeded", **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
