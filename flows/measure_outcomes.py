"""Entrypoint of the `measure-outcomes` flow for `prefect deploy` (it lives in the package)."""

from audiobooks_scoring.flows.measure_outcomes import measure_outcomes

__all__ = ["measure_outcomes"]
