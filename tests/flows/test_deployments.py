"""deployments/prefect.yaml: both deployments, their entrypoints, schedule and limits."""

from __future__ import annotations

from prefect.client.schemas.schedules import CronSchedule

from audiobooks_scoring.deployments.serve import (
    build_runner_deployments,
    load_entrypoint,
    read_deployments,
)


def by_name() -> dict:
    return {entry["name"]: entry for entry in read_deployments()}


def test_both_deployments_are_declared_with_importable_entrypoints():
    entries = by_name()
    assert set(entries) == {"nightly", "on-demand", "weekly"}
    assert load_entrypoint(entries["nightly"]["entrypoint"]).name == "score-customers"
    assert load_entrypoint(entries["on-demand"]["entrypoint"]).name == "retrain-model"
    assert load_entrypoint(entries["weekly"]["entrypoint"]).name == "measure-outcomes"


def test_nightly_scoring_runs_at_two_with_a_time_zone_and_one_at_a_time():
    nightly = by_name()["nightly"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *"
    assert schedule["timezone"] == "Europe/London"
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"
    assert nightly["concurrency_limit"] == 1


def test_retrain_has_no_schedule_and_is_triggered_by_the_drift_alert():
    from audiobooks_scoring.flows.score_customers import DRIFT_ALERT_EVENT

    retrain = by_name()["on-demand"]
    assert not retrain["schedules"]
    trigger = retrain["triggers"][0]
    assert trigger["expect"] == [DRIFT_ALERT_EVENT]
    assert trigger["name"] == "retrain-on-drift-alert"  # the automation's name in the UI


def test_the_serve_script_builds_the_same_deployments():
    deployments = {d.name: d for d in build_runner_deployments()}
    nightly = deployments["nightly"]
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert nightly.schedules[0].schedule.timezone == "Europe/London"
    assert nightly.concurrency_limit == 1
    assert not deployments["on-demand"].schedules
    assert deployments["on-demand"].triggers[0].expect == {"audiobooks.scoring.drift-alert"}
    assert deployments["on-demand"].triggers[0].name == "retrain-on-drift-alert"


def test_retrain_is_also_triggered_by_a_performance_decay():
    from audiobooks_scoring.flows.measure_outcomes import DECAY_ALERT_EVENT

    triggers = {t["name"]: t for t in by_name()["on-demand"]["triggers"]}
    assert set(triggers) == {"retrain-on-drift-alert", "retrain-on-performance-decay"}
    decay = triggers["retrain-on-performance-decay"]
    assert decay["expect"] == [DECAY_ALERT_EVENT]
    assert decay["match"] == {"prefect.resource.id": "audiobooks.outcomes.*"}
    assert decay["posture"] == "Reactive" and decay["enabled"]


def test_outcomes_are_measured_weekly_with_a_time_zone_and_served_too():
    weekly = by_name()["weekly"]
    (schedule,) = weekly["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 6 * * 1"
    assert schedule["timezone"] == "Europe/London" and weekly["concurrency_limit"] == 1
    served = {d.name: d for d in build_runner_deployments()}
    assert served["weekly"].schedules[0].schedule.cron == "0 6 * * 1"
    assert served["weekly"].schedules[0].schedule.timezone == "Europe/London"
    expected = {t.name: t.expect for t in served["on-demand"].triggers}
    assert expected["retrain-on-performance-decay"] == {"audiobooks.outcomes.performance-decay"}
