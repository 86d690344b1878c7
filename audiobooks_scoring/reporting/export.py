"""Export of the current campaign targets to CSV or Parquet for ad platforms."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from audiobooks_scoring.files import atomic_path
from audiobooks_scoring.warehouse import WarehouseAdapter

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


def export_targets(
    warehouse: WarehouseAdapter, out: Path, file_format: str, chunk_size: int
) -> int:
    """Stream the `campaign_targets` view into a CSV or Parquet file (written atomically)."""
    sql = warehouse.render_sql("marketing/export_targets")
    types = {field.name: field.type for field in EXPORT_SCHEMA}
    rows = 0
    with atomic_path(out) as partial:
        writer: pq.ParquetWriter | pacsv.CSVWriter
        if file_format == "parquet":
            writer = pq.ParquetWriter(partial, EXPORT_SCHEMA)
        else:
            writer = pacsv.CSVWriter(partial, EXPORT_SCHEMA)
        try:
            for chunk in warehouse.stream_query(sql, {}, chunk_size, types):
                table = pa.Table.from_pandas(chunk, schema=EXPORT_SCHEMA, preserve_index=False)
                writer.write_table(table)
                rows += len(chunk)
        finally:
            writer.close()
    return rows
