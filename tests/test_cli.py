"""The command line: exit codes and outputs of the commands that need no Prefect server."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from audiobooks_scoring.cli import app
from tests.conftest import REAL_CSV

runner = CliRunner()


@pytest.fixture
def local_env(tmp_path, monkeypatch, trained_store_dir):
    monkeypatch.setenv("AUDIOBOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUDIOBOOKS_MODEL_STORE_DIR", str(trained_store_dir))
    return tmp_path


def test_init_creates_the_warehouse_and_lists_tables(local_env):
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    assert "customer_scores" in result.output
    assert (local_env / "warehouse.db").is_file()


def test_invalid_settings_exit_2_naming_the_setting(local_env, monkeypatch):
    monkeypatch.setenv("AUDIOBOOKS_SCORES_TABLE", "scores; drop table x")
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 2
    assert "scores_table" in result.output


def test_load_csv_loads_the_real_file_and_refuses_a_malformed_one(local_env):
    result = runner.invoke(app, ["load-csv", str(REAL_CSV), "--window-end", "2024-06-30"])
    assert result.exit_code == 0, result.output
    assert "14084" in result.output
    broken = local_env / "broken.csv"
    lines = REAL_CSV.read_text().splitlines()
    broken.write_text("\n".join([*lines[:5], lines[5].replace(",", ",x", 1), *lines[6:10]]))
    result = runner.invoke(app, ["load-csv", str(broken)])
    assert result.exit_code == 1
    assert "line 6" in result.output


def test_models_list_and_show(local_env, trained_store_dir):
    from audiobooks_scoring.model.store import ModelStore

    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "champion" in result.output
    champion = ModelStore(trained_store_dir).champion()
    shown = runner.invoke(app, ["models", "show", champion])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["status"] == "champion"
    refused = runner.invoke(app, ["models", "show", "../evil"])
    assert refused.exit_code == 1


def test_demo_data_then_runs_json_is_empty_before_any_run(local_env):
    result = runner.invoke(app, ["demo-data", "--customers", "1000", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "1000 training examples, 1100 customers" in result.output
    runs = runner.invoke(app, ["runs", "--json"])
    assert runs.exit_code == 0
    assert json.loads(runs.output) == []
