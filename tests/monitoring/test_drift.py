"""Tests for the training profile and the streaming PSI drift accumulator."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.monitoring.drift import (
    BinProfile,
    DriftAccumulator,
    DriftResult,
    FeatureProfile,
    compute_psi,
    count_in_bins,
    profile_training,
    profile_values,
)

COLUMN = {name: j for j, name in enumerate(FEATURES)}


def make_population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return audiobook-like features (with the real data's ties) and scores for n customers."""
    length_avg = rng.choice([1080.0, 1188.0, 1620.0, 2160.0, 2700.0], size=n)
    books = rng.integers(1, 4, size=n)
    price_avg = np.round(rng.lognormal(2.0, 0.5, size=n), 2)
    review = (rng.random(n) < 0.16).astype(float)
    review_score = np.where(review == 1, rng.integers(1, 11, size=n).astype(float), 8.91)
    completion = np.where(rng.random(n) < 0.55, 0.0, np.round(rng.random(n), 2))
    support = np.where(rng.random(n) < 0.93, 0.0, rng.integers(1, 6, size=n).astype(float))
    last_visit = np.where(rng.random(n) < 0.35, 0.0, rng.integers(1, 400, size=n).astype(float))
    features = np.column_stack(
        [
            length_avg,
            length_avg * books,
            price_avg,
            price_avg * books,
            review,
            review_score,
            completion,
            completion * length_avg * books,
            support,
            last_visit,
        ]
    )
    scores = rng.beta(1.0, 5.0, size=n)
    return features, scores


def drift_of(profile: FeatureProfile, features: np.ndarray, scores: np.ndarray) -> DriftResult:
    accumulator = DriftAccumulator(profile)
    accumulator.add(features, scores)
    return accumulator.result()


@pytest.fixture(scope="module")
def training() -> tuple[np.ndarray, np.ndarray]:
    return make_population(np.random.default_rng(1), 100_000)


@pytest.fixture(scope="module")
def profile(training: tuple[np.ndarray, np.ndarray]) -> FeatureProfile:
    return profile_training(*training)


def test_psi_of_two_samples_from_the_same_generator_is_near_zero(profile):
    features, scores = make_population(np.random.default_rng(2), 100_000)
    result = drift_of(profile, features, scores)
    assert result.rows == 100_000
    assert all(psi < 0.01 for psi in result.feature_psi.values()), result.feature_psi
    assert result.score_psi < 0.01
    assert result.status(0.1, 0.25) == "ok"


def shift_by_one_sd(column: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return column + column.std()


def more_reviews(column: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(column.size) < 0.6).astype(float)


def more_support_requests(column: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return column + rng.integers(0, 3, size=column.size)


@pytest.mark.parametrize(
    ("feature", "transform"),
    [
        ("price_avg", shift_by_one_sd),
        ("last_visit_days_after_purchase", shift_by_one_sd),
        ("book_length_total_min", shift_by_one_sd),
        ("review", more_reviews),
        ("support_requests", more_support_requests),
    ],
)
def test_a_shifted_feature_shows_large_psi_and_is_named(
    profile, feature: str, transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
):
    rng = np.random.default_rng(3)
    features, scores = make_population(rng, 100_000)
    j = COLUMN[feature]
    features[:, j] = transform(features[:, j], rng)
    result = drift_of(profile, features, scores)
    assert result.feature_psi[feature] > 0.25
    assert result.max_feature == feature
    assert result.max_feature_psi == result.feature_psi[feature]
    others = [psi for name, psi in result.feature_psi.items() if name != feature]
    assert max(others) < 0.01
    assert result.status(0.1, 0.25) == "alert"


def test_a_shifted_score_shows_large_score_psi(profile):
    rng = np.random.default_rng(4)
    features, _ = make_population(rng, 100_000)
    result = drift_of(profile, features, rng.beta(2.0, 3.0, size=100_000))
    assert result.score_psi > 0.25
    assert result.max_feature_psi < 0.01
    assert result.status(0.1, 0.25) == "alert"


@pytest.mark.parametrize("chunk_size", [1, 7, 333, 5_000])
def test_accumulating_in_chunks_equals_one_pass(profile, chunk_size: int):
    features, scores = make_population(np.random.default_rng(5), 5_000)
    features[:, COLUMN["price_avg"]] *= 1.3
    chunked = DriftAccumulator(profile)
    for start in range(0, len(scores), chunk_size):
        chunked.add(features[start : start + chunk_size], scores[start : start + chunk_size])
    assert chunked.result() == drift_of(profile, features, scores)


def test_merging_partitions_equals_one_pass(profile):
    features, scores = make_population(np.random.default_rng(9), 3_000)
    features[:, COLUMN["completion"]] += 0.2
    first, second = DriftAccumulator(profile), DriftAccumulator(profile)
    first.add(features[:1_000], scores[:1_000])
    second.add(features[1_000:], scores[1_000:])
    second.add(np.full((2, len(FEATURES)), np.nan), np.zeros(2))
    merged = first.merged(second)
    assert merged.rows == 3_000
    assert merged.result().rows_skipped == 2
    assert merged.result().feature_psi == drift_of(profile, features, scores).feature_psi
    assert first.rows == 1_000 and second.rows == 2_000


def test_merging_accumulators_of_different_profiles_is_an_error(profile):
    features, scores = make_population(np.random.default_rng(10), 1_000)
    other = DriftAccumulator(profile_training(features, scores))
    with pytest.raises(ValueError, match="different profiles"):
        DriftAccumulator(profile).merged(other)


def test_rows_with_missing_values_are_skipped_and_counted(profile):
    features, scores = make_population(np.random.default_rng(6), 2_000)
    clean = drift_of(profile, features, scores)
    dirty_features = np.vstack([features, np.full((3, len(FEATURES)), 1.0)])
    dirty_scores = np.concatenate([scores, [0.5, np.nan, 0.5]])
    dirty_features[-3, COLUMN["completion"]] = np.nan
    dirty_features[-1, COLUMN["review_score"]] = np.inf
    dirty = drift_of(profile, dirty_features, dirty_scores)
    assert dirty.rows == clean.rows == 2_000
    assert dirty.rows_skipped == 3
    assert dirty.feature_psi == clean.feature_psi
    assert dirty.score_psi == clean.score_psi


def test_result_without_rows_is_an_error(profile):
    accumulator = DriftAccumulator(profile)
    accumulator.add(np.full((2, len(FEATURES)), np.nan), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="no rows"):
        accumulator.result()


@pytest.mark.parametrize(
    ("values", "expected_cuts"),
    [
        (np.array([0.0] * 84 + [1.0] * 16), (0.0,)),
        (np.array([0.0] * 95 + [1.0, 2.0, 2.0, 3.0, 5.0]), (0.0,)),
        (np.array([8.91] * 80 + [1.0] * 5 + [10.0] * 15), (8.91,)),
        (np.array([2.0] * 5 + [3.0] * 90 + [4.0] * 5), (3.0,)),
        (np.array([0.5, 0.7] + [1.0] * 98), (0.7,)),
        (np.array([0.0] * 50 + [1.0] * 30 + [2.0] * 20), (0.0, 1.0)),
        (np.repeat(np.arange(1.0, 21.0), 5), (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0)),
    ],
)
def test_ties_give_distinct_cuts_and_no_empty_bins(values: np.ndarray, expected_cuts):
    bins = profile_values(values)
    assert bins.cuts == expected_cuts
    assert all(share > 0 for share in bins.shares)
    edges = np.array([-np.inf, *bins.cuts, np.inf])
    for k, share in enumerate(bins.shares):
        in_bin = (values > edges[k]) & (values <= edges[k + 1])
        assert share == pytest.approx(in_bin.mean())


def test_every_training_bin_of_a_realistic_population_is_populated(profile):
    for name in (*FEATURES, "score"):
        bins = profile.score_bins if name == "score" else profile.bins_for(name)
        assert 2 <= bins.bin_count <= 10, name
        assert min(bins.shares) > 0, name
        assert len(set(bins.cuts)) == len(bins.cuts), name
    assert profile.score_bins.bin_count == 10
    assert profile.bins_for("review").cuts == (0.0,)
    assert profile.bins_for("support_requests").cuts == (0.0,)


def test_constant_training_column_still_detects_a_move_away():
    bins = profile_values(np.full(50, 3.0))
    assert bins.shares == (0.0, 1.0, 0.0)
    assert bins.count_values(np.array([3.0, 2.0, 4.0, 3.0])).tolist() == [1, 2, 1]


def test_values_outside_the_training_range_fall_in_the_open_ended_bins():
    bins = profile_values(np.linspace(0.0, 1.0, 1_001))
    counts = bins.count_values(np.array([-50.0, -1e300, 7.0, 1e300]))
    assert counts[0] == 2
    assert counts[-1] == 2
    assert counts.sum() == 4


def test_psi_matches_a_hand_computed_value():
    # (0.25 - 0.5) ln(0.25/0.5) + (0.75 - 0.5) ln(0.75/0.5) = 0.25 ln 3
    assert compute_psi(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(
        0.25 * math.log(3.0)
    )


def test_psi_of_an_empty_bin_is_large_but_finite():
    psi = compute_psi(np.array([0.5, 0.5]), np.array([1.0, 0.0]))
    assert math.isfinite(psi)
    assert psi > 1.0


def result_with(max_feature_psi: float, score_psi: float) -> DriftResult:
    return DriftResult(
        rows=10,
        rows_skipped=0,
        feature_psi={"price_avg": max_feature_psi},
        score_psi=score_psi,
        max_feature_psi=max_feature_psi,
        max_feature="price_avg",
        score_cuts=(0.5,),
        score_expected_shares=(0.5, 0.5),
        score_actual_shares=(0.5, 0.5),
    )


@pytest.mark.parametrize(
    ("max_feature_psi", "score_psi", "expected"),
    [
        (0.0, 0.0, "ok"),
        (0.099, 0.05, "ok"),
        (0.1, 0.0, "warning"),
        (0.0, 0.1, "warning"),
        (0.249, 0.2, "warning"),
        (0.25, 0.0, "alert"),
        (0.01, 0.3, "alert"),
        (3.0, 3.0, "alert"),
    ],
)
def test_status_thresholds(max_feature_psi: float, score_psi: float, expected: str):
    assert result_with(max_feature_psi, score_psi).status(warning=0.1, alert=0.25) == expected


def test_status_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="warning <= alert"):
        result_with(0.2, 0.0).status(warning=0.3, alert=0.2)


def test_feature_rows_are_sorted_by_psi():
    result = DriftResult(
        rows=1,
        rows_skipped=0,
        feature_psi={"review": 0.02, "price_avg": 0.4, "completion": 0.1},
        score_psi=0.0,
        max_feature_psi=0.4,
        max_feature="price_avg",
        score_cuts=(),
        score_expected_shares=(1.0,),
        score_actual_shares=(1.0,),
    )
    names = [row["feature"] for row in result.feature_rows()]
    assert names == ["price_avg", "completion", "review"]


def test_profile_round_trips_exactly_through_json(profile):
    restored = FeatureProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert restored == profile
    assert restored.to_dict() == profile.to_dict()


def test_drift_result_to_dict_is_json_ready(profile, training):
    result = drift_of(profile, training[0][:1_000], training[1][:1_000])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["max_feature"] == result.max_feature
    assert data["feature_psi"] == result.feature_psi


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format=99), "format"),
        (lambda d: d["features"].pop("review"), "contract"),
        (lambda d: d["score"].update(cuts=[0.5], shares=[0.5, 0.6]), "add up to 1"),
        (lambda d: d["features"]["review"].update(cuts=[1.0, 1.0]), "one share more"),
        (
            lambda d: (
                d["features"]["review"].update(cuts=[2.0], shares=[0.5, 0.5])
                or d["features"]["price_avg"].update(cuts=[3.0, 2.0], shares=[0.2, 0.3, 0.5])
            ),
            "strictly increasing",
        ),
    ],
)
def test_from_dict_rejects_a_broken_profile(profile, change, message: str):
    data = json.loads(json.dumps(profile.to_dict()))
    change(data)
    with pytest.raises(ValueError, match=message):
        FeatureProfile.from_dict(data)


@pytest.mark.parametrize(
    ("features", "scores"),
    [
        (np.zeros((3, len(FEATURES) - 1)), np.zeros(3)),
        (np.zeros(len(FEATURES)), np.zeros(1)),
        (np.zeros((3, len(FEATURES))), np.zeros(2)),
    ],
)
def test_add_rejects_misshaped_chunks(profile, features: np.ndarray, scores: np.ndarray):
    with pytest.raises(ValueError, match="must be"):
        DriftAccumulator(profile).add(features, scores)


def test_profile_training_skips_rows_with_missing_values():
    features, scores = make_population(np.random.default_rng(7), 1_000)
    with_gaps = features.copy()
    with_gaps[::10, COLUMN["price_avg"]] = np.nan
    assert profile_training(with_gaps, scores).training_rows == 900


def test_profile_inputs_are_not_mutated():
    features, scores = make_population(np.random.default_rng(8), 500)
    before = features.copy(), scores.copy()
    accumulator = DriftAccumulator(profile_training(features, scores))
    accumulator.add(features, scores)
    np.testing.assert_array_equal(features, before[0])
    np.testing.assert_array_equal(scores, before[1])


def test_bin_profile_json_values_are_plain_floats():
    bins = profile_values(np.array([1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.int64))
    data = bins.to_dict()
    assert all(type(v) is float for v in data["cuts"] + data["shares"])
    assert BinProfile.from_dict(data) == bins


BIN_CASES = {
    "values on the cuts": ([1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 2.5, 3.0, 3.5, 0.0]),
    "infinities and NaN": ([0.0, 10.0], [-np.inf, np.inf, np.nan, 5.0, 10.0, -0.0]),
    "no values": ([1.0, 2.0], []),
    "one cut": ([0.5], [0.1, 0.5, 0.9]),
}


@pytest.mark.parametrize(("cuts", "values"), BIN_CASES.values(), ids=BIN_CASES.keys())
def test_bin_counts_match_looking_each_value_up(cuts, values):
    values = np.asarray(values, dtype=np.float64)
    looked_up = np.searchsorted(np.asarray(cuts), values, side="left")  # NaN goes last
    expected = np.bincount(looked_up, minlength=len(cuts) + 1)
    assert count_in_bins(cuts, values).tolist() == expected.tolist()
