"""One typed settings object, read from `AUDIOBOOKS_*` environment variables."""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

IDENTIFIER_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
WAREHOUSE_ADAPTERS = ("sqlite", "postgresql", "duckdb", "mysql", "generic")
ENV_PREFIX = "AUDIOBOOKS_"
NOT_SETTINGS = frozenset({"PROJECT_DIR"})  # prefect.yaml's variable, not the job's
TEST_VARIABLES = "TEST_"  # AUDIOBOOKS_TEST_*: the test suite's variables
TABLE_SETTINGS = (
    "training_table",
    "activity_table",
    "scores_table",
    "history_table",
    "runs_table",
    "rejected_table",
    "model_versions_table",
    "purchases_table",
    "outcomes_table",
    "outcome_deciles_table",
)


def check_identifier(name: str, setting: str) -> str:
    """Return `name` if it is a safe lower-case SQL identifier, else raise naming the setting."""
    if not IDENTIFIER_PATTERN.fullmatch(name):
        raise ValueError(
            f"setting {setting!r} must be a lower-case identifier matching "
            f"{IDENTIFIER_PATTERN.pattern} (letters, digits, underscore; at most 48 characters); "
            f"got {name!r}"
        )
    return name


class Settings(BaseSettings):
    """Everything the job can be told, from the environment (prefix `AUDIOBOOKS_`) or `.env`."""

    # hide_input_in_errors: a validation error must never echo the input (the warehouse URL,
    # with its password, is part of the input every model-level rule would otherwise print).
    model_config = SettingsConfigDict(
        env_prefix="AUDIOBOOKS_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    data_dir: Path = Path("data")
    warehouse_url: SecretStr | None = None
    warehouse_schema: str | None = None
    warehouse_adapter: str | None = None  # default: the adapter of the URL's dialect

    training_table: str = "training_examples"
    activity_table: str = "customer_activity"
    scores_table: str = "customer_scores"
    history_table: str = "customer_score_history"
    runs_table: str = "scoring_runs"
    rejected_table: str = "rejected_rows"
    model_versions_table: str = "model_versions"
    purchases_table: str = "customer_purchases"
    outcomes_table: str = "run_outcomes"
    outcome_deciles_table: str = "run_outcome_deciles"

    model_store_dir: Path | None = None
    reports_dir: Path | None = None

    chunk_size: int = Field(default=200_000, ge=1_000, le=5_000_000)
    predict_batch_size: int = Field(default=65_536, ge=256)
    max_reject_share: float = Field(default=0.05, ge=0.0, le=1.0)
    model_max_age_days: int = Field(default=90, ge=1)
    lock_timeout_ms: int = Field(default=5_000, ge=100)
    customer_index: bool = False  # a unique customer-id index on each PostgreSQL list
    publish_retries: int = Field(default=3, ge=0)

    seed: int = 42
    recipe: str = "default"
    auc_tolerance: float = Field(default=0.005, ge=0.0)
    calibration_tolerance: float = Field(default=0.02, ge=0.0)

    holdout_share: float = Field(default=0.10, ge=0.0, lt=1.0)
    holdout_salt: str = "audiobooks-holdout-v1"
    campaign_mode: Literal["top_share", "top_n", "min_probability"] = "top_share"
    campaign_value: float = Field(default=0.2, gt=0.0)

    psi_warning: float = Field(default=0.1, ge=0.0)
    psi_alert: float = Field(default=0.25, ge=0.0)

    partitions: int = Field(default=1, ge=1, le=1024)
    dask_address: str | None = None
    dask_workers: int = Field(default=2, ge=1)

    timezone: str = "Europe/London"

    outcome_horizon_days: int = Field(default=183, ge=1, le=3_660)
    decay_auc_tolerance: float = Field(default=0.03, ge=0.0, le=1.0)
    decay_min_maturity: float = Field(default=1.0, gt=0.0, le=1.0)

    @field_validator(*TABLE_SETTINGS)
    @classmethod
    def _table_is_identifier(cls, value: str, info) -> str:
        return check_identifier(value, info.field_name)

    @field_validator("warehouse_url")
    @classmethod
    def _url_is_parseable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            make_url(value.get_secret_value())
        except Exception:  # noqa: BLE001 - the parser's message would quote the URL
            raise ValueError(
                "setting 'warehouse_url' is not a valid SQLAlchemy URL "
                "(dialect+driver://user:password@host:port/database)"
            ) from None
        return value

    @field_validator("warehouse_adapter")
    @classmethod
    def _adapter_is_known(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if value not in WAREHOUSE_ADAPTERS:
            raise ValueError(
                f"setting 'warehouse_adapter' must be one of {', '.join(WAREHOUSE_ADAPTERS)}; "
                f"got {value!r}"
            )
        return value

    @field_validator("warehouse_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str | None, info) -> str | None:
        return None if value in (None, "") else check_identifier(value, info.field_name)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> Settings:
        if self.psi_alert < self.psi_warning:
            raise ValueError("setting 'psi_alert' must be at least 'psi_warning'")
        if self.campaign_mode == "top_share" and self.campaign_value > 1:
            raise ValueError("setting 'campaign_value' must be a share in (0, 1] for top_share")
        return self

    @property
    def warehouse_url_value(self) -> str:
        """The warehouse URL with credentials; a SQLite file under `data_dir` by default."""
        if self.warehouse_url is not None:
            return self.warehouse_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'warehouse.db').resolve()}"

    @property
    def warehouse_url_safe(self) -> str:
        """The warehouse URL with its password masked, for logs and reports."""
        return make_url(self.warehouse_url_value).render_as_string(hide_password=True)

    @property
    def model_store_path(self) -> Path:
        """Folder of the model store."""
        return self.model_store_dir or self.data_dir / "models"

    @property
    def reports_path(self) -> Path:
        """Folder where HTML run reports are written."""
        return self.reports_dir or self.data_dir / "reports"


def unknown_environment_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """`AUDIOBOOKS_*` variables that name no setting, each with the closest setting's name."""
    known = [name.upper() for name in Settings.model_fields]
    problems = []
    for variable in sorted(os.environ if environ is None else environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        name = variable[len(ENV_PREFIX) :]
        if name in known or name in NOT_SETTINGS or name.startswith(TEST_VARIABLES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        problems.append(f"{variable} is not a setting and is ignored{hint}")
    return problems


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides taking precedence.

    Unknown `AUDIOBOOKS_*` variables are logged as warnings naming the closest setting.
    """
    for problem in unknown_environment_settings():
        logger.warning(problem)
    return Settings(**overrides)


def local_today(settings: Settings) -> date:
    """Today's date in `AUDIOBOOKS_TIMEZONE`: runs, and inputs the CLI dates "today", use it.

    Dating inputs by the machine's clock instead would, on a clock ahead of that zone, date
    them tomorrow, and a run as of today would not see them.
    """
    return datetime.now(ZoneInfo(settings.timezone)).date()
