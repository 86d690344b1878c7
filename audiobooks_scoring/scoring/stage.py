"""Staging: stream the population in chunks, validate, score, and hand the rows on.

Memory is bounded by the chunk size. On one machine each scored chunk is sorted and
spilled to local disk (`SpillFiles`), ranked later by a merge; partitions of a Dask run
stage their rows, with reason codes, in the warehouse's staging table instead.
"""

from __future__ import annotations

import logging
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
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from threadpoolctl import threadpool_limits

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    CUSTOMER_ID,
    FEATURES,
    SCORE_REASON_CODES,
    WINDOW_END,
    ContractError,
    check_columns,
    validate_chunk,
)
from audiobooks_scoring.model.network import as_model_input, predict_probability, scoring_threads
from audiobooks_scoring.model.scoring_model import ScoringModel
from audiobooks_scoring.monitoring.drift import DriftAccumulator
from audiobooks_scoring.scoring.control_group import control_group_mask
from audiobooks_scoring.scoring.ranking import SpillFiles
from audiobooks_scoring.scoring.reasons import (
    REASON_COUNT,
    above_medians,
    reason_coder,
    score_reasons,
)
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import CodedColumn, ColumnWriter, WarehouseAdapter

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
    spill: SpillFiles | None = None  # the scored rows, when spilled locally for ranking

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


def population_sql(warehouse: WarehouseAdapter, partition: int, partitions: int) -> str:
    """The scoring population query, restricted to one hash partition when partitioned."""
    sql = warehouse.source_sql("customer_activity")
    if partitions <= 1:
        return sql
    return (
        f"SELECT * FROM ({sql}) AS population "
        f"WHERE abs(coalesce(population.{CUSTOMER_ID}, 0)) % :partitions = :partition"
    )


def population_column_types(
    warehouse: WarehouseAdapter, sql: str, params: dict
) -> dict[str, pa.DataType]:
    """Arrow types to parse the population with; text columns stay text to be rejected by rows."""
    try:
        columns = warehouse.query_columns(sql, params)
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
    warehouse: WarehouseAdapter,
    model: ScoringModel,
    settings: Settings,
    run_id: str,
    as_of: date,
    partition: int = 0,
    partitions: int = 1,
    on_chunk: Callable[[StageResult], None] | None = None,
    spill: SpillFiles | None = None,
) -> StageResult:
    """Stream one partition of the population: validate, score, stage results and rejects.

    Memory is bounded by the chunk size. The scored rows go to `spill` (sorted files on
    local disk, ranked later on this machine, their reason codes computed during that merge)
    when given, else with their reason codes to the warehouse's staging table through the
    adapter's bulk writer, which the engine ingests while the next chunk is read and scored.
    Rejects are committed per chunk. The numpy forward passes run on one thread
    per core, with single-threaded BLAS; spilling and drift counts follow on their own thread.
    """
    params: dict = {"as_of": as_of}
    if partitions > 1:
        params.update(partitions=partitions, partition=partition)
    sql = population_sql(warehouse, partition, partitions)
    types = population_column_types(warehouse, sql, params)
    result = StageResult(
        drift=DriftAccumulator(model.profile) if model.profile else None, spill=spill
    )
    if spill is not None:
        spill.defer_reasons(model.weights.input_size, reason_coder(model))
    with (
        ThreadPoolExecutor(max_workers=scoring_threads(), thread_name_prefix="scoring") as pool,
        threadpool_limits(limits=1, user_api="blas"),
        nullcontext(spill)
        if spill is not None
        else warehouse.bulk_writer(warehouse.tables.staging) as staging,
        FollowingWork() as following,
    ):
        chunks = warehouse.stream_query(sql, params, settings.chunk_size, types)
        for chunk in read_ahead(chunks, depth=1):
            outcome = _stage_chunk(
                warehouse, model, settings, run_id, partition, chunk, pool, staging
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


class FollowingWork:
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

    def __enter__(self) -> FollowingWork:
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


@dataclass
class _ChunkOutcome:
    """What one staged chunk adds to the run's counts and drift."""

    rows_scored: int
    rejected: pd.DataFrame
    probability: np.ndarray
    raw: np.ndarray
    spill: Callable[[], None] | None = None  # spilling the rows, left to the following thread


def _stage_chunk(
    warehouse: WarehouseAdapter,
    model: ScoringModel,
    settings: Settings,
    run_id: str,
    partition: int,
    chunk: pd.DataFrame,
    pool: Executor,
    staging: ColumnWriter | SpillFiles,
) -> _ChunkOutcome:
    """Validate and score one chunk, hand its rows to the staging writer, commit its rejects."""
    now = datetime.now(UTC)
    checked = validate_chunk(chunk[list(ACTIVITY_COLUMNS)], run_id, now)
    valid = checked.valid
    raw = valid[list(FEATURES)].to_numpy(dtype=np.float64)
    scaled = model.preprocessing.transform(raw)
    probability = predict_probability(
        model.weights, scaled, settings.predict_batch_size, pool
    ).astype(np.float64)
    ids = valid[CUSTOMER_ID].to_numpy(dtype=np.int64)
    window_end = _coded(valid[WINDOW_END]) if WINDOW_END in valid else None
    holdout = control_group_mask(ids, settings.holdout_salt, settings.holdout_share)
    spill = None
    if isinstance(staging, SpillFiles):  # reason codes come during the merge
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
        with warehouse.engine.begin() as conn:
            warehouse.write_frame(conn, warehouse.tables.rejected, checked.rejected)
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


def count_population(warehouse: WarehouseAdapter, as_of: date) -> int:
    """Number of rows the scoring population query returns."""
    sql = warehouse.source_sql("customer_activity")
    with warehouse.engine.connect() as conn:
        return int(
            conn.execute(
                text(f"SELECT count(*) FROM ({sql}) AS population"), {"as_of": as_of}
            ).scalar_one()
        )
