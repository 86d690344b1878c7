"""The Dask task runner of partitioned scoring runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from audiobooks_scoring.settings import Settings

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


def partition_task_runner(settings: Settings) -> DaskTaskRunner:
    """The scheduler at `dask_address`, else a temporary local cluster.

    The local cluster has `dask_workers` worker processes of one thread each (a partition's
    scoring already uses every core it is given) and no dashboard.
    """
    from prefect_dask import DaskTaskRunner  # imports dask.distributed: only when partitioned

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )
