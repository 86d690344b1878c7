"""Feature preprocessing: per-feature log1p, standardization and training medians, as plain JSON.

The fitted `Preprocessing` is stored beside the Keras model as JSON numbers (never a pickle).
Statistics come from the training rows only; `transform` applies them to any rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from audiobooks_scoring.contract import FEATURES

FORMAT_VERSION = 1

# Heavy right-skewed features (counts, minutes, money, days) are compressed with log1p
# before standardizing; it gives the MLP a better-conditioned input (measured in the
# evaluation protocol, see audiobooks_scoring/model.py).
LOG1P_FEATURES: tuple[str, ...] = (
    "book_length_avg_min",
    "book_length_total_min",
    "price_avg",
    "price_total",
    "minutes_listened",
    "support_requests",
    "last_visit_days_after_purchase",
)

TRANSFORMS: tuple[str, ...] = ("identity", "log1p")


@dataclass(frozen=True)
class Preprocessing:
    """Fitted preprocessing: `(transform_j(x_j) - mean_j) / scale_j` per feature, plus raw medians.

    `transforms[j]` is "identity" or "log1p" (log1p is applied to `max(x, 0)`; the feature
    contract rejects negative values upstream). `medians` are the training medians of the raw
    feature values, used as the reference point of reason codes.
    """

    features: tuple[str, ...]
    transforms: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    medians: tuple[float, ...]

    def __post_init__(self) -> None:
        check_preprocessing_fields(
            self.features, self.transforms, self.mean, self.scale, self.medians
        )

    @property
    def log1p_mask(self) -> np.ndarray:
        """Boolean mask of the features transformed with log1p."""
        return np.array([name == "log1p" for name in self.transforms], dtype=bool)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Return the model input (float32, n x 10) for raw feature rows in FEATURES order."""
        shape = np.shape(X)
        if len(shape) != 2 or shape[1] != len(self.features):
            raise ValueError(
                f"expected a 2-D array with {len(self.features)} feature columns "
                f"({', '.join(self.features)}); got shape {shape}"
            )
        # One private float64 copy, feature by feature (features x rows, so that every step
        # runs over contiguous values), then in-place steps: the caller's array is never
        # modified. Each value goes through the same operations as row by row.
        values = np.array(np.asarray(X).T, dtype=np.float64, order="C", copy=True)
        for column in np.flatnonzero(self.log1p_mask):
            row = values[column]
            np.maximum(row, 0.0, out=row)
            np.log1p(row, out=row)
        values -= np.asarray(self.mean)[:, None]
        values /= np.asarray(self.scale)[:, None]
        return np.array(values.T, dtype=np.float32, order="C")

    def medians_scaled(self) -> np.ndarray:
        """Return the training medians in model-input space (float32, length 10)."""
        return self.transform(np.asarray(self.medians, dtype=np.float64)[None, :])[0]

    def to_dict(self) -> dict[str, object]:
        """Return the JSON-ready dictionary of this preprocessing (plain numbers and names)."""
        return {
            "format_version": FORMAT_VERSION,
            "features": list(self.features),
            "transforms": list(self.transforms),
            "mean": [float(value) for value in self.mean],
            "scale": [float(value) for value in self.scale],
            "medians": [float(value) for value in self.medians],
        }

    def to_json(self) -> str:
        """Return this preprocessing as JSON text that `from_json` restores exactly."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        """Return the preprocessing stored in `text`, validated against the feature contract."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"preprocessing JSON is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ValueError("preprocessing JSON must be an object")
        expected = {"format_version", "features", "transforms", "mean", "scale", "medians"}
        missing = sorted(expected - set(data))
        if missing:
            raise ValueError(f"preprocessing JSON lacks key(s): {', '.join(missing)}")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"preprocessing JSON format_version {data['format_version']!r} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        return cls(
            features=tuple(parse_names(data["features"], "features")),
            transforms=tuple(parse_names(data["transforms"], "transforms")),
            mean=tuple(parse_numbers(data["mean"], "mean")),
            scale=tuple(parse_numbers(data["scale"], "scale")),
            medians=tuple(parse_numbers(data["medians"], "medians")),
        )


def parse_names(value: object, key: str) -> list[str]:
    """Return `value` as a list of strings, or raise naming the JSON key."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"preprocessing JSON {key!r} must be a list of strings")
    return value


def parse_numbers(value: object, key: str) -> list[float]:
    """Return `value` as a list of floats, or raise naming the JSON key."""
    if not isinstance(value, list) or not all(
        isinstance(item, int | float) and not isinstance(item, bool) for item in value
    ):
        raise ValueError(f"preprocessing JSON {key!r} must be a list of numbers")
    return [float(item) for item in value]


def check_preprocessing_fields(
    features: Sequence[str],
    transforms: Sequence[str],
    mean: Sequence[float],
    scale: Sequence[float],
    medians: Sequence[float],
) -> None:
    """Raise ValueError unless the fields match the feature contract and hold finite numbers."""
    if tuple(features) != FEATURES:
        raise ValueError(
            f"preprocessing features {list(features)} do not equal the contract FEATURES "
            f"{list(FEATURES)}"
        )
    count = len(FEATURES)
    for key, values in (
        ("transforms", transforms),
        ("mean", mean),
        ("scale", scale),
        ("medians", medians),
    ):
        if len(values) != count:
            raise ValueError(f"preprocessing {key!r} has {len(values)} values; expected {count}")
    unknown = sorted({name for name in transforms if name not in TRANSFORMS})
    if unknown:
        raise ValueError(f"preprocessing transforms {unknown} are not among {list(TRANSFORMS)}")
    for key, values in (("mean", mean), ("scale", scale), ("medians", medians)):
        for name, value in zip(FEATURES, values, strict=True):
            if not math.isfinite(value):
                raise ValueError(f"preprocessing {key!r} for {name!r} is not finite: {value!r}")
    for name, value in zip(FEATURES, scale, strict=True):
        if value <= 0.0:
            raise ValueError(f"preprocessing 'scale' for {name!r} must be > 0; got {value!r}")


def fit_preprocessing(
    X_raw: np.ndarray, log1p_features: Sequence[str] = LOG1P_FEATURES
) -> Preprocessing:
    """Return the preprocessing fitted on the training rows `X_raw` (n x 10, FEATURES order)."""
    values = np.asarray(X_raw, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(FEATURES) or values.shape[0] < 2:
        raise ValueError(
            f"fit_preprocessing needs at least 2 rows of {len(FEATURES)} features; "
            f"got shape {values.shape}"
        )
    if not np.isfinite(values).all():
        finite = np.asarray(np.isfinite(values).all(axis=0))
        bad = [name for name, ok in zip(FEATURES, finite.tolist(), strict=True) if not ok]
        raise ValueError(f"fit_preprocessing got non-finite values in {bad}")
    unknown = sorted(set(log1p_features) - set(FEATURES))
    if unknown:
        raise ValueError(f"log1p_features {unknown} are not contract FEATURES")
    transforms = tuple("log1p" if name in log1p_features else "identity" for name in FEATURES)
    mask = np.array([name == "log1p" for name in transforms], dtype=bool)
    transformed = values.copy()
    transformed[:, mask] = np.log1p(np.maximum(transformed[:, mask], 0.0))
    mean = transformed.mean(axis=0)
    scale = transformed.std(axis=0)
    # A constant column carries no information; scale 1 keeps it at 0 instead of dividing by 0.
    scale = np.where(scale > 1e-12, scale, 1.0)
    medians = np.median(values, axis=0)
    return Preprocessing(
        features=FEATURES,
        transforms=transforms,
        mean=tuple(float(value) for value in mean),
        scale=tuple(float(value) for value in scale),
        medians=tuple(float(value) for value in medians),
    )
