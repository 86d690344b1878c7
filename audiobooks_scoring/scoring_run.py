"""One scoring run without Prefect: the same steps the `score_customers` flow runs as tasks."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from typing import Any

from audiobooks_scoring import lifecycle, publishing, scoring
from audiobooks_scoring.model_store import ModelStore
from audiobooks_scoring.ranking import spill_runs
from audiobooks_scoring.run_monitoring import summarize_drift
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import Warehouse

logger = logging.getLogger(__name__)


def run_scoring(
    settings: Settings,
    warehouse: Warehouse,
    run_id: str,
    as_of: date,
    publish: bool = True,
    model: scoring.ScoringModel | None = None,
) -> dict[str, Any]:
    """Score the population and publish (or backfill) it under the run lock; the ledger figures."""
    engine, tables = warehouse.engine, warehouse.tables
    with publishing.RunLock(engine, tables):
        publishing.record_run_start(engine, tables, run_id, as_of, None)
        try:
            scoring.clear_staging(engine, tables, run_id)
            if model is None:
                store = ModelStore(settings.model_store_path)
                version = store.champion()
                if version is None:
                    raise RuntimeError("no champion model in the store; train one first")
                model = lifecycle.load_scoring_model(store, version)
            runs = spill_runs(settings.data_dir / "spill")
            result = scoring.stage_population(
                engine, tables, model, settings, run_id, as_of, runs=runs
            )
            built = publishing.build_target_list(
                engine, tables, settings, run_id, model.version, datetime.now(UTC), as_of, runs
            )
            result = scoring.account_duplicates(result, built.duplicates)
            figures = scoring.run_figures(result, model.version)
            publishing.record_run_end(engine, tables, run_id, **figures)  # counts kept on failure
            publishing.check_gates_of_built_list(engine, tables, result, settings)
            published = publishing.publish_target_list(engine, tables, settings, built, publish)
            figures.update(published=publish, targets=published.targets)
            figures.update(summarize_drift(engine, tables, result, run_id, settings)["ledger"])
            figures["status"] = "succeeded" if publish else "backfilled"
            publishing.record_run_end(engine, tables, run_id, **figures)
            return {"run_id": run_id, **figures}
        except Exception as error:
            publishing.record_run_end(
                engine, tables, run_id, status="failed", message=str(error)[:2000]
            )
            raise
