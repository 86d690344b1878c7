"""Honest model evaluation: metrics, calibration and decile tables, permutation importance,
a logistic-regression baseline and the repeated test-split protocol that compares recipes.

Importing this module does not import TensorFlow; `run_evaluation_protocol` imports the
Keras model code only when it trains a Keras recipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from audiobooks_scoring import progress
from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.model.preprocessing import LOG1P_FEATURES, Preprocessing, fit_preprocessing

logger = logging.getLogger(__name__)

CALIBRATION_BINS = 10
DECILES = 10
LOG_LOSS_EPSILON = 1e-15
PROTOCOL_TEST_SHARE = 0.2
PROTOCOL_METRICS: tuple[str, ...] = ("auc", "balanced_accuracy", "brier", "lift_top_decile")
LOGISTIC_RECIPE = "logistic"
DEFAULT_PROTOCOL_RECIPES: tuple[str, ...] = ("default", "seeds", LOGISTIC_RECIPE)


@dataclass(frozen=True)
class Evaluation:
    """Metrics of probabilities against 0/1 labels; `to_dict` is JSON-ready (None if undefined)."""

    rows: int
    positives: int
    base_rate: float
    mean_predicted: float
    threshold: float
    auc: float | None
    balanced_accuracy: float | None
    brier: float
    log_loss: float
    calibration_error: float
    lift_top_decile: float | None
    confusion: dict[str, int]
    calibration: list[dict[str, Any]]
    deciles: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Return the evaluation as plain JSON-ready values."""
        return asdict(self)


def optional_mean(values: np.ndarray) -> float | None:
    """Return the mean of `values` as a float, or None when there are none."""
    return float(values.mean()) if values.size else None


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the ROC AUC of `scores` for 0/1 `labels` (Mann-Whitney, ties count one half)."""
    y = np.asarray(labels)
    positives = int((y == 1).sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both classes in labels")
    values, inverse, counts = np.unique(
        np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True
    )
    # Average 1-based rank of each distinct score: ties share the mean of their ranks.
    upper = np.cumsum(counts)
    average_rank = upper - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse.reshape(-1)][y == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def check_predictions(
    labels: np.ndarray, probabilities: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return labels (int) and probabilities (float64) after checking shape, range and values."""
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(
            f"labels and probabilities must be 1-D of equal length; got {y.shape} and {p.shape}"
        )
    if y.size == 0:
        raise ValueError("cannot evaluate zero rows")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y.astype(np.int64), p


def compute_calibration_table(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[dict[str, Any]]:
    """Return equal-width probability bins: bounds, count, mean predicted and observed rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    positions = np.clip(np.searchsorted(edges, probabilities, side="right") - 1, 0, bins - 1)
    table = []
    for index in range(bins):
        inside = positions == index
        table.append(
            {
                "bin": index + 1,
                "lower": float(edges[index]),
                "upper": float(edges[index + 1]),
                "count": int(inside.sum()),
                "mean_predicted": optional_mean(probabilities[inside]),
                "observed_rate": optional_mean(labels[inside].astype(np.float64)),
            }
        )
    return table


def compute_decile_table(labels: np.ndarray, probabilities: np.ndarray) -> list[dict[str, Any]]:
    """Return the decile table (decile 1 = highest probabilities) with lift and cumulative gains.

    Rows are ranked by probability, highest first (ties keep input order), and cut into ten
    groups whose sizes differ by at most one.
    """
    order = np.argsort(-probabilities, kind="stable")
    total_positives = int(labels.sum())
    base_rate = labels.mean()
    cumulative = 0
    table = []
    for index, members in enumerate(np.array_split(order, DECILES), start=1):
        positives = int(labels[members].sum())
        cumulative += positives
        rate = optional_mean(labels[members].astype(np.float64))
        table.append(
            {
                "decile": index,
                "count": int(members.size),
                "positives": positives,
                "mean_predicted": optional_mean(probabilities[members]),
                "min_predicted": float(probabilities[members].min()) if members.size else None,
                "observed_rate": rate,
                "lift": rate / base_rate if rate is not None and base_rate > 0 else None,
                "cumulative_gains": cumulative / total_positives if total_positives else None,
            }
        )
    return table


def evaluate_predictions(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float
) -> Evaluation:
    """Return AUC, balanced accuracy at `threshold`, Brier, log loss, calibration and deciles."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1]; got {threshold}")
    y, p = check_predictions(labels, probabilities)
    positives = int(y.sum())
    both_classes = 0 < positives < y.size
    predicted = p >= threshold
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    fn = int((~predicted & (y == 1)).sum())
    tn = int((~predicted & (y == 0)).sum())
    clipped = np.clip(p, LOG_LOSS_EPSILON, 1.0 - LOG_LOSS_EPSILON)
    log_loss = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)))
    calibration = compute_calibration_table(y, p)
    calibration_error = (
        sum(
            row["count"] * abs(row["mean_predicted"] - row["observed_rate"])
            for row in calibration
            if row["count"]
        )
        / y.size
    )
    deciles = compute_decile_table(y, p)
    return Evaluation(
        rows=int(y.size),
        positives=positives,
        base_rate=float(y.mean()),
        mean_predicted=float(p.mean()),
        threshold=float(threshold),
        auc=roc_auc(y, p) if both_classes else None,
        balanced_accuracy=0.5 * (tp / (tp + fn) + tn / (tn + fp)) if both_classes else None,
        brier=float(np.mean((p - y) ** 2)),
        log_loss=log_loss,
        calibration_error=float(calibration_error),
        lift_top_decile=deciles[0]["lift"],
        confusion={
            "true_negative": tn,
            "false_positive": fp,
            "false_negative": fn,
            "true_positive": tp,
        },
        calibration=calibration,
        deciles=deciles,
    )


def permutation_importance(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    X_raw: np.ndarray,
    labels: np.ndarray,
    seed: int,
    repeats: int = 5,
    feature_names: Sequence[str] = FEATURES,
) -> list[dict[str, Any]]:
    """Return per-feature drop in ROC AUC when that column is shuffled, largest drop first."""
    X = np.asarray(X_raw, dtype=np.float64)
    y = np.asarray(labels)
    if X.ndim != 2 or X.shape[1] != len(feature_names) or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X_raw must be n x {len(feature_names)} with one label per row; "
            f"got {X.shape} and {y.shape}"
        )
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if y.min() == y.max():
        raise ValueError("permutation importance needs both classes in labels")
    rng = np.random.default_rng(seed)
    baseline = roc_auc(y, predict_fn(X))
    result = []
    for j, name in enumerate(feature_names):
        drops = []
        shuffled = X.copy()
        for _ in range(repeats):
            shuffled[:, j] = rng.permutation(X[:, j])
            drops.append(baseline - roc_auc(y, predict_fn(shuffled)))
        result.append(
            {
                "feature": name,
                "auc_drop": float(np.mean(drops)),
                "auc_drop_std": float(np.std(drops)),
                "baseline_auc": baseline,
            }
        )
    return sorted(result, key=lambda row: row["auc_drop"], reverse=True)


@dataclass
class LogisticModel:
    """The logistic-regression baseline: preprocessing plus scikit-learn coefficients."""

    preprocessing: Preprocessing
    estimator: Any
    threshold: float

    def predict_raw(self, X_raw: np.ndarray) -> np.ndarray:
        """Return the probability of conversion for raw feature rows."""
        return self.estimator.predict_proba(self.preprocessing.transform(X_raw))[:, 1]


def train_logistic_baseline(features: np.ndarray, labels: np.ndarray, seed: int) -> LogisticModel:
    """Return a logistic regression on log1p-standardized features, natural class distribution."""
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    preprocessing = fit_preprocessing(X, LOG1P_FEATURES)
    estimator = LogisticRegression(max_iter=2000, random_state=seed)
    estimator.fit(preprocessing.transform(X), y)
    return LogisticModel(preprocessing, estimator, threshold=float(y.mean()))


def split_test(labels: np.ndarray, seed: int, test_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (rest, test) positions with a stratified `test_share` of rows in test."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    rest, test = train_test_split(
        positions, test_size=test_share, stratify=labels, random_state=seed
    )
    return np.sort(rest), np.sort(test)


def train_and_predict(
    recipe_name: str, X_rest: np.ndarray, y_rest: np.ndarray, X_test: np.ndarray, seed: int
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Return test probabilities, the recipe's threshold and training facts for one recipe."""
    started = time.perf_counter()
    if recipe_name == LOGISTIC_RECIPE:
        baseline = train_logistic_baseline(X_rest, y_rest, seed)
        probabilities = baseline.predict_raw(X_test)
        facts: dict[str, Any] = {"train_seconds": time.perf_counter() - started}
        return probabilities, baseline.threshold, facts
    from audiobooks_scoring.model.network import RECIPES, train_model

    if recipe_name not in RECIPES:
        known = sorted([*RECIPES, LOGISTIC_RECIPE])
        raise ValueError(f"unknown recipe {recipe_name!r}; known recipes: {known}")
    trained = train_model(X_rest, y_rest, RECIPES[recipe_name], seed)
    probabilities = trained.predict_raw(X_test)
    facts = {
        "train_seconds": trained.train_seconds,
        "epochs_run": trained.epochs_run,
        "best_epoch": trained.best_epoch,
    }
    return probabilities, trained.threshold, facts


def summarize_values(values: Sequence[float | None]) -> dict[str, float | None]:
    """Return mean and standard deviation of the defined values (None when there are none)."""
    defined = np.array([value for value in values if value is not None], dtype=np.float64)
    if defined.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(defined.mean()), "std": float(defined.std())}


def run_evaluation_protocol(
    features: np.ndarray,
    labels: np.ndarray,
    seeds: Sequence[int] = (1, 2, 3, 4, 5),
    recipe_names: Sequence[str] = DEFAULT_PROTOCOL_RECIPES,
    test_share: float = PROTOCOL_TEST_SHARE,
) -> dict[str, Any]:
    """Return per-recipe, per-seed test-split metrics and their mean/std (repeated test split).

    For each seed a stratified `test_share` of rows is held out; every recipe trains on the
    rest only (its validation split comes out of the rest) and is scored on the held-out rows
    at its own equal-prior threshold.
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if X.ndim != 2 or X.shape[1] != len(FEATURES) or X.shape[0] != y.shape[0]:
        raise ValueError(f"features must be n x {len(FEATURES)} with one label per row")
    if not seeds or not recipe_names:
        raise ValueError("the protocol needs at least one seed and one recipe")
    per_recipe: dict[str, list[dict[str, Any]]] = {name: [] for name in recipe_names}
    fits, done = len(seeds) * len(recipe_names), 0
    progress.report("training recipes", done, fits)
    for seed in seeds:
        rest, test = split_test(y, seed, test_share)
        for name in recipe_names:
            probabilities, threshold, facts = train_and_predict(
                name, X[rest], y[rest], X[test], seed
            )
            evaluation = evaluate_predictions(y[test], probabilities, threshold)
            row = {
                "seed": int(seed),
                "auc": evaluation.auc,
                "balanced_accuracy": evaluation.balanced_accuracy,
                "brier": evaluation.brier,
                "log_loss": evaluation.log_loss,
                "calibration_error": evaluation.calibration_error,
                "lift_top_decile": evaluation.lift_top_decile,
                "threshold": threshold,
                **facts,
            }
            per_recipe[name].append(row)
            done += 1
            progress.report("training recipes", done, fits)
            logger.info("protocol seed %d recipe %s: %s", seed, name, row)
    recipes: dict[str, Any] = {}
    for name, rows in per_recipe.items():
        metric_names = [key for key in rows[0] if key not in ("seed",)]
        summary = {key: summarize_values([row.get(key) for row in rows]) for key in metric_names}
        recipes[name] = {
            "per_seed": rows,
            "mean": {key: value["mean"] for key, value in summary.items()},
            "std": {key: value["std"] for key, value in summary.items()},
        }
    return {
        "seeds": [int(seed) for seed in seeds],
        "test_share": test_share,
        "rows": int(y.size),
        "recipes": recipes,
    }


def summarize_protocol(result: dict[str, Any]) -> dict[str, Any]:
    """Return {"recipes": {name: {auc, balanced_accuracy, brier, lift_top_decile}}} (means)."""
    return {
        "recipes": {
            name: {metric: recipe["mean"][metric] for metric in PROTOCOL_METRICS}
            for name, recipe in result["recipes"].items()
        }
    }
