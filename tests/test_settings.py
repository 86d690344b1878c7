"""Settings: defaults, identifier checks that name the setting, secrets kept out of reprs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from audiobooks_scoring.settings import Settings, load_settings, unknown_environment_settings
from audiobooks_scoring.warehouse import adapter_class


def test_defaults_point_at_a_sqlite_file_in_the_data_folder(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.warehouse_url_value == f"sqlite:///{(tmp_path / 'warehouse.db').resolve()}"
    assert settings.scores_table == "customer_scores"
    assert settings.model_store_path == tmp_path / "models"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("scores_table", "scores; drop table x"),
        ("scores_table", 'scores"'),
        ("training_table", "x -- comment"),
        ("activity_table", "kundenaktivität"),
        ("runs_table", "a" * 49),
        ("history_table", "1history"),
        ("warehouse_schema", "public; drop schema public"),
        ("rejected_table", "Rejected"),
    ],
)
def test_hostile_identifier_fails_at_load_naming_the_setting(setting, value):
    with pytest.raises(ValidationError) as raised:
        Settings(**{setting: value})
    assert setting in str(raised.value)


def test_hostile_identifier_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("AUDIOBOOKS_SCORES_TABLE", "scores; drop table x")
    with pytest.raises(ValidationError, match="scores_table"):
        Settings()


def test_password_is_masked_in_repr_and_safe_url():
    settings = Settings(warehouse_url="postgresql+psycopg://ads:s3cr3t-XYZ@db.example/warehouse")
    assert "s3cr3t-XYZ" not in repr(settings)
    assert "s3cr3t-XYZ" not in str(settings.model_dump())
    assert "s3cr3t-XYZ" not in settings.warehouse_url_safe
    assert "s3cr3t-XYZ" in settings.warehouse_url_value


def test_psi_alert_must_not_be_below_warning():
    with pytest.raises(ValidationError, match="psi_alert"):
        Settings(psi_warning=0.3, psi_alert=0.2)


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("AUDIOBOOKS_SCHEMA", "AUDIOBOOKS_WAREHOUSE_SCHEMA"),
        ("AUDIOBOOKS_CHUNKSIZE", "AUDIOBOOKS_CHUNK_SIZE"),
        ("AUDIOBOOKS_WAREHOUSE_ADAPTOR", "AUDIOBOOKS_WAREHOUSE_ADAPTER"),
    ],
)
def test_unknown_environment_variable_is_reported_with_the_closest_setting(
    monkeypatch, caplog, variable, closest
):
    monkeypatch.setenv(variable, "x")
    assert unknown_environment_settings() == [
        f"{variable} is not a setting and is ignored; did you mean {closest}?"
    ]
    with caplog.at_level("WARNING", logger="audiobooks_scoring.settings"):
        load_settings()
    assert any(variable in record.getMessage() for record in caplog.records)


def test_known_settings_and_test_variables_are_not_reported():
    environ = {
        "AUDIOBOOKS_WAREHOUSE_SCHEMA": "s",
        "AUDIOBOOKS_CHUNK_SIZE": "5000",
        "AUDIOBOOKS_TEST_POSTGRES_URL": "x",
        "AUDIOBOOKS_TEST_MARIADB_URL": "x",
        "AUDIOBOOKS_TEST_ENGINES": "sqlite",
        "AUDIOBOOKS_PROJECT_DIR": "/x",
        "PATH": "/bin",
    }
    assert unknown_environment_settings(environ) == []
    assert unknown_environment_settings({"AUDIOBOOKS_ZZZZZZ": "1"}) == [
        "AUDIOBOOKS_ZZZZZZ is not a setting and is ignored"
    ]


@pytest.mark.parametrize(
    ("url", "forced", "adapter"),
    [
        ("sqlite:///x.db", None, "SQLiteAdapter"),
        ("postgresql+psycopg://u@h/db", None, "PostgresAdapter"),
        ("sqlite:///x.db", "generic", "GenericAdapter"),
        ("postgresql+psycopg://u@h/db", "generic", "GenericAdapter"),
    ],
)
def test_the_adapter_follows_the_url_unless_a_setting_forces_one(url, forced, adapter):
    settings = Settings(warehouse_url=url, warehouse_adapter=forced)
    assert adapter_class(settings).__name__ == adapter


def test_an_unknown_adapter_name_is_refused_naming_the_setting():
    with pytest.raises(ValidationError, match="warehouse_adapter"):
        Settings(warehouse_adapter="oracle")
