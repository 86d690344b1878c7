"""Prefect flows: thin wiring of the library's steps (the only package that imports Prefect)."""

import os

# The library logs through `logging`; these loggers also reach the Prefect UI's run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "audiobooks_scoring")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
