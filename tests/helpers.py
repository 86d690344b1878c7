"""Helpers shared by the tests: one scoring run through the pipeline's steps, without Prefect."""

from __future__ import annotations

from datetime import date
from typing import Any

from audiobooks_scoring import pipeline
from audiobooks_scoring.model.scoring_model import ScoringModel
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter


def run_scoring(
    settings: Settings,
    warehouse: WarehouseAdapter,
    run_id: str,
    as_of: date,
    publish: bool = True,
    model: ScoringModel | None = None,
) -> dict[str, Any]:
    """The run's ledger figures after `pipeline.run_scoring` (no report: the flow test has it)."""
    run = pipeline.ScoringRun(settings, warehouse, run_id, as_of, publish)
    return pipeline.run_scoring(run, model=model, write_report=False).to_dict()
