"""Model lifecycle: stored splits reproduce stored metrics, promotion decisions, mirror table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import select

from audiobooks_scoring.model.evaluation import evaluate_predictions
from audiobooks_scoring.model.lifecycle import (
    decide_promotion,
    mirror_model_versions,
    stored_probability,
)
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.settings import Settings


def test_stored_splits_reproduce_the_stored_metrics(trained_store_dir):
    store = ModelStore(trained_store_dir)
    version = store.champion()
    stored = store.load_version(version)
    splits = store.load_splits(version)
    test = splits["test"]
    probability = stored_probability(stored, test["features"])
    again = evaluate_predictions(test["labels"], probability, stored.metadata["threshold"])
    metrics = stored.metadata["metrics"]
    assert again.auc == pytest.approx(metrics["auc"], abs=1e-12)
    assert again.brier == pytest.approx(metrics["brier"], abs=1e-9)
    assert again.balanced_accuracy == pytest.approx(metrics["balanced_accuracy"], abs=1e-12)
    ids = np.concatenate([splits[name]["customer_ids"] for name in ("train", "validation", "test")])
    assert len(np.unique(ids)) == len(ids), "splits overlap"


def evaluation(auc: float, mean_predicted: float, base_rate: float = 0.16, rows: int = 20_000):
    rng = np.random.default_rng(0)
    labels = (rng.random(rows) < base_rate).astype(int)
    base = evaluate_predictions(labels, np.clip(rng.random(rows), 0.01, 0.99), 0.16)
    return replace(
        base,
        auc=auc,
        mean_predicted=mean_predicted,
        base_rate=base_rate,
        calibration_error=abs(mean_predicted - base_rate),
    )


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "words"),
    [
        (evaluation(0.90, 0.16), None, True, "no champion"),
        (evaluation(0.91, 0.16), evaluation(0.912, 0.16), True, "tolerance"),
        (evaluation(0.89, 0.16), evaluation(0.912, 0.16), False, "below champion AUC"),
        (evaluation(0.95, 0.30), evaluation(0.912, 0.16), False, "miscalibrated"),
    ],
)
def test_promotion_decision_and_its_reason(challenger, champion, promote, words):
    decision = decide_promotion(challenger, champion, Settings(auc_tolerance=0.005))
    assert decision.promote is promote
    assert words in decision.reason


def test_model_versions_table_mirrors_the_store(warehouse, trained_store_dir):
    store = ModelStore(trained_store_dir)
    assert mirror_model_versions(warehouse, store) == 1
    rows = warehouse.read_frame(select(warehouse.tables.model_versions))
    row = rows.iloc[0]
    assert row["version"] == store.champion() and row["status"] == "champion"
    assert row["artifact_digest"] == store.list_versions()[0].artifact_digest
    assert 0.5 < row["auc"] <= 1.0
