"""Scoring: turn population chunks into staged probabilities, holdout flags and reason codes."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import partial
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import DBAPIError
from threadpoolctl import ThreadpoolController, threadpool_limits

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    CUSTOMER_ID,
    FEATURES,
    SCORE_REASON_CODES,
    WINDOW_END,
    ContractError,
    check_columns,
    rejected_frame,
    validate_chunk,
)
from audiobooks_scoring.model import (
    DenseLayer,
    DenseWeights,
    activate,
    as_model_input,
    forward_layers,
)
from audiobooks_scoring.monitoring import DriftAccumulator, FeatureProfile
from audiobooks_scoring.preprocessing import Preprocessing
from audiobooks_scoring.ranking import SortedRuns
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import (
    CodedColumn,
    ColumnWriter,
    WarehouseTables,
    bulk_writer,
    is_postgres,
    load_source_sql,
    qualified_name,
    query_columns,
    render_sql,
    stream_query,
    write_frame,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

REASON_COUNT = 3
SCORING_BLOCK_ROWS = 4_096  # rows per block of the float64 probability pass (cache-sized)
REASON_BLOCK_ROWS = 8_192  # rows per block of the reason-code passes
REASON_DENSE_SHARE = 0.7  # a feature moved in this share of a block's rows moves in all


@dataclass(frozen=True)
class ScoringModel:
    """What scoring needs from a stored model version: weights, preprocessing, training profile."""

    version: str
    weights: DenseWeights
    preprocessing: Preprocessing
    profile: FeatureProfile | None
    metrics: dict = field(default_factory=dict)
    importance: list = field(default_factory=list)


@dataclass
class StageResult:
    """Counts and monitoring figures of one staged population (or one partition of it)."""

    rows_in: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    reject_counts: Counter = field(default_factory=Counter)
    reject_samples: dict[str, str] = field(default_factory=dict)
    score_sum: float = 0.0
    drift: DriftAccumulator | None = None
    runs: SortedRuns | None = None  # the scored rows, when spilled locally for ranking

    def merge(self, other: StageResult) -> StageResult:
        """The sum of two partitions' results."""
        merged = StageResult(
            rows_in=self.rows_in + other.rows_in,
            rows_scored=self.rows_scored + other.rows_scored,
            rows_rejected=self.rows_rejected + other.rows_rejected,
            reject_counts=self.reject_counts + other.reject_counts,
            reject_samples={**other.reject_samples, **self.reject_samples},
            score_sum=self.score_sum + other.score_sum,
            drift=self.drift,
        )
        if self.drift is not None and other.drift is not None:
            merged.drift = self.drift.merged(other.drift)
        return merged


def salt_key(salt: str) -> np.uint64:
    """A 64-bit key derived from the holdout salt."""
    return np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little"))


def holdout_mask(customer_ids: np.ndarray, salt: str, share: float) -> np.ndarray:
    """Whether each customer is in the holdout group: a salted splitmix64 hash below `share`."""
    with np.errstate(over="ignore"):
        z = customer_ids.astype(np.int64).view(np.uint64) ^ salt_key(salt)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def _row_blocks(rows: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _run_blocks(work: Callable[[slice], None], rows: int, size: int, pool: Executor | None) -> None:
    """Call `work` on consecutive row blocks, spread over `pool`'s threads when given."""
    blocks = _row_blocks(rows, size)
    if pool is None or len(blocks) < 2:
        for block in blocks:
            work(block)
        return
    for _ in pool.map(work, blocks):
        pass


def predict_probability_stable(
    weights: DenseWeights,
    X_scaled: np.ndarray,
    batch_size: int = 65_536,
    pool: Executor | None = None,
) -> np.ndarray:
    """P(converted) per row (float32), computed in float64 then rounded.

    A float32 matrix product gives a row results that differ in the last bit with the
    row's position in the batch; in float64 such differences stay below float32's
    resolution, so a customer's score, rank and decile do not depend on how the
    population is chunked or partitioned. Rows go in cache-sized blocks (at most
    `batch_size`), over `pool`'s threads when given.
    """
    X = as_model_input(weights, X_scaled)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    layers = [
        DenseLayer(kernel.astype(np.float64), bias.astype(np.float64), activation)
        for kernel, bias, activation in weights.layers
    ]
    result = np.empty(X.shape[0], dtype=np.float32)

    def work(rows: slice) -> None:
        result[rows] = forward_layers(X[rows].astype(np.float64), layers)[:, 0]

    _run_blocks(work, X.shape[0], min(batch_size, SCORING_BLOCK_ROWS), pool)
    return result


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
        _run_blocks(work, rows, self.block_rows, pool)


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


def score_features(model: ScoringModel, raw: np.ndarray, batch_size: int) -> tuple:
    """Probabilities and reason codes (n x 3) for raw feature rows in FEATURES order."""
    scaled = model.preprocessing.transform(raw)
    probability = predict_probability_stable(model.weights, scaled, batch_size=batch_size)
    return probability, decode_reasons(score_reasons(model, raw, scaled))


def population_sql(engine: Engine, tables: WarehouseTables, partition: int, partitions: int) -> str:
    """The scoring population query, restricted to one hash partition when partitioned."""
    sql = load_source_sql("customer_activity", engine, tables)
    if partitions <= 1:
        return sql
    return (
        f"SELECT * FROM ({sql}) AS population "
        f"WHERE abs(coalesce(population.{CUSTOMER_ID}, 0)) % :partitions = :partition"
    )


def population_column_types(engine: Engine, sql: str, params: dict) -> dict[str, pa.DataType]:
    """Arrow types to parse the population with; text columns stay text to be rejected by rows."""
    try:
        columns = query_columns(engine, sql, params)
    except DBAPIError as error:
        raise ContractError(
            f"the scoring population query failed, so the source does not fit the contract "
            f"(rule 'required column'): {str(error.orig).strip().splitlines()[0]}"
        ) from None
    check_columns(tuple(columns), ACTIVITY_COLUMNS)
    types: dict[str, pa.DataType] = {WINDOW_END: pa.date32()}
    for name in (CUSTOMER_ID, *FEATURES):
        types[name] = pa.float64() if columns[name] else pa.string()
    return types


def stage_population(
    engine: Engine,
    tables: WarehouseTables,
    model: ScoringModel,
    settings: Settings,
    run_id: str,
    as_of: date,
    partition: int = 0,
    partitions: int = 1,
    on_chunk: Callable[[StageResult], None] | None = None,
    runs: SortedRuns | None = None,
) -> StageResult:
    """Stream one partition of the population: validate, score, stage results and rejects.

    Memory is bounded by the chunk size. The scored rows go to `runs` (sorted runs on local
    disk, ranked later on this machine, their reason codes computed during that merge) when
    given, else with their reason codes to the warehouse's staging table through one binary
    COPY that the server ingests while the next chunk is read and scored (committed together
    at the end). Rejects are committed per chunk. The numpy forward passes run on one thread
    per core, with single-threaded BLAS; spilling and drift counts follow on their own thread.
    """
    params: dict = {"as_of": as_of}
    if partitions > 1:
        params.update(partitions=partitions, partition=partition)
    sql = population_sql(engine, tables, partition, partitions)
    types = population_column_types(engine, sql, params)
    result = StageResult(
        drift=DriftAccumulator(model.profile) if model.profile else None, runs=runs
    )
    if runs is not None:
        runs.defer_reasons(model.weights.input_size, reason_coder(model))
    with (
        ThreadPoolExecutor(max_workers=scoring_threads(), thread_name_prefix="scoring") as pool,
        threadpool_limits(limits=1, user_api="blas"),
        nullcontext(runs) if runs is not None else bulk_writer(engine, tables.staging) as staging,
        _FollowingWork() as following,
    ):
        chunks = stream_query(engine, sql, params, settings.chunk_size, types)
        for chunk in read_ahead(chunks, depth=1):
            outcome = _stage_chunk(
                engine, tables, model, settings, run_id, partition, chunk, pool, staging
            )
            _count_chunk(result, len(chunk), outcome)
            following.submit(partial(_follow_chunk, result.drift, outcome))
            if on_chunk is not None:
                on_chunk(result)
    logger.info(
        "partition %s/%s staged: %s rows in, %s scored, %s rejected",
        partition + 1,
        partitions,
        result.rows_in,
        result.rows_scored,
        result.rows_rejected,
    )
    return result


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer.

    The next chunk is read off the wire while this one is scored. Errors of the producer
    are raised in the consumer; a consumer that stops early stops (and closes) the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
        except BaseException as error:  # handed to the consumer
            buffer.put((done, error))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        buffer.put((done, None))

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while producer.is_alive():
            try:
                buffer.get(timeout=0.1)
            except queue.Empty:
                pass
        producer.join()


class _FollowingWork:
    """What follows each scored chunk (spilling, drift counts), on one thread, a chunk behind.

    The main thread goes on with the next chunk meanwhile; its errors are raised at the
    next submission or on leaving (leaving after an error waits without raising again).
    """

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="following")
        self.pending: Future | None = None

    def submit(self, work: Callable[[], None]) -> None:
        self.wait()
        self.pending = self.executor.submit(work)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _FollowingWork:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                self.wait()
        finally:
            self.executor.shutdown(wait=True)


def _follow_chunk(drift: DriftAccumulator | None, outcome: _ChunkOutcome) -> None:
    if outcome.spill is not None:
        outcome.spill()
    if drift is not None:
        drift.add(outcome.raw, outcome.probability)


def scoring_threads() -> int:
    """Threads for the forward passes: one per available core, at most four."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass
class _ChunkOutcome:
    """What one staged chunk adds to the run's counts and drift."""

    rows_scored: int
    rejected: pd.DataFrame
    probability: np.ndarray
    raw: np.ndarray
    spill: Callable[[], None] | None = None  # spilling the rows, left to the following thread


def _stage_chunk(
    engine: Engine,
    tables: WarehouseTables,
    model: ScoringModel,
    settings: Settings,
    run_id: str,
    partition: int,
    chunk: pd.DataFrame,
    pool: Executor,
    staging: ColumnWriter | SortedRuns,
) -> _ChunkOutcome:
    """Validate and score one chunk, hand its rows to the staging writer, commit its rejects."""
    now = datetime.now(UTC)
    checked = validate_chunk(chunk[list(ACTIVITY_COLUMNS)], run_id, now)
    valid = checked.valid
    raw = valid[list(FEATURES)].to_numpy(dtype=np.float64)
    scaled = model.preprocessing.transform(raw)
    probability = predict_probability_stable(
        model.weights, scaled, settings.predict_batch_size, pool
    ).astype(np.float64)
    ids = valid[CUSTOMER_ID].to_numpy(dtype=np.int64)
    window_end = _coded(valid[WINDOW_END]) if WINDOW_END in valid else None
    holdout = holdout_mask(ids, settings.holdout_salt, settings.holdout_share)
    spill = None
    if isinstance(staging, SortedRuns):  # reason codes come during the merge
        inputs = as_model_input(model.weights, scaled)
        above = above_medians(model, raw)
        spill = partial(
            staging.add, ids, probability, holdout, window_end, inputs=inputs, above=above
        )
    else:
        reasons = score_reasons(model, raw, scaled, pool)
        staged = {
            "run_id": run_id,
            CUSTOMER_ID: ids,
            WINDOW_END: window_end,
            "probability": probability,
            "holdout": holdout,
            "partition_no": partition,
        }
        for slot in range(REASON_COUNT):
            staged[f"reason_{slot + 1}"] = CodedColumn(reasons[:, slot], SCORE_REASON_CODES)
        staging.write(staged, len(valid))
    if not checked.rejected.empty:
        with engine.begin() as conn:
            write_frame(conn, tables.rejected, checked.rejected)
    return _ChunkOutcome(len(valid), checked.rejected, probability, raw, spill)


def _count_chunk(result: StageResult, rows_in: int, outcome: _ChunkOutcome) -> None:
    result.rows_in += rows_in
    result.rows_scored += outcome.rows_scored
    result.rows_rejected += len(outcome.rejected)
    _count_rejects(result, outcome.rejected)
    result.score_sum += float(outcome.probability.sum(dtype=np.float64))


def _coded(column: pd.Series) -> CodedColumn:
    """A column of few distinct values (window ends) as codes, NULL where missing."""
    codes, uniques = pd.factorize(column.to_numpy(), use_na_sentinel=True)
    return CodedColumn(codes, tuple(uniques))


def _count_rejects(result: StageResult, rejected: pd.DataFrame) -> None:
    if rejected.empty:
        return
    result.reject_counts.update(rejected["reason_code"].value_counts().to_dict())
    for code, group in rejected.groupby("reason_code"):
        result.reject_samples.setdefault(
            str(code), f"{group['reason'].iloc[0]}; row {group['raw_values'].iloc[0]}"
        )


def clear_staging(engine: Engine, tables: WarehouseTables, run_id: str) -> int:
    """Remove every staged row (leftovers of killed runs too) and this run's earlier rejects.

    On PostgreSQL the staging table is truncated (no dead rows left behind; the run lock
    keeps other runs away); the count comes first.
    """
    with engine.begin() as conn:
        if is_postgres(conn):
            removed = conn.execute(select(func.count()).select_from(tables.staging)).scalar_one()
            if removed:
                conn.execute(text(f"TRUNCATE {qualified_name(conn, tables.staging)}"))
        else:
            removed = conn.execute(delete(tables.staging)).rowcount
        conn.execute(delete(tables.rejected).where(tables.rejected.c.run_id == run_id))
    return int(removed or 0)


def reject_duplicates(
    engine: Engine, tables: WarehouseTables, run_id: str, as_of: date, chunk_size: int
) -> int:
    """Move every staged copy of a customer id staged more than once to `rejected_rows`."""
    duplicated = render_sql("scoring/duplicated_customers", engine, tables).strip()
    with engine.connect() as conn:
        ids = {int(row[0]) for row in conn.execute(text(duplicated), {"run_id": run_id})}
    if not ids:
        return 0
    source = load_source_sql("customer_activity", engine, tables)
    params = {"as_of": as_of}
    wanted = np.fromiter(ids, dtype=np.int64, count=len(ids))
    moved = 0
    types = population_column_types(engine, source, params)
    for chunk in stream_query(engine, source, params, chunk_size, types):
        now = datetime.now(UTC)
        valid = validate_chunk(chunk[list(ACTIVITY_COLUMNS)], run_id, now).valid
        copies = valid[np.isin(valid[CUSTOMER_ID].to_numpy(dtype=np.int64), wanted)]
        if copies.empty:
            continue
        rejected = rejected_frame(
            copies,
            ["duplicate_customer_id"] * len(copies),
            [f"{CUSTOMER_ID}: appears more than once in the population"] * len(copies),
            run_id,
            now,
        )
        with engine.begin() as conn:
            write_frame(conn, tables.rejected, rejected)
        moved += len(rejected)
    with engine.begin() as conn:
        deleted = conn.execute(
            text(
                f"DELETE FROM {qualified_name(conn, tables.staging)} "
                f"WHERE run_id = :run_id AND {CUSTOMER_ID} IN ({duplicated})"
            ),
            {"run_id": run_id},
        ).rowcount
    if deleted != moved:
        raise RunGateError(
            f"duplicate accounting broken: {deleted} staged copies removed but {moved} "
            f"rows recorded as rejected"
        )
    logger.info("rejected %s staged rows whose customer id is duplicated", moved)
    return moved


class RunGateError(RuntimeError):
    """The run cannot produce a trustworthy list; nothing is published."""


def count_population(engine: Engine, tables: WarehouseTables, as_of: date) -> int:
    """Number of rows the scoring population query returns."""
    sql = load_source_sql("customer_activity", engine, tables)
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(f"SELECT count(*) FROM ({sql}) AS population"), {"as_of": as_of}
            ).scalar_one()
        )


def account_duplicates(result: StageResult, duplicates: int) -> StageResult:
    """The result with `duplicates` staged rows moved from scored to rejected."""
    if not duplicates:
        return result
    counts = Counter(result.reject_counts)
    counts["duplicate_customer_id"] += duplicates
    samples = dict(result.reject_samples)
    samples.setdefault("duplicate_customer_id", f"{duplicates} rows share customer ids")
    return StageResult(
        rows_in=result.rows_in,
        rows_scored=result.rows_scored - duplicates,
        rows_rejected=result.rows_rejected + duplicates,
        reject_counts=counts,
        reject_samples=samples,
        score_sum=result.score_sum,
        drift=result.drift,
    )


def check_run_gates(result: StageResult, max_reject_share: float) -> None:
    """Raise `RunGateError` for an empty population, too many rejects or unaccounted rows."""
    if result.rows_in == 0:
        raise RunGateError("the scoring population is empty: rule 'population not empty'")
    if result.rows_in != result.rows_scored + result.rows_rejected:
        raise RunGateError(
            f"row accounting broken: rows_in {result.rows_in} != scored {result.rows_scored} "
            f"+ rejected {result.rows_rejected}"
        )
    share = result.rows_rejected / result.rows_in
    if share > max_reject_share:
        worst = ", ".join(
            f"{code}: {count} (e.g. {result.reject_samples.get(code, '')})"
            for code, count in result.reject_counts.most_common(3)
        )
        raise RunGateError(
            f"{result.rows_rejected} of {result.rows_in} rows ({share:.1%}) broke the feature "
            f"contract, above the max_reject_share setting {max_reject_share:.1%}: {worst}"
        )


def run_figures(result: StageResult, model_version: str) -> dict:
    """Ledger figures of a staged run."""
    return {
        "model_version": model_version,
        "rows_in": result.rows_in,
        "rows_scored": result.rows_scored,
        "rows_rejected": result.rows_rejected,
        "reject_share": result.rows_rejected / result.rows_in if result.rows_in else None,
        "score_mean": result.score_sum / result.rows_scored if result.rows_scored else None,
    }
