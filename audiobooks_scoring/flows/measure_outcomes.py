"""The weekly `measure-outcomes` flow: the measurement's steps (`outcomes.loop`) as tasks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from audiobooks_scoring import pipeline
from audiobooks_scoring.flows.common import scheduled_date
from audiobooks_scoring.outcomes import loop
from audiobooks_scoring.reporting.reports import RunReport
from audiobooks_scoring.settings import load_settings
from audiobooks_scoring.warehouse import init_warehouse

TASK_OPTIONS: dict[str, Any] = {"persist_result": False, "cache_policy": NO_CACHE}
DECAY_ALERT_EVENT = "audiobooks.outcomes.performance-decay"


def outcomes_run_name() -> str:
    """`outcomes-<measurement date>`, for the Prefect UI."""
    parameters = flow_run.get_parameters()
    measured_on = parameters.get("as_of") or scheduled_date(load_settings())
    return f"outcomes-{measured_on}"


@task(name="publish-outcomes-report", **TASK_OPTIONS)
def publish_outcomes_report(
    job: loop.OutcomesJob, measurements: list[loop.RunMeasurement]
) -> RunReport:
    """The outcomes report, with markdown, table and link artifacts for the Prefect UI."""
    report = loop.write_outcomes_report(job, measurements)
    create_markdown_artifact(
        markdown=report.markdown,
        key="outcomes-report",
        description=f"Outcomes measured on {job.measured_on}",
    )
    if report.top_rows:
        create_table_artifact(
            table=report.top_rows,
            key="run-outcomes",
            description=f"Outcomes of the runs measured on {job.measured_on}",
        )
    create_link_artifact(
        link=report.html_path.resolve().as_uri(),
        link_text=f"HTML outcomes report of {job.measured_on}",
        key="outcomes-report-html",
    )
    return report


@task(name="emit-decay-alert", **TASK_OPTIONS)
def emit_decay_alert(measurements: list[loop.RunMeasurement]) -> str | None:
    """The id of the run named by the decay event that triggers a retrain (None: no event).

    One event per measurement, for the latest decayed run whose model is still the champion;
    the payload lists every decayed run, so one measurement asks for one retrain.
    """
    decayed = [m for m in measurements if m.decay]
    requesting = [m for m in decayed if m.retrain_requested]
    logger = get_run_logger()
    for measurement in decayed:
        logger.warning("%s: %s", measurement.run.run_id, measurement.reason)
    if not requesting:
        return None
    latest = max(requesting, key=lambda m: (m.run.as_of, m.run.run_id))
    emit_event(
        event=DECAY_ALERT_EVENT,
        resource={"prefect.resource.id": f"audiobooks.outcomes.{latest.run.run_id}"},
        payload={
            "run_id": latest.run.run_id,
            "model_version": latest.run.model_version,
            "realized_auc": latest.outcome.realized_auc,
            "expected_auc": latest.outcome.expected_auc,
            "maturity": latest.maturity,
            "reason": latest.reason,
            "decayed_runs": [m.run.run_id for m in decayed],
        },
    )
    return latest.run.run_id


TASKS: dict[Callable[..., Any], Task[..., Any]] = {
    loop.find_runs_to_measure: task(name="find-runs-to-measure", **TASK_OPTIONS)(
        loop.find_runs_to_measure
    ),
    loop.measure_run: task(name="measure-run", **TASK_OPTIONS)(loop.measure_run),
    loop.write_run_outcome: task(name="write-run-outcome", **TASK_OPTIONS)(loop.write_run_outcome),
    loop.write_outcomes_report: publish_outcomes_report,
}


class PrefectSteps(pipeline.StepRunner):
    """Each step of the measurement a named task (one `measure-run` task run per run)."""

    def call(self, step, *args):
        """Run the step as its task; a run's tasks are named after the run."""
        runner = TASKS[step]
        if step in (loop.measure_run, loop.write_run_outcome) and len(args) > 1:
            name = getattr(getattr(args[1], "run", args[1]), "run_id", None)
            if name:
                runner = runner.with_options(task_run_name=f"{runner.name}-{name}")
        return runner(*args)


@flow(name="measure-outcomes", flow_run_name=outcomes_run_name, persist_result=False)
def measure_outcomes(as_of: date | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Measure what each published list achieved on `as_of` (default: today); the figures.

    Every published or backfilled run whose horizon has begun and whose outcome is not yet
    final is measured (`run_id`: that run only, even if final); a mature run whose realized
    AUC fell below its model's promise emits the decay event that triggers a retrain.
    """
    settings = load_settings()
    measured_on = as_of or scheduled_date(settings)
    job = loop.OutcomesJob(settings, init_warehouse(settings), measured_on, run_id)
    get_run_logger().info(
        "measuring outcomes on %s (horizon %s days) in %s",
        measured_on,
        settings.outcome_horizon_days,
        settings.warehouse_url_safe,
    )
    result = loop.run_outcomes(job, PrefectSteps())
    emit_decay_alert(result.measurements)
    return result.to_dict()
