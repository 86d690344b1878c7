"""The nightly `score_customers` flow: score every customer and publish the ranked target list."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Completed

from audiobooks_scoring import lifecycle, publishing, run_monitoring, run_reports, scoring
from audiobooks_scoring.model_store import ModelStore
from audiobooks_scoring.ranking import SortedRuns, spill_runs
from audiobooks_scoring.settings import Settings, load_settings
from audiobooks_scoring.warehouse import Warehouse, init_warehouse, open_warehouse
from flows.common import scheduled_date, scoring_run_name
from flows.retrain_model import retrain_model

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

TASK_OPTIONS = {"persist_result": False, "cache_policy": NO_CACHE}
DRIFT_ALERT_EVENT = "audiobooks.scoring.drift-alert"


@task(name="prepare-run", **TASK_OPTIONS)
def prepare_run(warehouse: Warehouse, run_id: str, as_of: date) -> int:
    """Ledger row for the run; staged leftovers of earlier runs removed (their count)."""
    publishing.record_run_start(
        warehouse.engine, warehouse.tables, run_id, as_of, flow_run.get_id()
    )
    return scoring.clear_staging(warehouse.engine, warehouse.tables, run_id)


@task(name="load-champion", **TASK_OPTIONS)
def load_champion(store: ModelStore) -> scoring.ScoringModel:
    """The champion model, digest-verified and loaded in safe mode."""
    version = store.champion()
    if version is None:
        raise RuntimeError("no champion model in the store; run retrain-model first")
    return lifecycle.load_scoring_model(store, version)


@task(name="stage-population", **TASK_OPTIONS)
def stage_population(
    settings: Settings,
    model: scoring.ScoringModel,
    run_id: str,
    as_of: date,
    partition: int,
    partitions: int,
) -> scoring.StageResult:
    """Counts of one partition streamed, validated and scored; rows staged in the warehouse.

    A single partition spills its scored rows as sorted runs on local disk instead, ranked on
    this machine by `build-target-list`.
    """
    warehouse = open_warehouse(settings)
    progress = None
    runs = None
    if partitions == 1:
        runs = spill_runs(settings.data_dir / "spill")
        expected = scoring.count_population(warehouse.engine, warehouse.tables, as_of)
        progress_id = create_progress_artifact(
            progress=0.0, key="scoring-progress", description=f"Scoring {expected} customers"
        )

        def progress(result: scoring.StageResult) -> None:
            update_progress_artifact(
                artifact_id=progress_id, progress=100.0 * result.rows_in / max(expected, 1)
            )

    result = scoring.stage_population(
        warehouse.engine,
        warehouse.tables,
        model,
        settings,
        run_id,
        as_of,
        partition,
        partitions,
        on_chunk=progress,
        runs=runs,
    )
    warehouse.engine.dispose()
    return result


@task(name="build-target-list", **TASK_OPTIONS)
def build_target_list(
    warehouse: Warehouse,
    settings: Settings,
    run_id: str,
    model_version: str,
    as_of: date,
    runs: SortedRuns | None,
) -> publishing.TargetList:
    """The run's ranked list built beside the live one; repeated customer ids moved to rejects."""
    return publishing.build_target_list(
        warehouse.engine,
        warehouse.tables,
        settings,
        run_id,
        model_version,
        datetime.now(UTC),
        as_of,
        runs,
    )


@task(name="check-run-gates", **TASK_OPTIONS)
def check_run_gates(warehouse: Warehouse, result: scoring.StageResult, settings: Settings) -> None:
    """Raise when the run cannot produce a trustworthy list (empty, too many rejects, lost rows)."""
    publishing.check_gates_of_built_list(warehouse.engine, warehouse.tables, result, settings)


@task(name="publish-target-list", **TASK_OPTIONS)
def publish_target_list(
    warehouse: Warehouse,
    settings: Settings,
    built: publishing.TargetList,
    replace_current: bool,
) -> publishing.PublishResult:
    """The built list swapped in as `customer_scores` and into history (a backfill: history)."""
    return publishing.publish_target_list(
        warehouse.engine, warehouse.tables, settings, built, replace_current
    )


@task(name="measure-drift", **TASK_OPTIONS)
def measure_drift(
    warehouse: Warehouse, result: scoring.StageResult, run_id: str, settings: Settings
) -> dict:
    """Population stability per feature and of the score, and the share of changed deciles."""
    return run_monitoring.summarize_drift(
        warehouse.engine, warehouse.tables, result, run_id, settings
    )


@task(name="record-run", **TASK_OPTIONS)
def record_run(warehouse: Warehouse, run_id: str, figures: dict) -> None:
    """The run's ledger row completed with its outcome and figures."""
    publishing.record_run_end(warehouse.engine, warehouse.tables, run_id, **figures)


@task(name="publish-run-report", **TASK_OPTIONS)
def publish_run_report(
    warehouse: Warehouse,
    settings: Settings,
    run_id: str,
    model: scoring.ScoringModel,
    drift: dict | None,
) -> str:
    """Path of the run's HTML report; markdown, table and link artifacts for the Prefect UI."""
    report = run_reports.build_scoring_report(
        warehouse.engine, warehouse.tables, run_id, model, drift, settings
    )
    create_markdown_artifact(
        markdown=report.markdown, key="scoring-report", description=f"Scoring run {run_id}"
    )
    create_table_artifact(
        table=report.top_rows, key="top-targets", description=f"Top of the target list of {run_id}"
    )
    create_link_artifact(
        link=report.html_path.resolve().as_uri(),
        link_text=f"HTML report of {run_id}",
        key="scoring-report-html",
    )
    return str(report.html_path)


def ensure_champion(store: ModelStore, settings: Settings, as_of: date, logger) -> None:
    """Run the retrain flow as a subflow when there is no champion or it is too old."""
    age = lifecycle.champion_age_days(store)
    if age is None:
        logger.info("no champion model yet: retraining first")
    elif age > settings.model_max_age_days:
        logger.info(
            "champion is %.0f days old (max %s): retraining first", age, settings.model_max_age_days
        )
    else:
        return
    version = retrain_model(as_of=as_of)
    if store.champion() is None:
        raise RuntimeError(
            f"no champion model: the retrain stored {version} as a challenger without promoting "
            f"it ({store.history()[-1]['reason']}); review it with `audiobooks-scoring models "
            f"show {version}` and promote it by hand if it is fit to use"
        )


def partition_task_runner(settings: Settings) -> DaskTaskRunner:
    """The Dask runner of partitioned runs: the scheduler at `dask_address`, else a local cluster.

    The temporary local cluster has `dask_workers` worker processes of one thread each (a
    partition's scoring already uses every core it is given) and no dashboard.
    """
    from prefect_dask import DaskTaskRunner  # imports dask.distributed: only when partitioned

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


def stage_all(settings, model, run_id, as_of, partitions: int) -> scoring.StageResult:
    """Stage every partition and merge their counts; partitions run as tasks on Dask.

    Each partition task streams its hash bucket of the population straight from the
    warehouse and stages it there; only the settings, the model (a few kB of weights) and
    the counts travel through Dask. Ranking and publication happen once, afterwards.
    """
    if partitions == 1:
        return stage_population(settings, model, run_id, as_of, 0, 1)
    with partition_task_runner(settings) as runner:
        futures = [
            runner.submit(
                stage_population,
                parameters={
                    "settings": settings,
                    "model": model,
                    "run_id": run_id,
                    "as_of": as_of,
                    "partition": partition,
                    "partitions": partitions,
                },
            )
            for partition in range(partitions)
        ]
        results = [future.result() for future in futures]
    merged = results[0]
    for other in results[1:]:
        merged = merged.merge(other)
    return merged


@flow(name="score-customers", flow_run_name=scoring_run_name, persist_result=False)
def score_customers(as_of: date | None = None, run_id: str | None = None, publish: bool = True):
    """Score every customer and publish the ranked target list; the run's figures."""
    logger = get_run_logger()
    settings = load_settings()
    as_of = as_of or scheduled_date(settings)
    run_id = run_id or f"score-{as_of.isoformat()}"
    warehouse = init_warehouse(settings)
    store = ModelStore(settings.model_store_path)
    logger.info("scoring run %s as of %s on %s", run_id, as_of, settings.warehouse_url_safe)
    try:
        lock = publishing.RunLock(warehouse.engine, warehouse.tables).__enter__()
    except publishing.AnotherRunPublishing as busy:
        logger.warning("%s: run %s skipped", busy, run_id)
        return Completed(name="Skipped", message=f"another run is publishing; {run_id} skipped")
    try:
        return _score_locked(logger, settings, warehouse, store, run_id, as_of, publish)
    finally:
        lock.__exit__(None, None, None)


def _score_locked(logger, settings, warehouse, store, run_id, as_of, publish) -> dict:
    removed = prepare_run(warehouse, run_id, as_of)
    if removed:
        logger.info("removed %s staged rows left by an earlier run", removed)
    try:
        ensure_champion(store, settings, as_of, logger)
        model = load_champion(store)
        logger.info(
            "champion model %s loaded (holdout AUC %s)", model.version, model.metrics.get("auc")
        )
        result = stage_all(settings, model, run_id, as_of, settings.partitions)
        built = build_target_list(warehouse, settings, run_id, model.version, as_of, result.runs)
        result = scoring.account_duplicates(result, built.duplicates)
        logger.info(
            "%s rows in: %s scored, %s rejected %s",
            result.rows_in,
            result.rows_scored,
            result.rows_rejected,
            dict(result.reject_counts),
        )
        record_run(warehouse, run_id, scoring.run_figures(result, model.version))
        check_run_gates(warehouse, result, settings)
        figures = scoring.run_figures(result, model.version)
        published = publish_target_list(warehouse, settings, built, publish)
        logger.info(
            "%s %s customers (%s targets) in %.1fs",
            "published" if publish else "backfilled into history",
            published.rows_published,
            published.targets,
            published.seconds,
        )
        figures.update(published=publish, targets=published.targets)
        drift = measure_drift(warehouse, result, run_id, settings)
        figures.update(drift["ledger"])
        if drift["ledger"].get("drift_status") == "alert":
            emit_event(
                event=DRIFT_ALERT_EVENT,
                resource={"prefect.resource.id": f"audiobooks.scoring.{run_id}"},
                payload=drift["ledger"],
            )
            logger.warning("drift alert: %s", drift["ledger"])
        figures["status"] = "succeeded" if publish else "backfilled"
        record_run(warehouse, run_id, figures)
        figures["report_path"] = publish_run_report(
            warehouse, settings, run_id, model, drift["detail"]
        )
        record_run(warehouse, run_id, {"report_path": figures["report_path"]})
        return {"run_id": run_id, **figures}
    except Exception as error:
        publishing.record_run_end(
            warehouse.engine, warehouse.tables, run_id, status="failed", message=str(error)[:2000]
        )
        raise
