"""Tests of the fitted preprocessing: transform, JSON round trip and validation."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.model.preprocessing import (
    LOG1P_FEATURES,
    Preprocessing,
    fit_preprocessing,
)


def make_raw_rows(count: int, seed: int = 0) -> np.ndarray:
    """Return `count` plausible raw feature rows in FEATURES order."""
    rng = np.random.default_rng(seed)
    avg_length = rng.choice([216.0, 1188.0, 1620.0, 2160.0], size=count)
    total_length = avg_length * rng.integers(1, 4, size=count)
    price_avg = rng.uniform(3.86, 20.0, size=count)
    price_total = price_avg * rng.integers(1, 3, size=count)
    review = rng.integers(0, 2, size=count).astype(float)
    review_score = np.where(review == 1, rng.integers(1, 11, size=count), 8.91)
    completion = np.round(rng.uniform(0, 1, size=count), 2)
    minutes = completion * total_length
    support = rng.poisson(0.1, size=count).astype(float)
    last_visit = rng.integers(0, 400, size=count).astype(float)
    return np.column_stack(
        [
            avg_length,
            total_length,
            price_avg,
            price_total,
            review,
            review_score,
            completion,
            minutes,
            support,
            last_visit,
        ]
    )


def test_fit_uses_log1p_then_standardizes() -> None:
    rows = make_raw_rows(200)
    fitted = fit_preprocessing(rows)
    transformed = fitted.transform(rows)
    assert transformed.dtype == np.float32
    assert transformed.shape == rows.shape
    np.testing.assert_allclose(transformed.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(transformed.std(axis=0), 1.0, atol=1e-5)
    price = FEATURES.index("price_avg")
    review = FEATURES.index("review")
    assert "price_avg" in LOG1P_FEATURES and "review" not in LOG1P_FEATURES
    logged = np.log1p(rows[:, price])
    expected_price = (logged - logged.mean()) / logged.std()
    np.testing.assert_allclose(transformed[:, price], expected_price, rtol=1e-5, atol=1e-5)
    expected_review = (rows[:, review] - rows[:, review].mean()) / rows[:, review].std()
    np.testing.assert_allclose(transformed[:, review], expected_review, rtol=1e-5, atol=1e-5)


def test_transform_uses_only_training_statistics() -> None:
    train = make_raw_rows(100, seed=1)
    fitted = fit_preprocessing(train)
    other = make_raw_rows(50, seed=2) * 3.0
    alone = fitted.transform(other[:1])
    together = fitted.transform(other)[:1]
    np.testing.assert_array_equal(alone, together)
    refit_on_other = fit_preprocessing(np.vstack([train, other]))
    assert fitted.mean != refit_on_other.mean
    np.testing.assert_array_equal(np.asarray(fitted.medians), np.median(train, axis=0))


def test_json_round_trip_is_exact() -> None:
    fitted = fit_preprocessing(make_raw_rows(123, seed=3))
    restored = Preprocessing.from_json(fitted.to_json())
    assert restored == fitted
    for original, back in zip(
        fitted.mean + fitted.scale + fitted.medians,
        restored.mean + restored.scale + restored.medians,
        strict=True,
    ):
        assert original.hex() == back.hex()
    rows = make_raw_rows(10, seed=4)
    np.testing.assert_array_equal(fitted.transform(rows), restored.transform(rows))


def test_json_holds_plain_numbers() -> None:
    data = json.loads(fit_preprocessing(make_raw_rows(20)).to_json())
    assert data["features"] == list(FEATURES)
    assert all(isinstance(value, float) for value in data["mean"] + data["scale"])


def mutate(text: str, key: str, value: object) -> str:
    data = json.loads(text)
    data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("features", list(reversed(FEATURES)), "contract FEATURES"),
        ("mean", [0.0] * 9, "'mean' has 9 values"),
        ("scale", [1.0] * 9 + [0.0], "must be > 0"),
        ("medians", [1.0] * 9 + ["x"], "list of numbers"),
        ("transforms", ["sqrt"] * 10, "not among"),
        ("format_version", 99, "format_version"),
    ],
)
def test_from_json_rejects_bad_content(key: str, value: object, message: str) -> None:
    text = fit_preprocessing(make_raw_rows(20)).to_json()
    with pytest.raises(ValueError, match=message):
        Preprocessing.from_json(mutate(text, key, value))


def test_from_json_rejects_non_finite_numbers() -> None:
    text = (
        fit_preprocessing(make_raw_rows(20))
        .to_json()
        .replace(json.dumps(fit_preprocessing(make_raw_rows(20)).mean[0]), "Infinity", 1)
    )
    with pytest.raises(ValueError, match="not finite"):
        Preprocessing.from_json(text)


def test_from_json_rejects_missing_key_and_garbage() -> None:
    data = json.loads(fit_preprocessing(make_raw_rows(20)).to_json())
    del data["medians"]
    with pytest.raises(ValueError, match="medians"):
        Preprocessing.from_json(json.dumps(data))
    with pytest.raises(ValueError, match="not valid JSON"):
        Preprocessing.from_json("{not json")


def test_transform_rejects_wrong_width() -> None:
    fitted = fit_preprocessing(make_raw_rows(20))
    with pytest.raises(ValueError, match="10 feature columns"):
        fitted.transform(np.zeros((3, 9)))


def test_constant_column_gets_unit_scale() -> None:
    rows = make_raw_rows(30)
    rows[:, FEATURES.index("review")] = 1.0
    fitted = fit_preprocessing(rows)
    assert fitted.scale[FEATURES.index("review")] == 1.0
    assert np.all(fitted.transform(rows)[:, FEATURES.index("review")] == 0.0)


def test_medians_scaled_matches_transform_of_medians() -> None:
    fitted = fit_preprocessing(make_raw_rows(41))
    expected = fitted.transform(np.asarray(fitted.medians)[None, :])[0]
    np.testing.assert_array_equal(fitted.medians_scaled(), expected)


def test_module_does_not_import_tensorflow() -> None:
    assert "audiobooks_scoring.model.preprocessing" in sys.modules
    # Importing preprocessing (done above) must not pull TensorFlow in on its own; other test
    # modules may have imported it, so check in a fresh interpreter.
    import subprocess

    code = (
        "import sys, audiobooks_scoring.model.preprocessing, audiobooks_scoring.model.evaluation;"
        "sys.exit(int('tensorflow' in sys.modules or 'keras' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_transform_does_not_modify_its_input() -> None:
    rows = make_raw_rows(25, seed=8)
    rows[0, FEATURES.index("price_avg")] = -1.0
    before = rows.copy()
    transformed = fit_preprocessing(make_raw_rows(25)).transform(rows)
    np.testing.assert_array_equal(rows, before)
    assert np.isfinite(transformed).all()
