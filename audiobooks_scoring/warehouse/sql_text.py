"""SQL text: the files under `sql/` loaded by name, and the one way to quote names and literals.

Table names come from validated settings and are always quoted by the dialect's preparer;
values are bound parameters, except where SQL needs a literal (view text, DDL defaults),
which `sql_literal` renders through SQLAlchemy's own literal processors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import String, Table, case, cast, func, literal, literal_column
from sqlalchemy import table as table_clause
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

from audiobooks_scoring.contract import SCORE_REASON_LABELS
from audiobooks_scoring.warehouse.tables import VIEW_NAMES, WarehouseTables

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_TEMPLATE_ATTRS = {
    "training_table": "training",
    "activity_table": "activity",
    "scores_table": "scores",
    "history_table": "history",
    "runs_table": "runs",
    "rejected_table": "rejected",
    "model_versions_table": "model_versions",
    "staging_table": "staging",
    "purchases_table": "purchases",
    "outcomes_table": "outcomes",
    "outcome_deciles_table": "outcome_deciles",
}


class SqlFileError(RuntimeError):
    """A SQL file is missing or names a placeholder that does not exist."""


def quote_identifier(dialect: Dialect, name: str) -> str:
    """A column, index or role name quoted for the dialect."""
    return dialect.identifier_preparer.quote(name)


def qualified_name(dialect: Dialect, relation: Table | str, schema: str | None = None) -> str:
    """The dialect-quoted, schema-qualified name of a table (or of a name in `schema`)."""
    preparer = dialect.identifier_preparer
    if isinstance(relation, Table):
        return preparer.format_table(relation)
    quoted = preparer.quote(relation)
    return f"{preparer.quote_schema(schema)}.{quoted}" if schema else quoted


def sql_literal(dialect: Dialect, value: Any, type_: TypeEngine | None = None) -> str:
    """A value as a SQL literal of the dialect (for DDL and view text, never for queries)."""
    return str(
        literal(value, type_=type_).compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    )


def strip_comments(sql_text: str) -> str:
    """SQL text without its `--` comment lines (they may mention placeholders)."""
    return "\n".join(line for line in sql_text.splitlines() if not line.lstrip().startswith("--"))


def split_statements(sql_text: str) -> list[str]:
    """The `;`-separated statements of a SQL file, without comments-only pieces."""
    pieces = re.split(r";(?=(?:[^']*'[^']*')*[^']*$)", strip_comments(sql_text))
    return [piece.strip() for piece in pieces if piece.strip()]


def reasons_expression(prefix: str = "") -> ColumnElement:
    """The plain-language reasons of a score row: its reason labels joined by '; '."""

    def label(column: str) -> ColumnElement:
        code = cast(literal_column(f"{prefix}{column}"), String)  # an enum on some engines
        return case(
            *[(code == literal(key), literal(text_)) for key, text_ in SCORE_REASON_LABELS.items()]
        )

    separator = literal("; ", String)
    return (
        label("reason_1")
        + func.coalesce(separator + label("reason_2"), literal(""))
        + func.coalesce(separator + label("reason_3"), literal(""))
    )


def reason_labels_sql(dialect: Dialect, prefix: str = "") -> str:
    """`reasons_expression` as SQL text of the dialect, for view definitions."""
    return str(
        reasons_expression(prefix).compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    )


def reasons_column() -> ColumnElement:
    """The plain-language `reasons` of a score row, as a column of a one-table SELECT."""
    return reasons_expression().label("reasons")


def render_sql(name: str, dialect: Dialect, tables: WarehouseTables) -> str:
    """The text of `sql/<name>.sql` with `{table}` placeholders replaced by quoted names."""
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        raise SqlFileError(f"no SQL file named {name!r} under {SQL_DIR}")
    relations: dict[str, Table | str] = {
        key: getattr(tables, attr) for key, attr in _TEMPLATE_ATTRS.items()
    }
    relations.update({f"{view}_view": view for view in VIEW_NAMES})

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key == "reason_labels":
            return reason_labels_sql(dialect)
        if key not in relations:
            raise SqlFileError(f"{path.name}: unknown placeholder {{{key}}}")
        return qualified_name(dialect, relations[key], tables.schema)

    return PLACEHOLDER.sub(substitute, strip_comments(path.read_text()))


def load_source_sql(name: str, dialect: Dialect, tables: WarehouseTables) -> str:
    """A source query from `sql/sources/`, ready to run with bound parameters."""
    return render_sql(f"sources/{name}", dialect, tables).strip().rstrip(";")


def view_clause(name: str, tables: WarehouseTables):
    """A Core table clause naming one of the marketing views (for SELECTs from Python)."""
    return table_clause(name, schema=tables.schema)
