"""Entrypoint of the `score-customers` flow for `prefect deploy` (the flow lives in the package)."""

from audiobooks_scoring.flows.score_customers import score_customers

__all__ = ["score_customers"]
