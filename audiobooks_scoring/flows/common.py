"""Helpers shared by the flows: run names and dates from the Prefect run context."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

from prefect.runtime import flow_run

from audiobooks_scoring.settings import Settings, load_settings, local_today


def scheduled_date(settings: Settings) -> date:
    """The flow run's expected start date in the configured time zone (today outside a run)."""
    start = flow_run.get_scheduled_start_time()
    if start is None:
        return local_today(settings)
    return datetime.fromisoformat(str(start)).astimezone(ZoneInfo(settings.timezone)).date()


def scoring_run_name() -> str:
    """`score-<date>`: the scoring date of the run, for the Prefect UI."""
    parameters = flow_run.get_parameters()
    as_of = parameters.get("as_of") or scheduled_date(load_settings())
    return f"score-{as_of}"


def retrain_run_name() -> str:
    """`retrain-<date>-<recipe>`, for the Prefect UI."""
    parameters = flow_run.get_parameters()
    settings = load_settings()
    as_of = parameters.get("as_of") or local_today(settings)
    return f"retrain-{as_of}-{parameters.get('recipe') or settings.recipe}"
