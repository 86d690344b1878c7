"""The generic adapter on a `snowflake://` URL, with Snowflake emulated by fakesnow (on DuckDB).

snowflake-sqlalchemy runs the portable Core the generic adapter emits; fakesnow patches
`snowflake.connector.connect` so every statement runs, translated by sqlglot, in an
in-memory DuckDB. Two test-only shims keep the emulation usable:

- fakesnow (0.12) needs snowflake-connector-python < 5 (it imports modules that 5.x removed),
  so snowflake-sqlalchemy must be a 1.x release (2.x needs connector >= 5), and 1.x imports
  `ORMSelectCompileState`, which SQLAlchemy 2.1 renamed `_ORMSelectCompileState`: the old
  name is put back before the dialect loads.
- fakesnow runs an `executemany` INSERT one row at a time (one sqlglot parse per row, ~50 ms),
  while the real connector (pyformat) rewrites it into one multi-row INSERT; the emulator is
  given the real connector's rewrite, so the adapter's batched inserts cost one statement per
  batch as they do on Snowflake.

Not emulated: Snowflake does not enforce PRIMARY KEY constraints, while DuckDB does; the lock
row reads the lock's rows back, so it holds either way (tests/warehouse/test_generic.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy.orm.context as orm_context
from sqlalchemy import select


def _restore_orm_select_compile_state() -> None:
    """snowflake-sqlalchemy 1.x subclasses a class SQLAlchemy 2.1 renamed; give it the old name."""
    if not hasattr(orm_context, "ORMSelectCompileState"):
        orm_context.ORMSelectCompileState = orm_context._ORMSelectCompileState  # type: ignore[attr-defined]


_restore_orm_select_compile_state()  # before the snowflake dialect is loaded
if importlib.util.find_spec("fakesnow") is None:  # skip only when absent, never when broken
    pytest.skip("fakesnow is not installed", allow_module_level=True)

import fakesnow  # noqa: E402
from fakesnow.cursor import FakeSnowflakeCursor  # noqa: E402
from snowflake.connector.cursor import SnowflakeCursor  # noqa: E402
from snowflake.connector.util_text import extract_values_clause  # noqa: E402

from audiobooks_scoring.settings import Settings  # noqa: E402
from audiobooks_scoring.warehouse import GenericAdapter, init_warehouse  # noqa: E402
from audiobooks_scoring.warehouse.lock_table import lock_table  # noqa: E402
from tests.helpers import run_scoring  # noqa: E402
from tests.test_pipeline import AS_OF, bad_rows, fill_activity, scores_dump  # noqa: E402

SNOWFLAKE_URL = "snowflake://user:pw@account/db1/schema1"
ROWS_PER_INSERT = 2_000
_ORIGINAL_EXECUTEMANY = FakeSnowflakeCursor.executemany


def _multi_row_executemany(
    self: FakeSnowflakeCursor, command: str, seqparams: Sequence[Any], **kwargs: Any
) -> FakeSnowflakeCursor:
    """`executemany` as the real connector does it for pyformat INSERTs: one multi-row INSERT."""
    command = command.strip(" \t\n\r")
    is_insert = SnowflakeCursor.INSERT_SQL_RE.match(command) is not None
    values = extract_values_clause(command) if is_insert else None
    if values is None or isinstance(seqparams, dict) or not seqparams:
        return _ORIGINAL_EXECUTEMANY(self, command, seqparams, **kwargs)
    rows = list(seqparams)
    inserted = 0
    for start in range(0, len(rows), ROWS_PER_INSERT):
        piece = rows[start : start + ROWS_PER_INSERT]
        # fakesnow's own client-side binding (as the connector's), applied to the VALUES group
        rendered = ",".join(self._rewrite_with_params(values, row)[0] for row in piece)
        self.execute(command.replace(values, rendered, 1), **kwargs)
        inserted += len(piece)
    self._rowcount = inserted
    return self


@pytest.fixture
def snowflake_generic(tmp_path, trained_store_dir, monkeypatch):
    """A fakesnow warehouse reached through snowflake-sqlalchemy and the generic adapter."""
    monkeypatch.setattr(FakeSnowflakeCursor, "executemany", _multi_row_executemany)
    with fakesnow.patch(create_database_on_connect=True, create_schema_on_connect=True):
        settings = Settings(
            data_dir=tmp_path,
            warehouse_url=SNOWFLAKE_URL,
            warehouse_adapter="generic",
            model_store_dir=trained_store_dir,
            chunk_size=1_000,
        )
        warehouse = init_warehouse(settings)
        assert isinstance(warehouse, GenericAdapter)
        assert warehouse.dialect.name == "snowflake"
        yield settings, warehouse
        warehouse.dispose()


@pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")
def test_a_whole_run_publishes_through_portable_core_on_snowflake(snowflake_generic):
    settings, warehouse = snowflake_generic
    rows_in = fill_activity(warehouse, customers=1_500, bad_rows=bad_rows("snowflake"))
    figures = run_scoring(settings, warehouse, "snowflake-a", AS_OF)
    assert figures["rows_in"] == rows_in == figures["rows_scored"] + figures["rows_rejected"]
    assert figures["rows_rejected"] == 10
    scores = scores_dump(warehouse)
    assert len(scores) == figures["rows_scored"]
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert scores["customer_id"].is_unique and set(scores["run_id"]) == {"snowflake-a"}
    sizes = scores.groupby("decile").size()
    assert list(sizes.index) == list(range(1, 11)) and sizes.max() - sizes.min() <= 1

    second = run_scoring(settings, warehouse, "snowflake-b", AS_OF)
    assert set(scores_dump(warehouse)["run_id"]) == {"snowflake-b"}
    history = warehouse.tables.history
    counts = warehouse.read_frame(select(history.c.run_id))["run_id"].value_counts()
    assert counts.to_dict() == {"snowflake-a": len(scores), "snowflake-b": second["rows_scored"]}
    assert warehouse.read_frame(select(lock_table(warehouse))).empty
