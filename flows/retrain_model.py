"""Entrypoint of the `retrain-model` flow for `prefect deploy` (the flow lives in the package)."""

from audiobooks_scoring.flows.retrain_model import retrain_model

__all__ = ["retrain_model"]
