"""Tests of the evaluation metrics, tables, permutation importance and the protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.model.evaluation import (
    evaluate_predictions,
    permutation_importance,
    roc_auc,
    run_evaluation_protocol,
    summarize_protocol,
    train_logistic_baseline,
)


def test_perfect_ranking_gives_auc_one_and_full_balanced_accuracy() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    result = evaluate_predictions(labels, probabilities, threshold=0.5)
    assert result.auc == 1.0
    assert result.balanced_accuracy == 1.0
    assert result.confusion == {
        "true_negative": 3,
        "false_positive": 0,
        "false_negative": 0,
        "true_positive": 2,
    }


def test_hand_checked_metrics() -> None:
    labels = np.array([1, 0, 1, 0])
    probabilities = np.array([0.8, 0.6, 0.4, 0.2])
    result = evaluate_predictions(labels, probabilities, threshold=0.5)
    # Pairs (pos, neg): (0.8, 0.6) ok, (0.8, 0.2) ok, (0.4, 0.6) wrong, (0.4, 0.2) ok -> 3/4.
    assert result.auc == pytest.approx(0.75)
    # At 0.5: TP 1 (0.8), FN 1 (0.4), FP 1 (0.6), TN 1 (0.2) -> recall 0.5 each.
    assert result.balanced_accuracy == pytest.approx(0.5)
    assert result.brier == pytest.approx((0.04 + 0.36 + 0.36 + 0.04) / 4)
    expected_log_loss = -(math.log(0.8) + math.log(0.4) + math.log(0.4) + math.log(0.8)) / 4
    assert result.log_loss == pytest.approx(expected_log_loss)
    assert result.base_rate == 0.5 and result.mean_predicted == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_agrees_with_scikit_learn_including_ties(seed: int) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=500) < 0.2).astype(int)
    scores = np.round(rng.uniform(size=500) + 0.3 * labels, 1)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_counts_ties_as_half() -> None:
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.3, 0.3, 0.9])) == pytest.approx(
        (1 + 1 + 0.5 + 1) / 4
    )


def test_threshold_is_inclusive_and_changes_balanced_accuracy() -> None:
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([0.1, 0.16, 0.16, 0.9])
    at_base_rate = evaluate_predictions(labels, probabilities, threshold=0.16)
    at_half = evaluate_predictions(labels, probabilities, threshold=0.5)
    assert at_base_rate.confusion["true_positive"] == 2
    assert at_base_rate.confusion["false_positive"] == 1
    assert at_base_rate.balanced_accuracy == pytest.approx(0.75)
    assert at_half.balanced_accuracy == pytest.approx(0.75)
    assert at_half.confusion["false_negative"] == 1


def test_calibration_table_bins() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    probabilities = np.array([0.05, 0.05, 0.55, 0.55, 1.0])
    table = evaluate_predictions(labels, probabilities, threshold=0.5).calibration
    assert len(table) == 10
    assert [row["count"] for row in table] == [2, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert table[0]["observed_rate"] == 0.5 and table[0]["mean_predicted"] == pytest.approx(0.05)
    assert table[1]["mean_predicted"] is None
    assert table[9]["observed_rate"] == 1.0


@pytest.mark.parametrize("rows", [10, 37, 1000, 5])
def test_decile_counts_sum_to_rows_and_gains_reach_one(rows: int) -> None:
    rng = np.random.default_rng(rows)
    labels = np.zeros(rows, dtype=int)
    labels[: max(1, rows // 4)] = 1
    probabilities = rng.uniform(size=rows)
    deciles = evaluate_predictions(labels, probabilities, threshold=0.5).deciles
    assert [row["decile"] for row in deciles] == list(range(1, 11))
    counts = [row["count"] for row in deciles]
    assert sum(counts) == rows
    assert max(counts) - min(counts) <= 1
    assert deciles[-1]["cumulative_gains"] == pytest.approx(1.0)
    means = [row["mean_predicted"] for row in deciles if row["mean_predicted"] is not None]
    assert means == sorted(means, reverse=True)


def test_decile_one_holds_the_top_scores_and_lift() -> None:
    labels = np.array([1] * 10 + [0] * 90)
    probabilities = np.linspace(1.0, 0.0, 100)
    result = evaluate_predictions(labels, probabilities, threshold=0.5)
    top = result.deciles[0]
    assert top["count"] == 10 and top["positives"] == 10
    assert top["lift"] == pytest.approx(10.0)
    assert top["cumulative_gains"] == 1.0
    assert result.lift_top_decile == pytest.approx(10.0)


def test_random_model_has_lift_near_one_and_auc_near_half() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=200_000) < 0.16).astype(int)
    probabilities = rng.uniform(size=200_000)
    result = evaluate_predictions(labels, probabilities, threshold=0.16)
    assert result.auc == pytest.approx(0.5, abs=0.01)
    assert all(row["lift"] == pytest.approx(1.0, abs=0.05) for row in result.deciles)


def test_single_class_gives_undefined_ranking_metrics_and_json_ready_dict() -> None:
    result = evaluate_predictions(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), 0.5)
    assert result.auc is None and result.balanced_accuracy is None
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["rows"] == 3


@pytest.mark.parametrize(
    ("labels", "probabilities", "threshold", "message"),
    [
        (np.array([0, 1]), np.array([0.1]), 0.5, "equal length"),
        (np.array([0, 2]), np.array([0.1, 0.2]), 0.5, "0 or 1"),
        (np.array([0, 1]), np.array([0.1, 1.2]), 0.5, "within"),
        (np.array([0, 1]), np.array([0.1, np.nan]), 0.5, "finite"),
        (np.array([0, 1]), np.array([0.1, 0.2]), 1.5, "threshold"),
        (np.array([], dtype=int), np.array([]), 0.5, "zero rows"),
    ],
)
def test_evaluate_rejects_bad_input(labels, probabilities, threshold, message) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(labels, probabilities, threshold)


def make_linear_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return raw-looking positive features where only completion drives the label."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(1.0, 10.0, size=(count, len(FEATURES)))
    completion = FEATURES.index("completion")
    X[:, completion] = rng.uniform(0.0, 1.0, size=count)
    labels = (X[:, completion] + rng.normal(0, 0.15, count) > 0.7).astype(int)
    return X, labels


def test_permutation_importance_ranks_the_driving_feature_first() -> None:
    X, labels = make_linear_data(2000, seed=1)
    completion = FEATURES.index("completion")

    def predict(rows: np.ndarray) -> np.ndarray:
        return rows[:, completion]

    importance = permutation_importance(predict, X, labels, seed=0, repeats=3)
    assert [row["feature"] for row in importance][0] == "completion"
    assert importance[0]["auc_drop"] > 0.3
    assert all(row["auc_drop"] == 0.0 for row in importance[1:])
    assert len(importance) == len(FEATURES)
    np.testing.assert_array_equal(X, make_linear_data(2000, seed=1)[0])


def test_logistic_baseline_learns_and_uses_base_rate_threshold() -> None:
    X, labels = make_linear_data(1500, seed=2)
    baseline = train_logistic_baseline(X[:1000], labels[:1000], seed=0)
    assert baseline.threshold == pytest.approx(labels[:1000].mean())
    result = evaluate_predictions(labels[1000:], baseline.predict_raw(X[1000:]), baseline.threshold)
    assert result.auc > 0.9


def test_protocol_with_logistic_recipe_has_cli_shape() -> None:
    X, labels = make_linear_data(600, seed=3)
    result = run_evaluation_protocol(X, labels, seeds=(1, 2), recipe_names=("logistic",))
    per_seed = result["recipes"]["logistic"]["per_seed"]
    assert [row["seed"] for row in per_seed] == [1, 2]
    assert per_seed[0]["auc"] != per_seed[1]["auc"]
    summary = summarize_protocol(result)
    assert set(summary) == {"recipes"}
    assert set(summary["recipes"]["logistic"]) == {
        "auc",
        "balanced_accuracy",
        "brier",
        "lift_top_decile",
    }
    assert summary["recipes"]["logistic"]["auc"] == pytest.approx(
        np.mean([row["auc"] for row in per_seed])
    )
    json.dumps(result, allow_nan=False)


def test_protocol_rejects_unknown_recipe() -> None:
    X, labels = make_linear_data(200, seed=4)
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        run_evaluation_protocol(X, labels, seeds=(1,), recipe_names=("nope",))
