"""Serve every deployment of `prefect.yaml` from one local process (the embedded default)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def read_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployment entries of a prefect.yaml."""
    return yaml.safe_load(path.read_text())["deployments"]


def load_entrypoint(entrypoint: str):
    """The flow object an entrypoint `flows/<name>.py:function` names, from the package.

    The project's `flows/<name>.py` files only re-export `audiobooks_scoring.flows.<name>`,
    so an installed wheel serves the same flows without the project folder.
    """
    file_part, function = entrypoint.split(":")
    module = "audiobooks_scoring.flows." + Path(file_part).stem
    return getattr(importlib.import_module(module), function)


def build_runner_deployments(path: Path = PREFECT_YAML) -> list:
    """Runner deployments (schedules, time zone, concurrency, triggers) as prefect.yaml says."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    deployments = []
    for entry in read_deployments(path):
        flow = load_entrypoint(entry["entrypoint"])
        schedules = [
            Cron(item["cron"], timezone=item.get("timezone"), active=item.get("active", True))
            for item in entry.get("schedules") or []
        ]
        triggers = [
            DeploymentEventTrigger(**{k: v for k, v in item.items() if k != "type"})
            for item in entry.get("triggers") or []
        ]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                tags=entry.get("tags"),
                schedules=schedules or None,
                concurrency_limit=entry.get("concurrency_limit"),
                triggers=triggers or None,
                parameters=entry.get("parameters") or {},
            )
        )
    return deployments


def serve_deployments() -> None:
    """Serve the nightly scoring, on-demand retrain and weekly outcome deployments until stopped."""
    from prefect import serve

    serve(*build_runner_deployments())


if __name__ == "__main__":
    serve_deployments()
