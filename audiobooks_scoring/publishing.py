"""Publication: the one-run-at-a-time lock, the run ledger, building and swapping in the list.

Decisions (each covered by tests/test_reliability_*.py):
- A run's list is built as `<scores>_next` beside the live one: from sorted runs merged on
  the scoring machine (one process) or ranked in the warehouse from staging (partitions).
  Customer ids are checked unique before it is published (spilled ids, or a query).
- PostgreSQL: the history is partitioned by run id and every run's list is written once.
  The built table holds the ranked columns; the run's constants are catalog defaults. The
  swap, one transaction under `SET LOCAL lock_timeout`, renames the live table to its history
  partition name, renames the built table to `customer_scores` and attaches it as the run's
  history partition; a re-run replaces its own partition. A reader's long transaction delays
  the swap by at most the lock timeout per attempt, and readers always see one whole list.
  SQLite copies the built rows into the list and the history in one transaction.
- A killed run leaves at most `<scores>_next`, staged rows or spill files, which the next
  run replaces; its ledger row, still `running`, is marked `abandoned` by the next run.
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
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
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
from audiobooks_scoring.ranking import (
    SortedRuns,
    campaign_limit,
    decile_bounds,
    ranked_columns,
)
from audiobooks_scoring.scoring import (
    RunGateError,
    StageResult,
    check_run_gates,
    reject_duplicates,
)
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import (
    RANKED_COLUMNS,
    VIEW_NAMES,
    WarehouseTables,
    bulk_writer,
    create_views,
    drop_views,
    is_postgres,
    qualified_name,
    render_sql,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
LIST_WRITERS = 2
LIST_STATISTICS_TARGET = 10  # ANALYZE samples 300 rows per unit of target

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
            "publishing needs the run lock: build and publish the list inside `with RunLock(...)`"
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


@dataclass(frozen=True)
class TargetList:
    """A run's ranked list, built beside the live one and not yet published."""

    run_id: str
    rows: int
    targets: int
    duplicates: int
    seconds: float


class DuplicateCustomers(RuntimeError):
    """The scored rows hold a customer id more than once."""


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
    limit = campaign_limit(settings, non_holdout_count)
    if limit is None:
        return probability >= settings.campaign_value
    return campaign_rank <= limit


def ranked_scores_select(
    tables: WarehouseTables,
    settings: Settings,
    run_id: str,
    population: int,
    non_holdout_count: int,
):
    """SELECT of a run's staged rows with rank, decile and target flag (one sort, one window).

    Rank is 1 for the most likely buyer (ties: lower customer id first); deciles are
    `ntile(10)` of the rank, computed from the known population.
    """
    staging = tables.staging
    order = (staging.c.probability.desc(), staging.c[CUSTOMER_ID].asc())
    running = {"order_by": order, "rows": (None, 0)}
    ranked = (
        select(
            staging.c[CUSTOMER_ID],
            staging.c[WINDOW_END],
            staging.c.probability,
            staging.c.holdout,
            staging.c.reason_1,
            staging.c.reason_2,
            staging.c.reason_3,
            func.count().over(**running).label("rank"),
            func.count().filter(not_(staging.c.holdout)).over(**running).label("campaign_rank"),
        )
        .where(staging.c.run_id == run_id)
        .subquery("ranked")
    )
    decile = case(
        *[
            (ranked.c.rank <= bound, index + 1)
            for index, bound in enumerate(decile_bounds(population))
        ],
        else_=10,
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
        decile.label("decile"),
        case((is_target, True), else_=False).label("is_target"),
        ranked.c.holdout,
        ranked.c.reason_1,
        ranked.c.reason_2,
        ranked.c.reason_3,
    )


def next_scores_table(tables: WarehouseTables, narrow: bool) -> Table:
    """`<scores>_next`, where a run's list is built; `narrow`: without the run's constants."""
    metadata = MetaData(schema=tables.metadata.schema)
    wanted = RANKED_COLUMNS if narrow else [c.name for c in tables.scores.columns]
    return Table(
        f"{tables.scores.name}_next"[:60],
        metadata,
        *[
            Column(c.name, c.type, nullable=c.nullable)
            for c in tables.scores.columns
            if c.name in wanted
        ],
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


def count_staged(engine: Engine, tables: WarehouseTables, run_id: str) -> tuple[int, int]:
    """Staged rows of a run, and how many of them are not in the holdout."""
    staging = tables.staging
    with engine.connect() as conn:
        total, non_holdout = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((not_(staging.c.holdout), 1), else_=0)), 0),
            ).where(staging.c.run_id == run_id)
        ).one()
    return int(total), int(non_holdout)


def _failed_publication(error: DBAPIError, settings: Settings, run_id: str, what: str) -> Exception:
    kind = (
        f"transient error still failing after {settings.publish_retries} retries"
        if is_transient(error)
        else "error that is not retried"
    )
    first_line = (str(error.orig).strip().splitlines() or ["?"])[0]
    return PublicationError(
        f"run {run_id} was not {what} ({kind}: {type(error.orig).__name__}: "
        f"{first_line}); the previous list is untouched"
    )


def build_target_list(
    engine: Engine,
    tables: WarehouseTables,
    settings: Settings,
    run_id: str,
    model_version: str,
    scored_at: datetime,
    as_of: date,
    runs: SortedRuns | None = None,
) -> TargetList:
    """Rank the run's scored rows into `<scores>_next`, beside the live list, ready to publish.

    Rows spilled as sorted `runs` are merged on this machine and written once, in rank
    order (their reason codes computed on the way); otherwise the warehouse ranks the staged
    rows (partitioned runs). Customer ids are checked to be unique (a merge of the spilled
    ids, or a query of the built list; the `customer_index` setting adds a unique index):
    when one repeats, every copy of it is moved to `rejected_rows` and the list is built
    again from staging. On PostgreSQL the table holds the ranked columns only; the run's
    constants (model version, run id, scored at) are catalog defaults, not in every row.
    """
    started = time.perf_counter()
    constants = {"model_version": model_version, "run_id": run_id, "scored_at": scored_at}
    if runs is not None:
        try:
            rows, targets = with_retries(
                lambda: _build_from_runs(engine, tables, settings, runs, constants),
                settings.publish_retries,
                "building the new list",
            )
            runs.remove()
            return TargetList(run_id, rows, targets, 0, time.perf_counter() - started)
        except DuplicateCustomers:
            logger.warning("a customer id was scored twice; ranking again in the warehouse")
            _stage_runs(engine, tables, runs, run_id)
            runs.remove()
        except DBAPIError as error:
            raise _failed_publication(error, settings, run_id, "built") from error
    build = (
        partial(_build_postgres, customer_index=settings.customer_index)
        if is_postgres(engine)
        else _build_sqlite
    )
    duplicates = 0
    for attempt in range(2):
        population, non_holdout = count_staged(engine, tables, run_id)
        ranked = ranked_scores_select(tables, settings, run_id, population, non_holdout)
        try:
            rows, targets = with_retries(
                lambda ranked=ranked: build(engine, tables, ranked, constants),
                settings.publish_retries,
                "building the new list",
            )
            break
        except DuplicateCustomers:
            if attempt:
                raise
            duplicates = reject_duplicates(engine, tables, run_id, as_of, settings.chunk_size)
        except DBAPIError as error:
            raise _failed_publication(error, settings, run_id, "built") from error
    return TargetList(run_id, rows, targets, duplicates, time.perf_counter() - started)


def _build_from_runs(
    engine: Engine,
    tables: WarehouseTables,
    settings: Settings,
    runs: SortedRuns,
    constants: dict[str, Any],
) -> tuple[int, int]:
    if runs.repeats_customer_ids():
        raise DuplicateCustomers("a customer id was scored twice")
    postgres = is_postgres(engine)
    next_table = next_scores_table(tables, narrow=postgres)
    with engine.begin() as conn:
        check_run_lock(conn, tables)
        next_table.drop(conn, checkfirst=True)
        next_table.create(conn)
    rows = targets = 0
    with ExitStack() as stack:
        # Two COPY sessions on PostgreSQL: the server ingests with two backends at once.
        writers = [
            stack.enter_context(bulk_writer(engine, next_table))
            for _ in range(LIST_WRITERS if postgres else 1)
        ]
        for batch, (columns, count) in enumerate(ranked_columns(runs, settings)):
            if not postgres:
                columns.update(constants)
            writers[batch % len(writers)].write(columns, count)
            rows += count
            targets += int(np.count_nonzero(columns["is_target"]))
    with engine.begin() as conn:
        check_run_lock(conn, tables)
        if postgres:
            _add_run_constants(conn, tables, next_table, constants)
            if settings.customer_index:
                _create_customer_index(conn, next_table)
            _analyze_list(conn, next_table)
    return rows, targets


def _stage_runs(engine: Engine, tables: WarehouseTables, runs: SortedRuns, run_id: str) -> None:
    """Copy spilled rows into the staging table (to rank them in the warehouse instead)."""
    with bulk_writer(engine, tables.staging) as writer:
        for block in runs.merged():
            columns = runs.columns_of(block)
            writer.write({**columns, "run_id": run_id, "partition_no": 0}, len(block))


def _unique_violation(error: DBAPIError) -> bool:
    state = _sqlstate(error)
    if state:
        return state == "23505"
    return "unique" in str(getattr(error, "orig", error)).lower()


def _check_unique_customers(conn: Connection, table: Table) -> None:
    """Raise `DuplicateCustomers` when a customer id is in the built list twice."""
    repeated = conn.execute(
        select(table.c[CUSTOMER_ID])
        .group_by(table.c[CUSTOMER_ID])
        .having(func.count() > 1)
        .limit(1)
    ).first()
    if repeated is not None:
        raise DuplicateCustomers(f"{table.name}: a customer id is staged twice")


def _create_customer_index(conn: Connection, table: Table) -> None:
    try:
        with conn.begin_nested():
            Index(f"{table.name}_customer"[:60], table.c[CUSTOMER_ID], unique=True).create(conn)
    except DBAPIError as error:
        if _unique_violation(error):
            raise DuplicateCustomers(f"{table.name}: a customer id is staged twice") from error
        raise


def _analyze_list(conn: Connection, table: Table) -> None:
    """Planner statistics of a new list, from a 3,000-row sample (flags, codes, deciles, ids)."""
    conn.execute(text(f"SET LOCAL default_statistics_target = {LIST_STATISTICS_TARGET}"))
    conn.execute(text(f"ANALYZE {qualified_name(conn, table)}"))


def _count_targets(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).where(table.c.is_target)).scalar_one())


def _build_postgres(
    engine: Engine,
    tables: WarehouseTables,
    ranked,
    constants: dict[str, Any],
    customer_index: bool,
) -> tuple[int, int]:
    next_table = next_scores_table(tables, narrow=True)
    with engine.begin() as conn:
        check_run_lock(conn, tables)
        conn.execute(text("SET LOCAL work_mem = '256MB'"))  # the ranking sort in memory
        conn.execute(text("SET LOCAL jit = off"))
        next_table.drop(conn, checkfirst=True)
        next_table.create(conn)
        rows = conn.execute(insert(next_table).from_select(RANKED_COLUMNS, ranked)).rowcount
        _add_run_constants(conn, tables, next_table, constants)
        if customer_index:
            _create_customer_index(conn, next_table)
        else:
            _check_unique_customers(conn, next_table)
        targets = _count_targets(conn, next_table)
        _analyze_list(conn, next_table)
    return int(rows), targets


def _add_run_constants(
    conn: Connection, tables: WarehouseTables, table: Table, constants: dict[str, Any]
) -> None:
    """Add the run's constant columns as catalog defaults (no rewrite) and the partition check."""
    name = qualified_name(conn, table)
    preparer = conn.dialect.identifier_preparer
    literals = {
        column: _literal(conn, tables, column, value) for column, value in constants.items()
    }
    added = ", ".join(
        f"ADD COLUMN {preparer.quote(column)} "
        f"{tables.scores.c[column].type.compile(dialect=conn.dialect)} NOT NULL DEFAULT {value}"
        for column, value in literals.items()
    )
    check = preparer.quote(f"{table.name}_run"[:60])
    conn.execute(
        text(
            f"ALTER TABLE {name} {added}, "
            f"ADD CONSTRAINT {check} CHECK (run_id = {literals['run_id']})"
        )
    )
    dropped = ", ".join(
        f"ALTER COLUMN {preparer.quote(column)} DROP DEFAULT" for column in literals
    )
    conn.execute(text(f"ALTER TABLE {name} {dropped}"))


def _literal(conn: Connection, tables: WarehouseTables, column: str, value: Any) -> str:
    return str(
        literal(value, type_=tables.scores.c[column].type).compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True}
        )
    )


def _build_sqlite(
    engine: Engine, tables: WarehouseTables, ranked, constants: dict[str, Any]
) -> tuple[int, int]:
    next_table = next_scores_table(tables, narrow=False)
    with_constants = ranked.add_columns(
        *[
            literal(value, type_=tables.scores.c[name].type).label(name)
            for name, value in constants.items()
        ]
    )
    with engine.begin() as conn:
        next_table.drop(conn, checkfirst=True)
        next_table.create(conn)
        columns = [c.name for c in next_table.columns]
        rows = conn.execute(insert(next_table).from_select(columns, with_constants)).rowcount
        _create_customer_index(conn, next_table)
        targets = _count_targets(conn, next_table)
    return int(rows), targets


def discard_target_list(engine: Engine, tables: WarehouseTables) -> None:
    """Drop a built but unpublished list (a run that fails its gates publishes nothing)."""
    with engine.begin() as conn:
        next_scores_table(tables, narrow=True).drop(conn, checkfirst=True)


def check_gates_of_built_list(
    engine: Engine, tables: WarehouseTables, result: StageResult, settings: Settings
) -> None:
    """Raise `RunGateError` when the run fails its gates, after dropping its built list."""
    try:
        check_run_gates(result, settings.max_reject_share)
    except RunGateError:
        discard_target_list(engine, tables)
        raise


def publish_target_list(
    engine: Engine,
    tables: WarehouseTables,
    settings: Settings,
    built: TargetList,
    replace_current: bool = True,
) -> PublishResult:
    """Swap the built list in as `customer_scores` and into history (a backfill: history only)."""
    started = time.perf_counter()
    swap = _swap_postgres if is_postgres(engine) else _swap_sqlite
    try:
        with_retries(
            lambda: swap(engine, tables, settings, built.run_id, replace_current),
            settings.publish_retries,
            "swapping in the new list",
        )
    except DBAPIError as error:
        raise _failed_publication(error, settings, built.run_id, "published") from error
    return PublishResult(built.rows, built.targets, built.seconds + time.perf_counter() - started)


def _swap_sqlite(
    engine: Engine, tables: WarehouseTables, settings: Settings, run_id: str, replace: bool
) -> None:
    next_table = next_scores_table(tables, narrow=False)
    columns = [c.name for c in tables.scores.columns]
    built = select(*[next_table.c[name] for name in columns])
    with engine.begin() as conn:
        pause_at("after_staging")
        if replace:
            conn.execute(delete(tables.scores))
            pause_at("during_swap")
            conn.execute(insert(tables.scores).from_select(columns, built))
        conn.execute(delete(tables.history).where(tables.history.c.run_id == run_id))
        conn.execute(insert(tables.history).from_select(columns, built))
        next_table.drop(conn)
        pause_at("before_commit")


_PARTITION_OF_RUN_SQL = text(
    "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass(:history) "
    "AND pg_get_expr(c.relpartbound, c.oid) = :bound"
)
_PARTITION_BOUND_SQL = text(
    "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits AS i "
    "JOIN pg_class AS c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass(:history) AND c.oid = to_regclass(:relation)"
)


def partition_bound(run_id: str) -> str:
    """The run's history partition bound, spelled as PostgreSQL prints it (`pg_get_expr`).

    Standard-conforming strings (the default): quotes are doubled, backslashes are not.
    """
    return "FOR VALUES IN ('" + run_id.replace("'", "''") + "')"


def history_partition_name(tables: WarehouseTables, bound: str) -> str:
    """The name a history partition gets once it is not the live list (from its bound)."""
    digest = hashlib.sha256(bound.encode()).hexdigest()[:12]
    return f"{tables.history.name[:48]}_{digest}"


def _swap_postgres(
    engine: Engine, tables: WarehouseTables, settings: Settings, run_id: str, replace: bool
) -> None:
    next_table = next_scores_table(tables, narrow=True)
    pause_at("after_staging")
    with engine.begin() as conn:
        conn.execute(text(f"SET LOCAL lock_timeout = {int(settings.lock_timeout_ms)}"))
        conn.execute(text("SET LOCAL standard_conforming_strings = on"))  # `partition_bound`
        check_run_lock(conn, tables)
        history = qualified_name(conn, tables.history)
        live = qualified_name(conn, tables.scores)
        built = qualified_name(conn, next_table)
        if conn.execute(text("SELECT to_regclass(:name)"), {"name": built}).scalar() is None:
            raise PublicationError(f"no built list {next_table.name} to publish for run {run_id}")
        bound = partition_bound(run_id)
        live_bound = conn.execute(
            _PARTITION_BOUND_SQL, {"history": history, "relation": live}
        ).scalar()
        replace = replace or live_bound == bound  # re-running the live run replaces it live
        relations = [live, *(_in_schema(conn, tables, view) for view in VIEW_NAMES)]
        grants = {relation: _relation_grants(conn, relation) for relation in relations}
        if replace:
            drop_views(conn, tables)
        earlier = conn.execute(_PARTITION_OF_RUN_SQL, {"history": history, "bound": bound})
        for (name,) in earlier.all():
            partition = _in_schema(conn, tables, name)
            conn.execute(text(f"ALTER TABLE {history} DETACH PARTITION {partition}"))
            conn.execute(text(f"DROP TABLE {partition}"))
        target_name = tables.scores.name if replace else history_partition_name(tables, bound)
        if replace:
            if live_bound is not None and live_bound != bound:
                _rename_with_index(
                    conn, tables, tables.scores.name, history_partition_name(tables, live_bound)
                )
            elif live_bound is None:
                conn.execute(text(f"DROP TABLE IF EXISTS {live}"))  # the empty table of init
            pause_at("during_swap")
        _rename_with_index(conn, tables, next_table.name, target_name)
        target = _in_schema(conn, tables, target_name)
        conn.execute(text(f"ALTER TABLE {history} ATTACH PARTITION {target} {bound}"))
        if replace:
            create_views(conn, tables)
            for relation, granted in grants.items():
                _grant(conn, relation, granted)
        check_run_lock(conn, tables)
        pause_at("before_commit")


def _rename_with_index(conn: Connection, tables: WarehouseTables, old: str, new: str) -> None:
    """Rename a list table and its customer index (`<name>_customer`)."""
    preparer = conn.dialect.identifier_preparer
    old_index = _in_schema(conn, tables, f"{old}_customer"[:60])
    conn.execute(
        text(
            f"ALTER INDEX IF EXISTS {old_index} RENAME TO {preparer.quote(f'{new}_customer'[:60])}"
        )
    )
    conn.execute(
        text(f"ALTER TABLE {_in_schema(conn, tables, old)} RENAME TO {preparer.quote(new)}")
    )


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
