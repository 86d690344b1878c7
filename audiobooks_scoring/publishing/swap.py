"""Publishing a built list: the adapter's atomic swap, retried on transient errors."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

from audiobooks_scoring.publishing.build import TargetList
from audiobooks_scoring.publishing.retry import failed_publication, with_retries
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter


@dataclass(frozen=True)
class PublishResult:
    """What a publication wrote."""

    rows_published: int
    targets: int
    seconds: float


def publish_target_list(
    warehouse: WarehouseAdapter,
    settings: Settings,
    built: TargetList,
    replace_current: bool = True,
) -> PublishResult:
    """Swap the built list in as `customer_scores` and into history (a backfill: history only)."""
    started = time.perf_counter()
    try:
        with_retries(
            warehouse,
            lambda: warehouse.swap_list(built.run_id, replace_current),
            settings.publish_retries,
            "swapping in the new list",
        )
    except DBAPIError as error:
        raise failed_publication(
            warehouse, error, settings.publish_retries, built.run_id, "published"
        ) from error
    return PublishResult(built.rows, built.targets, built.seconds + time.perf_counter() - started)
