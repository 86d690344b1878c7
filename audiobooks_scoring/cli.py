"""The `audiobooks-scoring` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table as RichTable

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

app = typer.Typer(no_args_is_help=True, help="Score audiobook customers' chance to buy again.")
models_app = typer.Typer(no_args_is_help=True, help="List, inspect, promote and roll back models.")
app.add_typer(models_app, name="models")
console = Console()
logger = logging.getLogger("audiobooks_scoring")

AsOf = Annotated[
    str | None, typer.Option("--as-of", help="Scoring/training date YYYY-MM-DD (default: today).")
]


def _date(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date in YYYY-MM-DD form") from None


def _settings():
    from pydantic import ValidationError

    from audiobooks_scoring.settings import load_settings

    try:
        return load_settings()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in error.errors()
        )
        console.print(f"[red]invalid settings[/red]: {problems}")
        raise typer.Exit(2) from None


@contextmanager
def progress_bars() -> Iterator[None]:
    """Show the library's progress reports as bars on stderr while the block runs."""
    from audiobooks_scoring import progress

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bars:
        tasks: dict[str, TaskID] = {}

        def show(task: str, done: float, total: float) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)

        with progress.listening(show):
            yield


@contextmanager
def refused_run() -> Iterator[None]:
    """A scoring run that refuses its model or inputs: one line naming why, exit code 1.

    A tampered or unsafe champion, a missing column or a failed run gate is an expected
    outcome of a run, not a crash: the run is already `failed` in the ledger with this
    message, and Prefect has logged the traceback.
    """
    from rich.markup import escape

    from audiobooks_scoring.contract import ContractError
    from audiobooks_scoring.model.store import ModelStoreError
    from audiobooks_scoring.scoring.gates import RunGateError

    try:
        yield
    except (ModelStoreError, ContractError, RunGateError) as error:
        console.print(f"[red]scoring run failed[/red]: {escape(str(error))}")
        raise typer.Exit(1) from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Nightly scoring of the audiobook customer base, published to the warehouse."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("httpx", "prefect.server", "prefect.task_runs", "alembic", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for noisy in ("absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
def init() -> None:
    """Create the warehouse tables and marketing views if they are missing."""
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    warehouse = init_warehouse(settings)
    console.print(f"warehouse ready: {settings.warehouse_url_safe}")
    for table in warehouse.tables.metadata.sorted_tables:
        console.print(f"  {table.name}")


@app.command("load-csv")
def load_csv(
    path: Path,
    window_end: Annotated[
        str | None, typer.Option(help="window_end of these examples (default: today).")
    ] = None,
) -> None:
    """Load a CSV in the public Audiobooks format (with or without header) as training examples."""
    from audiobooks_scoring.inputs.csv_file import CsvFormatError
    from audiobooks_scoring.inputs.loading import load_csv as load
    from audiobooks_scoring.settings import local_today
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    warehouse = init_warehouse(settings)
    try:
        rows = load(warehouse, path, _date(window_end) or local_today(settings))
    except (CsvFormatError, FileNotFoundError) as error:
        console.print(f"[red]not loaded[/red]: {error}")
        raise typer.Exit(1) from None
    console.print(f"loaded {rows} training examples from {path}")


@app.command("demo-data")
def demo_data(
    customers: Annotated[int, typer.Option(min=1)] = 20_000,
    seed: int = 7,
    as_of: AsOf = None,
) -> None:
    """Fill both input tables with synthetic customers that look like the real data set."""
    from audiobooks_scoring.inputs.loading import load_demo_data
    from audiobooks_scoring.settings import local_today
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    warehouse = init_warehouse(settings)
    with progress_bars():
        result = load_demo_data(
            warehouse, customers, seed, _date(as_of) or local_today(settings), settings.chunk_size
        )
    console.print(
        f"demo data: {result.training_rows} training examples, "
        f"{result.activity_rows} customers to score"
    )


@app.command()
def train(
    as_of: AsOf = None,
    recipe: Annotated[str | None, typer.Option(help="default or seeds")] = None,
    seed: int | None = None,
    force: Annotated[bool, typer.Option(help="Promote even if not better.")] = False,
) -> None:
    """Run the retrain-model flow: train a challenger and promote it if it is not worse."""
    from audiobooks_scoring.flows.retrain_model import retrain_model

    _settings()
    version = retrain_model(as_of=_date(as_of), recipe=recipe, seed=seed, force=force)
    _print_versions()
    console.print(f"trained model {version}")


@app.command()
def evaluate(
    csv: Annotated[Path | None, typer.Option(help="Labeled CSV (public format).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "1,2,3,4,5",
    recipes: Annotated[
        str, typer.Option(help="Comma-separated recipes.")
    ] = "default,seeds,logistic",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare recipes by repeated stratified test splits on a CSV or the training source."""
    from audiobooks_scoring.model.evaluation import run_evaluation_protocol, summarize_protocol

    settings = _settings()
    if csv is not None:
        from audiobooks_scoring.inputs.csv_file import read_audiobooks_csv
        from audiobooks_scoring.model.lifecycle import training_data_from_frame

        data = training_data_from_frame(read_audiobooks_csv(csv, date.today()))
    else:
        from audiobooks_scoring.model.lifecycle import read_training_data
        from audiobooks_scoring.warehouse import init_warehouse

        warehouse = init_warehouse(settings)
        data = read_training_data(warehouse, date.today(), settings.chunk_size)
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    with progress_bars():
        result = run_evaluation_protocol(
            data.features, data.labels, seed_list, [r.strip() for r in recipes.split(",")]
        )
    summary = summarize_protocol(result)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    table = RichTable(
        title=f"Repeated test splits, {len(seed_list)} seeds, {len(data.labels)} rows"
    )
    for column in ("recipe", "auc", "balanced_accuracy", "brier", "lift_top_decile"):
        table.add_column(column)
    for name, metrics in summary["recipes"].items():
        stds = result["recipes"][name].get("std", {}) if "recipes" in result else {}
        table.add_row(
            name,
            *[
                _mean_std(metrics.get(key), (stds or {}).get(key))
                for key in ("auc", "balanced_accuracy", "brier", "lift_top_decile")
            ],
        )
    console.print(table)


def _mean_std(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if isinstance(std, float) else "")


def _print_versions() -> None:
    from audiobooks_scoring.model.store import ModelStore

    store = ModelStore(_settings().model_store_path)
    table = RichTable(title=f"Models in {store.root}")
    for column in ("version", "status", "created", "auc", "brier", "balanced acc."):
        table.add_column(column)
    for info in store.list_versions():
        m = info.metrics
        table.add_row(
            info.version,
            info.status or "-",
            info.created_at[:19],
            *[
                f"{m[k]:.4f}" if m.get(k) is not None else "-"
                for k in ("auc", "brier", "balanced_accuracy")
            ],
        )
    console.print(table)


@models_app.command("list")
def models_list() -> None:
    """List stored model versions, newest first, with status and test-split metrics."""
    _print_versions()


@models_app.command("show")
def models_show(version: str) -> None:
    """Show a version's metadata: metrics, importance, training data, libraries."""
    from audiobooks_scoring.model.store import ModelStore, ModelStoreError

    store = ModelStore(_settings().model_store_path)
    try:
        metadata = store.read_metadata(version)
        store.verify_version(version)
    except ModelStoreError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    metadata = {k: v for k, v in metadata.items() if k != "training_profile"}
    metadata["status"] = store.status_of(version)
    console.print_json(json.dumps(metadata, default=str))


@models_app.command("promote")
def models_promote(
    version: str, reason: Annotated[str, typer.Option()] = "promoted by hand"
) -> None:
    """Make a version the champion (the current one is retired)."""
    _change_champion(lambda store: store.promote(version, reason) or version)


@models_app.command("rollback")
def models_rollback(reason: Annotated[str, typer.Option()] = "rolled back by hand") -> None:
    """Restore the previous champion."""
    _change_champion(lambda store: store.rollback(reason))


def _change_champion(change) -> None:
    from audiobooks_scoring.model.lifecycle import mirror_model_versions
    from audiobooks_scoring.model.store import ModelStore, ModelStoreError
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    store = ModelStore(settings.model_store_path)
    try:
        version = change(store)
    except ModelStoreError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    warehouse = init_warehouse(settings)
    mirror_model_versions(warehouse, store)
    console.print(f"champion is now {version}")


@app.command()
def score(
    as_of: AsOf = None,
    run_id: Annotated[str | None, typer.Option(help="Default: score-<as-of>.")] = None,
    backfill: Annotated[
        bool, typer.Option(help="Write history only; leave the current list alone.")
    ] = False,
) -> None:
    """Run the score-customers flow: score everyone and publish the ranked target list."""
    from audiobooks_scoring.flows.score_customers import score_customers

    _settings()
    with refused_run(), progress_bars():
        outcome = score_customers(as_of=_date(as_of), run_id=run_id, publish=not backfill)
    _print_outcome(outcome)


def _print_outcome(outcome) -> None:
    if isinstance(outcome, dict):
        console.print_json(json.dumps(outcome, default=str))
        return
    message = getattr(outcome, "message", None) or str(outcome)
    console.print(f"[yellow]{message}[/yellow]")
    raise typer.Exit(3)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=1000)] = 20_000,
    top: Annotated[int, typer.Option(min=1)] = 10,
) -> None:
    """Run the whole job on the configured warehouse: tables, demo data, model, scores."""
    from audiobooks_scoring.flows.retrain_model import retrain_model
    from audiobooks_scoring.flows.score_customers import score_customers
    from audiobooks_scoring.inputs.demo_outcomes import earlier_run_date, load_demo_earlier_window
    from audiobooks_scoring.inputs.loading import input_row_counts, load_demo_data
    from audiobooks_scoring.model.store import ModelStore
    from audiobooks_scoring.settings import local_today
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    warehouse = init_warehouse(settings)
    console.rule(f"warehouse {settings.warehouse_url_safe}")
    today = local_today(settings)
    counts = input_row_counts(warehouse)
    if counts.training_rows == 0 or counts.activity_rows == 0:
        with progress_bars():
            result = load_demo_data(warehouse, customers, 7, today, settings.chunk_size)
            load_demo_earlier_window(
                warehouse, customers, 7, earlier_run_date(today), settings.chunk_size
            )
        console.print(
            f"loaded demo data: {result.training_rows} training examples, "
            f"{result.activity_rows} customers to score (and the same activity dated "
            f"{earlier_run_date(today)}, for an earlier run)"
        )
    else:
        console.print(
            f"input tables already filled: {counts.training_rows} training examples, "
            f"{counts.activity_rows} activity rows"
        )
    if ModelStore(settings.model_store_path).champion() is None:
        console.rule("training the first model")
        retrain_model()
    console.rule("scoring")
    with refused_run(), progress_bars():
        outcome = score_customers()
    if not isinstance(outcome, dict):
        _print_outcome(outcome)
        return
    _print_top(warehouse, top)
    console.print(
        f"\nrun {outcome['run_id']}: {outcome['rows_in']} customers in, "
        f"{outcome['rows_scored']} scored, {outcome['rows_rejected']} rejected, "
        f"{outcome.get('targets')} targets; model {outcome['model_version']}"
    )
    console.print(
        f"target list: table [bold]{warehouse.tables.scores.name}[/bold] and view "
        f"[bold]campaign_targets[/bold] in {settings.warehouse_url_safe}"
    )
    console.print(f"report: {outcome.get('report_path')}")
    _demo_closing_the_loop(settings, warehouse)


def _demo_closing_the_loop(settings, warehouse) -> None:
    """Score an earlier run, simulate its customers' purchases, measure what it achieved."""
    from sqlalchemy import func, select

    from audiobooks_scoring.flows.measure_outcomes import measure_outcomes
    from audiobooks_scoring.flows.score_customers import score_customers
    from audiobooks_scoring.inputs.demo_outcomes import (
        earlier_run_date,
        has_window_on_or_before,
        load_demo_purchases,
    )
    from audiobooks_scoring.outcomes.loop import read_outcome_ledger
    from audiobooks_scoring.settings import local_today

    today = local_today(settings)
    earlier = earlier_run_date(today)
    console.rule("closing the loop: what an earlier list achieved")
    purchases = warehouse.tables.purchases
    with warehouse.engine.connect() as conn:
        has_purchases = bool(conn.execute(select(func.count()).select_from(purchases)).scalar())
    simulated = None
    if has_purchases:
        console.print(f"{purchases.name} already holds purchases: measuring them")
    elif not has_window_on_or_before(warehouse, earlier):
        console.print(f"no activity window on or before {earlier}: no earlier run to measure")
    else:
        with progress_bars():
            earlier_run = score_customers(as_of=earlier, publish=False)
        if not isinstance(earlier_run, dict):
            _print_outcome(earlier_run)
            return
        simulated = load_demo_purchases(
            warehouse, earlier_run["run_id"], earlier, settings.outcome_horizon_days
        )
        console.print(
            f"backfilled run {earlier_run['run_id']} ({earlier_run.get('targets')} targets) and "
            f"simulated {len(simulated.frame)} purchases in its {settings.outcome_horizon_days}"
            f"-day horizon; simulated campaign effect: {simulated.describe()}"
        )
    measured = measure_outcomes(as_of=today)
    ledger = read_outcome_ledger(warehouse)
    if ledger.empty:
        console.print("no run had outcomes to measure yet")
        return
    _print_outcomes(ledger)
    for row in ledger.to_dict("records"):
        if row["uplift"] is None or row["uplift"] != row["uplift"]:
            continue
        console.print(
            f"run {row['run_id']}: measured uplift "
            f"{_uplift_text(row['uplift'], row['uplift_ci_low'], row['uplift_ci_high'])} "
            f"points (95% interval), {row['targeted']} targeted against {row['control']} "
            f"comparable control customers"
            + (f"; simulated: {simulated.describe()}" if simulated is not None else "")
        )
    console.print(f"outcomes report: {measured['report_path']}")


def _print_top(warehouse, top: int) -> None:
    from sqlalchemy import select

    from audiobooks_scoring.warehouse import reasons_column

    scores = warehouse.tables.scores
    frame = warehouse.read_frame(
        select(
            scores.c.rank,
            scores.c.customer_id,
            scores.c.probability,
            scores.c.decile,
            scores.c.is_target,
            scores.c.holdout,
            reasons_column(),
        )
        .order_by(scores.c.rank)
        .limit(top),
    )
    table = RichTable(title=f"Top {top} of {scores.name}")
    for column in frame.columns:
        table.add_column(column)
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=max(console.width, 150)).print(table)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(min=1)] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List recent scoring runs from the run ledger."""
    from sqlalchemy import select

    from audiobooks_scoring.warehouse import init_warehouse

    warehouse = init_warehouse(_settings())
    ledger = warehouse.tables.runs
    frame = warehouse.read_frame(select(ledger).order_by(ledger.c.started_at.desc()).limit(limit))
    records = json.loads(frame.to_json(orient="records", date_format="iso"))
    if as_json:
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
        return
    columns = (
        "run_id",
        "status",
        "started_at",
        "model_version",
        "rows_in",
        "rows_scored",
        "rows_rejected",
        "targets",
        "drift_status",
    )
    table = RichTable(title="Recent scoring runs")
    for column in columns:
        table.add_column(column)
    for record in records:
        table.add_row(*[str(record.get(c)) for c in columns])
    console.print(table)


@app.command()
def outcomes(
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Measurement date YYYY-MM-DD (default: today).")
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Measure this run only (again, even if final).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the measure-outcomes flow: what each published list achieved against the holdout."""
    from audiobooks_scoring.flows.measure_outcomes import measure_outcomes
    from audiobooks_scoring.outcomes.loop import (
        OutcomesError,
        ledger_summaries,
        read_outcome_ledger,
    )
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    try:
        result = measure_outcomes(as_of=_date(as_of), run_id=run_id)
    except OutcomesError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    ledger = read_outcome_ledger(init_warehouse(settings), run_id)
    if as_json:
        sys.stdout.write(json.dumps({"runs": ledger_summaries(ledger)}, indent=2) + "\n")
        return
    _print_outcomes(ledger)
    console.print(
        f"measured {len(result['runs'])} run(s) on {result['measured_on']}; "
        f"report: {result['report_path']}"
    )
    for decayed in result["decay_alerts"]:
        console.print(f"[red]performance decay[/red] in run {decayed}: see the report")


def _print_outcomes(ledger) -> None:
    table = RichTable(title="What each published list achieved (run_outcomes)")
    headers = (
        "run",
        "as of",
        "maturity",
        "status",
        "targeted",
        "rate",
        "control",
        "rate",
        "uplift, points [95% CI]",
        "extra buyers",
        "AUC",
        "promised",
        "Brier",
    )
    for header in headers:
        table.add_column(header, no_wrap=True)
    notes = []
    for row in ledger.to_dict("records"):
        table.add_row(
            str(row["run_id"]),
            str(row["as_of"])[:10],
            _number(row["maturity"], ".2f"),
            str(row["status"]),
            str(row["targeted"]),
            _number(row["targeted_rate"], ".4f"),
            str(row["control"]),
            _number(row["control_rate"], ".4f"),
            _uplift_text(row["uplift"], row["uplift_ci_low"], row["uplift_ci_high"]),
            _number(row["incremental_conversions"], ".1f"),
            _number(row["realized_auc"], ".4f"),
            _number(row["expected_auc"], ".4f"),
            _number(row["brier"], ".4f"),
        )
        for note in (row["uplift_note"], row["reason"]):
            if isinstance(note, str) and note:
                notes.append(f"{row['run_id']}: {note}")
    Console(width=max(console.width, 170)).print(table)
    for note in notes:
        console.print(note)


def _number(value, spec: str) -> str:
    if value is None or value != value:
        return "-"
    return format(float(value), spec)


def _uplift_text(uplift, low, high) -> str:
    if uplift is None or uplift != uplift:
        return "-"
    return f"{100 * uplift:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="File to write.")],
    format: Annotated[str, typer.Option(help="csv or parquet")] = "csv",
) -> None:
    """Write the current campaign targets (id, probability, rank, decile, reasons) to a file."""
    from audiobooks_scoring.reporting.export import export_targets
    from audiobooks_scoring.warehouse import init_warehouse

    settings = _settings()
    if format not in ("csv", "parquet"):
        raise typer.BadParameter("format must be csv or parquet")
    rows = export_targets(init_warehouse(settings), out, format, settings.chunk_size)
    console.print(f"wrote {rows} targets to {out}")


@app.command()
def bench(
    customers: Annotated[int, typer.Option(min=1000)] = 1_000_000,
    warehouse: Annotated[
        str | None, typer.Option(help="Warehouse URL (default: the configured one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    repeats: Annotated[
        int, typer.Option(min=1, help="Rounds of floor, pipeline and naive; best kept.")
    ] = 3,
) -> None:
    """Measure the floor, the pipeline and a naive notebook pipeline on one population."""
    from audiobooks_scoring.bench import run_bench

    settings = _settings()
    if warehouse:
        settings = settings.model_copy(update={"warehouse_url": SecretStr(warehouse)})
    with progress_bars():
        report = run_bench(settings, customers, repeats)
    if as_json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        console.print(report.describe())


@app.command()
def serve() -> None:
    """Serve the deployments (nightly scoring, on-demand retrain, weekly outcomes) here."""
    from audiobooks_scoring.deployments.serve import serve_deployments

    serve_deployments()


if __name__ == "__main__":
    app()
