"""Settings: defaults, identifier checks that name the setting, secrets kept out of reprs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from audiobooks_scoring.settings import Settings


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
