"""Acceptance: `audiobooks-scoring demo` then `score`, through the CLI, from an empty folder.

On each of the four engines by their own adapter (a SQLite file, a PostgreSQL schema, a DuckDB
file URL, a MariaDB URL) and with the generic adapter forced on DuckDB and on MariaDB:

* `demo` then `score` publish a whole list (ranks 1..n by probability, unique customers,
  `ntile(10)` deciles) and the run is in the `scoring_runs` ledger as succeeded and published;
* rows with bad values inserted into `customer_activity` for the scoring window are rejected
  with their reason codes and accounted for (`rows_in = rows_scored + rows_rejected`);
* a flipped byte in the champion's files makes `score` exit 1 naming the file, and leaves the
  published list byte-identical.

Everything is read back from the warehouse, not taken from the CLI's output.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import prefect.main  # noqa: F401 - see below
import pytest
from prefect.testing.utilities import prefect_test_harness
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from audiobooks_scoring.cli import app
from audiobooks_scoring.model.store import MODEL_FILE, ModelStore
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter, open_warehouse

# `import prefect.main` (above) configures Prefect's console log handler on the stderr of this
# moment. Imported first inside a CliRunner call, it would bind the handler to the runner's
# stderr, closed when the call returns, and the harness's last log line would crash pytest.

pytestmark = pytest.mark.slow

runner = CliRunner()
CUSTOMERS = 1_000  # the demo's smallest population (`demo --customers` is at least 1000)

# case: (engine, forced adapter)
CASES: dict[str, tuple[str, str | None]] = {
    "sqlite": ("sqlite", None),
    "postgres": ("postgres", None),
    "duckdb": ("duckdb", None),
    "mariadb": ("mariadb", None),
    "generic-on-duckdb": ("duckdb", "generic"),
    "generic-on-mariadb": ("mariadb", "generic"),
}
ADAPTER_OF = {"postgres": "postgresql", "mariadb": "mysql"}  # the adapter a URL gets

# (change to a valid row of the scoring window, the reason code it must be rejected with)
BAD_ROWS: list[tuple[dict[str, Any], str]] = [
    ({"customer_id": None}, "missing_customer_id"),
    ({"completion": None}, "missing_value"),
    ({"price_total": -5.0}, "negative_value"),
    ({"completion": 1.5}, "completion_out_of_range"),
    ({"review": 0.5}, "review_not_binary"),
    ({"review_score": 11.0}, "review_score_out_of_range"),
    ({"price_avg": 1e6}, "average_above_total"),
]
INFINITE_ROW = ({"minutes_listened": math.inf}, "infinite_value")  # MariaDB cannot store one
TEXT_ROW = ({"support_requests": "two"}, "not_numeric")  # only SQLite keeps text in a DOUBLE


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server for this module's flow runs."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


def invoke(*args: str):
    """Run the CLI in this process; the result (exit code, output)."""
    return runner.invoke(app, list(args))


def warehouse_env(request, engine: str, folder: Path) -> dict[str, str]:
    """The settings that point at a fresh, empty warehouse of `engine`."""
    if engine == "sqlite":
        return {"AUDIOBOOKS_WAREHOUSE_URL": f"sqlite:///{folder / 'warehouse.db'}"}
    if engine == "duckdb":
        return {"AUDIOBOOKS_WAREHOUSE_URL": f"duckdb:///{folder / 'warehouse.duckdb'}"}
    if engine == "postgres":
        url, schema = request.getfixturevalue("postgres_schema")
        return {"AUDIOBOOKS_WAREHOUSE_URL": url, "AUDIOBOOKS_WAREHOUSE_SCHEMA": schema}
    url, name = request.getfixturevalue("mariadb_database")  # dropped afterwards
    server = create_engine(url)
    with server.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    server.dispose()
    database_url = make_url(url).set(database=name).render_as_string(hide_password=False)
    return {"AUDIOBOOKS_WAREHOUSE_URL": database_url}  # the database in the URL, no schema


def read_warehouse() -> WarehouseAdapter:
    """The warehouse the environment points at, opened to read back what the CLI did."""
    return open_warehouse(Settings())


def ledger_row(warehouse: WarehouseAdapter, run_id: str) -> dict[str, Any]:
    runs = warehouse.tables.runs
    with warehouse.engine.connect() as conn:
        return dict(conn.execute(select(runs).where(runs.c.run_id == run_id)).one()._mapping)


def published_run(warehouse: WarehouseAdapter) -> str:
    """The one run the ledger shows as succeeded and published."""
    runs = warehouse.tables.runs
    with warehouse.engine.connect() as conn:
        (run_id,) = conn.execute(
            select(runs.c.run_id).where(runs.c.status == "succeeded", runs.c.published)
        ).one()
    return run_id


def scoring_window(warehouse: WarehouseAdapter) -> tuple[Any, int, int]:
    """The latest activity window: its date, its number of rows and its largest customer id."""
    activity = warehouse.tables.activity
    with warehouse.engine.connect() as conn:
        window = conn.execute(select(func.max(activity.c.window_end))).scalar_one()
        rows, top = conn.execute(
            select(func.count(), func.max(activity.c.customer_id)).where(
                activity.c.window_end == window
            )
        ).one()
    return window, int(rows), int(top)


def dump_list(warehouse: WarehouseAdapter) -> list[tuple]:
    """Every row and column of the published list, in rank order."""
    scores = warehouse.tables.scores
    with warehouse.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(select(scores).order_by(scores.c.rank))]


def assert_whole_list(warehouse: WarehouseAdapter, run_id: str, size: int) -> None:
    """The published list is `run_id`'s, of `size` customers: ranks 1..n, unique ids, deciles."""
    scores = warehouse.tables.scores
    with warehouse.engine.connect() as conn:
        rows = conn.execute(
            select(
                scores.c.rank,
                scores.c.customer_id,
                scores.c.probability,
                scores.c.decile,
                scores.c.run_id,
            ).order_by(scores.c.rank)
        ).all()
    assert len(rows) == size
    assert [r.rank for r in rows] == list(range(1, size + 1))
    assert len({r.customer_id for r in rows}) == size
    probabilities = [r.probability for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    each, larger = divmod(size, 10)  # ntile(10): sizes differ by at most 1, larger ones first
    sizes = [each + (1 if decile < larger else 0) for decile in range(10)]
    assert [r.decile for r in rows] == [d + 1 for d in range(10) for _ in range(sizes[d])]
    assert {r.run_id for r in rows} == {run_id}


def assert_published(warehouse: WarehouseAdapter, run_id: str, rows_in: int, rejected: int):
    """The run is in the ledger as succeeded and published, every input row accounted for."""
    run = ledger_row(warehouse, run_id)
    assert run["status"] == "succeeded" and run["published"], run
    assert (run["rows_in"], run["rows_rejected"]) == (rows_in, rejected), run
    assert run["rows_in"] == run["rows_scored"] + run["rows_rejected"]
    assert_whole_list(warehouse, run_id, run["rows_scored"])


def insert_bad_rows(warehouse: WarehouseAdapter, bad_rows) -> tuple[list, Any]:
    """Bad copies of a valid row of the scoring window, and a second copy of one customer.

    Returns the ids given to the bad rows and the repeated id.
    """
    activity = warehouse.tables.activity
    window, _, top = scoring_window(warehouse)
    with warehouse.engine.connect() as conn:
        valid = conn.execute(
            select(activity)
            .where(activity.c.window_end == window)
            .order_by(activity.c.customer_id)
            .limit(1)
        ).one()
    good = dict(valid._mapping)
    rows = [
        {**good, "customer_id": top + 1 + index, **change}
        for index, (change, _) in enumerate(bad_rows)
    ]
    texts = [  # text in a number column: written past the column type's bind processor
        (row["customer_id"], name, value)
        for row in rows
        for name, value in row.items()
        if isinstance(value, str)
    ]
    numbers = [{k: None if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    with warehouse.engine.begin() as conn:
        conn.execute(activity.insert(), [*numbers, good])  # `good` again: a repeated id
        for customer, name, value in texts:
            conn.execute(
                text(f"UPDATE {activity.name} SET {name} = :value WHERE customer_id = :id"),
                {"value": value, "id": customer},
            )
    return [row["customer_id"] for row in rows], good["customer_id"]


def rejected_rows(warehouse: WarehouseAdapter, run_id: str) -> list[tuple[str | None, str]]:
    rejected = warehouse.tables.rejected
    with warehouse.engine.connect() as conn:
        return [
            (row.customer_id, row.reason_code)
            for row in conn.execute(
                select(rejected.c.customer_id, rejected.c.reason_code).where(
                    rejected.c.run_id == run_id
                )
            )
        ]


def flip_a_byte_of_the_champion(store_dir: Path) -> str:
    """Flip one bit in the middle of the champion's model file; the champion's version."""
    store = ModelStore(store_dir)
    version = store.champion()
    path = store_dir / version / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return version


@pytest.mark.parametrize("case", list(CASES))
def test_demo_then_score_from_an_empty_folder(
    case, request, tmp_path, monkeypatch, trained_store_dir, prefect_server
):
    engine, adapter = CASES[case]
    folder = tmp_path / "empty"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for name in Settings.model_fields:  # nothing from the caller's environment
        monkeypatch.delenv(f"AUDIOBOOKS_{name.upper()}", raising=False)
    for variable, value in warehouse_env(request, engine, folder).items():
        monkeypatch.setenv(variable, value)
    if adapter:
        monkeypatch.setenv("AUDIOBOOKS_WAREHOUSE_ADAPTER", adapter)
    store_dir = tmp_path / "models"  # the session's trained champion: the demo need not train
    shutil.copytree(trained_store_dir, store_dir)
    monkeypatch.setenv("AUDIOBOOKS_MODEL_STORE_DIR", str(store_dir))
    monkeypatch.setenv("AUDIOBOOKS_CHUNK_SIZE", "1000")  # several chunks per run

    # demo: tables, demo data, the list published (and an earlier run backfilled, measured)
    demo = invoke("demo", "--customers", str(CUSTOMERS), "--top", "3")
    assert demo.exit_code == 0, demo.output
    assert "training the first model" not in demo.output
    warehouse = read_warehouse()
    assert warehouse.name == (adapter or ADAPTER_OF.get(engine, engine))
    demo_run = published_run(warehouse)
    _, population, _ = scoring_window(warehouse)
    assert population >= CUSTOMERS
    assert_published(warehouse, demo_run, population, 0)

    # bad rows in the scoring window, then `score`: the same date again, so it replaces the
    # demo's run; the bad rows are rejected with their reasons and accounted for
    bad_rows = list(BAD_ROWS)
    if engine != "mariadb":
        bad_rows.append(INFINITE_ROW)
    if engine == "sqlite":
        bad_rows.append(TEXT_ROW)
    bad_ids, repeated = insert_bad_rows(warehouse, bad_rows)
    warehouse.dispose()
    scored = invoke("score")
    assert scored.exit_code == 0, scored.output
    warehouse = read_warehouse()
    assert published_run(warehouse) == demo_run
    rows_in = population + len(bad_rows) + 1
    assert_published(warehouse, demo_run, rows_in, len(bad_rows) + 2)
    expected = [
        (None if customer is None else str(customer), code)
        for customer, (_, code) in zip(bad_ids, bad_rows, strict=True)
    ] + [(str(repeated), "duplicate_customer_id")] * 2
    assert Counter(rejected_rows(warehouse, demo_run)) == Counter(expected)
    scores = warehouse.tables.scores
    with warehouse.engine.connect() as conn:
        listed = set(conn.execute(select(scores.c.customer_id)).scalars())
    assert listed.isdisjoint([repeated, *bad_ids])
    before = dump_list(warehouse)
    warehouse.dispose()

    # a flipped byte in the champion: the run fails naming the file; the list stays as it was
    version = flip_a_byte_of_the_champion(store_dir)
    tampered = invoke("score", "--run-id", "acceptance-tampered")
    assert tampered.exit_code == 1, tampered.output
    said = " ".join(tampered.output.split())
    assert f"scoring run failed: model version '{version}': {MODEL_FILE} does not match" in said
    warehouse = read_warehouse()
    assert dump_list(warehouse) == before
    run = ledger_row(warehouse, "acceptance-tampered")
    assert run["status"] == "failed" and not run["published"], run
    assert f"{MODEL_FILE} does not match its sha256" in run["message"]
    history = warehouse.tables.history
    with warehouse.engine.connect() as conn:
        tampered_rows = conn.execute(
            select(func.count()).where(history.c.run_id == "acceptance-tampered")
        ).scalar_one()
    assert tampered_rows == 0
    warehouse.dispose()
