"""Shared fixtures: a real warehouse per test on every engine (SQLite and DuckDB files, a
PostgreSQL schema, a MariaDB database), a small model."""

from __future__ import annotations

import os
import uuid
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from audiobooks_scoring.settings import Settings  # noqa: E402
from audiobooks_scoring.warehouse import (  # noqa: E402
    PostgresAdapter,
    WarehouseAdapter,
    init_warehouse,
)

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
ENGINES = tuple(
    os.environ.get("AUDIOBOOKS_TEST_ENGINES", "sqlite,postgres,duckdb,mariadb")
    .replace(" ", "")
    .split(",")
)
REAL_CSV = Path(__file__).parent / "data" / "audiobooks_data.csv"
AS_OF = date(2026, 11, 25)


def postgres_url() -> str:
    """The test server: AUDIOBOOKS_TEST_POSTGRES_URL, else the local default."""
    return os.environ.get("AUDIOBOOKS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def mariadb_url() -> str:
    """The MariaDB test server: AUDIOBOOKS_TEST_MARIADB_URL, else the local default."""
    return os.environ.get("AUDIOBOOKS_TEST_MARIADB_URL", DEFAULT_MARIADB_URL)


def require_postgres() -> str:
    """The reachable test server URL; in CI an unreachable server fails the test, never skips."""
    return require_server(postgres_url(), "PostgreSQL", "AUDIOBOOKS_TEST_POSTGRES_URL")


def require_mariadb() -> str:
    """The reachable MariaDB URL; in CI an unreachable server fails the test, never skips."""
    return require_server(mariadb_url(), "MariaDB", "AUDIOBOOKS_TEST_MARIADB_URL")


def require_server(url: str, engine_name: str, variable: str) -> str:
    """`url` if a server answers there; fails in CI, skips elsewhere, naming the variable."""
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any failure to connect decides the same way
        message = f"{engine_name} at {url.split('@')[-1]} is unreachable: {type(error).__name__}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI requires it)")
        pytest.skip(message + f"; set {variable} to run {engine_name} tests")
    return url


@pytest.fixture
def postgres_schema():
    """A fresh schema on the test server, dropped afterwards; yields (url, schema)."""
    url = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield url, schema
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


@pytest.fixture
def postgres_engine(postgres_schema):
    """An engine on the test server with a fresh, empty schema; yields (engine, schema)."""
    url, schema = postgres_schema
    engine = PostgresAdapter.create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield engine, schema
    engine.dispose()


@pytest.fixture
def mariadb_database():
    """A fresh database on the MariaDB test server, dropped afterwards; yields (url, name)."""
    url = require_mariadb()
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield url, name
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    engine.dispose()


def make_settings(tmp_path: Path, dialect: str, server: tuple[str, str] | None, **extra):
    """Settings for one test warehouse of the given engine (a server's URL and schema)."""
    if dialect in ("postgres", "mariadb"):
        url, schema = server
        return Settings(data_dir=tmp_path, warehouse_url=url, warehouse_schema=schema, **extra)
    if dialect == "duckdb":
        url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
        return Settings(data_dir=tmp_path, warehouse_url=url, **extra)
    return Settings(
        data_dir=tmp_path, warehouse_url=f"sqlite:///{tmp_path / 'warehouse.db'}", **extra
    )


def stores_infinity(dialect: str) -> bool:
    """Whether the engine's DOUBLE columns can hold +-inf (a source row can carry one).

    MySQL and MariaDB cannot store an infinite number at all (the adapter refuses to write
    one, tests/warehouse/test_mysql.py), so no such row can reach a scoring run there.
    Decided by the engine, not the adapter: the generic adapter on MariaDB cannot either.
    """
    return dialect != "mariadb"


def server_of(request, dialect: str) -> tuple[str, str] | None:
    """The (url, schema) of a fresh schema on the engine's test server, if it has one."""
    if dialect == "postgres":
        return request.getfixturevalue("postgres_schema")
    if dialect == "mariadb":
        return request.getfixturevalue("mariadb_database")
    return None


@pytest.fixture(params=ENGINES)
def dialect(request) -> str:
    """Each test using it runs on every engine of AUDIOBOOKS_TEST_ENGINES (real ones)."""
    return request.param


@pytest.fixture
def settings(request, tmp_path, dialect, trained_store_dir) -> Settings:
    """Settings pointing at a fresh warehouse of `dialect` and the shared trained model store."""
    return make_settings(
        tmp_path,
        dialect,
        server_of(request, dialect),
        model_store_dir=trained_store_dir,
        chunk_size=1_000,
    )


@pytest.fixture
def warehouse(settings) -> WarehouseAdapter:
    """An initialised warehouse (tables and views created)."""
    warehouse = init_warehouse(settings)
    yield warehouse
    warehouse.dispose()


@pytest.fixture(scope="session")
def trained_store_dir(tmp_path_factory) -> Path:
    """A model store with one small champion trained on demo customers."""
    from audiobooks_scoring.contract import FEATURES, LABEL
    from audiobooks_scoring.inputs.demo_data import generate_customers
    from audiobooks_scoring.model.lifecycle import (
        TrainingData,
        judge_challenger,
        save_challenger,
        train_challenger,
    )
    from audiobooks_scoring.model.store import ModelStore

    root = tmp_path_factory.mktemp("models")
    frame = generate_customers(4_000, seed=3)
    data = TrainingData(
        frame["customer_id"].to_numpy(np.int64),
        frame[list(FEATURES)].to_numpy(np.float64),
        frame[LABEL].to_numpy(np.int8),
    )
    store = ModelStore(root)
    challenger = train_challenger(data, "default", seed=1)
    version = save_challenger(store, data, challenger, AS_OF)
    judge_challenger(store, data, challenger, version, Settings(), force=True)
    return root
