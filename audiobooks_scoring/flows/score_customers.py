"""The nightly `score-customers` flow: the scoring run's steps (`pipeline`), each as a task."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

from prefect import Task, flow, get_run_logger, task
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

from audiobooks_scoring import pipeline, progress
from audiobooks_scoring.flows.common import scheduled_date, scoring_run_name
from audiobooks_scoring.flows.partitions import partition_task_runner
from audiobooks_scoring.flows.retrain_model import retrain_model
from audiobooks_scoring.model.lifecycle import champion_age_days
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.reporting.reports import RunReport
from audiobooks_scoring.scoring.stage import StageResult, count_population
from audiobooks_scoring.settings import load_settings
from audiobooks_scoring.warehouse import AnotherRunPublishing, init_warehouse

TASK_OPTIONS: dict[str, Any] = {"persist_result": False, "cache_policy": NO_CACHE}
DRIFT_ALERT_EVENT = "audiobooks.scoring.drift-alert"


@task(name="measure-drift", **TASK_OPTIONS)
def measure_drift(run: pipeline.ScoringRun, built: pipeline.BuiltList) -> pipeline.DriftFigures:
    """Drift figures of the run; above the alert threshold, the event that triggers a retrain."""
    drift = pipeline.measure_drift(run, built)
    if drift.alert:
        emit_event(
            event=DRIFT_ALERT_EVENT,
            resource={"prefect.resource.id": f"audiobooks.scoring.{run.run_id}"},
            payload=drift.ledger,
        )
        get_run_logger().warning(
            "drift alert: score PSI %.4f, largest feature PSI %.4f (%s)",
            drift.ledger["score_psi"],
            drift.ledger["max_feature_psi"],
            drift.ledger["max_psi_feature"],
        )
    return drift


@task(name="publish-run-report", **TASK_OPTIONS)
def publish_run_report(run: pipeline.ScoringRun, model, drift) -> RunReport:
    """The run's HTML report, with markdown, table and link artifacts for the Prefect UI."""
    report = pipeline.write_run_report(run, model, drift)
    create_markdown_artifact(
        markdown=report.markdown, key="scoring-report", description=f"Scoring run {run.run_id}"
    )
    create_table_artifact(
        table=report.top_rows, key="top-targets", description=f"Top of the list of {run.run_id}"
    )
    create_link_artifact(
        link=report.html_path.resolve().as_uri(),
        link_text=f"HTML report of {run.run_id}",
        key="scoring-report-html",
    )
    return report


TASKS: dict[Callable[..., Any], Task[..., Any]] = {
    step: task(name=step.__name__.replace("_", "-"), **TASK_OPTIONS)(step)
    for step in (
        pipeline.prepare_run,
        pipeline.load_champion,
        pipeline.stage_population,
        pipeline.build_target_list,
        pipeline.check_run_gates,
        pipeline.publish_target_list,
        pipeline.record_run,
    )
}
TASKS[pipeline.measure_drift] = measure_drift
TASKS[pipeline.write_run_report] = publish_run_report


class PrefectSteps(pipeline.StepRunner):
    """Each step a named task; partitions on Dask; progress as a Prefect artifact."""

    def call(self, step, *args):
        """Run the step as its task."""
        return TASKS[step](*args)

    def map_partitions(self, run, model, partitions) -> list[StageResult]:
        """One `stage-population` task per partition on the Dask task runner.

        A warehouse other processes cannot open while the run holds it (a DuckDB file) has
        its partitions scored here, one after the other, with a warning that says why.
        """
        if not run.warehouse.shared_by_processes:
            get_run_logger().warning(
                "%s: scoring the %s partitions in one process, not on Dask workers",
                run.warehouse.single_process_reason or "the warehouse cannot be shared",
                partitions,
            )
            return super().map_partitions(run, model, partitions)
        stage = TASKS[pipeline.stage_population]
        with partition_task_runner(run.settings) as runner:
            futures = [
                runner.submit(
                    stage,
                    parameters={
                        "run": run,
                        "model": model,
                        "partition": partition,
                        "partitions": partitions,
                    },
                )
                for partition in range(partitions)
            ]
            return [future.result() for future in futures]

    def chunk_progress(self, run):
        """A progress artifact of the customers scored so far (and the terminal's bar)."""
        expected = max(count_population(run.warehouse, run.as_of), 1)
        progress_id = create_progress_artifact(
            progress=0.0, key="scoring-progress", description=f"Scoring {expected} customers"
        )

        def update(result: StageResult) -> None:
            update_progress_artifact(
                artifact_id=progress_id, progress=100.0 * result.rows_in / expected
            )
            progress.report("scoring customers", result.rows_in, expected)

        return update


def ensure_champion(run: pipeline.ScoringRun) -> None:
    """Run the retrain flow as a subflow when there is no champion or it is too old."""
    logger = get_run_logger()
    store = ModelStore(run.settings.model_store_path)
    age = champion_age_days(store)
    limit = run.settings.model_max_age_days
    if age is not None and age <= limit:
        return
    logger.info(
        "no champion model yet: retraining first"
        if age is None
        else f"champion is {age:.0f} days old (max {limit}): retraining first"
    )
    version = retrain_model(as_of=run.as_of)
    if store.champion() is None:
        raise RuntimeError(
            f"no champion model: the retrain stored {version} as a challenger without promoting "
            f"it ({store.history()[-1]['reason']}); review it with `audiobooks-scoring models "
            f"show {version}` and promote it by hand if it is fit to use"
        )


@flow(name="score-customers", flow_run_name=scoring_run_name, persist_result=False)
def score_customers(as_of: date | None = None, run_id: str | None = None, publish: bool = True):
    """Score every customer and publish the ranked target list; the run's figures."""
    settings = load_settings()
    as_of = as_of or scheduled_date(settings)
    run = pipeline.ScoringRun(
        settings=settings,
        warehouse=init_warehouse(settings),
        run_id=run_id or f"score-{as_of.isoformat()}",
        as_of=as_of,
        publish=publish,
        flow_run_id=flow_run.get_id(),
    )
    get_run_logger().info(
        "scoring run %s as of %s on %s", run.run_id, as_of, settings.warehouse_url_safe
    )
    try:
        outcome = pipeline.run_scoring(run, PrefectSteps(), ensure_champion=ensure_champion)
    except AnotherRunPublishing as busy:
        get_run_logger().warning("%s: run %s skipped", busy, run.run_id)
        return Completed(name="Skipped", message=f"another run is publishing; {run.run_id} skipped")
    return outcome.to_dict()
