"""Helpers shared by the tests: one scoring run through the pipeline's steps, without Prefect."""

from __future__ import annotations

import tracemalloc
from collections.abc import Mapping
from datetime import date
from typing import Any

from sqlalchemy import Table, inspect, text

from audiobooks_scoring import pipeline
from audiobooks_scoring.model.scoring_model import ScoringModel
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter


def run_scoring(
    settings: Settings,
    warehouse: WarehouseAdapter,
    run_id: str,
    as_of: date,
    publish: bool = True,
    model: ScoringModel | None = None,
) -> dict[str, Any]:
    """The run's ledger figures after `pipeline.run_scoring` (no report: the flow test has it)."""
    run = pipeline.ScoringRun(settings, warehouse, run_id, as_of, publish)
    return pipeline.run_scoring(run, model=model, write_report=False).to_dict()


def unique_indexes(warehouse: WarehouseAdapter, table: Table) -> list[list[str]]:
    """The column lists of the unique indexes the engine keeps on `table`.

    SQLAlchemy's reflection where it works; DuckDB's own catalog (`duckdb_indexes()`) on
    DuckDB, whose SQLAlchemy dialect (duckdb-engine 0.17) reflects no index at all.
    """
    if warehouse.engine.dialect.name != "duckdb":
        indexes = inspect(warehouse.engine).get_indexes(table.name, schema=table.schema)
        return [list(index["column_names"]) for index in indexes if index["unique"]]
    with warehouse.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT expressions FROM duckdb_indexes() WHERE is_unique "
                "AND table_name = :name AND schema_name = coalesce(:schema, current_schema())"
            ),
            {"name": table.name, "schema": table.schema},
        ).all()
    return [_index_columns(row[0]) for row in rows]


def _index_columns(expressions: Any) -> list[str]:
    """DuckDB's `expressions` of an index (a list, or its text `[a, b]`) as column names."""
    if isinstance(expressions, str):
        expressions = expressions.strip("[]").split(",")
    return [str(column).strip().strip('"') for column in expressions]


def stream_peak(
    warehouse: WarehouseAdapter,
    as_of: date,
    chunk_size: int,
    column_types: Mapping[str, Any] | None = None,
) -> tuple[int, list[int]]:
    """Peak traced memory while streaming the population as of `as_of`, and the chunk sizes."""
    sql = warehouse.source_sql("customer_activity")
    tracemalloc.start()
    tracemalloc.reset_peak()
    sizes = []
    for chunk in warehouse.stream_query(sql, {"as_of": as_of}, chunk_size, column_types):
        sizes.append(len(chunk))
        del chunk
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, sizes
