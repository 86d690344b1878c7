"""Hostile settings, secrets and tampered model files, through the real entry points.

Hostile table or schema names are refused when the settings load, before any SQL is sent (every
statement of every engine is counted). A known password never shows in logs, errors, reprs,
the run report (the Prefect markdown artifact) or the ledger. A tampered champion stops the run
with a clear error and publishes nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import traceback
import uuid
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, create_engine, event, make_url, select, text
from typer.testing import CliRunner

from audiobooks_scoring.cli import app
from audiobooks_scoring.model.scoring_model import load_scoring_model
from audiobooks_scoring.model.store import ModelStore, ModelStoreError
from audiobooks_scoring.reporting.reports import build_scoring_report
from audiobooks_scoring.scoring.gates import RunGateError
from audiobooks_scoring.settings import TABLE_SETTINGS, Settings, load_settings
from audiobooks_scoring.warehouse import PostgresAdapter, init_warehouse, open_warehouse
from tests.conftest import make_settings, server_of
from tests.helpers import run_scoring
from tests.model.test_store import edit_keras_config, rehash_file, rewrite_manifest
from tests.reliability.helpers import (
    AS_OF,
    assert_accounting,
    assert_no_held_lock,
    assert_one_whole_list,
    assert_settled,
    fill_activity,
    history_counts,
    ledger,
    leftover_tables,
    scores_dump,
)

NAME_SETTINGS = (*TABLE_SETTINGS, "warehouse_schema")
HOSTILE_NAMES = [
    'scores"',
    "scores'",
    'x"; DROP TABLE customer_scores; --',
    "a;b",
    "scores -- comment",
    "scores/*c*/",
    "kundenaktivität",
    "ｓcores",  # full-width s
    "scores\u200b",  # zero-width space
    "a" * 49,
    "a" * 64,
    " scores",
    "scores\n",
    "scores\x00",
    "Scores",
    "1scores",
    "public.scores",
    "scores-v2",
    "$scores",
]


@pytest.fixture
def statements():
    """Every SQL statement any engine sends while the test runs."""
    sent: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    yield sent
    event.remove(Engine, "before_cursor_execute", count)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused_at_settings_load_before_any_sql(
    name, statements, tmp_path, monkeypatch
):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    for setting in NAME_SETTINGS:
        with pytest.raises(ValidationError) as raised:
            init_warehouse(load_settings(warehouse_url=url, **{setting: name}))
        assert setting in str(raised.value)
        if "\x00" in name:
            continue  # an environment variable cannot hold a NUL byte
        monkeypatch.setenv(f"AUDIOBOOKS_{setting.upper()}", name)
        with pytest.raises(ValidationError, match=setting):
            init_warehouse(load_settings(warehouse_url=url))
        monkeypatch.delenv(f"AUDIOBOOKS_{setting.upper()}")
    assert statements == []
    assert not (tmp_path / "w.db").exists()


def test_the_command_line_refuses_a_hostile_name_before_any_sql(statements, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOBOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUDIOBOOKS_SCORES_TABLE", 'x"; DROP TABLE customer_scores; --')
    result = CliRunner().invoke(app, ["init"])
    assert result.exit_code == 2
    assert "invalid settings" in result.output and "scores_table" in result.output
    assert statements == []
    monkeypatch.delenv("AUDIOBOOKS_SCORES_TABLE")
    assert CliRunner().invoke(app, ["init"]).exit_code == 0
    assert len(statements) > 0  # the counter does see the statements of a valid start


def test_reserved_words_as_table_names_are_quoted_everywhere(settings, dialect, trained_store_dir):
    names = {
        "activity_table": "select",
        "scores_table": "order",
        "history_table": "table",
        "runs_table": "user",
        "rejected_table": "group",
    }
    hostile = settings.model_copy(update=names)
    warehouse = init_warehouse(hostile)
    fill_activity(warehouse, customers=500)
    run_scoring(hostile, warehouse, "first", AS_OF)
    figures = run_scoring(hostile, warehouse, "second", AS_OF)
    assert figures["status"] == "succeeded"
    assert warehouse.tables.scores.name == "order"
    assert_one_whole_list(warehouse, "second")
    assert_settled(warehouse, {"second"})
    warehouse.engine.dispose()


# ----------------------------------------------------------------------------- secrets


@pytest.fixture(params=["postgres", "mariadb"])
def secret_login(request):
    """A login with a known password on a test server, allowed a fresh schema (database).

    Yields (url with the password, schema, login name, password, SQL naming the login).
    """
    name = f"audiobooks_secret_{uuid.uuid4().hex[:8]}"
    password = f"s3cr3t-XYZ-{uuid.uuid4().hex[:8]}"
    if request.param == "postgres":
        url, schema = request.getfixturevalue("postgres_schema")
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            conn.execute(text(f"GRANT CREATE ON DATABASE {admin.url.database} TO {name}"))
        login = make_url(url).set(username=name, password=password)
        yield login, schema, name, password, "SELECT current_user"
        with admin.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {name} CASCADE"))
            conn.execute(text(f"DROP ROLE {name}"))
    else:
        url, schema = request.getfixturevalue("mariadb_database")  # dropped afterwards
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE DATABASE {schema}"))  # the login may not create others
            conn.execute(text(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"))
            conn.execute(text(f"GRANT ALL PRIVILEGES ON {schema}.* TO '{name}'@'%'"))
        login = make_url(url).set(username=name, password=password, database=schema)
        yield login, schema, name, password, "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)"
        with admin.begin() as conn:
            conn.execute(text(f"DROP USER '{name}'@'%'"))
    admin.dispose()


def error_texts(error: BaseException) -> list[str]:
    """Everything an operator could see of an exception: message, repr, full traceback."""
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


def test_a_known_password_never_appears_in_logs_errors_reprs_reports_or_the_ledger(
    tmp_path, secret_login, trained_store_dir, caplog, monkeypatch
):
    login, schema, role, password, current_user = secret_login
    url = login.render_as_string(hide_password=False)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    settings = Settings(
        data_dir=tmp_path,
        warehouse_url=url,
        warehouse_schema=schema,
        model_store_dir=trained_store_dir,
        chunk_size=1_000,
    )
    assert password in settings.warehouse_url_value  # the secret really is in play

    warehouse = init_warehouse(settings)
    with warehouse.engine.connect() as conn:
        assert conn.execute(text(current_user)).scalar_one() == role
    fill_activity(warehouse, customers=500)
    store = ModelStore(trained_store_dir)
    model = load_scoring_model(store, store.champion())
    run_scoring(settings, warehouse, "with-secret", AS_OF, model=model)
    report = build_scoring_report(warehouse, "with-secret", model, None, settings)
    seen += [
        report.markdown,
        report.html_path.read_text(),
        json.dumps(report.top_rows, default=str),
    ]

    with warehouse.engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {warehouse.qualified_name(warehouse.tables.activity)}"))
    with pytest.raises(RunGateError) as gate:
        run_scoring(settings, warehouse, "failing", AS_OF)
    seen += error_texts(gate.value)

    lock = warehouse.run_lock()
    seen += [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())]
    seen += [repr(warehouse), repr(warehouse.engine), str(warehouse.engine.url), repr(lock)]
    seen += [settings.warehouse_url_safe, repr(warehouse.engine.pool)]
    seen.append(warehouse.read_frame(select(warehouse.tables.runs)).to_csv())

    for broken_url in (
        login.set(port=1),  # nothing listens there
        login.set(username="no_such_role"),  # refused at authentication
        login.set(database="no_such_database"),
        login.set(host="host.invalid"),
    ):
        broken = broken_url.render_as_string(hide_password=False)
        assert password in broken
        broken_settings = settings.model_copy(
            update={"warehouse_url": type(settings.warehouse_url)(broken)}
        )
        with pytest.raises(Exception) as raised:
            run_scoring(broken_settings, open_warehouse(broken_settings), "unreachable", AS_OF)
        seen += error_texts(raised.value)
    with pytest.raises(ValidationError) as invalid:
        Settings(warehouse_url=url.replace("://", ":/"))
    seen += error_texts(invalid.value)
    with pytest.raises(ValidationError) as invalid:
        Settings(warehouse_url=url, campaign_value=3.0)
    seen += error_texts(invalid.value)

    monkeypatch.setenv("AUDIOBOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUDIOBOOKS_WAREHOUSE_URL", url)
    monkeypatch.setenv("AUDIOBOOKS_WAREHOUSE_SCHEMA", schema)
    for command in (["init"], ["runs"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
        seen.append(result.output)
    assert "***" in seen[-2]  # `init` shows the masked URL

    seen.append(caplog.text)
    assert len(caplog.records) > 0
    leaks = [piece[:300] for piece in seen if password in piece]
    assert leaks == []
    warehouse.engine.dispose()


def test_engine_creation_errors_never_echo_the_url():
    password = "s3cr3t-" + "XYZ"  # not spelled whole here, as the traceback quotes this file
    url = f"postgresql+nosuchdriver://ads:{password}@db/warehouse"
    with pytest.raises(Exception) as raised:
        PostgresAdapter.create_engine(url)
    assert all(password not in piece for piece in error_texts(raised.value))


# ----------------------------------------------------------------------------- model files


def flip_byte(folder: Path, name: str) -> None:
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def dense_becomes_lambda(config: dict) -> None:
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Dense":
            layer["class_name"] = "Lambda"
            return
    raise AssertionError("no Dense layer to replace")


def champion_is_outside_the_store(store: ModelStore) -> None:
    path = store.root / "registry.json"
    registry = json.loads(path.read_text())
    for entry in registry["versions"].values():
        entry["status"] = "retired"
    registry["versions"]["../../outside"] = {"status": "champion", "updated_at": "2026-11-25"}
    path.write_text(json.dumps(registry))


def h5_beside_the_model(store: ModelStore) -> None:
    folder = store.root / store.champion()
    shutil.copy(folder / "model.keras", folder / "model.h5")


TAMPERING = {
    "model byte flipped": (lambda s: flip_byte(s.root / s.champion(), "model.keras"), "sha256"),
    "scaler byte flipped": (
        lambda s: flip_byte(s.root / s.champion(), "preprocessing.json"),
        "preprocessing.json does not match",
    ),
    "manifest byte flipped": (
        lambda s: flip_byte(s.root / s.champion(), "manifest.json"),
        "manifest.json",
    ),
    "Lambda layer, re-signed": (
        lambda s: edit_keras_config(s.root / s.champion(), dense_becomes_lambda),
        "'Lambda'",
    ),
    "extra file, re-signed": (
        lambda s: (
            (s.root / s.champion() / "payload.py").write_text("import os"),
            rewrite_manifest(
                s.root / s.champion(), rehash_file(s.root / s.champion(), "payload.py")
            ),
        ),
        "payload.py",
    ),
    ".h5 model": (h5_beside_the_model, "model.h5"),
    "champion '../../outside'": (champion_is_outside_the_store, "invalid model version id"),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_scoring_refuses_a_tampered_champion_and_publishes_nothing(
    tmp_path, request, dialect, trained_store_dir, tampering
):
    store_dir = tmp_path / "models"
    shutil.copytree(trained_store_dir, store_dir)
    settings = make_settings(
        tmp_path, dialect, server_of(request, dialect), model_store_dir=store_dir, chunk_size=1_000
    )
    warehouse = init_warehouse(settings)
    fill_activity(warehouse, customers=500)
    run_scoring(settings, warehouse, "good", AS_OF)
    before = scores_dump(warehouse)
    tamper, named = TAMPERING[tampering]
    tamper(ModelStore(store_dir))

    with pytest.raises(ModelStoreError, match=named) as raised:
        run_scoring(settings, warehouse, "tampered", AS_OF)
    assert "model version" in str(raised.value) or "version id" in str(raised.value)
    pd.testing.assert_frame_equal(scores_dump(warehouse), before)
    run = ledger(warehouse).loc["tampered"]
    assert run["status"] == "failed" and not run["published"]
    assert run["message"] == str(raised.value)[:2000]
    assert "tampered" not in history_counts(warehouse)
    assert leftover_tables(warehouse) == []
    assert_no_held_lock(warehouse)
    assert_accounting(warehouse)
    assert not (Path(tmp_path.anchor) / "outside").exists()
    warehouse.engine.dispose()
