"""Run-level monitoring figures: drift against the champion's training data, decile churn."""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import text

from audiobooks_scoring.publishing.ledger import previous_published_run
from audiobooks_scoring.scoring.stage import StageResult
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter

logger = logging.getLogger(__name__)


def decile_change_share(warehouse: WarehouseAdapter, run_id: str) -> float | None:
    """Share of customers in this run and the previous published one whose decile changed."""
    previous = previous_published_run(warehouse, run_id)
    if previous is None:
        return None
    with warehouse.engine.connect() as conn:
        both, moved = conn.execute(
            text(warehouse.render_sql("scoring/decile_change")),
            {"run_id": run_id, "previous_run_id": previous},
        ).one()
    return None if not both else float(moved) / float(both)


def summarize_drift(
    warehouse: WarehouseAdapter, result: StageResult, run_id: str, settings: Settings
) -> dict[str, Any]:
    """Drift figures for the ledger (`ledger`) and the full drift result (`detail`)."""
    ledger: dict[str, Any] = {"decile_change_share": decile_change_share(warehouse, run_id)}
    detail: dict[str, Any] | None = None
    if result.drift is not None and result.drift.rows:
        drift = result.drift.result()
        detail = drift.to_dict()
        ledger.update(
            score_psi=drift.score_psi,
            max_feature_psi=drift.max_feature_psi,
            max_psi_feature=drift.max_feature,
            feature_psi=json.dumps(drift.feature_psi),
            drift_status=drift.status(settings.psi_warning, settings.psi_alert),
        )
    else:
        ledger["drift_status"] = "unknown"
        logger.warning("the champion has no training profile: drift is not measured")
    return {"ledger": ledger, "detail": detail}
