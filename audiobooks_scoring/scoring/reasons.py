"""Score reasons: for each customer, the (up to) three features that raise their score most.

The contribution of feature j is `p(x) - p(x with feature j at its training median)`,
computed exactly from the network: its first layer is linear before the activation, so each
counterfactual only shifts the first pre-activation by `(median_j - x_j) * W1[j]`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from audiobooks_scoring.contract import SCORE_REASON_CODES
from audiobooks_scoring.model.network import (
    DenseWeights,
    activate,
    as_model_input,
    run_blocks,
    scoring_threads,
)
from audiobooks_scoring.model.scoring_model import ScoringModel

REASON_COUNT = 3
REASON_BLOCK_ROWS = 8_192  # rows per block of the reason-code passes
REASON_DENSE_SHARE = 0.7  # a feature moved in this share of a block's rows moves in all


class _ReasonPass:
    """The counterfactual forward passes of reason codes, one block of rows at a time.

    Activations are held transposed (units x rows) so that biases and activations run over
    long contiguous rows. The first layer is linear before its activation, so moving
    feature j to its median adds `shift_j * W1[j]` to the first pre-activation: a feature
    that moves in most rows of a block is moved in all of them (where it does not move, the
    contribution is set to 0), one that moves in few rows has those rows gathered first.
    Each thread reuses its own buffers from block to block.
    """

    def __init__(self, weights: DenseWeights, medians_scaled: np.ndarray, block_rows: int):
        self.layers = [
            (np.ascontiguousarray(kernel.T), np.ascontiguousarray(bias[:, None]), activation)
            for kernel, bias, activation in weights.layers
        ]
        self.medians = np.asarray(medians_scaled, dtype=np.float32).reshape(-1, 1)
        self.block_rows = block_rows
        self.units = max(kernel.shape[0] for kernel, _, _ in self.layers)
        self.zeros = np.zeros(self.units * block_rows, dtype=np.float32)  # read only
        self._local = threading.local()

    def _buffers(self) -> dict[str, np.ndarray]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            size = self.units * self.block_rows
            width = self.medians.shape[0]
            buffers = {
                name: np.empty(size, dtype=np.float32)
                for name in ("pre", "moved", "gathered", "even", "odd")
            }
            buffers["shift"] = np.empty(width * self.block_rows, dtype=np.float32)
            buffers["contributions"] = np.empty(width * self.block_rows, dtype=np.float32)
            buffers["base"] = np.empty(self.block_rows, dtype=np.float32)
            self._local.buffers = buffers
        return buffers

    def _activate(self, values: np.ndarray, activation: str) -> np.ndarray:
        if activation == "relu":  # max with an array of zeros is the vectorised loop
            zeros = self.zeros[: values.size].reshape(values.shape)
            return np.maximum(values, zeros, out=values)
        return activate(values.T, activation).T

    def _probability(self, hidden: np.ndarray, buffers: dict[str, np.ndarray]) -> np.ndarray:
        """The network after the first layer's activation, for `hidden` (units x rows)."""
        rows = hidden.shape[1]
        for index, (kernel_t, bias, activation) in enumerate(self.layers[1:]):
            flat = buffers["odd" if index % 2 else "even"]
            out = flat[: kernel_t.shape[0] * rows].reshape(kernel_t.shape[0], rows)
            np.matmul(kernel_t, hidden, out=out)
            out += bias
            hidden = self._activate(out, activation)
        return hidden[0]

    def contributions(self, batch: np.ndarray) -> np.ndarray:
        """Features x rows: p(x) - p(x with that feature at its median) for a block of rows.

        The result is a buffer of the calling thread, valid until its next block.
        """
        kernel_t, bias, activation = self.layers[0]
        rows, width = batch.shape
        units = kernel_t.shape[0]
        buffers = self._buffers()
        pre = np.matmul(kernel_t, batch.T, out=buffers["pre"][: units * rows].reshape(units, rows))
        pre += bias
        moved = buffers["moved"][: units * rows].reshape(units, rows)
        np.copyto(moved, pre)
        base = buffers["base"][:rows]
        np.copyto(base, self._probability(self._activate(moved, activation), buffers))
        shift = buffers["shift"][: width * rows].reshape(width, rows)
        np.subtract(self.medians, batch.T, out=shift)
        contributions = buffers["contributions"][: width * rows].reshape(width, rows)
        contributions.fill(0.0)
        gathered_for = None
        for j in range(width):
            changed = shift[j] != 0
            count = int(np.count_nonzero(changed))
            if count == 0:
                continue
            if count >= REASON_DENSE_SHARE * rows:
                np.multiply(kernel_t[:, j, None], shift[j], out=moved)
                moved += pre
                probability = self._probability(self._activate(moved, activation), buffers)
                np.subtract(base, probability, out=contributions[j], where=changed)
                continue
            if gathered_for is None or not np.array_equal(changed, gathered_for):
                index = np.flatnonzero(changed)
                gathered = buffers["gathered"][: units * count].reshape(units, count)
                np.take(pre, index, axis=1, out=gathered, mode="clip")  # unbuffered
                gathered_for = changed
            part = buffers["moved"][: units * count].reshape(units, count)
            np.multiply(kernel_t[:, j, None], shift[j, index], out=part)
            part += gathered
            probability = self._probability(self._activate(part, activation), buffers)
            contributions[j, index] = base[index] - probability
        return contributions

    def run(self, work: Callable[[slice], None], rows: int, pool: Executor | None) -> None:
        """Call `work` on consecutive blocks of at most `block_rows` rows."""
        run_blocks(work, rows, self.block_rows, pool)


def _reason_pass(weights: DenseWeights, medians_scaled: np.ndarray) -> _ReasonPass:
    medians = np.asarray(medians_scaled, dtype=np.float32).reshape(-1)
    if medians.shape[0] != weights.input_size:
        raise ValueError(
            f"medians_scaled has {medians.shape[0]} values; expected {weights.input_size}"
        )
    return _ReasonPass(weights, medians, REASON_BLOCK_ROWS)


def reason_contributions_fast(
    weights: DenseWeights,
    X_scaled: np.ndarray,
    medians_scaled: np.ndarray,
    pool: Executor | None = None,
) -> np.ndarray:
    """n x features: p(x) minus p(x with that one feature at its median); > 0 raises the score.

    The counterfactual of `model.reason_contributions`, computed only where a feature
    differs from its median (elsewhere it is exactly 0), in float32 blocks of rows over
    `pool`'s threads when given.
    """
    X = as_model_input(weights, X_scaled)
    passes = _reason_pass(weights, medians_scaled)
    contributions = np.empty(X.shape, dtype=np.float32)

    def work(rows: slice) -> None:
        contributions[rows] = passes.contributions(X[rows]).T

    passes.run(work, X.shape[0], pool)
    return contributions


def reason_code_indices(
    contributions: np.ndarray, raw: np.ndarray, medians: np.ndarray
) -> np.ndarray:
    """Per row, indices into `SCORE_REASON_CODES` of the (up to) three top reasons, -1 for none.

    The top three are the largest contributions, ties going to the earlier feature (as a
    stable sort would); a reason is given only when its contribution is above 0.
    """
    by_feature = np.array(np.asarray(contributions, dtype=np.float32).T, order="C")
    return _top_reasons(by_feature, np.asarray(raw) > np.asarray(medians))


def _top_reasons(remaining: np.ndarray, above: np.ndarray) -> np.ndarray:
    """`reason_code_indices` of contributions given features x rows (overwritten).

    `above` (rows x features) tells where a feature is above its median ("_high" codes).
    """
    width, rows = remaining.shape
    if 2 * width > 127 or np.isnan(remaining).any():
        return _top_reasons_by_argmax(remaining.T, above)
    indices = np.full((rows, REASON_COUNT), -1, dtype=np.int8)
    # A row's code of feature j, 2j ("_high") or 2j + 1 ("_low"), grows with j: the code of
    # the first feature holding a row's maximum is the largest code among those that raise it.
    codes = np.empty((width, rows), dtype=np.uint8)
    np.copyto(codes, ~above.T)
    codes += (2 * np.arange(width, dtype=np.uint8))[:, None]
    best = np.empty(rows, dtype=remaining.dtype)
    code = np.empty(rows, dtype=np.uint8)
    raised = np.empty(rows, dtype=bool)
    candidate = np.empty(rows, dtype=np.uint8)
    positions = np.arange(rows)
    for slot in range(min(REASON_COUNT, width)):
        np.copyto(best, remaining[0])
        np.copyto(code, codes[0])
        for j in range(1, width):
            np.greater(remaining[j], best, out=raised)
            np.maximum(best, remaining[j], out=best)
            np.multiply(raised, codes[j], out=candidate)
            np.maximum(code, candidate, out=code)
        indices[:, slot] = np.where(best > 0, code, -1)
        remaining.reshape(-1)[(code >> 1).astype(np.intp) * rows + positions] = -np.inf
    return indices


def _top_reasons_by_argmax(contributions: np.ndarray, above: np.ndarray) -> np.ndarray:
    """`reason_code_indices` by repeated argmax (any width; NaN counts as the largest)."""
    remaining = np.array(contributions, dtype=np.float32, copy=True)
    rows = np.arange(len(remaining))
    indices = np.full((len(remaining), REASON_COUNT), -1, dtype=np.int8)
    for slot in range(min(REASON_COUNT, remaining.shape[1])):
        chosen = np.argmax(remaining, axis=1)
        value = remaining[rows, chosen]
        code = 2 * chosen + np.where(above[rows, chosen], 0, 1)
        indices[:, slot] = np.where(value > 0, code, -1)
        remaining[rows, chosen] = -np.inf
    return indices


def reason_codes(contributions: np.ndarray, raw: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """The codes of the (up to) three features that raise each row's score most, else None."""
    return decode_reasons(reason_code_indices(contributions, raw, medians))


def decode_reasons(indices: np.ndarray) -> np.ndarray:
    """Reason code indices (-1 for none) as an object array of codes (None for none)."""
    lookup = np.array([*SCORE_REASON_CODES, None], dtype=object)
    return lookup[np.where(indices < 0, len(SCORE_REASON_CODES), indices)]


def score_reasons(
    model: ScoringModel, raw: np.ndarray, scaled: np.ndarray, pool: Executor | None = None
) -> np.ndarray:
    """Reason code indices (n x 3, -1 for none) of raw rows and their scaled model input."""
    X = as_model_input(model.weights, scaled)
    passes = _reason_pass(model.weights, model.preprocessing.medians_scaled())
    return _reason_indices(passes, X, above_medians(model, raw), pool)


def above_medians(model: ScoringModel, raw: np.ndarray) -> np.ndarray:
    """Where raw features lie above their training medians (the "_high" reason codes)."""
    return np.asarray(raw) > np.asarray(model.preprocessing.medians, dtype=np.float64)


def _reason_indices(
    passes: _ReasonPass, X: np.ndarray, above: np.ndarray, pool: Executor | None
) -> np.ndarray:
    indices = np.empty((X.shape[0], REASON_COUNT), dtype=np.int8)

    def work(rows: slice) -> None:
        indices[rows] = _top_reasons(passes.contributions(X[rows]), above[rows])

    passes.run(work, X.shape[0], pool)
    return indices


def reason_coder(model: ScoringModel) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`score_reasons` of model inputs kept apart (float32 scaled inputs, above-median flags).

    Each call spreads its rows over one thread per core with single-threaded BLAS, so it
    can run while a bulk write of the previous block goes on.
    """
    passes = _reason_pass(model.weights, model.preprocessing.medians_scaled())
    blas = ThreadpoolController()

    def codes(inputs: np.ndarray, above: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(inputs, dtype=np.float32)
        with (
            ThreadPoolExecutor(scoring_threads(), thread_name_prefix="reasons") as pool,
            blas.limit(limits=1, user_api="blas"),
        ):
            return _reason_indices(passes, X, np.asarray(above), pool)

    return codes
