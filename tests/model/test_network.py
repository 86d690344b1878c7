"""Tests of model training, the numpy inference path and reason contributions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.model.network import (
    RECIPES,
    DenseLayer,
    DenseWeights,
    Recipe,
    extract_dense_weights,
    keras_probability,
    predict_probability,
    train_model,
)
from tests.scoring.reference import reason_contributions

keras = pytest.importorskip("keras")


def make_raw_rows(count: int, seed: int = 0) -> np.ndarray:
    """Return `count` plausible raw feature rows in FEATURES order."""
    rng = np.random.default_rng(seed)
    avg_length = rng.choice([216.0, 1188.0, 1620.0, 2160.0], size=count)
    total_length = avg_length * rng.integers(1, 4, size=count)
    price_avg = rng.uniform(3.86, 20.0, size=count)
    review = rng.integers(0, 2, size=count).astype(float)
    completion = np.round(rng.uniform(0, 1, size=count), 2)
    return np.column_stack(
        [
            avg_length,
            total_length,
            price_avg,
            price_avg * rng.integers(1, 3, size=count),
            review,
            np.where(review == 1, rng.integers(1, 11, size=count), 8.91),
            completion,
            completion * total_length,
            rng.poisson(0.1, size=count).astype(float),
            rng.integers(0, 400, size=count).astype(float),
        ]
    )


def make_labels(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return noisy 0/1 labels that depend on completion and last visit, about 25% positive."""
    rng = np.random.default_rng(seed)
    completion = rows[:, FEATURES.index("completion")]
    last_visit = rows[:, FEATURES.index("last_visit_days_after_purchase")]
    logit = 3.0 * completion + last_visit / 150.0 - 3.0 + rng.normal(0, 0.5, len(rows))
    return (logit > 0).astype(np.int64)


def quick(recipe_name: str) -> Recipe:
    """Return the named recipe shortened to a few epochs for fast tests."""
    return dataclasses.replace(RECIPES[recipe_name], max_epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def trained() -> object:
    rows = make_raw_rows(600, seed=11)
    return train_model(rows, make_labels(rows), quick("default"), seed=7)


def test_recipes_state_their_own_thresholds() -> None:
    assert {"default", "seeds"} <= set(RECIPES)
    assert RECIPES["seeds"].balance_classes and RECIPES["seeds"].threshold_rule == "half"
    assert RECIPES["seeds"].batch_size == 100 and RECIPES["seeds"].patience == 2
    assert not RECIPES["default"].balance_classes
    assert RECIPES["default"].threshold_rule == "base_rate"
    assert RECIPES["default"].restore_best_weights


def test_train_model_records_split_and_history(trained) -> None:
    assert trained.recipe_name == "default"
    assert set(trained.train_index).isdisjoint(trained.validation_index)
    assert trained.train_index.size + trained.validation_index.size == 600
    assert 1 <= trained.epochs_run <= 3
    assert trained.epochs_run == len(trained.history["loss"])
    assert "val_loss" in trained.history
    assert trained.threshold == pytest.approx(trained.base_rate)
    labels = make_labels(make_raw_rows(600, seed=11))
    assert trained.base_rate == pytest.approx(labels[trained.train_index].mean())


def test_preprocessing_fitted_on_training_rows_only(trained) -> None:
    rows = make_raw_rows(600, seed=11)
    np.testing.assert_array_equal(
        np.asarray(trained.preprocessing.medians), np.median(rows[trained.train_index], axis=0)
    )


def test_train_model_is_reproducible_for_a_seed() -> None:
    rows = make_raw_rows(300, seed=5)
    labels = make_labels(rows, seed=5)
    first = train_model(rows, labels, quick("default"), seed=3)
    second = train_model(rows, labels, quick("default"), seed=3)
    other = train_model(rows, labels, quick("default"), seed=4)
    np.testing.assert_array_equal(first.train_index, second.train_index)
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.history == second.history
    assert not np.array_equal(first.model.get_weights()[0], other.model.get_weights()[0])


def test_seeds_recipe_balances_and_exposes_column_one() -> None:
    rows = make_raw_rows(400, seed=6)
    labels = make_labels(rows, seed=6)
    model = train_model(rows, labels, quick("seeds"), seed=1)
    used = np.concatenate([model.train_index, model.validation_index])
    assert labels[used].sum() * 2 == used.size == 2 * labels.sum()
    assert model.threshold == 0.5
    X_scaled = model.preprocessing.transform(rows)
    softmax = np.asarray(model.model.predict(X_scaled, verbose=0))
    assert softmax.shape == (400, 2)
    weights = extract_dense_weights(model.model)
    np.testing.assert_allclose(predict_probability(weights, X_scaled), softmax[:, 1], atol=1e-5)


def test_numpy_forward_pass_equals_keras_predict(trained) -> None:
    X_scaled = trained.preprocessing.transform(make_raw_rows(1000, seed=12))
    weights = extract_dense_weights(trained.model)
    expected = keras_probability(trained.model, X_scaled)
    numpy_path = predict_probability(weights, X_scaled, batch_size=137)
    assert numpy_path.dtype == np.float32 and numpy_path.shape == (1000,)
    np.testing.assert_allclose(numpy_path, expected, atol=1e-5)
    np.testing.assert_allclose(
        trained.predict_raw(make_raw_rows(1000, seed=12)), expected, atol=1e-5
    )


def test_extract_rejects_unsupported_layers() -> None:
    model = keras.Sequential(
        [
            keras.Input(shape=(10,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dropout(0.5, name="drop_me"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    with pytest.raises(ValueError, match="drop_me"):
        extract_dense_weights(model)
    tanh = keras.Sequential(
        [
            keras.Input(shape=(10,)),
            keras.layers.Dense(4, activation="tanh", name="tanh_layer"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    with pytest.raises(ValueError, match="tanh_layer"):
        extract_dense_weights(tanh)
    three = keras.Sequential([keras.Input(shape=(10,)), keras.layers.Dense(3, name="out3")])
    with pytest.raises(ValueError, match="out3"):
        extract_dense_weights(three)


def test_sigmoid_is_stable_for_extreme_logits() -> None:
    layer = DenseLayer(np.array([[1.0]], np.float32), np.zeros(1, np.float32), "sigmoid")
    weights = DenseWeights((layer,))
    result = predict_probability(weights, np.array([[-500.0], [0.0], [500.0]], np.float32))
    np.testing.assert_allclose(result, [0.0, 0.5, 1.0], atol=1e-7)


def test_reason_contributions_match_median_counterfactual(trained) -> None:
    X_scaled = trained.preprocessing.transform(make_raw_rows(50, seed=13))
    medians = trained.preprocessing.medians_scaled()
    weights = trained.dense_weights
    contributions = reason_contributions(weights, X_scaled, medians, batch_size=16)
    assert contributions.shape == (50, len(FEATURES))
    base = predict_probability(weights, X_scaled)
    for row in range(50):
        top = int(np.argmax(contributions[row]))
        moved = X_scaled[row : row + 1].copy()
        moved[0, top] = medians[top]
        after = predict_probability(weights, moved)[0]
        assert base[row] - after == pytest.approx(contributions[row, top], abs=1e-6)
        if contributions[row, top] > 0:
            assert after < base[row]


def test_reason_contributions_zero_at_the_median(trained) -> None:
    medians = trained.preprocessing.medians_scaled()
    at_median = np.tile(medians, (3, 1))
    contributions = reason_contributions(trained.dense_weights, at_median, medians)
    np.testing.assert_allclose(contributions, 0.0, atol=1e-7)


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros((4, 9)), np.array([0, 1, 0, 1]), "n x 10"),
        (np.zeros((4, 10)), np.array([0, 0, 0, 0]), "single class"),
        (np.zeros((4, 10)), np.array([0, 2, 0, 1]), "0 or 1"),
        (np.full((4, 10), np.nan), np.array([0, 1, 0, 1]), "NaN"),
    ],
)
def test_train_model_rejects_bad_input(features, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        train_model(features, labels, quick("default"), seed=0)


def test_saved_and_reloaded_model_gives_the_same_numpy_weights(trained, tmp_path) -> None:
    path = tmp_path / "model.keras"
    trained.model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True, compile=False)
    for before, after in zip(trained.dense_weights, extract_dense_weights(reloaded), strict=True):
        np.testing.assert_array_equal(before.kernel, after.kernel)
        assert before.activation == after.activation


REAL_DATA = Path(__file__).parents[1] / "data" / "audiobooks_data.csv"


@pytest.mark.slow
def test_default_recipe_on_real_data_is_accurate_and_calibrated() -> None:
    import pandas as pd

    from audiobooks_scoring.contract import LABEL
    from audiobooks_scoring.model.evaluation import evaluate_predictions, split_test

    frame = pd.read_csv(REAL_DATA)
    X = frame[list(FEATURES)].to_numpy(dtype=float)
    y = frame[LABEL].to_numpy(dtype=int)
    rest, test = split_test(y, seed=1, test_share=0.2)
    model = train_model(X[rest], y[rest], RECIPES["default"], seed=1)
    assert model.train_seconds < 120
    result = evaluate_predictions(y[test], model.predict_raw(X[test]), model.threshold)
    assert result.auc > 0.905
    assert result.balanced_accuracy > 0.805
    assert result.brier < 0.072
    assert abs(result.mean_predicted - result.base_rate) < 0.02
