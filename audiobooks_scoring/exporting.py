"""Export of the current campaign targets to CSV or Parquet for ad platforms."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from audiobooks_scoring.warehouse import Warehouse, render_sql, stream_query

EXPORT_SCHEMA = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("probability", pa.float64()),
        ("rank", pa.int64()),
        ("decile", pa.int64()),
        ("reason_1", pa.string()),
        ("reason_2", pa.string()),
        ("reason_3", pa.string()),
        ("reasons", pa.string()),
        ("model_version", pa.string()),
        ("run_id", pa.string()),
    ]
)


def export_targets(warehouse: Warehouse, out: Path, file_format: str, chunk_size: int) -> int:
    """Stream the `campaign_targets` view into a CSV or Parquet file (written atomically)."""
    sql = render_sql("marketing/export_targets", warehouse.engine, warehouse.tables)
    types = {field.name: field.type for field in EXPORT_SCHEMA}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    rows = 0
    if file_format == "parquet":
        writer = pq.ParquetWriter(partial, EXPORT_SCHEMA)
    else:
        writer = pacsv.CSVWriter(partial, EXPORT_SCHEMA)
    try:
        for chunk in stream_query(warehouse.engine, sql, {}, chunk_size, types):
            table = pa.Table.from_pandas(chunk, schema=EXPORT_SCHEMA, preserve_index=False)
            writer.write_table(table)
            rows += len(chunk)
    finally:
        writer.close()
    os.replace(partial, out)
    return rows
