"""The slow reference of the score reasons: the tests' oracle for `scoring.reasons`."""

from __future__ import annotations

import numpy as np

from audiobooks_scoring.model.network import DenseWeights, activate, as_model_input, forward_layers


def reason_contributions(
    weights: DenseWeights,
    X_scaled: np.ndarray,
    medians_scaled: np.ndarray,
    batch_size: int = 16384,
) -> np.ndarray:
    """n x features: p(x) minus p(x with that one feature at its median); > 0 raises.

    The first layer is linear before its activation, so moving feature j to its median only
    adds `(m_j - x_j) * W1[j]` to the first pre-activation; the rest of the network is re-run.
    """
    X = as_model_input(weights, X_scaled)
    medians = np.asarray(medians_scaled, dtype=np.float32).reshape(-1)
    if medians.shape[0] != weights.input_size:
        raise ValueError(
            f"medians_scaled has {medians.shape[0]} values; expected {weights.input_size}"
        )
    first, rest = weights.layers[0], weights.layers[1:]
    contributions = np.empty(X.shape, dtype=np.float32)
    for start in range(0, X.shape[0], batch_size):
        stop = min(start + batch_size, X.shape[0])
        batch = X[start:stop]
        pre_activation = batch @ first.kernel
        pre_activation += first.bias
        base = forward_layers(activate(pre_activation.copy(), first.activation), rest)[:, 0]
        shift = medians[None, :] - batch
        for j in range(X.shape[1]):
            moved = pre_activation + shift[:, j : j + 1] * first.kernel[j][None, :]
            moved_probability = forward_layers(activate(moved, first.activation), rest)[:, 0]
            contributions[start:stop, j] = base - moved_probability
    return contributions


def score_features(model, raw: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and reason codes (n x 3, None for none) of raw feature rows."""
    from audiobooks_scoring.model.network import predict_probability
    from audiobooks_scoring.scoring.reasons import decode_reasons, score_reasons

    scaled = model.preprocessing.transform(raw)
    probability = predict_probability(model.weights, scaled, batch_size=batch_size)
    return probability, decode_reasons(score_reasons(model, raw, scaled))
