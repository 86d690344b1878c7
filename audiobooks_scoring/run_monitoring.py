"""Run-level monitoring figures: drift against the champion's training data, decile churn."""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import Engine

from audiobooks_scoring.publishing import decile_change_share
from audiobooks_scoring.scoring import StageResult
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseTables

logger = logging.getLogger(__name__)


def summarize_drift(
    engine: Engine,
    tables: WarehouseTables,
    result: StageResult,
    run_id: str,
    settings: Settings,
) -> dict[str, Any]:
    """Drift figures for the ledger (`ledger`) and the full drift result (`detail`)."""
    ledger: dict[str, Any] = {"decile_change_share": decile_change_share(engine, tables, run_id)}
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
