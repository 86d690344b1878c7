"""The benchmark behind `audiobooks-scoring bench`: the floor, the pipeline and a naive pipeline.

All three run in one process on the same warehouse and the same population:

- floor: the population's columns copied out and a result of the published list's shape
  (the columns and types the list stores, constant values) copied back into a scratch table
  with the engine's bulk path (binary COPY through the list's two sessions on PostgreSQL),
  no scoring. Nothing that writes the list can be faster.
- pipeline: the scoring run's own steps (`pipeline.run_scoring`, the steps the flow runs as
  tasks), timed through a `StepRunner` hook from preparing the run to the atomic swap:
  clear staging, stage the population (stream, validate, score, holdout, spill), build the
  ranked list with reason codes and unique ids, check the run gates, publish. Process
  start-up, Prefect, model loading, drift and the report are not timed.
- naive: what a notebook would do: `pandas.read_sql` of the table, Keras `model.predict`
  at its default batch size, `DataFrame.to_sql`. Above `NAIVE_SAMPLE_ROWS` rows it runs on
  that many rows and its time is scaled up linearly (the report says so).

The bench owns its warehouse: it fills an empty one with demo customers (or one it filled
before, recognised by its ledger row) and refuses to touch input tables it did not fill.
Point it at a schema or database of its own (`AUDIOBOOKS_WAREHOUSE_SCHEMA=bench`).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Column, MetaData, Table, func, select, text
from threadpoolctl import threadpool_limits

from audiobooks_scoring import pipeline, progress
from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, SCORE_REASON_CODES, WINDOW_END
from audiobooks_scoring.inputs.demo_data import BLOCK_ROWS, NEW_CUSTOMER_SHARE
from audiobooks_scoring.inputs.loading import load_demo_data
from audiobooks_scoring.model import lifecycle
from audiobooks_scoring.model.network import predict_probability, scoring_threads
from audiobooks_scoring.model.preprocessing import Preprocessing
from audiobooks_scoring.model.scoring_model import ScoringModel, load_scoring_model
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.publishing.ledger import record_run_end, record_run_start
from audiobooks_scoring.scoring.reasons import score_reasons
from audiobooks_scoring.scoring.stage import (
    StageResult,
    count_population,
    population_column_types,
    population_sql,
)
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import CodedColumn, WarehouseAdapter, init_warehouse

logger = logging.getLogger(__name__)

BENCH_AS_OF = date(2026, 1, 1)
BENCH_SEED = 7
BENCH_RUN_ID = "bench"
DATA_MARKER_RUN_ID = "bench-demo-data"
NAIVE_SAMPLE_ROWS = 200_000
TRAINING_SAMPLE_ROWS = 20_000
MODEL_STEP_ROWS = 1_000_000


class BenchError(RuntimeError):
    """The bench cannot run on this warehouse (it would overwrite data it did not load)."""


@dataclass(frozen=True)
class BenchReport:
    """Times of the floor, the pipeline and the naive pipeline on one population."""

    customers: int
    dialect: str
    machine: str
    floor_s: float
    pipeline_s: float
    naive_s: float
    naive_rows: int
    model_rows_per_s: float
    reason_rows_per_s: float
    peak_rss_mb: float
    pipeline_peak_rss_mb: float | None
    pipeline_steps: dict[str, float] = field(default_factory=dict)
    rows_scored: int = 0
    rows_rejected: int = 0
    repeats: int = 1

    @property
    def naive_sampled(self) -> bool:
        """Whether the naive pipeline ran on a sample and was scaled up."""
        return self.naive_rows < self.customers

    @property
    def pipeline_over_floor(self) -> float:
        """How many times the floor the pipeline takes."""
        return self.pipeline_s / self.floor_s

    @property
    def naive_over_pipeline(self) -> float:
        """How many times faster than the naive pipeline the pipeline is."""
        return self.naive_s / self.pipeline_s

    def rows_per_s(self, seconds: float) -> float:
        """Population rows per second for a time over the whole population."""
        return self.customers / seconds if seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        """The figures as plain JSON values (the keys `--json` prints)."""
        figures = asdict(self)
        figures.update(
            pipeline_over_floor=round(self.pipeline_over_floor, 3),
            naive_over_pipeline=round(self.naive_over_pipeline, 3),
            naive_sampled=self.naive_sampled,
        )
        return {
            key: round(value, 3) if isinstance(value, float) else value
            for key, value in figures.items()
        }

    def describe(self) -> str:
        """A plain-text report: rows per second of each path, ratios, model speed, memory."""
        naive_note = (
            f"measured on {self.naive_rows:,} rows, scaled x{self.customers / self.naive_rows:.1f}"
            if self.naive_sampled
            else "measured on every row"
        )
        lines = [
            f"bench: {self.customers:,} customers on {self.dialect} ({self.machine});"
            f" best of {self.repeats} rounds",
            f"  floor     {self.floor_s:8.2f} s  {self.rows_per_s(self.floor_s):>12,.0f} rows/s"
            "  (bulk copy out and back, no scoring)",
            f"  pipeline  {self.pipeline_s:8.2f} s  {self.rows_per_s(self.pipeline_s):>12,.0f}"
            " rows/s  (read, validate, score, rank, check duplicates, publish atomically)",
            f"  naive     {self.naive_s:8.2f} s  {self.rows_per_s(self.naive_s):>12,.0f} rows/s"
            f"  (read_sql, predict, to_sql; {naive_note})",
            f"  pipeline / floor = {self.pipeline_over_floor:.2f}x;"
            f" naive / pipeline = {self.naive_over_pipeline:.1f}x",
            f"  model step {self.model_rows_per_s:,.0f} rows/s (forward pass on the scoring"
            f" threads); reason codes {self.reason_rows_per_s:,.0f} rows/s",
            "  pipeline steps: "
            + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.pipeline_steps.items()),
            f"  peak RSS {self.peak_rss_mb:,.0f} MB"
            + (
                f" (pipeline alone {self.pipeline_peak_rss_mb:,.0f} MB)"
                if self.pipeline_peak_rss_mb is not None
                else ""
            ),
        ]
        return "\n".join(lines)


def run_bench(settings: Settings, customers: int, repeats: int = 3) -> BenchReport:
    """Fill the warehouse if needed, then time the floor, the pipeline and the naive path.

    The three run in rounds (floor, pipeline, naive; `repeats` rounds) and the best time of
    each is kept, so a slow moment of a shared machine does not favour one of them.
    Each phase of each round is reported to progress listeners as it starts.
    """
    report = progress.report
    warehouse = init_warehouse(settings)
    rounds = max(repeats, 1)
    try:
        report("loading demo data", 0, 1)
        rows = ensure_bench_data(warehouse, customers, settings.chunk_size)
        report("training a champion", 0, 1)
        model = ensure_champion(warehouse, settings)
        naive_rows = min(rows, NAIVE_SAMPLE_ROWS)
        floors, runs, naives = [], [], []
        phases = 3 * rounds + 1
        for index in range(rounds):
            report(f"round {index + 1}/{rounds}: floor", 3 * index, phases)
            floors.append(measure_floor(warehouse, settings.chunk_size))
            report(f"round {index + 1}/{rounds}: pipeline", 3 * index + 1, phases)
            runs.append(measure_pipeline(warehouse, settings, model))
            report(f"round {index + 1}/{rounds}: naive", 3 * index + 2, phases)
            naives.append(measure_naive(warehouse, settings, naive_rows))
        report("model step", phases - 1, phases)
        model_rows_per_s, reason_rows_per_s = measure_model_step(warehouse, settings, model)
        report("done", phases, phases)
    finally:
        warehouse.dispose()
    best = min(runs, key=lambda run: run.seconds)
    return BenchReport(
        customers=rows,
        dialect=warehouse.describe(),
        machine=describe_machine(),
        floor_s=min(floors),
        pipeline_s=best.seconds,
        naive_s=min(naives) * rows / naive_rows,
        naive_rows=naive_rows,
        model_rows_per_s=model_rows_per_s,
        reason_rows_per_s=reason_rows_per_s,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        pipeline_peak_rss_mb=max((run.peak_rss_mb or 0.0) for run in runs) or None,
        pipeline_steps=best.steps,
        rows_scored=best.result.rows_scored,
        rows_rejected=best.result.rows_rejected,
        repeats=rounds,
    )


def measure_model_step(
    warehouse: WarehouseAdapter, settings: Settings, model: ScoringModel
) -> tuple[float, float]:
    """Rows per second of the forward pass and of the reason codes, on the scoring threads.

    Measured on the first chunk of the population, scored until at least a million rows
    went through (the pipeline's own figures include waiting for the reader thread).
    """
    sql = population_sql(warehouse, 0, 1)
    params = {"as_of": BENCH_AS_OF}
    types = population_column_types(warehouse, sql, params)
    chunks = warehouse.stream_query(sql, params, settings.chunk_size, types)
    chunk = next(iter(chunks))
    chunks.close()
    raw = chunk[list(FEATURES)].to_numpy(dtype=np.float64)
    scaled = model.preprocessing.transform(raw)
    passes = max(1, -(-MODEL_STEP_ROWS // len(raw)))
    with (
        ThreadPoolExecutor(scoring_threads()) as pool,
        threadpool_limits(limits=1, user_api="blas"),
    ):
        started = time.perf_counter()
        for _ in range(passes):
            predict_probability(model.weights, scaled, settings.predict_batch_size, pool)
        forward = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(passes):
            score_reasons(model, raw, scaled, pool)
        reasons = time.perf_counter() - started
    rows = passes * len(raw)
    return rows / forward, rows / reasons


def describe_machine() -> str:
    """CPU model and count, memory and OS, for the report."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kb = int(meminfo.read_text().split()[1])
        memory = f", {total_kb / 1024**2:.0f} GB RAM"
    return f"{os.cpu_count()} x {cpu}{memory}, {platform.system()} {platform.release()}"


def demo_returning_customers(customers: int) -> int:
    """Returning demo customers whose activity, with the new ones, is closest to `customers`."""
    returning = round(customers / (1 + NEW_CUSTOMER_SHARE))
    return min(
        (returning - 1, returning, returning + 1),
        key=lambda candidate: abs(demo_population(candidate) - customers),
    )


def demo_population(returning: int) -> int:
    """Rows of the demo activity of `returning` customers (new customers included)."""
    return returning + round(returning * NEW_CUSTOMER_SHARE)


def ensure_bench_data(warehouse: WarehouseAdapter, customers: int, chunk_size: int) -> int:
    """Rows of the bench population, loading demo customers first when needed.

    The demo population is `customers` rows, or the nearest count the demo generator makes
    (returning customers plus a tenth of new ones). Loads when the population differs and
    the input tables are empty or were filled by an earlier bench; else raises `BenchError`.
    """
    tables = warehouse.tables
    current = count_population(warehouse, BENCH_AS_OF)
    returning = demo_returning_customers(customers)
    if current == demo_population(returning):
        return current
    with warehouse.engine.connect() as conn:
        activity_rows = conn.execute(select(func.count()).select_from(tables.activity)).scalar()
        marked = conn.execute(
            select(func.count()).where(tables.runs.c.run_id == DATA_MARKER_RUN_ID)
        ).scalar()
    if activity_rows and not marked:
        raise BenchError(
            f"the warehouse already holds {activity_rows} activity rows that the bench did not "
            "load; run the bench on a schema or database of its own (for example "
            "AUDIOBOOKS_WAREHOUSE_SCHEMA=bench)"
        )
    logger.info("loading %s demo customers for the bench", customers)
    started = time.perf_counter()
    # The mark goes first, so that a load cut short can be redone by the next bench.
    record_run_start(warehouse, DATA_MARKER_RUN_ID, BENCH_AS_OF, None, "bench")
    load_demo_data(warehouse, returning, BENCH_SEED, BENCH_AS_OF, max(chunk_size, BLOCK_ROWS))
    rows = count_population(warehouse, BENCH_AS_OF)
    record_run_end(
        warehouse,
        DATA_MARKER_RUN_ID,
        rows_in=rows,
        message=f"demo data loaded by the bench in {time.perf_counter() - started:.0f} s",
    )
    warehouse.analyze(tables.activity)
    return rows


def ensure_champion(warehouse: WarehouseAdapter, settings: Settings) -> ScoringModel:
    """The store's champion, after training a quick one on demo training rows if there is none."""
    store = ModelStore(settings.model_store_path)
    version = store.champion()
    if version is None:
        sql = warehouse.source_sql("training_examples")
        chunks = warehouse.stream_query(sql, {"as_of": BENCH_AS_OF}, TRAINING_SAMPLE_ROWS)
        frame = next(iter(chunks))
        chunks.close()
        data = lifecycle.training_data_from_frame(frame)
        challenger = lifecycle.train_challenger(data, settings.recipe, settings.seed)
        version = lifecycle.save_challenger(store, data, challenger, BENCH_AS_OF)
        lifecycle.judge_challenger(store, data, challenger, version, settings, force=True)
    return load_scoring_model(store, version)


def floor_table(warehouse: WarehouseAdapter) -> Table:
    """The scratch table of the floor: the columns the adapter stores in a list's rows."""
    listed = warehouse.list_table()
    return Table(
        "bench_floor",
        MetaData(schema=warehouse.tables.schema),
        *[Column(c.name, c.type, nullable=c.nullable) for c in listed.columns],
    )


def floor_columns(table: Table, ids: np.ndarray, first_rank: int, scored_at: datetime) -> dict:
    """A result of the list's shape for `ids`: constant values, two of three reasons given."""
    count = len(ids)
    constant = {
        "probability": np.full(count, 0.5),
        "rank": np.arange(first_rank, first_rank + count, dtype=np.int64),
        "decile": np.full(count, 1, dtype=np.int16),
        "is_target": np.zeros(count, dtype=bool),
        "holdout": np.zeros(count, dtype=bool),
        WINDOW_END: CodedColumn(np.zeros(count, dtype=np.int64), (BENCH_AS_OF,)),
        "model_version": "bench",
        "run_id": BENCH_RUN_ID,
        "scored_at": scored_at,
    }
    for slot, code in enumerate((0, 1, -1)):  # about the share of reasons a real list has
        constant[f"reason_{slot + 1}"] = CodedColumn(
            np.full(count, code, dtype=np.int64), SCORE_REASON_CODES
        )
    columns: dict[str, Any] = {CUSTOMER_ID: ids}
    columns.update((name, value) for name, value in constant.items() if name in table.c)
    return columns


def measure_floor(warehouse: WarehouseAdapter, chunk_size: int) -> float:
    """Seconds to copy the population's ids out and a result of the list's shape back in.

    Both ways use the adapter's fastest paths, and the result goes in as the list does
    (through `list_writers` bulk writers).
    """
    scratch = floor_table(warehouse)
    scratch.drop(warehouse.engine, checkfirst=True)
    scratch.create(warehouse.engine)
    sql = warehouse.source_sql("customer_activity")
    scored_at = datetime.now(UTC)
    writers = warehouse.list_writers
    started = time.perf_counter()
    copied = 0
    with ExitStack() as stack:
        outs = [stack.enter_context(warehouse.bulk_writer(scratch)) for _ in range(writers)]
        ids_chunks = warehouse.stream_customer_ids(sql, {"as_of": BENCH_AS_OF}, chunk_size)
        for batch, ids in enumerate(ids_chunks):
            outs[batch % writers].write(
                floor_columns(scratch, ids, copied + 1, scored_at), len(ids)
            )
            copied += len(ids)
    seconds = time.perf_counter() - started
    scratch.drop(warehouse.engine)
    logger.info("floor: %s rows out and back in %.2f s", copied, seconds)
    return seconds


@dataclass(frozen=True)
class PipelineRun:
    """One timed pipeline run."""

    seconds: float
    steps: dict[str, float]
    result: StageResult
    peak_rss_mb: float | None


TIMED_STEPS = {
    pipeline.prepare_run: "clear",
    pipeline.stage_population: "stage",
    pipeline.build_target_list: "rank",
    pipeline.check_run_gates: "rank",
    pipeline.publish_target_list: "publish",
}


class TimedSteps(pipeline.StepRunner):
    """Times the pipeline's steps from preparing the run to the swap (the bench's figure)."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def call(self, step, *args):
        """Run the step, adding its time to its phase when it is one the bench times."""
        started = time.perf_counter()
        result = step(*args)
        phase = TIMED_STEPS.get(step)
        if phase is not None:
            self.steps[phase] = round(self.steps.get(phase, 0.0) + time.perf_counter() - started, 3)
        return result


def measure_pipeline(
    warehouse: WarehouseAdapter, settings: Settings, model: ScoringModel
) -> PipelineRun:
    """Time the scoring run's own steps, from clearing the staging table to the atomic swap.

    Every round publishes the same run id; its rows from the round before are removed from
    history before the clock starts, since a nightly run publishes a run id history does not
    hold yet (replacing a run's history is a backfill's cost, not the nightly one's).
    """
    warehouse.forget_run_history(BENCH_RUN_ID)
    reset_peak_rss()
    timer = TimedSteps()
    run = pipeline.ScoringRun(settings, warehouse, BENCH_RUN_ID, BENCH_AS_OF)
    outcome = pipeline.run_scoring(run, timer, model=model, write_report=False)
    seconds = sum(timer.steps.values())
    logger.info("pipeline: %s rows in %.2f s %s", outcome.figures["rows_in"], seconds, timer.steps)
    counts = StageResult(
        rows_in=outcome.figures["rows_in"],
        rows_scored=outcome.figures["rows_scored"],
        rows_rejected=outcome.figures["rows_rejected"],
    )
    return PipelineRun(seconds, timer.steps, counts, peak_rss_mb())


def measure_naive(warehouse: WarehouseAdapter, settings: Settings, rows: int) -> float:
    """Seconds of a notebook's pipeline on `rows` rows: read_sql, predict, to_sql."""
    import keras  # noqa: F401 - imported before the clock starts, like a warm notebook

    engine, tables = warehouse.engine, warehouse.tables
    store = ModelStore(settings.model_store_path)
    champion = store.champion()
    if champion is None:
        raise BenchError("the model store has no champion")
    stored = store.load_version(champion)
    preprocessing = Preprocessing.from_json(stored.preprocessing_json)
    source = warehouse.source_sql("customer_activity")
    query = text(f"SELECT * FROM ({source}) AS population LIMIT :rows")
    started = time.perf_counter()
    frame = pd.read_sql(query, engine, params={"as_of": BENCH_AS_OF, "rows": rows})
    features = preprocessing.transform(frame[list(FEATURES)].to_numpy(dtype=np.float64))
    output = stored.model.predict(features, verbose=0)
    probability = output[:, -1]
    result = pd.DataFrame({CUSTOMER_ID: frame[CUSTOMER_ID], "probability": probability})
    result["rank"] = result["probability"].rank(ascending=False, method="first").astype(int)
    result["decile"] = np.ceil(10 * result["rank"] / len(result)).astype(int)
    result["run_id"] = BENCH_RUN_ID
    result["scored_at"] = datetime.now(UTC)
    result.to_sql("bench_naive", engine, schema=tables.schema, if_exists="replace", index=False)
    seconds = time.perf_counter() - started
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {warehouse.qualified_name('bench_naive')}"))
    logger.info("naive: %s rows in %.2f s", len(frame), seconds)
    return seconds


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux), so a phase can be measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident memory since the last reset (Linux `VmHWM`), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
