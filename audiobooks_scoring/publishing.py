"""Publication: the one-run-at-a-time lock, the run ledger and the atomic swap of the list.

Decisions (each covered by tests/test_reliability_*.py):
- PostgreSQL builds `<scores>_next` in its own transaction, then swaps it in with renames in one
  transaction under `SET LOCAL lock_timeout`; a reader's long transaction delays the swap by at
  most the lock timeout per attempt, and readers always see one whole list. SQLite replaces the
  rows in one transaction (WAL readers keep their snapshot).
- A killed run leaves at most `<scores>_next` and staged rows, which the next run replaces; its
  ledger row, still `running`, is marked `abandoned` by the next run (one ledger per list).
- The run lock lives in a database session. Publication re-checks that this process's session
  still holds it, so a run whose session was lost fails instead of publishing unguarded.
- Privileges granted on the list and its views (e.g. the ad team's SELECT) are re-granted on
  the swapped-in table and the re-created views.
- Transient errors (lost connection, lock timeout, deadlock, serialization failure, SQLite
  "database is locked") are retried with exponential backoff; others fail at once. A publication
  that still fails raises `PublicationError`, leaving the previous list untouched.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Engine,
    Index,
    MetaData,
    Table,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    not_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from audiobooks_scoring.contract import CUSTOMER_ID, WINDOW_END
from audiobooks_scoring.scoring import REASON_LABELS
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import (
    VIEW_NAMES,
    WarehouseTables,
    create_views,
    drop_views,
    is_postgres,
    qualified_name,
    render_sql,
    score_columns,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_SQLSTATES = ("08", "40001", "40P01", "55P03", "57P01", "57P02", "57P03")
# Connection failures carry no SQLSTATE; these ones will not heal by waiting.
PERMANENT_CONNECTION_ERRORS = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
)


class AnotherRunPublishing(RuntimeError):
    """Another scoring run holds the publication lock."""


class PublicationError(RuntimeError):
    """The target list could not be published; the previous list is untouched."""


def _sqlstate(error: BaseException) -> str:
    original = getattr(error, "orig", None)
    return str(getattr(original, "sqlstate", "") or "")


def is_transient(error: BaseException) -> bool:
    """Whether a database error is worth retrying (lost connection, lock timeout, deadlock)."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    state = _sqlstate(error)
    if state:
        return state.startswith(TRANSIENT_SQLSTATES)
    if isinstance(error, OperationalError):
        message = str(getattr(error, "orig", error)).lower()
        if any(marker in message for marker in PERMANENT_CONNECTION_ERRORS):
            return False
        return "database is locked" in message or "connection" in message
    return False


def with_retries(action: Callable[[], T], attempts: int, what: str, base_delay: float = 0.5) -> T:
    """Run `action`, retrying transient database errors with exponential backoff."""
    for attempt in range(attempts + 1):
        try:
            return action()
        except DBAPIError as error:
            if not is_transient(error) or attempt == attempts:
                raise
            delay = base_delay * 2**attempt
            logger.warning(
                "%s failed with a transient error (%s); retry %s/%s in %.1fs",
                what,
                _sqlstate(error) or type(error.orig).__name__,
                attempt + 1,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def lock_key(tables: WarehouseTables) -> int:
    """A stable 63-bit advisory-lock key for the configured scores table."""
    name = f"{tables.metadata.schema or ''}.{tables.scores.name}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


# The backend pid holding each PostgreSQL run lock of this process, by (masked URL, lock key):
# publication checks, inside its own transactions, that this session still holds the lock.
_HELD_LOCKS: dict[tuple[str, int], int] = {}

_LOCK_HOLDERS_SQL = text(
    "SELECT l.pid, a.application_name, a.client_addr, a.backend_start FROM pg_locks AS l "
    "LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid::bigint = :high AND l.objid::bigint = :low"
)


def _engine_key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _key_parts(key: int) -> dict[str, int]:
    return {"high": key >> 32, "low": key & 0xFFFFFFFF}


def run_lock_holders(bind: Engine | Connection, tables: WarehouseTables) -> list[int]:
    """Backend pids holding the PostgreSQL run lock of these tables (empty on SQLite or if free)."""
    if not is_postgres(bind):
        return []
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return run_lock_holders(conn, tables)
    rows = bind.execute(_LOCK_HOLDERS_SQL, _key_parts(lock_key(tables))).all()
    return [int(row.pid) for row in rows]


def _describe_holder(connection: Connection, tables: WarehouseTables) -> str:
    try:
        row = connection.execute(_LOCK_HOLDERS_SQL, _key_parts(lock_key(tables))).first()
    except DBAPIError:
        return "advisory lock is held"
    if row is None:
        return "advisory lock is held"
    return (
        f"advisory lock held by backend pid {row.pid} ({row.application_name or 'unknown app'}"
        f" from {row.client_addr or 'local socket'}, connected {row.backend_start})"
    )


def check_run_lock(conn: Connection, tables: WarehouseTables) -> None:
    """Raise `PublicationError` unless this process's run lock session still holds the lock."""
    if not is_postgres(conn):
        return
    key = lock_key(tables)
    pid = _HELD_LOCKS.get((_engine_key(conn.engine), key))
    if pid is None:
        raise PublicationError(
            "publishing needs the run lock: call publish_scores inside `with RunLock(...)`"
        )
    if pid not in run_lock_holders(conn, tables):
        raise PublicationError(
            f"the run lock was lost (its database session, backend pid {pid}, ended or was "
            "terminated), so another run may be publishing; nothing was published by this run"
        )


class RunLock:
    """Only one scoring run at a time: a PostgreSQL session advisory lock or a SQLite file lock.

    On PostgreSQL the lock lives as long as its database session. If that session is lost
    (server restart, `pg_terminate_backend`), publication notices it inside its transaction and
    fails with `PublicationError` rather than publishing without the lock.
    """

    def __init__(self, engine: Engine, tables: WarehouseTables) -> None:
        self.engine = engine
        self.tables = tables
        self._connection: Connection | None = None
        self._file: Any = None
        self._registered: tuple[str, int] | None = None

    def __enter__(self) -> RunLock:
        if is_postgres(self.engine):
            connection = self.engine.connect()
            key = lock_key(self.tables)
            got = connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
            ).scalar_one()
            if not got:
                holder = _describe_holder(connection, self.tables)
                connection.rollback()
                connection.close()
                raise AnotherRunPublishing(f"another run is publishing ({holder})")
            pid = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
            connection.commit()
            self._connection = connection
            self._registered = (_engine_key(self.engine), key)
            _HELD_LOCKS[self._registered] = pid
            return self
        path = Path(f"{self.engine.url.database or 'memory'}.{self.tables.scores.name}.lock")
        handle = open(path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise AnotherRunPublishing("another run is publishing (lock file is held)") from None
        self._file = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._registered is not None:
            _HELD_LOCKS.pop(self._registered, None)
            self._registered = None
        if self._connection is not None:
            try:
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(self.tables)}
                )
                self._connection.commit()
            except DBAPIError:
                logger.warning("could not release the advisory lock; closing its session frees it")
            finally:
                self._connection.close()
                self._connection = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class PublishResult:
    """What a publication wrote."""

    rows_published: int
    targets: int
    seconds: float


def record_run_start(
    engine: Engine,
    tables: WarehouseTables,
    run_id: str,
    as_of: date,
    flow_run_id: str | None,
    status: str = "running",
) -> datetime:
    """Insert (or reset) this run's ledger row, closing rows of runs killed mid-way; its start.

    Called under the run lock, so any other row still `running` belongs to a run that died
    without finishing (killed, lost its machine): it is marked `abandoned`.
    """
    started = datetime.now(UTC)
    runs = tables.runs
    with engine.begin() as conn:
        abandoned = conn.execute(
            update(runs)
            .where(runs.c.status == "running", runs.c.run_id != run_id)
            .values(
                status="abandoned",
                finished_at=started,
                message=f"the run ended without recording an outcome; found by run {run_id}",
            )
        ).rowcount
        if abandoned:
            logger.warning("marked %s unfinished earlier run(s) as abandoned", abandoned)
        conn.execute(delete(runs).where(runs.c.run_id == run_id))
        conn.execute(
            insert(runs).values(
                run_id=run_id,
                flow_run_id=flow_run_id,
                as_of=as_of,
                started_at=started,
                status=status,
                published=False,
            )
        )
    return started


def record_run_end(engine: Engine, tables: WarehouseTables, run_id: str, **figures: Any) -> None:
    """Update this run's ledger row with its outcome and figures."""
    runs = tables.runs
    values = {"finished_at": datetime.now(UTC), **figures}
    with engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))


def campaign_condition(settings: Settings, non_holdout_count: int, campaign_rank, probability):
    """The SQL condition that makes a non-holdout customer a campaign target."""
    if settings.campaign_mode == "min_probability":
        return probability >= settings.campaign_value
    if settings.campaign_mode == "top_n":
        limit = int(settings.campaign_value)
    else:
        limit = math.ceil(settings.campaign_value * non_holdout_count)
    return campaign_rank <= limit


def ranked_scores_select(
    tables: WarehouseTables,
    settings: Settings,
    run_id: str,
    model_version: str,
    scored_at: datetime,
    non_holdout_count: int,
):
    """SELECT of the run's staged rows with rank, decile, target flag and reason labels."""
    staging = tables.staging
    order = (staging.c.probability.desc(), staging.c[CUSTOMER_ID].asc())
    ranked = (
        select(
            staging.c[CUSTOMER_ID],
            staging.c[WINDOW_END],
            staging.c.probability,
            staging.c.holdout,
            staging.c.reason_1,
            staging.c.reason_2,
            staging.c.reason_3,
            func.row_number().over(order_by=order).label("rank"),
            func.ntile(10).over(order_by=order).label("decile"),
            func.count()
            .filter(not_(staging.c.holdout))
            .over(order_by=order, rows=(None, 0))
            .label("campaign_rank"),
        )
        .where(staging.c.run_id == run_id)
        .subquery("ranked")
    )

    def label(code_column):
        return case(REASON_LABELS, value=code_column)

    separator = literal("; ")
    reasons = (
        label(ranked.c.reason_1)
        + func.coalesce(separator + label(ranked.c.reason_2), literal(""))
        + func.coalesce(separator + label(ranked.c.reason_3), literal(""))
    )
    is_target = and_(
        not_(ranked.c.holdout),
        campaign_condition(
            settings, non_holdout_count, ranked.c.campaign_rank, ranked.c.probability
        ),
    )
    return select(
        ranked.c[CUSTOMER_ID],
        ranked.c[WINDOW_END],
        ranked.c.probability,
        ranked.c.rank,
        ranked.c.decile,
        case((is_target, True), else_=False).label("is_target"),
        ranked.c.holdout,
        ranked.c.reason_1,
        ranked.c.reason_2,
        ranked.c.reason_3,
        reasons.label("reasons"),
        literal(model_version).label("model_version"),
        literal(run_id).label("run_id"),
        literal(scored_at, type_=tables.scores.c.scored_at.type).label("scored_at"),
    )


def _next_scores_table(tables: WarehouseTables) -> Table:
    metadata = MetaData(schema=tables.metadata.schema)
    name = f"{tables.scores.name}_next"[:60]
    return Table(
        name,
        metadata,
        *[Column(c.name, c.type, nullable=c.nullable) for c in score_columns()],
    )


def pause_at(stage: str) -> None:
    """Test hook: sleep at a publication stage named in AUDIOBOOKS_TEST_PAUSE_AT (stage:seconds)."""
    wanted = os.environ.get("AUDIOBOOKS_TEST_PAUSE_AT", "")
    if wanted.split(":")[0] == stage:
        seconds = float(wanted.split(":")[1]) if ":" in wanted else 30.0
        marker = os.environ.get("AUDIOBOOKS_TEST_PAUSE_MARKER")
        if marker:
            Path(marker).write_text(stage)
        time.sleep(seconds)


def count_non_holdout(engine: Engine, tables: WarehouseTables, run_id: str) -> int:
    """Number of staged, non-holdout rows of a run."""
    staging = tables.staging
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(staging.c.run_id == run_id, not_(staging.c.holdout))
            ).scalar_one()
        )


def publish_scores(
    engine: Engine,
    tables: WarehouseTables,
    settings: Settings,
    run_id: str,
    model_version: str,
    scored_at: datetime,
    replace_current: bool = True,
) -> PublishResult:
    """This run's ranked list appended to history and, unless a backfill, swapped in as current."""
    started = time.perf_counter()
    non_holdout = count_non_holdout(engine, tables, run_id)
    ranked = ranked_scores_select(tables, settings, run_id, model_version, scored_at, non_holdout)
    try:
        if not replace_current:
            rows = with_retries(
                lambda: _append_history(engine, tables, ranked, run_id),
                settings.publish_retries,
                "appending to history",
            )
        elif is_postgres(engine):
            rows = _publish_postgres(engine, tables, settings, ranked, run_id)
        else:
            rows = with_retries(
                lambda: _publish_sqlite(engine, tables, ranked, run_id),
                settings.publish_retries,
                "publication",
            )
    except DBAPIError as error:
        kind = (
            f"transient error still failing after {settings.publish_retries} retries"
            if is_transient(error)
            else "error that is not retried"
        )
        first_line = (str(error.orig).strip().splitlines() or ["?"])[0]
        raise PublicationError(
            f"run {run_id} was not published ({kind}: {type(error.orig).__name__}: "
            f"{first_line}); the previous list is untouched"
        ) from error
    history = tables.history
    with engine.connect() as conn:
        targets = int(
            conn.execute(
                select(func.count()).where(history.c.is_target, history.c.run_id == run_id)
            ).scalar_one()
        )
    return PublishResult(rows, targets, time.perf_counter() - started)


def _append_history(engine: Engine, tables: WarehouseTables, ranked, run_id: str) -> int:
    columns = [c.name for c in tables.history.columns]
    with engine.begin() as conn:
        conn.execute(delete(tables.history).where(tables.history.c.run_id == run_id))
        return int(conn.execute(insert(tables.history).from_select(columns, ranked)).rowcount)


def _publish_sqlite(engine: Engine, tables: WarehouseTables, ranked, run_id: str) -> int:
    columns = [c.name for c in tables.scores.columns]
    with engine.begin() as conn:
        pause_at("after_staging")
        conn.execute(delete(tables.scores))
        pause_at("during_swap")
        rows = conn.execute(insert(tables.scores).from_select(columns, ranked)).rowcount
        conn.execute(delete(tables.history).where(tables.history.c.run_id == run_id))
        conn.execute(insert(tables.history).from_select(columns, select(*tables.scores.columns)))
        pause_at("before_commit")
    return int(rows)


def _publish_postgres(
    engine: Engine, tables: WarehouseTables, settings: Settings, ranked, run_id: str
) -> int:
    columns = [c.name for c in tables.scores.columns]
    next_table = _next_scores_table(tables)

    def build_next() -> int:
        with engine.begin() as conn:
            check_run_lock(conn, tables)
            conn.execute(text("SET LOCAL work_mem = '256MB'"))  # the ranking sort in memory
            conn.execute(text("SET LOCAL jit = off"))
            next_table.drop(conn, checkfirst=True)
            next_table.create(conn)
            rows = conn.execute(insert(next_table).from_select(columns, ranked)).rowcount
            Index(  # built once after the load: faster than maintained row by row
                f"{next_table.name}_customer"[:60], next_table.c[CUSTOMER_ID], unique=True
            ).create(conn)
            conn.execute(text(f"ANALYZE {qualified_name(conn, next_table)}"))
        return int(rows)

    rows = with_retries(build_next, settings.publish_retries, "building the new list")
    pause_at("after_staging")

    def swap() -> None:
        with engine.begin() as conn:
            conn.execute(text(f"SET LOCAL lock_timeout = {int(settings.lock_timeout_ms)}"))
            check_run_lock(conn, tables)
            conn.execute(delete(tables.history).where(tables.history.c.run_id == run_id))
            conn.execute(insert(tables.history).from_select(columns, select(*next_table.columns)))
            live = qualified_name(conn, tables.scores)
            old_name = f"{tables.scores.name}_old"[:60]
            preparer = conn.dialect.identifier_preparer
            relations = [live, *(_in_schema(conn, tables, view) for view in VIEW_NAMES)]
            grants = {relation: _relation_grants(conn, relation) for relation in relations}
            drop_views(conn, tables)
            conn.execute(text(f"DROP TABLE IF EXISTS {_in_schema(conn, tables, old_name)}"))
            conn.execute(text(f"ALTER TABLE IF EXISTS {live} RENAME TO {preparer.quote(old_name)}"))
            pause_at("during_swap")
            conn.execute(
                text(
                    f"ALTER TABLE {qualified_name(conn, next_table)} "
                    f"RENAME TO {preparer.quote(tables.scores.name)}"
                )
            )
            conn.execute(text(f"DROP TABLE IF EXISTS {_in_schema(conn, tables, old_name)}"))
            index_name = f"{tables.scores.name}_customer"[:60]
            conn.execute(text(f"DROP INDEX IF EXISTS {_in_schema(conn, tables, index_name)}"))
            conn.execute(
                text(
                    f"ALTER INDEX {_in_schema(conn, tables, f'{next_table.name}_customer'[:60])} "
                    f"RENAME TO {preparer.quote(index_name)}"
                )
            )
            create_views(conn, tables)
            for relation, granted in grants.items():
                _grant(conn, relation, granted)
            check_run_lock(conn, tables)
            pause_at("before_commit")

    with_retries(swap, settings.publish_retries, "swapping in the new list")
    return rows


GRANTABLE_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
)
_GRANTS_SQL = text(
    "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE r.rolname END AS grantee, "
    "a.privilege_type, a.is_grantable "
    "FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a "
    "LEFT JOIN pg_roles AS r ON r.oid = a.grantee "
    "WHERE c.oid = to_regclass(:relation) AND a.grantee <> c.relowner"
)


def _relation_grants(conn: Connection, relation: str) -> list[tuple[str | None, str, bool]]:
    """Privileges granted on a table or view to roles other than its owner (None = PUBLIC)."""
    rows = conn.execute(_GRANTS_SQL, {"relation": relation}).all()
    return [(row.grantee, row.privilege_type, bool(row.is_grantable)) for row in rows]


def _grant(conn: Connection, relation: str, grants: list[tuple[str | None, str, bool]]) -> None:
    """Give the swapped-in table (or recreated view) the privileges its predecessor had."""
    preparer = conn.dialect.identifier_preparer
    for grantee, privilege, grantable in grants:
        if privilege not in GRANTABLE_PRIVILEGES:
            continue
        role = "PUBLIC" if grantee is None else preparer.quote_identifier(grantee)
        option = " WITH GRANT OPTION" if grantable and grantee is not None else ""
        conn.execute(text(f"GRANT {privilege} ON {relation} TO {role}{option}"))


def _in_schema(conn: Connection, tables: WarehouseTables, name: str) -> str:
    preparer = conn.dialect.identifier_preparer
    schema = tables.metadata.schema
    return (
        f"{preparer.quote_schema(schema)}.{preparer.quote(name)}"
        if schema
        else preparer.quote(name)
    )


def previous_published_run(engine: Engine, tables: WarehouseTables, run_id: str) -> str | None:
    """The run id of the latest published run other than `run_id`."""
    runs = tables.runs
    with engine.connect() as conn:
        return conn.execute(
            select(runs.c.run_id)
            .where(runs.c.published, runs.c.run_id != run_id)
            .order_by(runs.c.finished_at.desc())
            .limit(1)
        ).scalar_one_or_none()


def decile_change_share(engine: Engine, tables: WarehouseTables, run_id: str) -> float | None:
    """Share of customers in this run and the previous published one whose decile changed."""
    previous = previous_published_run(engine, tables, run_id)
    if previous is None:
        return None
    with engine.connect() as conn:
        both, moved = conn.execute(
            text(render_sql("scoring/decile_change", conn, tables)),
            {"run_id": run_id, "previous_run_id": previous},
        ).one()
    return None if not both else float(moved) / float(both)
