"""Retries of transient database errors, and the error a failed publication raises."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from audiobooks_scoring.warehouse import PublicationError, WarehouseAdapter

logger = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(
    warehouse: WarehouseAdapter,
    action: Callable[[], T],
    attempts: int,
    what: str,
    base_delay: float = 0.5,
) -> T:
    """Run `action`, retrying the engine's transient errors with exponential backoff."""
    for attempt in range(attempts + 1):
        try:
            return action()
        except DBAPIError as error:
            if not warehouse.is_transient(error) or attempt == attempts:
                raise
            delay = base_delay * 2**attempt
            logger.warning(
                "%s failed with a transient error (%s); retry %s/%s in %.1fs",
                what,
                str(getattr(error.orig, "sqlstate", "") or "") or type(error.orig).__name__,
                attempt + 1,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def failed_publication(
    warehouse: WarehouseAdapter, error: DBAPIError, retries: int, run_id: str, what: str
) -> PublicationError:
    """The `PublicationError` of a run whose list could not be built or published."""
    kind = (
        f"transient error still failing after {retries} retries"
        if warehouse.is_transient(error)
        else "error that is not retried"
    )
    return PublicationError(
        f"run {run_id} was not {what} ({kind}: {warehouse.describe_error(error)}); "
        "the previous list is untouched"
    )
