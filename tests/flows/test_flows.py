"""The Prefect flows end to end under the test harness, with their artifacts and events."""

from __future__ import annotations

from datetime import date

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.fixtures import asserting_events_worker  # noqa: F401 - a fixture
from sqlalchemy import select

from audiobooks_scoring.inputs.loading import load_demo_data
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import init_warehouse

AS_OF = date(2026, 11, 25)


@pytest.fixture
def flow_settings(tmp_path, monkeypatch) -> Settings:
    """Environment for the flows: a fresh SQLite warehouse with demo data, an empty store."""
    monkeypatch.setenv("AUDIOBOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUDIOBOOKS_CHUNK_SIZE", "1000")
    settings = Settings()
    load_demo_data(init_warehouse(settings), 2_500, seed=11, as_of=AS_OF, chunk_size=1_000)
    return settings


def artifacts_of(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        return {artifact.key: artifact for artifact in artifacts if artifact.key}


def child_flow_runs(parent_name: str) -> list:
    with get_client(sync_client=True) as client:
        return [run for run in client.read_flow_runs() if run.name.startswith(parent_name)]


def test_scoring_flow_retrains_then_scores_and_reports(prefect_harness, flow_settings):
    from audiobooks_scoring.flows.score_customers import score_customers

    state = score_customers(as_of=AS_OF, return_state=True)
    assert state.is_completed(), state.message
    figures = state.result()
    assert figures["run_id"] == "score-2026-11-25"
    assert figures["rows_in"] == figures["rows_scored"] + figures["rows_rejected"] == 2_750

    store = ModelStore(flow_settings.model_store_path)
    assert store.champion() == figures["model_version"]

    warehouse = init_warehouse(flow_settings)
    scores = warehouse.read_frame(select(warehouse.tables.scores))
    assert len(scores) == figures["rows_scored"]
    versions = warehouse.read_frame(select(warehouse.tables.model_versions))
    assert list(versions["status"]) == ["champion"]

    scoring_run = state.state_details.flow_run_id
    artifacts = artifacts_of(scoring_run)
    assert {"scoring-report", "top-targets", "scoring-report-html", "scoring-progress"} <= set(
        artifacts
    )
    assert "rows in" in artifacts["scoring-report"].data
    assert artifacts["scoring-progress"].data == pytest.approx(100.0)

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    names = {run.name: run for run in runs}
    assert "score-2026-11-25" in names
    retrain = [run for name, run in names.items() if name.startswith("retrain-2026-11-25")]
    assert retrain and retrain[0].parent_task_run_id is not None
    retrain_artifacts = artifacts_of(retrain[0].id)
    assert {"retrain-report", "retrain-report-html"} <= set(retrain_artifacts)
    assert "Feature importance" in retrain_artifacts["retrain-report"].data


def test_a_second_run_while_one_publishes_ends_skipped(prefect_harness, flow_settings):
    from audiobooks_scoring.flows.score_customers import score_customers

    warehouse = init_warehouse(flow_settings)
    with warehouse.run_lock():
        state = score_customers(as_of=AS_OF, return_state=True)
    assert state.is_completed()
    assert state.name == "Skipped"
    assert "another run is publishing" in state.message
    assert warehouse.read_frame(select(warehouse.tables.scores)).empty


def test_retrain_twice_records_a_decision_with_its_reason(prefect_harness, flow_settings):
    from audiobooks_scoring.flows.retrain_model import retrain_model

    first = retrain_model(as_of=AS_OF)
    second = retrain_model(as_of=AS_OF, seed=5)
    store = ModelStore(flow_settings.model_store_path)
    decisions = [entry for entry in store.history() if entry["version"] == second]
    assert decisions[-1]["action"] in {"promote", "decision"}
    assert "AUC" in decisions[-1]["reason"] and "champion" in decisions[-1]["reason"]
    assert store.champion() in {first, second}


def test_drift_alert_emits_the_event_that_triggers_retraining(
    prefect_harness,
    flow_settings,
    monkeypatch,
    asserting_events_worker,  # noqa: F811
):
    from audiobooks_scoring.flows.retrain_model import retrain_model
    from audiobooks_scoring.flows.score_customers import DRIFT_ALERT_EVENT, score_customers

    retrain_model(as_of=AS_OF)
    monkeypatch.setenv("AUDIOBOOKS_PSI_WARNING", "0")
    monkeypatch.setenv("AUDIOBOOKS_PSI_ALERT", "0")
    figures = score_customers(as_of=AS_OF)
    assert figures["drift_status"] == "alert"
    asserting_events_worker.drain()
    events = [
        event
        for event in asserting_events_worker._client.events
        if event.event == DRIFT_ALERT_EVENT
    ]
    assert len(events) == 1
    assert events[0].resource.id == "audiobooks.scoring.score-2026-11-25"
    assert events[0].payload["drift_status"] == "alert"
