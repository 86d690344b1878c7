"""Drift monitoring: a binned profile of the training data and a streaming PSI against it.

A `FeatureProfile` is made once per model version from its training features and scores,
and stored with the model as JSON. At scoring time a `DriftAccumulator` counts each chunk's
rows into the profile's bins, so memory stays constant whatever the population size, and
`result()` turns the counts into the population stability index (PSI) per feature and for
the score.

Binning rules (the same for every feature and for the score):

- Cut points are the training data's deciles (`inverted_cdf`, so every cut is a value that
  occurs in the data), de-duplicated: a feature with heavy ties (`review` is 0 or 1,
  `support_requests` is mostly 0) gets fewer than ten bins, never empty duplicate ones.
- Bins are closed on the right: bin 0 is `(-inf, cuts[0]]`, bin i is `(cuts[i-1], cuts[i]]`,
  the last is `(cuts[-1], +inf)`, which with `inverted_cdf` cuts gives each bin about a
  tenth of the rows. The first and last bins are open-ended, so values outside the
  training range still land somewhere and show up as drift.
- A cut equal to the training maximum is dropped (it would leave the last bin empty), so
  every training bin holds at least one row. When that leaves no cut at all (nine tenths
  of the rows share the maximum), the largest value below the maximum becomes the one cut.
  A heavy mass at the minimum needs no such help: `support_requests` (mostly 0) and
  `review` (0 or 1) get the bins "0" and "above 0".
- A feature that is constant in training gets the cuts `(next float below c, c)`: the
  bins below and above the constant are empty in training, so any move away is drift.
- The score uses quantile bins too (a sigmoid score crowds into a few fixed-width bins);
  since scores lie in [0, 1], its outer bins are effectively `[0, cuts[0]]` and
  `(cuts[-1], 1]`.

PSI is `sum((a - e) * ln(a / e))` over bins, with actual (`a`) and expected (`e`) shares
floored at `PSI_EPSILON` so empty bins give a large but finite value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from audiobooks_scoring.contract import FEATURES

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 1
QUANTILE_BINS = 10
PSI_EPSILON = 1e-4

DriftStatus = Literal["ok", "warning", "alert"]


@dataclass(frozen=True)
class BinProfile:
    """Cut points of one variable's bins and the training share of rows in each bin."""

    cuts: tuple[float, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.cuts) + 1:
            raise ValueError(
                f"a bin profile needs one share more than cuts; got {len(self.cuts)} cuts "
                f"and {len(self.shares)} shares"
            )
        if any(not math.isfinite(c) for c in self.cuts):
            raise ValueError(f"bin cuts must be finite numbers; got {list(self.cuts)}")
        if any(b <= a for a, b in zip(self.cuts, self.cuts[1:], strict=False)):
            raise ValueError(f"bin cuts must be strictly increasing; got {list(self.cuts)}")
        if any(not (0.0 <= s <= 1.0) for s in self.shares) or not math.isclose(
            sum(self.shares), 1.0, abs_tol=1e-9
        ):
            raise ValueError(
                f"bin shares must lie in [0, 1] and add up to 1; got {list(self.shares)}"
            )

    @property
    def bin_count(self) -> int:
        """Number of bins (one more than the number of cuts)."""
        return len(self.cuts) + 1

    def count_values(self, values: np.ndarray) -> np.ndarray:
        """Return the number of `values` falling in each bin (values must be finite)."""
        return count_in_bins(self.cuts, values)

    def to_dict(self) -> dict[str, list[float]]:
        """Return the profile as JSON-ready lists of plain floats."""
        return {"cuts": [float(c) for c in self.cuts], "shares": [float(s) for s in self.shares]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BinProfile:
        """Rebuild a bin profile from `to_dict()` output."""
        return cls(
            cuts=tuple(float(c) for c in data["cuts"]),
            shares=tuple(float(s) for s in data["shares"]),
        )


@dataclass(frozen=True)
class FeatureProfile:
    """Training-time bins and shares of every feature (in `FEATURES` order) and of the score."""

    features: tuple[str, ...]
    feature_bins: tuple[BinProfile, ...]
    score_bins: BinProfile
    training_rows: int

    def __post_init__(self) -> None:
        if len(self.features) != len(self.feature_bins):
            raise ValueError(
                f"profile names {len(self.features)} features but holds "
                f"{len(self.feature_bins)} bin profiles"
            )
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"profile feature names repeat: {list(self.features)}")
        if self.training_rows < 1:
            raise ValueError(f"training_rows must be at least 1; got {self.training_rows}")

    def bins_for(self, feature: str) -> BinProfile:
        """Return the bin profile of one feature by name."""
        try:
            return self.feature_bins[self.features.index(feature)]
        except ValueError:
            raise KeyError(f"feature {feature!r} is not in the profile {self.features}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-ready dict (floats round-trip exactly through JSON)."""
        return {
            "format": PROFILE_FORMAT,
            "training_rows": int(self.training_rows),
            "features": {
                name: bins.to_dict()
                for name, bins in zip(self.features, self.feature_bins, strict=True)
            },
            "score": self.score_bins.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureProfile:
        """Rebuild a profile from `to_dict()` output, checking its format and features."""
        fmt = data.get("format")
        if fmt != PROFILE_FORMAT:
            raise ValueError(
                f"feature profile format {fmt!r} is not supported (expected {PROFILE_FORMAT})"
            )
        features = tuple(name for name in FEATURES if name in data["features"])
        if sorted(data["features"]) != sorted(FEATURES):
            raise ValueError(
                f"feature profile lists features {list(features)}; the contract expects "
                f"{list(FEATURES)}"
            )
        return cls(
            features=features,
            feature_bins=tuple(BinProfile.from_dict(data["features"][f]) for f in features),
            score_bins=BinProfile.from_dict(data["score"]),
            training_rows=int(data["training_rows"]),
        )


@dataclass(frozen=True)
class DriftResult:
    """PSI of each feature and of the score for one run, with the bin shares behind them."""

    rows: int
    rows_skipped: int
    feature_psi: dict[str, float]
    score_psi: float
    max_feature_psi: float
    max_feature: str
    score_cuts: tuple[float, ...]
    score_expected_shares: tuple[float, ...]
    score_actual_shares: tuple[float, ...]

    @property
    def max_psi(self) -> float:
        """The largest PSI over all features and the score."""
        return max(self.max_feature_psi, self.score_psi)

    def status(self, warning: float = 0.1, alert: float = 0.25) -> DriftStatus:
        """Return "alert", "warning" or "ok" by comparing the largest PSI with the thresholds."""
        if not 0.0 <= warning <= alert:
            raise ValueError(
                f"drift thresholds must satisfy 0 <= warning <= alert; got warning={warning}, "
                f"alert={alert}"
            )
        if self.max_psi >= alert:
            return "alert"
        if self.max_psi >= warning:
            return "warning"
        return "ok"

    def feature_rows(self) -> list[dict[str, Any]]:
        """Return one {"feature", "psi"} row per feature, largest PSI first, for tables."""
        ordered = sorted(self.feature_psi.items(), key=lambda item: item[1], reverse=True)
        return [{"feature": name, "psi": psi} for name, psi in ordered]

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict of plain numbers."""
        return {
            "rows": self.rows,
            "rows_skipped": self.rows_skipped,
            "feature_psi": dict(self.feature_psi),
            "score_psi": self.score_psi,
            "max_feature_psi": self.max_feature_psi,
            "max_feature": self.max_feature,
            "score_cuts": list(self.score_cuts),
            "score_expected_shares": list(self.score_expected_shares),
            "score_actual_shares": list(self.score_actual_shares),
        }


def count_in_bins(cuts: tuple[float, ...] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Return how many `values` fall in each right-closed bin delimited by `cuts`.

    The values are sorted (a vectorised sort) and the few cuts looked up in them, which is
    several times faster than looking every value up among the cuts; NaN counts as largest.
    """
    edges = np.asarray(cuts, dtype=np.float64)
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    at_most = np.searchsorted(ordered, edges, side="right")
    return np.diff(at_most, prepend=0, append=ordered.size).astype(np.int64)


def compute_psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Return the population stability index of `actual` bin shares against `expected`."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs equal bin counts; got {e.shape} and {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def profile_values(values: np.ndarray, bins: int = QUANTILE_BINS) -> BinProfile:
    """Return quantile bins (de-duplicated, none empty) and shares of finite 1-D `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"profiling needs a non-empty 1-D array; got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("profiling needs finite values; drop NaN/inf rows first")
    highest = float(x.max())
    if highest == float(x.min()):
        cuts = np.array([np.nextafter(highest, -np.inf), highest])
    else:
        quantiles = np.arange(1, bins) / bins
        cuts = np.unique(np.quantile(x, quantiles, method="inverted_cdf"))
        cuts = cuts[cuts < highest]
        if cuts.size == 0:
            cuts = np.array([x[x < highest].max()])
    counts = count_in_bins(cuts, x)
    return BinProfile(
        cuts=tuple(float(c) for c in cuts), shares=tuple(float(n / x.size) for n in counts)
    )


def _check_chunk(features: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES):
        raise ValueError(
            f"features must be a 2-D array with {len(FEATURES)} columns in FEATURES order; "
            f"got shape {x.shape}"
        )
    if s.shape != (x.shape[0],):
        raise ValueError(
            f"scores must be a 1-D array with one value per feature row ({x.shape[0]}); "
            f"got shape {s.shape}"
        )
    return x, s


def _finite_rows(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1) & np.isfinite(s)


def profile_training(features: np.ndarray, scores: np.ndarray) -> FeatureProfile:
    """Return the binned profile of training `features` (columns in FEATURES order) and scores."""
    x, s = _check_chunk(features, scores)
    keep = _finite_rows(x, s)
    if not keep.any():
        raise ValueError("cannot profile training data: no row has finite features and score")
    skipped = int((~keep).sum())
    if skipped:
        logger.warning("profile_training skipped %d rows with missing values", skipped)
    x, s = x[keep], s[keep]
    return FeatureProfile(
        features=FEATURES,
        feature_bins=tuple(profile_values(x[:, j]) for j in range(x.shape[1])),
        score_bins=profile_values(s),
        training_rows=int(x.shape[0]),
    )


class DriftAccumulator:
    """Counts scoring chunks into a profile's bins; `result()` gives PSI per feature and score."""

    def __init__(self, profile: FeatureProfile) -> None:
        if profile.features != FEATURES:
            raise ValueError(
                f"profile features {list(profile.features)} differ from the contract "
                f"{list(FEATURES)}"
            )
        self.profile = profile
        self._feature_counts = [np.zeros(b.bin_count, dtype=np.int64) for b in profile.feature_bins]
        self._score_counts = np.zeros(profile.score_bins.bin_count, dtype=np.int64)
        self._rows = 0
        self._rows_skipped = 0

    @property
    def rows(self) -> int:
        """Rows counted so far (rows with a missing value are not counted)."""
        return self._rows

    def add(self, features: np.ndarray, scores: np.ndarray) -> None:
        """Count a chunk of features (FEATURES order) and scores; skip rows with NaN/inf."""
        x, s = _check_chunk(features, scores)
        keep = _finite_rows(x, s)
        kept = int(keep.sum())
        self._rows_skipped += int(keep.size - kept)
        if kept == 0:
            return
        if kept < keep.size:
            x, s = x[keep], s[keep]
        for j, bins in enumerate(self.profile.feature_bins):
            self._feature_counts[j] += bins.count_values(x[:, j])
        self._score_counts += self.profile.score_bins.count_values(s)
        self._rows += kept

    def merged(self, other: DriftAccumulator) -> DriftAccumulator:
        """Return a new accumulator holding both accumulators' counts (same profile only)."""
        if other.profile is not self.profile and other.profile != self.profile:
            raise ValueError("cannot merge drift counts made against different profiles")
        combined = DriftAccumulator(self.profile)
        combined._feature_counts = [
            mine + theirs
            for mine, theirs in zip(self._feature_counts, other._feature_counts, strict=True)
        ]
        combined._score_counts = self._score_counts + other._score_counts
        combined._rows = self._rows + other._rows
        combined._rows_skipped = self._rows_skipped + other._rows_skipped
        return combined

    def result(self) -> DriftResult:
        """Return the PSI of every feature and of the score over all chunks added so far."""
        if self._rows == 0:
            raise ValueError(
                f"no rows to compare with the training profile ({self._rows_skipped} rows were "
                "skipped for missing values); drift is undefined"
            )
        feature_psi: dict[str, float] = {}
        for name, bins, counts in zip(
            self.profile.features, self.profile.feature_bins, self._feature_counts, strict=True
        ):
            feature_psi[name] = compute_psi(np.asarray(bins.shares), counts / self._rows)
        score_actual = self._score_counts / self._rows
        max_feature = max(feature_psi, key=lambda name: feature_psi[name])
        result = DriftResult(
            rows=self._rows,
            rows_skipped=self._rows_skipped,
            feature_psi=feature_psi,
            score_psi=compute_psi(np.asarray(self.profile.score_bins.shares), score_actual),
            max_feature_psi=feature_psi[max_feature],
            max_feature=max_feature,
            score_cuts=self.profile.score_bins.cuts,
            score_expected_shares=self.profile.score_bins.shares,
            score_actual_shares=tuple(float(v) for v in score_actual),
        )
        logger.info(
            "drift over %d rows: score PSI %.4f, max feature PSI %.4f (%s)",
            result.rows,
            result.score_psi,
            result.max_feature_psi,
            result.max_feature,
        )
        return result
