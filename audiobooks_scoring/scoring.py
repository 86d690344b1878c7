"""Scoring: turn population chunks into staged probabilities, holdout flags and reason codes."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import DBAPIError
from threadpoolctl import threadpool_limits

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    CUSTOMER_ID,
    FEATURES,
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

REASON_LABELS: dict[str, str] = {
    "book_length_avg_min_high": "buys long books",
    "book_length_avg_min_low": "buys short books",
    "book_length_total_min_high": "has bought many hours of audio",
    "book_length_total_min_low": "has bought few hours of audio",
    "price_avg_high": "pays high prices per book",
    "price_avg_low": "pays low prices per book",
    "price_total_high": "has spent a lot in total",
    "price_total_low": "has spent little in total",
    "review_high": "left a review",
    "review_low": "has not left a review",
    "review_score_high": "rated their books highly",
    "review_score_low": "rated their books low",
    "completion_high": "listened to most of what they bought",
    "completion_low": "listened to little of what they bought",
    "minutes_listened_high": "listened for many minutes",
    "minutes_listened_low": "listened for few minutes",
    "support_requests_high": "contacted support",
    "support_requests_low": "has not needed support",
    "last_visit_days_after_purchase_high": "visited long after purchase",
    "last_visit_days_after_purchase_low": "visited soon after purchase",
}
REASON_COUNT = 3
# Every reason code, in FEATURES order: code 2*j is feature j's "_high", 2*j + 1 its "_low".
REASON_CODE_VALUES: tuple[str, ...] = tuple(
    f"{name}_{side}" for name in FEATURES for side in ("high", "low")
)
SCORING_BLOCK_ROWS = 4_096  # rows per block of the numpy forward passes (cache-sized)


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
    model_seconds: float = 0.0
    reason_seconds: float = 0.0
    drift: DriftAccumulator | None = None

    def merge(self, other: StageResult) -> StageResult:
        """The sum of two partitions' results."""
        merged = StageResult(
            rows_in=self.rows_in + other.rows_in,
            rows_scored=self.rows_scored + other.rows_scored,
            rows_rejected=self.rows_rejected + other.rows_rejected,
            reject_counts=self.reject_counts + other.reject_counts,
            reject_samples={**other.reject_samples, **self.reject_samples},
            score_sum=self.score_sum + other.score_sum,
            model_seconds=self.model_seconds + other.model_seconds,
            reason_seconds=self.reason_seconds + other.reason_seconds,
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


def _block_contributions(
    weights: DenseWeights, batch: np.ndarray, medians: np.ndarray
) -> np.ndarray:
    first, rest = weights.layers[0], weights.layers[1:]
    contributions = np.zeros(batch.shape, dtype=np.float32)
    pre_activation = batch @ first.kernel
    pre_activation += first.bias
    base = forward_layers(activate(pre_activation.copy(), first.activation), rest)[:, 0]
    shift = medians[None, :] - batch
    features, rows = np.nonzero(shift.T)
    if len(rows):
        moved = pre_activation[rows]
        moved += shift[rows, features][:, None] * first.kernel[features]
        moved_probability = forward_layers(activate(moved, first.activation), rest)[:, 0]
        contributions[rows, features] = base[rows] - moved_probability
    return contributions


def reason_contributions_fast(
    weights: DenseWeights,
    X_scaled: np.ndarray,
    medians_scaled: np.ndarray,
    pool: Executor | None = None,
) -> np.ndarray:
    """n x features: p(x) minus p(x with that one feature at its median); > 0 raises the score.

    The counterfactual of `model.reason_contributions`, computed only where a feature
    differs from its median (elsewhere it is exactly 0): the moved first-layer
    pre-activations of every (row, feature) pair of a block go through the rest of the
    network in one matrix product.
    """
    X = as_model_input(weights, X_scaled)
    medians = np.asarray(medians_scaled, dtype=np.float32).reshape(-1)
    if medians.shape[0] != weights.input_size:
        raise ValueError(
            f"medians_scaled has {medians.shape[0]} values; expected {weights.input_size}"
        )
    contributions = np.empty(X.shape, dtype=np.float32)

    def work(rows: slice) -> None:
        contributions[rows] = _block_contributions(weights, X[rows], medians)

    _run_blocks(work, X.shape[0], SCORING_BLOCK_ROWS, pool)
    return contributions


def reason_code_indices(
    contributions: np.ndarray, raw: np.ndarray, medians: np.ndarray
) -> np.ndarray:
    """Per row, indices into `REASON_CODE_VALUES` of the (up to) three top reasons, -1 for none.

    The top three are the largest contributions, ties going to the earlier feature (as a
    stable sort would); a reason is given only when its contribution is above 0.
    """
    remaining = np.array(contributions, dtype=np.float32, copy=True)
    rows = np.arange(len(remaining))
    indices = np.full((len(remaining), REASON_COUNT), -1, dtype=np.int8)
    for slot in range(min(REASON_COUNT, remaining.shape[1])):
        chosen = np.argmax(remaining, axis=1)
        value = remaining[rows, chosen]
        above = raw[rows, chosen] > medians[chosen]
        code = 2 * chosen + np.where(above, 0, 1)
        indices[:, slot] = np.where(value > 0, code, -1)
        remaining[rows, chosen] = -np.inf
    return indices


def reason_codes(contributions: np.ndarray, raw: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """The codes of the (up to) three features that raise each row's score most, else None."""
    return decode_reasons(reason_code_indices(contributions, raw, medians))


def decode_reasons(indices: np.ndarray) -> np.ndarray:
    """Reason code indices (-1 for none) as an object array of codes (None for none)."""
    lookup = np.array([*REASON_CODE_VALUES, None], dtype=object)
    return lookup[np.where(indices < 0, len(REASON_CODE_VALUES), indices)]


def score_reasons(
    model: ScoringModel, raw: np.ndarray, scaled: np.ndarray, pool: Executor | None = None
) -> np.ndarray:
    """Reason code indices (n x 3, -1 for none) of raw rows and their scaled model input."""
    X = as_model_input(model.weights, scaled)
    medians = np.asarray(model.preprocessing.medians, dtype=np.float64)
    medians_scaled = model.preprocessing.medians_scaled()
    indices = np.empty((X.shape[0], REASON_COUNT), dtype=np.int8)

    def work(rows: slice) -> None:
        contributions = _block_contributions(model.weights, X[rows], medians_scaled)
        indices[rows] = reason_code_indices(contributions, raw[rows], medians)

    _run_blocks(work, X.shape[0], SCORING_BLOCK_ROWS, pool)
    return indices


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
) -> StageResult:
    """Stream one partition of the population: validate, score, stage results and rejects.

    Memory is bounded by the chunk size. The staged rows go to the warehouse through one
    binary COPY that the server ingests while the next chunk is read and scored (they are
    committed together at the end; rejects are committed per chunk). The numpy forward
    passes run on one thread per core, with single-threaded BLAS.
    """
    params: dict = {"as_of": as_of}
    if partitions > 1:
        params.update(partitions=partitions, partition=partition)
    sql = population_sql(engine, tables, partition, partitions)
    types = population_column_types(engine, sql, params)
    result = StageResult(drift=DriftAccumulator(model.profile) if model.profile else None)
    with (
        ThreadPoolExecutor(max_workers=scoring_threads(), thread_name_prefix="scoring") as pool,
        threadpool_limits(limits=1, user_api="blas"),
        bulk_writer(engine, tables.staging) as staging,
    ):
        for chunk in stream_query(engine, sql, params, settings.chunk_size, types):
            outcome = _stage_chunk(
                engine, tables, model, settings, run_id, partition, chunk, pool, staging
            )
            _count_chunk(result, len(chunk), outcome)
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
    model_seconds: float
    reason_seconds: float


def _stage_chunk(
    engine: Engine,
    tables: WarehouseTables,
    model: ScoringModel,
    settings: Settings,
    run_id: str,
    partition: int,
    chunk: pd.DataFrame,
    pool: Executor,
    staging: ColumnWriter,
) -> _ChunkOutcome:
    """Validate and score one chunk, hand its rows to the staging writer, commit its rejects."""
    now = datetime.now(UTC)
    checked = validate_chunk(chunk[list(ACTIVITY_COLUMNS)], run_id, now)
    valid = checked.valid
    raw = valid[list(FEATURES)].to_numpy(dtype=np.float64)
    started = time.perf_counter()
    scaled = model.preprocessing.transform(raw)
    probability = predict_probability_stable(
        model.weights, scaled, settings.predict_batch_size, pool
    )
    scored = time.perf_counter()
    reasons = score_reasons(model, raw, scaled, pool)
    reasoned = time.perf_counter()
    ids = valid[CUSTOMER_ID].to_numpy(dtype=np.int64)
    staged = {
        "run_id": run_id,
        CUSTOMER_ID: ids,
        WINDOW_END: _coded(valid[WINDOW_END]) if WINDOW_END in valid else None,
        "probability": probability.astype(np.float64),
        "holdout": holdout_mask(ids, settings.holdout_salt, settings.holdout_share),
        "partition_no": partition,
    }
    for slot in range(REASON_COUNT):
        staged[f"reason_{slot + 1}"] = CodedColumn(reasons[:, slot], REASON_CODE_VALUES)
    staging.write(staged, len(valid))
    if not checked.rejected.empty:
        with engine.begin() as conn:
            write_frame(conn, tables.rejected, checked.rejected)
    return _ChunkOutcome(
        len(valid), checked.rejected, probability, raw, scored - started, reasoned - scored
    )


def _count_chunk(result: StageResult, rows_in: int, outcome: _ChunkOutcome) -> None:
    result.rows_in += rows_in
    result.rows_scored += outcome.rows_scored
    result.rows_rejected += len(outcome.rejected)
    _count_rejects(result, outcome.rejected)
    result.score_sum += float(outcome.probability.sum(dtype=np.float64))
    result.model_seconds += outcome.model_seconds
    result.reason_seconds += outcome.reason_seconds
    if result.drift is not None:
        result.drift.add(outcome.raw, outcome.probability)


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
        model_seconds=result.model_seconds,
        reason_seconds=result.reason_seconds,
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
