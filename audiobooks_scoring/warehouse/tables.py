"""SQLAlchemy Core definitions of every table the job reads or writes, laid out per adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Enum,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.mysql import DATETIME as MYSQL_DATETIME

from audiobooks_scoring.contract import (
    CUSTOMER_ID,
    FEATURES,
    LABEL,
    SCORE_REASON_CODES,
    WINDOW_END,
)
from audiobooks_scoring.settings import Settings, check_identifier

LIST_COLUMNS = (
    CUSTOMER_ID,
    WINDOW_END,
    "probability",
    "rank",
    "decile",
    "is_target",
    "holdout",
    "reason_1",
    "reason_2",
    "reason_3",
)
"""The columns of the target list that vary by customer (the rest is constant in a run)."""

SCORED_AT_TYPE = DateTime(timezone=True).with_variant(MYSQL_DATETIME(fsp=6), "mysql", "mariadb")
"""When a list was scored, to the microsecond (MySQL's DATETIME would keep whole seconds)."""

VIEW_NAMES = (
    "campaign_targets",
    "decile_summary",
    "customer_scores_explained",
    "campaign_uplift",
)


@dataclass(frozen=True)
class TableLayout:
    """What an adapter's engine stores differently: schema, enum, partitions, indexes."""

    schema: str | None = None
    native_enum: bool = False
    history_partitioned: bool = False
    scores_index: bool = True
    staging_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WarehouseTables:
    """SQLAlchemy Core definitions of every table the job reads or writes."""

    metadata: MetaData
    training: Table
    activity: Table
    scores: Table
    history: Table
    runs: Table
    rejected: Table
    model_versions: Table
    staging: Table
    purchases: Table
    outcomes: Table
    outcome_deciles: Table

    @property
    def schema(self) -> str | None:
        """The schema every table lives in (None: the connection's default)."""
        return self.metadata.schema


def _feature_columns() -> list[Column]:
    return [Column(name, Double) for name in FEATURES]


def score_reason_type(scores_table: str, metadata: MetaData, native: bool) -> Enum | String:
    """The score-reason column type: a native enum where the engine has one, else VARCHAR."""
    if not native:
        return String(48)
    return Enum(
        *SCORE_REASON_CODES,
        name=f"{scores_table}_reason"[:60],
        metadata=metadata,
        native_enum=True,
        create_constraint=False,
        validate_strings=True,
    )


def score_columns(reason_type: Any) -> list[Column]:
    """Columns shared by `customer_scores` and the history table, in their table order.

    The first ones (`LIST_COLUMNS`) vary by customer; the last three are constant in a run.
    """
    return [
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date),
        Column("probability", Double, nullable=False),
        Column("rank", BigInteger, nullable=False),
        Column("decile", SmallInteger, nullable=False),
        Column("is_target", Boolean, nullable=False),
        Column("holdout", Boolean, nullable=False),
        Column("reason_1", reason_type),
        Column("reason_2", reason_type),
        Column("reason_3", reason_type),
        Column("model_version", String(80), nullable=False),
        Column("run_id", String(80), nullable=False),
        Column("scored_at", SCORED_AT_TYPE, nullable=False),
    ]


def build_tables(settings: Settings, layout: TableLayout) -> WarehouseTables:
    """Table definitions named as the settings say and laid out as the adapter says."""
    metadata = MetaData(schema=layout.schema)
    training = Table(
        settings.training_table,
        metadata,
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date, nullable=False),
        *_feature_columns(),
        Column(LABEL, SmallInteger, nullable=False),
    )
    activity = Table(
        settings.activity_table,
        metadata,
        Column(CUSTOMER_ID, BigInteger),
        Column(WINDOW_END, Date),
        *_feature_columns(),
    )
    reason = score_reason_type(settings.scores_table, metadata, layout.native_enum)
    scores_index = (
        [Index(f"{settings.scores_table}_customer"[:60], CUSTOMER_ID, unique=True)]
        if layout.scores_index
        else []
    )
    scores = Table(settings.scores_table, metadata, *score_columns(reason), *scores_index)
    history_layout: list[Any] = (
        []
        if layout.history_partitioned
        else [
            Index(f"ix_{settings.history_table}_run"[:60], "run_id"),
            Index(f"ix_{settings.history_table}_customer"[:60], CUSTOMER_ID),
        ]
    )
    partitioning: dict[str, Any] = (
        {"postgresql_partition_by": "LIST (run_id)"} if layout.history_partitioned else {}
    )
    history = Table(
        settings.history_table, metadata, *score_columns(reason), *history_layout, **partitioning
    )
    runs = Table(
        settings.runs_table,
        metadata,
        Column("run_id", String(80), primary_key=True),
        Column("flow_run_id", String(80)),
        Column("as_of", Date),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True)),
        Column("status", String(32), nullable=False),
        Column("model_version", String(80)),
        Column("rows_in", BigInteger),
        Column("rows_scored", BigInteger),
        Column("rows_rejected", BigInteger),
        Column("reject_share", Double),
        Column("published", Boolean, nullable=False, default=False),
        Column("score_mean", Double),
        Column("score_psi", Double),
        Column("max_feature_psi", Double),
        Column("max_psi_feature", String(48)),
        Column("feature_psi", Text),
        Column("drift_status", String(16)),
        Column("decile_change_share", Double),
        Column("targets", BigInteger),
        Column("report_path", Text),
        Column("message", Text),
    )
    rejected = Table(
        settings.rejected_table,
        metadata,
        Column("run_id", String(80), nullable=False),
        Column(CUSTOMER_ID, Text),
        Column("reason_code", String(48), nullable=False),
        Column("reason", Text, nullable=False),
        Column("raw_values", Text, nullable=False),
        Column("rejected_at", DateTime(timezone=True), nullable=False),
        Index(f"ix_{settings.rejected_table}_run"[:60], "run_id"),
    )
    model_versions = Table(
        settings.model_versions_table,
        metadata,
        Column("version", String(80), primary_key=True),
        Column("status", String(16), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("recipe", String(48)),
        Column("auc", Double),
        Column("balanced_accuracy", Double),
        Column("brier", Double),
        Column("log_loss", Double),
        Column("lift_top_decile", Double),
        Column("training_rows", BigInteger),
        Column("training_fingerprint", String(80)),
        Column("artifact_digest", String(80)),
        Column("decision_reason", Text),
    )
    staging = Table(
        check_identifier(f"{settings.scores_table}_staging"[:48], "scores_table"),
        metadata,
        Column("run_id", String(80), nullable=False),
        Column(CUSTOMER_ID, BigInteger, nullable=False),
        Column(WINDOW_END, Date),
        Column("probability", Double, nullable=False),
        Column("holdout", Boolean, nullable=False),
        Column("reason_1", reason),
        Column("reason_2", reason),
        Column("reason_3", reason),
        Column("partition_no", SmallInteger, nullable=False),
        prefixes=list(layout.staging_prefixes),
    )
    return WarehouseTables(
        metadata,
        training,
        activity,
        scores,
        history,
        runs,
        rejected,
        model_versions,
        staging,
        *outcome_tables(settings, metadata),
    )


def next_list_table(tables: WarehouseTables, columns: tuple[str, ...] | None = None) -> Table:
    """`<scores>_next`, where a run's list is built beside the live one (`columns`: a subset)."""
    return list_shaped_table(tables, f"{tables.scores.name}_next"[:60], columns)


def list_shaped_table(
    tables: WarehouseTables, name: str, columns: tuple[str, ...] | None = None
) -> Table:
    """A table `name` with the live list's columns (`columns`: a subset), in its order."""
    wanted = columns or tuple(c.name for c in tables.scores.columns)
    return Table(
        name,
        MetaData(schema=tables.schema),
        *[
            Column(c.name, c.type, nullable=c.nullable)
            for c in tables.scores.columns
            if c.name in wanted
        ],
    )


def outcome_tables(settings: Settings, metadata: MetaData) -> tuple[Table, Table, Table]:
    """The purchases input, the per-run outcome ledger and its per-decile companion."""
    purchases = Table(
        settings.purchases_table,
        metadata,
        Column(CUSTOMER_ID, BigInteger),
        Column("purchased_at", DateTime),  # wall-clock time of the purchase; its date counts
        Index(f"ix_{settings.purchases_table}_purchased_at"[:60], "purchased_at"),
    )
    outcomes = Table(
        settings.outcomes_table,
        metadata,
        Column("run_id", String(80), primary_key=True),
        Column("as_of", Date, nullable=False),
        Column("measured_on", Date, nullable=False),
        Column("horizon_days", Integer, nullable=False),
        Column("maturity", Double, nullable=False),
        Column("provisional", Boolean, nullable=False),
        Column("status", String(32), nullable=False),
        Column("reason", Text),
        Column("model_version", String(80)),
        Column("customers", BigInteger, nullable=False),
        Column("targeted", BigInteger, nullable=False),
        Column("targeted_conversions", BigInteger, nullable=False),
        Column("targeted_rate", Double),
        Column("lowest_targeted_probability", Double),
        Column("control", BigInteger, nullable=False),
        Column("control_conversions", BigInteger, nullable=False),
        Column("control_rate", Double),
        Column("uplift", Double),
        Column("uplift_ci_low", Double),
        Column("uplift_ci_high", Double),
        Column("confidence", Double, nullable=False),
        Column("incremental_conversions", Double),
        Column("uplift_note", Text),
        Column("control_customers", BigInteger, nullable=False),
        Column("control_base_rate", Double),
        Column("mean_predicted", Double),
        Column("realized_auc", Double),
        Column("expected_auc", Double),
        Column("brier", Double),
        Column("purchases_used", BigInteger, nullable=False),
        Column("purchases_unknown_customer", BigInteger, nullable=False),
        Column("purchases_missing_date", BigInteger, nullable=False),
        Column("purchases_before_run", BigInteger, nullable=False),
        Column("purchases_after_horizon", BigInteger, nullable=False),
        Column("measured_at", DateTime(timezone=True), nullable=False),
        Column("report_path", Text),
    )
    outcome_deciles = Table(
        settings.outcome_deciles_table,
        metadata,
        Column("run_id", String(80), primary_key=True),
        Column("decile", SmallInteger, primary_key=True, autoincrement=False),
        Column("control_customers", BigInteger, nullable=False),
        Column("mean_predicted", Double),
        Column("observed_rate", Double),
        Column("cumulative_gain_realized", Double),
        Column("cumulative_gain_promised", Double),
        Column("targeted", BigInteger, nullable=False),
        Column("targeted_rate", Double),
        Column("control", BigInteger, nullable=False),
        Column("control_rate", Double),
        Column("uplift", Double),
        Column("uplift_ci_low", Double),
        Column("uplift_ci_high", Double),
    )
    return purchases, outcomes, outcome_deciles
