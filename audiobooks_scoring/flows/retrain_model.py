"""The `retrain_model` flow: read labeled history, train a challenger, judge it, report."""

from __future__ import annotations

from datetime import date
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from audiobooks_scoring.flows.common import retrain_run_name
from audiobooks_scoring.model import lifecycle
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.reporting import reports
from audiobooks_scoring.settings import Settings, load_settings, local_today
from audiobooks_scoring.warehouse import WarehouseAdapter, init_warehouse

TASK_OPTIONS: dict[str, Any] = {"persist_result": False, "cache_policy": NO_CACHE}


@task(name="read-training-examples", **TASK_OPTIONS)
def read_training_examples(
    warehouse: WarehouseAdapter, as_of: date, chunk_size: int
) -> lifecycle.TrainingData:
    """Labeled history from the training source query."""
    return lifecycle.read_training_data(warehouse, as_of, chunk_size)


@task(name="train-challenger", **TASK_OPTIONS)
def train_challenger(data: lifecycle.TrainingData, recipe: str, seed: int) -> lifecycle.Challenger:
    """A challenger trained on all but a fresh holdout, evaluated on that holdout."""
    return lifecycle.train_challenger(data, recipe, seed)


@task(name="store-challenger", **TASK_OPTIONS)
def store_challenger(
    store: ModelStore, data: lifecycle.TrainingData, challenger: lifecycle.Challenger, as_of: date
) -> str:
    """The version id of the stored challenger."""
    return lifecycle.save_challenger(store, data, challenger, as_of)


@task(name="judge-challenger", **TASK_OPTIONS)
def judge_challenger(
    store: ModelStore,
    data: lifecycle.TrainingData,
    challenger: lifecycle.Challenger,
    version: str,
    settings: Settings,
    force: bool,
) -> tuple[lifecycle.Decision, dict[str, Any] | None]:
    """The champion/challenger decision and the champion's metrics on the same test split."""
    return lifecycle.judge_challenger(store, data, challenger, version, settings, force)


@task(name="mirror-model-versions", **TASK_OPTIONS)
def mirror_model_versions(warehouse: WarehouseAdapter, store: ModelStore) -> int:
    """Rows written to the `model_versions` table."""
    return lifecycle.mirror_model_versions(warehouse, store)


@task(name="publish-retrain-report", **TASK_OPTIONS)
def publish_retrain_report(
    settings: Settings,
    data: lifecycle.TrainingData,
    challenger: lifecycle.Challenger,
    version: str,
    decision: lifecycle.Decision,
    champion_metrics: dict | None,
) -> str:
    """Path of the HTML report; the markdown summary and a link go to Prefect artifacts."""
    report = reports.build_retrain_report(
        data, challenger, version, decision, champion_metrics, settings.reports_path
    )
    create_markdown_artifact(
        markdown=report.markdown, key="retrain-report", description=f"Model {version}"
    )
    create_link_artifact(
        link=report.html_path.resolve().as_uri(),
        link_text=f"HTML report of model {version}",
        key="retrain-report-html",
    )
    return str(report.html_path)


@flow(name="retrain-model", flow_run_name=retrain_run_name, persist_result=False)
def retrain_model(
    as_of: date | None = None,
    recipe: str | None = None,
    seed: int | None = None,
    force: bool = False,
) -> str:
    """Train a challenger on labeled history, promote it if it is not worse; its version id."""
    logger = get_run_logger()
    settings = load_settings()
    as_of = as_of or local_today(settings)
    recipe = recipe or settings.recipe
    seed = settings.seed if seed is None else seed
    warehouse = init_warehouse(settings)
    store = ModelStore(settings.model_store_path)
    logger.info(
        "retraining on %s as of %s (recipe %s, seed %s)",
        settings.warehouse_url_safe,
        as_of,
        recipe,
        seed,
    )
    data = read_training_examples(warehouse, as_of, settings.chunk_size)
    logger.info(
        "read %s training examples (%.1f%% converted)", len(data.labels), 100 * data.labels.mean()
    )
    challenger = train_challenger(data, recipe, seed)
    version = store_challenger(store, data, challenger, as_of)
    decision, champion_metrics = judge_challenger(store, data, challenger, version, settings, force)
    logger.info(
        "model %s %s: %s",
        version,
        "promoted to champion" if decision.promote else "stays a challenger",
        decision.reason,
    )
    mirror_model_versions(warehouse, store)
    publish_retrain_report(settings, data, challenger, version, decision, champion_metrics)
    return version
