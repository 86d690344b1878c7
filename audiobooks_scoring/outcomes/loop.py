"""Closing the loop: what each published list achieved, measured run by run into the warehouse.

The measurement is a list of named steps, like the scoring run (`pipeline`); a `StepRunner`
decides how each is called (plainly here and in the tests, as a Prefect task in the
`measure-outcomes` flow):

    find-runs-to-measure -> measure-run -> write-run-outcome (both per run)
    -> write-outcomes-report

A run is measured once its horizon has begun (its as-of date is before the measurement
date); until the horizon has fully elapsed its figures are provisional and it is measured
again every time. A final run (maturity 1) is measured again only when asked for by id.
Each measurement replaces the run's rows in the outcome tables in one transaction.

Memory: a run's scored customers are read whole (five columns, about 20 bytes a customer,
so 200 MB for 10 million); purchases are streamed in chunks of `chunk_size` rows and joined
to them in numpy, so the purchases never need to fit in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import delete, insert, select, update

from audiobooks_scoring.model.store import ModelStore, ModelStoreError
from audiobooks_scoring.outcomes.measures import (
    OutcomeLabels,
    RunOutcome,
    is_provisional,
    label_outcomes,
    maturity,
    measure_outcome,
)
from audiobooks_scoring.pipeline import StepRunner
from audiobooks_scoring.reporting.outcomes_report import build_outcomes_report
from audiobooks_scoring.reporting.reports import RunReport, records
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter

logger = logging.getLogger(__name__)

MEASURED_STATUSES = ("succeeded", "backfilled")
"""Ledger statuses of runs whose list is in history (published, or backfilled)."""

SUMMARY_KEYS = (
    "run_id",
    "maturity",
    "realized_auc",
    "expected_auc",
    "brier",
    "uplift",
    "uplift_ci_low",
    "uplift_ci_high",
    "targeted",
    "targeted_rate",
    "control",
    "control_rate",
    "provisional",
)
"""The headline figures of a run's outcome, in the order `outcomes --json` prints them."""

STATUS_FINAL = "final"
STATUS_PROVISIONAL = "provisional"
STATUS_DECAY = "decay"


class OutcomesError(ValueError):
    """A measurement was asked for a run the ledger does not hold as published or backfilled."""


@dataclass(frozen=True)
class OutcomesJob:
    """One measurement: settings, warehouse, the measurement date and, optionally, one run."""

    settings: Settings
    warehouse: WarehouseAdapter
    measured_on: date
    run_id: str | None = None


@dataclass(frozen=True)
class PublishedRun:
    """A run whose list is in history: its id, as-of date and the model that scored it."""

    run_id: str
    as_of: date
    model_version: str | None
    published: bool
    last_status: str | None = None  # the status of its latest stored outcome, if any


@dataclass(frozen=True)
class RunCustomers:
    """A run's scored customers as aligned arrays."""

    customer_id: np.ndarray
    probability: np.ndarray
    decile: np.ndarray
    is_target: np.ndarray
    holdout: np.ndarray


@dataclass(frozen=True)
class RunMeasurement:
    """One run's outcome on a measurement date, with its maturity, status and the reason."""

    run: PublishedRun
    measured_on: date
    horizon_days: int
    maturity: float
    provisional: bool
    status: str
    reason: str
    retrain_requested: bool
    purchases: dict[str, int]
    outcome: RunOutcome
    measured_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def decay(self) -> bool:
        """Whether the run's realized AUC fell below its model's promise beyond the tolerance."""
        return self.status == STATUS_DECAY

    @property
    def horizon_end(self) -> date:
        """The last day of the run's horizon."""
        return self.run.as_of + timedelta(days=self.horizon_days)

    def summary(self) -> dict[str, Any]:
        """The headline figures (`SUMMARY_KEYS`)."""
        row = self.ledger_row()
        return {key: row[key] for key in SUMMARY_KEYS}

    def ledger_row(self) -> dict[str, Any]:
        """The run's row of the outcome table."""
        o = self.outcome
        return {
            "run_id": self.run.run_id,
            "as_of": self.run.as_of,
            "measured_on": self.measured_on,
            "horizon_days": self.horizon_days,
            "maturity": self.maturity,
            "provisional": self.provisional,
            "status": self.status,
            "reason": self.reason,
            "model_version": self.run.model_version,
            "customers": o.customers,
            "targeted": o.targeted,
            "targeted_conversions": o.targeted_conversions,
            "targeted_rate": o.targeted_rate,
            "lowest_targeted_probability": o.lowest_targeted_probability,
            "control": o.control,
            "control_conversions": o.control_conversions,
            "control_rate": o.control_rate,
            "uplift": o.uplift,
            "uplift_ci_low": o.uplift_ci_low,
            "uplift_ci_high": o.uplift_ci_high,
            "confidence": o.confidence,
            "incremental_conversions": o.incremental_conversions,
            "uplift_note": o.uplift_note,
            "control_customers": o.control_customers,
            "control_base_rate": o.control_base_rate,
            "mean_predicted": o.mean_predicted,
            "realized_auc": o.realized_auc,
            "expected_auc": o.expected_auc,
            "brier": o.brier,
            **{f"purchases_{bucket}": count for bucket, count in self.purchases.items()},
            "measured_at": self.measured_at,
        }

    def decile_rows(self) -> list[dict[str, Any]]:
        """The run's rows of the per-decile outcome table."""
        rows = []
        for decile in self.outcome.deciles:
            row = decile.to_dict()
            row["control_customers"] = row.pop("customers")
            rows.append({"run_id": self.run.run_id, **row})
        return rows


@dataclass(frozen=True)
class OutcomesResult:
    """A finished measurement: the runs measured and the report."""

    measured_on: date
    measurements: list[RunMeasurement]
    report: RunReport | None

    def to_dict(self) -> dict[str, Any]:
        """The measurement date, each measured run's headline figures and the report's path."""
        return {
            "measured_on": self.measured_on.isoformat(),
            "runs": [m.summary() for m in self.measurements],
            "decay_alerts": [m.run.run_id for m in self.measurements if m.decay],
            "report_path": None if self.report is None else str(self.report.html_path),
        }


# ---------------------------------------------------------------- steps


def find_runs_to_measure(job: OutcomesJob) -> list[PublishedRun]:
    """Published and backfilled runs whose horizon has begun and whose outcome is not final.

    With `job.run_id`, that run only, final or not; `OutcomesError` if the ledger does not
    hold it as published or backfilled.
    """
    runs = job.warehouse.tables.runs
    outcomes = job.warehouse.tables.outcomes
    query = (
        select(
            runs.c.run_id,
            runs.c.as_of,
            runs.c.model_version,
            runs.c.published,
            outcomes.c.status.label("last_status"),
        )
        .select_from(runs.outerjoin(outcomes, outcomes.c.run_id == runs.c.run_id))
        .where(runs.c.status.in_(MEASURED_STATUSES), runs.c.as_of.is_not(None))
        .order_by(runs.c.as_of, runs.c.run_id)
    )
    if job.run_id is not None:
        query = query.where(runs.c.run_id == job.run_id)
    else:
        query = query.where(outcomes.c.provisional.is_(None) | outcomes.c.provisional)
    frame = job.warehouse.read_frame(query)
    if job.run_id is not None and frame.empty:
        raise OutcomesError(
            f"run {job.run_id!r} is not in the {runs.name} ledger as a published or backfilled "
            "run; `audiobooks-scoring runs` lists the runs"
        )
    found = [
        PublishedRun(
            run_id=str(row.run_id),
            as_of=_to_date(row.as_of),
            model_version=row.model_version if isinstance(row.model_version, str) else None,
            published=bool(row.published),
            last_status=row.last_status if isinstance(row.last_status, str) else None,
        )
        for row in frame.itertuples(index=False)
    ]
    due = [run for run in found if run.as_of < job.measured_on]
    for run in found:
        if run.as_of >= job.measured_on:
            logger.info(
                "run %s (as of %s): its horizon has not begun on %s; nothing to measure",
                run.run_id,
                run.as_of,
                job.measured_on,
            )
    logger.info("%s run(s) to measure on %s", len(due), job.measured_on)
    return due


def measure_run(job: OutcomesJob, run: PublishedRun) -> RunMeasurement:
    """One run's outcome on the measurement date: labels, realized performance, uplift, status."""
    settings, warehouse = job.settings, job.warehouse
    horizon = settings.outcome_horizon_days
    customers = read_run_customers(warehouse, run.run_id, settings.chunk_size)
    observed = observed_days(run.as_of, job.measured_on, horizon)
    labels = read_outcome_labels(
        warehouse, customers.customer_id, run.as_of, horizon, observed, settings.chunk_size
    )
    promised = promised_auc(settings, warehouse, run.model_version)
    targeted = customers.is_target & ~customers.holdout
    outcome = measure_outcome(
        customers.probability,
        customers.decile,
        targeted,
        customers.holdout,
        labels.converted,
        promised,
    )
    share = maturity(run.as_of, job.measured_on, horizon)
    provisional = is_provisional(run.as_of, job.measured_on, horizon)
    status, reason, retrain = judge_outcome(settings, run, outcome, share, job.measured_on)
    measurement = RunMeasurement(
        run=run,
        measured_on=job.measured_on,
        horizon_days=horizon,
        maturity=share,
        provisional=provisional,
        status=status,
        reason=reason,
        retrain_requested=retrain,
        purchases=labels.counts(),
        outcome=outcome,
    )
    ignored = labels.purchases - labels.used
    logger.info(
        "run %s: maturity %.2f, %s customers, %s purchases used%s; uplift %s; realized AUC %s",
        run.run_id,
        share,
        outcome.customers,
        labels.used,
        f", {ignored} ignored" if ignored else "",
        _points(outcome.uplift),
        "-" if outcome.realized_auc is None else f"{outcome.realized_auc:.4f}",
    )
    if measurement.decay:
        logger.warning("run %s: %s", run.run_id, reason)
    return measurement


def write_run_outcome(job: OutcomesJob, measurement: RunMeasurement) -> int:
    """Rows written: the run's outcome and decile rows, replacing its earlier ones in one commit."""
    tables = job.warehouse.tables
    run_id = measurement.run.run_id
    deciles = measurement.decile_rows()
    with job.warehouse.engine.begin() as conn:
        conn.execute(
            delete(tables.outcome_deciles).where(tables.outcome_deciles.c.run_id == run_id)
        )
        conn.execute(delete(tables.outcomes).where(tables.outcomes.c.run_id == run_id))
        conn.execute(insert(tables.outcomes), [measurement.ledger_row()])
        if deciles:
            conn.execute(insert(tables.outcome_deciles), deciles)
    return 1 + len(deciles)


def write_outcomes_report(job: OutcomesJob, measurements: list[RunMeasurement]) -> RunReport:
    """The measurement's report (HTML file and markdown); its path recorded on the runs' rows."""
    history = records(
        job.warehouse.read_frame(job.warehouse.render_sql("outcomes/outcome_history"))
    )
    report = build_outcomes_report(
        measurements, history, job.measured_on, job.settings, job.warehouse.tables.outcomes.name
    )
    measured = [m.run.run_id for m in measurements]
    if measured:
        outcomes = job.warehouse.tables.outcomes
        with job.warehouse.engine.begin() as conn:
            conn.execute(
                update(outcomes)
                .where(outcomes.c.run_id.in_(measured))
                .values(report_path=str(report.html_path))
            )
    return report


def run_outcomes(
    job: OutcomesJob, steps: StepRunner | None = None, write_report: bool = True
) -> OutcomesResult:
    """Measure every run due (or the one asked for), write each, then the report; the result."""
    steps = steps or StepRunner()
    runs = steps.call(find_runs_to_measure, job)
    measurements = []
    for run in runs:
        measurement = steps.call(measure_run, job, run)
        steps.call(write_run_outcome, job, measurement)
        measurements.append(measurement)
    report = steps.call(write_outcomes_report, job, measurements) if write_report else None
    return OutcomesResult(job.measured_on, measurements, report)


# ---------------------------------------------------------------- reads and judgement


def read_outcome_ledger(warehouse: WarehouseAdapter, run_id: str | None = None) -> pd.DataFrame:
    """The outcome table's rows (one per measured run, oldest as-of first); one run if asked."""
    outcomes = warehouse.tables.outcomes
    query = select(outcomes).order_by(outcomes.c.as_of, outcomes.c.run_id)
    if run_id is not None:
        query = query.where(outcomes.c.run_id == run_id)
    return warehouse.read_frame(query)


def ledger_summaries(ledger: pd.DataFrame) -> list[dict[str, Any]]:
    """The headline figures (`SUMMARY_KEYS`) of outcome-table rows, as plain JSON values."""
    summaries = []
    for row in ledger.to_dict("records"):
        summary: dict[str, Any] = {}
        for key in SUMMARY_KEYS:
            value = row[key]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                summary[key] = None
            elif key == "run_id":
                summary[key] = str(value)
            elif key == "provisional":
                summary[key] = bool(value)
            elif key in ("targeted", "control"):
                summary[key] = int(value)
            else:
                summary[key] = float(value)
        summaries.append(summary)
    return summaries


def read_run_customers(warehouse: WarehouseAdapter, run_id: str, chunk_size: int) -> RunCustomers:
    """A run's scored customers from history, read whole (five columns)."""
    sql = warehouse.render_sql("outcomes/run_customers")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in RunCustomers.__dataclass_fields__}
    for chunk in warehouse.stream_query(sql, {"run_id": run_id}, chunk_size):
        parts["customer_id"].append(chunk["customer_id"].to_numpy(dtype=np.int64))
        parts["probability"].append(chunk["probability"].to_numpy(dtype=np.float64))
        parts["decile"].append(chunk["decile"].to_numpy(dtype=np.int16))
        parts["is_target"].append(chunk["is_target"].to_numpy(dtype=bool))
        parts["holdout"].append(chunk["holdout"].to_numpy(dtype=bool))
    empty = {
        "customer_id": np.int64,
        "probability": np.float64,
        "decile": np.int16,
        "is_target": bool,
        "holdout": bool,
    }
    return RunCustomers(
        **{
            name: np.concatenate(pieces) if pieces else np.empty(0, dtype=empty[name])
            for name, pieces in parts.items()
        }
    )


def observed_days(as_of: date, measured_on: date, horizon_days: int) -> int:
    """Days of the run's horizon observed on `measured_on`: later purchases are not known yet."""
    return max(0, min(horizon_days, (measured_on - as_of).days))


def purchase_window(as_of: date, horizon_days: int, observed: int) -> dict[str, date]:
    """The source query's bound parameters: one horizon before the run to the last day observed."""
    return {
        "since": as_of - timedelta(days=horizon_days),
        "until": as_of + timedelta(days=observed + 1),
    }


def read_outcome_labels(
    warehouse: WarehouseAdapter,
    customer_ids: np.ndarray,
    as_of: date,
    horizon_days: int,
    observed: int,
    chunk_size: int,
) -> OutcomeLabels:
    """The run's conversion flags from the purchases source query, streamed in chunks.

    A customer converted when they bought in the first `observed` days after `as_of` (the
    whole horizon once it has elapsed); a purchase after them counts as after the horizon.
    """
    if observed <= 0:
        return label_purchase_chunks(customer_ids, as_of, 1, [])
    chunks = warehouse.stream_query(
        warehouse.source_sql("customer_purchases"),
        purchase_window(as_of, horizon_days, observed),
        chunk_size,
    )
    return label_purchase_chunks(customer_ids, as_of, observed, chunks)


def label_purchase_chunks(
    customer_ids: np.ndarray,
    as_of: date,
    horizon_days: int,
    chunks: Iterable[pd.DataFrame],
) -> OutcomeLabels:
    """`label_outcomes` over purchases given in chunks: the same flags and bucket counts.

    Each chunk is labeled against only the run's customers it may name (found through a
    lookup of the run's ids built once), so the cost of a chunk follows its size, not the
    run's; `label_outcomes` still decides every row.
    """
    ids = np.asarray(customer_ids, dtype=np.int64)
    lookup = CustomerLookup(ids)
    converted = np.zeros(ids.size, dtype=np.int8)
    counts = dict.fromkeys(("used", "unknown_customer", "missing_date", "before_run"), 0)
    counts["after_horizon"] = 0
    for chunk in chunks:
        if chunk.empty:
            continue
        candidates = lookup.positions(chunk["customer_id"])
        labels = label_outcomes(ids[candidates], as_of, horizon_days, chunk)
        converted[candidates] |= labels.converted
        for bucket, count in labels.counts().items():
            counts[bucket] += count
    return OutcomeLabels(converted=converted, **counts)


class CustomerLookup:
    """Positions of a run's (unique) customer ids, for the ids a purchase chunk names.

    Ids that are non-negative and dense (the largest at most four times the count, plus a
    million) get a position table indexed by id; others a hash index.
    """

    def __init__(self, ids: np.ndarray) -> None:
        self.size = ids.size
        self.table: np.ndarray | None = None
        self.index: pd.Index | None = None
        largest = int(ids.max()) if ids.size else -1
        if ids.size and int(ids.min()) >= 0 and largest <= 4 * ids.size + 1_000_000:
            self.table = np.full(largest + 1, -1, dtype=np.int64)
            self.table[ids] = np.arange(ids.size)
            if np.count_nonzero(self.table >= 0) != ids.size:
                raise ValueError("customer_ids must be unique within a run")
        else:
            self.index = pd.Index(ids)
            if not self.index.is_unique:
                raise ValueError("customer_ids must be unique within a run")

    def positions(self, purchase_ids: pd.Series) -> np.ndarray:
        """Ascending positions of every run customer that `purchase_ids` may name."""
        if self.index is not None:
            found = np.asarray(self.index.get_indexer(pd.Index(purchase_ids.to_numpy())))
        elif self.table is not None:
            numbers = pd.to_numeric(purchase_ids, errors="coerce")
            values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
            whole = np.isfinite(values) & (values >= 0) & (values < self.table.size)
            whole &= values == np.floor(values)
            found = self.table[values[whole].astype(np.int64)]
        else:
            return np.empty(0, dtype=np.intp)
        found = found[found >= 0]
        if found.size < self.size // 64:
            return np.unique(found)
        marked = np.zeros(self.size, dtype=bool)
        marked[found] = True
        return np.flatnonzero(marked)


def promised_auc(
    settings: Settings, warehouse: WarehouseAdapter, model_version: str | None
) -> float | None:
    """The test-split AUC the run's model promised: the model store's, else `model_versions`'."""
    if model_version is None:
        return None
    try:
        metrics = ModelStore(settings.model_store_path).read_metadata(model_version).get("metrics")
    except ModelStoreError as error:
        logger.info("model %s: %s; reading its AUC from the warehouse", model_version, error)
        metrics = None
    auc = metrics.get("auc") if isinstance(metrics, dict) else None
    if auc is None:
        versions = warehouse.tables.model_versions
        frame = warehouse.read_frame(
            select(versions.c.auc).where(versions.c.version == model_version)
        )
        auc = None if frame.empty or pd.isna(frame["auc"].iloc[0]) else frame["auc"].iloc[0]
    return None if auc is None else float(auc)


def judge_outcome(
    settings: Settings,
    run: PublishedRun,
    outcome: RunOutcome,
    share: float,
    measured_on: date,
) -> tuple[str, str, bool]:
    """The run's status, the reason for it, and whether a retrain is requested.

    `decay` when the run is at least `decay_min_maturity` mature and its realized AUC is
    more than `decay_auc_tolerance` below the AUC its model promised; a retrain is requested
    only while that model is still the champion (a newer champion has replaced it otherwise)
    and only the first time the run decays (a provisional run is measured again each time).
    Else `final` once the horizon has fully elapsed, `provisional` before.
    """
    horizon = settings.outcome_horizon_days
    end = run.as_of + timedelta(days=horizon)
    realized, promised = outcome.realized_auc, outcome.expected_auc
    tolerance = settings.decay_auc_tolerance
    if share >= 1.0:
        status, reason = (
            STATUS_FINAL,
            f"the {horizon}-day horizon ended on {end}: figures are final",
        )
    else:
        status = STATUS_PROVISIONAL
        reason = (
            f"{share:.0%} of the {horizon}-day horizon had elapsed on {measured_on}: figures "
            f"are provisional until {end}"
        )
    if realized is None:
        return status, f"{reason}; no realized AUC (no buyer or no non-buyer in control)", False
    if promised is None:
        return status, f"{reason}; the model's promised AUC is unknown: no decay check", False
    shortfall = promised - realized
    if share < settings.decay_min_maturity or shortfall <= tolerance:
        verdict = "within" if shortfall <= tolerance else "beyond (not yet mature enough to alert)"
        return (
            status,
            f"{reason}; realized AUC {realized:.3f} against the promised {promised:.3f}: "
            f"{verdict} the tolerance of {tolerance:.3f}",
            False,
        )
    champion = _champion(settings)
    still_champion = run.model_version is not None and run.model_version == champion
    if run.last_status == STATUS_DECAY:
        action, retrain = "already reported by an earlier measurement: no new retrain", False
    elif still_champion:
        action, retrain = (
            f"model {run.model_version} is still the champion: retrain requested",
            True,
        )
    else:
        action = (
            f"model {run.model_version} is no longer the champion (now {champion}): "
            "no retrain requested"
        )
        retrain = False
    return (
        STATUS_DECAY,
        f"performance decay: realized AUC {realized:.3f} is {shortfall:.3f} below the "
        f"{promised:.3f} model {run.model_version} promised on its test split (tolerance "
        f"{tolerance:.3f}) at maturity {share:.0%}; {action}",
        retrain,
    )


def _champion(settings: Settings) -> str | None:
    try:
        return ModelStore(settings.model_store_path).champion()
    except ModelStoreError:
        return None


def _to_date(value: Any) -> date:
    """A ledger date (a date, a datetime, a pandas timestamp or ISO text) as a date."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return pd.Timestamp(value).date()


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f} points"


__all__ = [
    "CustomerLookup",
    "OutcomesError",
    "OutcomesJob",
    "OutcomesResult",
    "PublishedRun",
    "RunCustomers",
    "RunMeasurement",
    "find_runs_to_measure",
    "judge_outcome",
    "ledger_summaries",
    "label_purchase_chunks",
    "measure_run",
    "observed_days",
    "promised_auc",
    "read_outcome_labels",
    "read_outcome_ledger",
    "read_run_customers",
    "run_outcomes",
    "write_outcomes_report",
    "write_run_outcome",
]
