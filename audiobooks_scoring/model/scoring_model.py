"""A stored model version in the form scoring needs: numpy weights, preprocessing, profile."""

from __future__ import annotations

from dataclasses import dataclass, field

from audiobooks_scoring.model.network import DenseWeights, extract_dense_weights
from audiobooks_scoring.model.preprocessing import Preprocessing
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.monitoring.drift import FeatureProfile


@dataclass(frozen=True)
class ScoringModel:
    """What scoring needs from a stored model version: weights, preprocessing, training profile."""

    version: str
    weights: DenseWeights
    preprocessing: Preprocessing
    profile: FeatureProfile | None
    metrics: dict = field(default_factory=dict)
    importance: list = field(default_factory=list)


def load_scoring_model(store: ModelStore, version: str) -> ScoringModel:
    """A verified stored version in the form scoring needs (numpy weights, preprocessing)."""
    stored = store.load_version(version)
    profile_data = stored.metadata.get("training_profile")
    return ScoringModel(
        version=version,
        weights=extract_dense_weights(stored.model),
        preprocessing=Preprocessing.from_json(stored.preprocessing_json),
        profile=FeatureProfile.from_dict(profile_data) if profile_data else None,
        metrics=dict(stored.metadata.get("metrics", {})),
        importance=list(stored.metadata.get("feature_importance", [])),
    )


def load_champion(store: ModelStore) -> ScoringModel:
    """The champion, digest-verified and loaded in safe mode; raises when there is none."""
    version = store.champion()
    if version is None:
        raise RuntimeError("no champion model in the store; run retrain-model first")
    return load_scoring_model(store, version)
