"""The scoring run, defined once: named steps with typed inputs and results, in one order.

`run_scoring` is the only place the order lives. A `StepRunner` decides how each step is
called: plainly (the CLI's library path and the tests), as a Prefect task (the
`score-customers` flow), or timed (`bench`). Partitions of a Dask run go through the
runner's `map_partitions`.

    prepare-run -> load-champion -> stage-population (per partition) -> build-target-list
    -> check-run-gates -> publish-target-list -> measure-drift -> record-run
    -> write-run-report
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from audiobooks_scoring import progress
from audiobooks_scoring.model.scoring_model import ScoringModel
from audiobooks_scoring.model.scoring_model import load_champion as load_stored_champion
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.monitoring.run_figures import summarize_drift
from audiobooks_scoring.publishing import build, ledger, swap
from audiobooks_scoring.reporting.reports import RunReport, build_scoring_report
from audiobooks_scoring.scoring import gates, stage
from audiobooks_scoring.scoring.ranking import open_spill_files
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter, open_warehouse

logger = logging.getLogger(__name__)
T = TypeVar("T")
ChunkProgress = Callable[[stage.StageResult], None]


@dataclass(frozen=True)
class ScoringRun:
    """What one scoring run is: its settings, warehouse, id, date and whether it publishes."""

    settings: Settings
    warehouse: WarehouseAdapter
    run_id: str
    as_of: date
    publish: bool = True
    flow_run_id: str | None = None


@dataclass(frozen=True)
class BuiltList:
    """The run's list built beside the live one, with the counts after duplicate rejects."""

    target_list: build.TargetList
    counts: stage.StageResult
    model_version: str


@dataclass(frozen=True)
class DriftFigures:
    """Drift for the ledger (flat figures) and in detail (for the report)."""

    ledger: dict[str, Any]
    detail: dict[str, Any] | None

    @property
    def alert(self) -> bool:
        """Whether the drift is above the alert threshold."""
        return self.ledger.get("drift_status") == "alert"


@dataclass(frozen=True)
class ScoringOutcome:
    """A finished run: its ledger figures, drift and report."""

    run_id: str
    figures: dict[str, Any]
    drift: DriftFigures
    report: RunReport | None

    def to_dict(self) -> dict[str, Any]:
        """The run id and its ledger figures (what the flow and `score` return)."""
        return {"run_id": self.run_id, **self.figures}


def prepare_run(run: ScoringRun) -> int:
    """The run's ledger row (stale `running` rows marked abandoned); staged leftovers removed."""
    ledger.record_run_start(run.warehouse, run.run_id, run.as_of, run.flow_run_id)
    return run.warehouse.clear_staging(run.run_id)


def load_champion(run: ScoringRun) -> ScoringModel:
    """The champion model, digest-verified and loaded in safe mode."""
    model = load_stored_champion(ModelStore(run.settings.model_store_path))
    auc = model.metrics.get("auc")
    logger.info(
        "champion model %s loaded (test-split AUC %s)",
        model.version,
        "unknown" if auc is None else f"{auc:.4f}",
    )
    return model


def stage_population(
    run: ScoringRun,
    model: ScoringModel,
    partition: int = 0,
    partitions: int = 1,
    on_chunk: ChunkProgress | None = None,
) -> stage.StageResult:
    """Counts of one partition streamed, validated and scored; its rows spilled or staged.

    A single partition spills its scored rows to local files, ranked on this machine by
    `build_target_list`; partitions stage theirs in the warehouse (each opens its own
    engine: it may run in another process).
    """
    if partitions == 1:
        spill = open_spill_files(run.settings.data_dir / "spill")
        return stage.stage_population(
            run.warehouse,
            model,
            run.settings,
            run.run_id,
            run.as_of,
            on_chunk=on_chunk,
            spill=spill,
        )
    warehouse = open_warehouse(run.settings)
    try:
        return stage.stage_population(
            warehouse, model, run.settings, run.run_id, run.as_of, partition, partitions
        )
    finally:
        warehouse.dispose()


def build_target_list(run: ScoringRun, model: ScoringModel, staged: stage.StageResult) -> BuiltList:
    """The ranked list built beside the live one; repeated customer ids moved to rejects."""
    built = build.build_target_list(
        run.warehouse, run.settings, run.run_id, model.version, run.as_of, staged.spill
    )
    counts = gates.account_duplicates(staged, built.duplicates)
    logger.info(
        "%s rows in: %s scored, %s rejected%s",
        counts.rows_in,
        counts.rows_scored,
        counts.rows_rejected,
        "".join(f"; {code} {count}" for code, count in counts.reject_counts.most_common()),
    )
    return BuiltList(built, counts, model.version)


def check_run_gates(run: ScoringRun, built: BuiltList) -> None:
    """Record the run's counts; raise `RunGateError` (dropping the built list) if it fails."""
    ledger.record_run_end(
        run.warehouse, run.run_id, **gates.run_figures(built.counts, built.model_version)
    )
    try:
        gates.check_run_gates(built.counts, run.settings.max_reject_share)
    except gates.RunGateError:
        run.warehouse.discard_list()
        raise


def publish_target_list(run: ScoringRun, built: BuiltList) -> swap.PublishResult:
    """The built list swapped in as the live list and into history (a backfill: history)."""
    published = swap.publish_target_list(
        run.warehouse, run.settings, built.target_list, run.publish
    )
    logger.info(
        "%s %s customers (%s targets) in %.1f s",
        "published" if run.publish else "backfilled into history",
        published.rows_published,
        published.targets,
        published.seconds,
    )
    return published


def measure_drift(run: ScoringRun, built: BuiltList) -> DriftFigures:
    """Population stability per feature and of the score, and the share of changed deciles."""
    drift = summarize_drift(run.warehouse, built.counts, run.run_id, run.settings)
    return DriftFigures(drift["ledger"], drift["detail"])


def record_run(
    run: ScoringRun, built: BuiltList, published: swap.PublishResult, drift: DriftFigures
) -> dict[str, Any]:
    """The run's ledger row completed (status, counts, targets, drift); its figures."""
    figures = gates.run_figures(built.counts, built.model_version)
    figures.update(published=run.publish, targets=published.targets, **drift.ledger)
    figures["status"] = "succeeded" if run.publish else "backfilled"
    ledger.record_run_end(run.warehouse, run.run_id, **figures)
    return figures


def write_run_report(run: ScoringRun, model: ScoringModel, drift: DriftFigures) -> RunReport:
    """The run's report (HTML file, markdown, top rows); its path recorded in the ledger."""
    report = build_scoring_report(run.warehouse, run.run_id, model, drift.detail, run.settings)
    ledger.record_run_end(run.warehouse, run.run_id, report_path=str(report.html_path))
    return report


class StepRunner:
    """How the steps are called: plainly. The flow's runner makes them tasks; the bench times."""

    def call(self, step: Callable[..., T], *args: Any) -> T:
        """Run one step."""
        return step(*args)

    def map_partitions(
        self, run: ScoringRun, model: ScoringModel, partitions: int
    ) -> list[stage.StageResult]:
        """Stage every partition (here one after the other, in this process)."""
        return [
            self.call(stage_population, run, model, partition, partitions)
            for partition in range(partitions)
        ]

    def chunk_progress(self, run: ScoringRun) -> ChunkProgress | None:
        """A callback told of every staged chunk: reports to progress listeners, if any."""
        if not progress.active():
            return None
        expected = stage.count_population(run.warehouse, run.as_of)

        def update(result: stage.StageResult) -> None:
            progress.report("scoring customers", result.rows_in, expected)

        return update


def stage_all(run: ScoringRun, model: ScoringModel, steps: StepRunner) -> stage.StageResult:
    """Stage the population (every partition) and merge the partitions' counts."""
    partitions = run.settings.partitions
    if partitions == 1:
        return steps.call(stage_population, run, model, 0, 1, steps.chunk_progress(run))
    results = steps.map_partitions(run, model, partitions)
    merged = results[0]
    for other in results[1:]:
        merged = merged.merge(other)
    return merged


def run_scoring(
    run: ScoringRun,
    steps: StepRunner | None = None,
    model: ScoringModel | None = None,
    ensure_champion: Callable[[ScoringRun], None] | None = None,
    write_report: bool = True,
) -> ScoringOutcome:
    """Score the population and publish (or backfill) it under the run lock; the outcome.

    Raises `AnotherRunPublishing` when another run holds the lock (nothing is written);
    any other failure is recorded in the ledger as `failed` with its message, then raised.
    `model` skips loading the champion; `ensure_champion` runs before it is loaded (the
    flow retrains there when there is no champion or it is too old).
    """
    steps = steps or StepRunner()
    with run.warehouse.run_lock():
        removed = steps.call(prepare_run, run)
        if removed:
            logger.info("removed %s staged rows left by an earlier run", removed)
        try:
            if model is None:
                if ensure_champion is not None:
                    ensure_champion(run)
                model = steps.call(load_champion, run)
            staged = stage_all(run, model, steps)
            built = steps.call(build_target_list, run, model, staged)
            steps.call(check_run_gates, run, built)
            published = steps.call(publish_target_list, run, built)
            drift = steps.call(measure_drift, run, built)
            figures = steps.call(record_run, run, built, published, drift)
            report = steps.call(write_run_report, run, model, drift) if write_report else None
        except Exception as error:
            ledger.record_run_end(
                run.warehouse, run.run_id, status="failed", message=str(error)[:2000]
            )
            raise
    if report is not None:
        figures["report_path"] = str(report.html_path)
    return ScoringOutcome(run.run_id, figures, drift, report)
