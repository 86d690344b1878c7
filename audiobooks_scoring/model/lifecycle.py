"""Model lifecycle: read labeled history, train a challenger, judge it against the champion."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sqlalchemy import delete, insert

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, LABEL, TRAINING_COLUMNS
from audiobooks_scoring.model.evaluation import (
    Evaluation,
    evaluate_predictions,
    permutation_importance,
    split_test,
)
from audiobooks_scoring.model.network import (
    RECIPES,
    TrainedModel,
    extract_dense_weights,
    train_model,
)
from audiobooks_scoring.model.preprocessing import Preprocessing
from audiobooks_scoring.model.store import ModelStore, StoredModel
from audiobooks_scoring.monitoring.drift import FeatureProfile, profile_training
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter

logger = logging.getLogger(__name__)

TEST_SPLIT_SHARE = 0.2
MIN_TRAINING_ROWS = 200


class TrainingDataError(ValueError):
    """The labeled history cannot train a trustworthy model."""


@dataclass(frozen=True)
class TrainingData:
    """Labeled examples as arrays, with a fingerprint of their content."""

    customer_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray

    @property
    def fingerprint(self) -> str:
        """sha256 of the ids, features and labels, in order."""
        digest = hashlib.sha256()
        for array in (self.customer_ids, self.features, self.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Challenger:
    """A freshly trained model with its evaluation on a test split it never saw."""

    trained: TrainedModel
    rest_index: np.ndarray
    test_index: np.ndarray
    evaluation: Evaluation
    importance: list[dict[str, Any]]
    profile: FeatureProfile


@dataclass(frozen=True)
class Decision:
    """Whether a challenger becomes champion, and why."""

    promote: bool
    reason: str


def training_data_from_frame(frame: pd.DataFrame) -> TrainingData:
    """Arrays from a frame of training examples, refusing rows that break the contract."""
    features = frame[list(FEATURES)].to_numpy(dtype=np.float64)
    labels = frame[LABEL].to_numpy()
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        raise TrainingDataError(f"{bad} training rows have missing or infinite features")
    if not np.isin(labels, (0, 1)).all():
        raise TrainingDataError(f"column {LABEL} must hold only 0 and 1")
    if len(labels) < MIN_TRAINING_ROWS or labels.min() == labels.max():
        raise TrainingDataError(
            f"need at least {MIN_TRAINING_ROWS} training rows with both outcomes; "
            f"got {len(labels)} rows, {int(labels.sum())} converted"
        )
    return TrainingData(
        frame[CUSTOMER_ID].to_numpy(dtype=np.int64), features, labels.astype(np.int8)
    )


def read_training_data(warehouse: WarehouseAdapter, as_of: date, chunk_size: int) -> TrainingData:
    """The labeled history the training source query returns (windows ending by `as_of`)."""
    sql = warehouse.source_sql("training_examples")
    types = {name: pa.float64() for name in FEATURES}
    types.update({CUSTOMER_ID: pa.int64(), LABEL: pa.int64()})
    chunks = list(warehouse.stream_query(sql, {"as_of": as_of}, chunk_size, types))
    if not chunks:
        raise TrainingDataError(f"the training source returned no rows on or before {as_of}")
    frame = pd.concat(chunks, ignore_index=True)
    missing = [name for name in TRAINING_COLUMNS if name not in frame.columns]
    if missing:
        raise TrainingDataError(f"the training source lacks column(s) {', '.join(missing)}")
    return training_data_from_frame(frame)


def train_challenger(data: TrainingData, recipe_name: str, seed: int) -> Challenger:
    """Train on all but a fresh stratified test split; evaluate and explain on that test split."""
    if recipe_name not in RECIPES:
        raise TrainingDataError(f"unknown recipe {recipe_name!r}; known: {sorted(RECIPES)}")
    rest, test = split_test(data.labels, seed, TEST_SPLIT_SHARE)
    trained = train_model(data.features[rest], data.labels[rest], RECIPES[recipe_name], seed)
    test_probability = trained.predict_raw(data.features[test])
    evaluation = evaluate_predictions(data.labels[test], test_probability, trained.threshold)
    importance = permutation_importance(
        trained.predict_raw, data.features[test], data.labels[test], seed, repeats=3
    )
    train_rows = rest[trained.train_index]
    profile = profile_training(
        data.features[train_rows], trained.predict_raw(data.features[train_rows])
    )
    logger.info(
        "challenger (%s, seed %s): test-split AUC %.4f, Brier %.4f on %s rows",
        recipe_name,
        seed,
        evaluation.auc or float("nan"),
        evaluation.brier,
        len(test),
    )
    return Challenger(trained, rest, test, evaluation, importance, profile)


def challenger_splits(
    data: TrainingData, challenger: Challenger
) -> dict[str, dict[str, np.ndarray]]:
    """The exact train/validation/test rows of a challenger, for the model store."""
    rows = {
        "train": challenger.rest_index[challenger.trained.train_index],
        "validation": challenger.rest_index[challenger.trained.validation_index],
        "test": challenger.test_index,
    }
    return {
        name: {
            "customer_ids": data.customer_ids[index],
            "features": data.features[index],
            "labels": data.labels[index],
        }
        for name, index in rows.items()
    }


def save_challenger(
    store: ModelStore, data: TrainingData, challenger: Challenger, as_of: date
) -> str:
    """Store a challenger with its splits and metadata; returns the new version id."""
    trained = challenger.trained
    metadata = {
        "recipe": trained.recipe_name,
        "seed": trained.seed,
        "threshold": trained.threshold,
        "as_of": as_of.isoformat(),
        "metrics": challenger.evaluation.to_dict(),
        "feature_importance": challenger.importance,
        "training_profile": challenger.profile.to_dict(),
        "training_rows": int(len(data.labels)),
        "training_fingerprint": data.fingerprint,
        "feature_contract": list(FEATURES),
        "epochs_run": trained.epochs_run,
        "best_epoch": trained.best_epoch,
        "train_seconds": trained.train_seconds,
    }
    return store.save_version(
        trained.model,
        trained.preprocessing.to_json(),
        challenger_splits(data, challenger),
        metadata,
    )


def stored_probability(stored: StoredModel, features: np.ndarray) -> np.ndarray:
    """Probabilities of a stored model version for raw feature rows."""
    from audiobooks_scoring.model.network import predict_probability

    preprocessing = Preprocessing.from_json(stored.preprocessing_json)
    weights = extract_dense_weights(stored.model)
    return predict_probability(weights, preprocessing.transform(features))


def decide_promotion(
    challenger: Evaluation, champion: Evaluation | None, settings: Settings
) -> Decision:
    """Promote when there is no champion, or the challenger is not worse on the same test split."""
    calibration_gap = abs(challenger.mean_predicted - challenger.base_rate)
    noise = 3 * math.sqrt(challenger.base_rate * (1 - challenger.base_rate) / challenger.rows)
    allowed = max(settings.calibration_tolerance, noise)
    if calibration_gap > allowed:
        return Decision(
            False,
            f"challenger is miscalibrated: mean predicted {challenger.mean_predicted:.4f} vs "
            f"observed {challenger.base_rate:.4f} on {challenger.rows} test-split rows "
            f"(allowed gap {allowed:.4f}: calibration_tolerance or 3 standard errors)",
        )
    if champion is None:
        return Decision(True, "no champion yet; challenger is calibrated")
    challenger_auc = challenger.auc or 0.0
    champion_auc = champion.auc or 0.0
    if challenger_auc < champion_auc - settings.auc_tolerance:
        return Decision(
            False,
            f"challenger AUC {challenger_auc:.4f} is below champion AUC {champion_auc:.4f} "
            f"by more than {settings.auc_tolerance} on the same test split",
        )
    if challenger.calibration_error > champion.calibration_error + settings.calibration_tolerance:
        return Decision(
            False,
            f"challenger calibration error {challenger.calibration_error:.4f} is worse than "
            f"the champion's {champion.calibration_error:.4f} beyond tolerance",
        )
    return Decision(
        True,
        f"challenger AUC {challenger_auc:.4f} vs champion {champion_auc:.4f} on the same "
        f"test split (tolerance {settings.auc_tolerance}); calibration within bounds",
    )


def judge_challenger(
    store: ModelStore,
    data: TrainingData,
    challenger: Challenger,
    version: str,
    settings: Settings,
    force: bool = False,
) -> tuple[Decision, dict[str, Any] | None]:
    """Evaluate the champion on the challenger's test split, decide, and record it in the store."""
    champion_version = store.champion()
    champion_eval = None
    if champion_version is not None:
        champion = store.load_version(champion_version)
        test = challenger.test_index
        probability = stored_probability(champion, data.features[test])
        threshold = float(champion.metadata.get("threshold", data.labels.mean()))
        champion_eval = evaluate_predictions(data.labels[test], probability, threshold)
    decision = decide_promotion(challenger.evaluation, champion_eval, settings)
    if force and not decision.promote:
        decision = Decision(True, f"forced promotion (would not pass: {decision.reason})")
    if decision.promote:
        store.promote(version, decision.reason)
    else:
        store.record_decision(version, decision.reason)
    logger.info(
        "model %s: %s (%s)", version, "promoted" if decision.promote else "kept", decision.reason
    )
    return decision, None if champion_eval is None else {
        "version": champion_version,
        **champion_eval.to_dict(),
    }


def champion_age_days(store: ModelStore, now: datetime | None = None) -> float | None:
    """Age in days of the champion version, or None when there is none."""
    version = store.champion()
    if version is None:
        return None
    created = datetime.fromisoformat(store.read_metadata(version)["created_at"])
    return ((now or datetime.now(UTC)) - created).total_seconds() / 86400


def mirror_model_versions(warehouse: WarehouseAdapter, store: ModelStore) -> int:
    """Replace the `model_versions` table with one row per stored version; returns the count."""
    decisions: dict[str, str] = {}
    for entry in store.history():
        decisions[entry["version"]] = entry.get("reason", "")
    rows = []
    now = datetime.now(UTC)
    for info in store.list_versions():
        metrics = info.metrics
        metadata = store.read_metadata(info.version)
        rows.append(
            {
                "version": info.version,
                "status": info.status or "unregistered",
                "created_at": datetime.fromisoformat(info.created_at) if info.created_at else now,
                "updated_at": now,
                "recipe": metadata.get("recipe"),
                "auc": metrics.get("auc"),
                "balanced_accuracy": metrics.get("balanced_accuracy"),
                "brier": metrics.get("brier"),
                "log_loss": metrics.get("log_loss"),
                "lift_top_decile": metrics.get("lift_top_decile"),
                "training_rows": metadata.get("training_rows"),
                "training_fingerprint": metadata.get("training_fingerprint"),
                "artifact_digest": info.artifact_digest,
                "decision_reason": decisions.get(info.version),
            }
        )
    table = warehouse.tables.model_versions
    with warehouse.engine.begin() as conn:
        conn.execute(delete(table))
        if rows:
            conn.execute(insert(table), rows)
    return len(rows)
