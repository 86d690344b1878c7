"""The outcomes report: what each published list achieved, as self-contained HTML and markdown.

Charts, from the measured figures only: realized against promised calibration by decile,
cumulative gains realized against promised, uplift by targeted decile with its interval, and
the uplift of every measured run across time. "Promised" is what the model predicted for the
run's control customers (the mean probability); "realized" is what they then did.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from audiobooks_scoring.outcomes.measures import wilson_interval
from audiobooks_scoring.reporting.render import (
    ACCENT_COLOR,
    CHART_DPI,
    RUN_COLOR,
    TRAINING_COLOR,
    ReportSection,
    _new_figure,
    _style,
    _to_png,
    render_markdown_report,
    write_html_report,
)
from audiobooks_scoring.reporting.reports import RunReport
from audiobooks_scoring.settings import Settings

if TYPE_CHECKING:
    from audiobooks_scoring.outcomes.loop import RunMeasurement

DETAILED_RUNS_HTML = 6
DETAILED_RUNS_MARKDOWN = 1


# ---------------------------------------------------------------- charts


def render_outcome_calibration_png(
    deciles: Sequence[Mapping[str, Any]], dpi: int = CHART_DPI
) -> bytes:
    """Return a PNG of promised (mean predicted) and realized conversion per decile of control.

    Rows need "decile", "mean_predicted", "observed_rate" and "control_customers"; the
    realized bars carry their 95% Wilson interval.
    """
    rows = [row for row in deciles if row.get("control_customers")]
    if not rows:
        raise ValueError("a calibration chart needs deciles with control customers")
    positions = np.arange(len(rows))
    promised = np.array([float(row["mean_predicted"]) for row in rows])
    realized = np.array([float(row["observed_rate"]) for row in rows])
    intervals = [
        wilson_interval(
            round(row["observed_rate"] * row["control_customers"]), row["control_customers"]
        )
        for row in rows
    ]
    errors = np.array(
        [[r - low for r, (low, _) in zip(realized, intervals, strict=True)],
         [high - r for r, (_, high) in zip(realized, intervals, strict=True)]]
    )  # fmt: skip
    figure, (axes,) = _new_figure()
    axes.bar(positions - 0.2, promised, width=0.4, color=TRAINING_COLOR, label="promised")
    axes.bar(
        positions + 0.2,
        realized,
        width=0.4,
        color=RUN_COLOR,
        label="realized (95% interval)",
        yerr=errors,
        error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#4a5560"},
    )
    axes.set_xticks(positions, [str(row["decile"]) for row in rows])
    axes.set_ylim(0, 1.05 * max(1e-3, float(max(promised.max(), (realized + errors[1]).max()))))
    axes.legend(fontsize=7, frameon=False)
    _style(
        axes,
        "Calibration by decile: control customers",
        "decile (1 = highest scores)",
        "conversion rate",
    )
    return _to_png(figure, dpi)


def render_outcome_gains_png(deciles: Sequence[Mapping[str, Any]], dpi: int = CHART_DPI) -> bytes:
    """Return a PNG of the cumulative gains by decile of control, realized against promised.

    Rows need "control_customers", "cumulative_gain_realized" and "cumulative_gain_promised".
    """
    rows = [row for row in deciles if row.get("control_customers")]
    total = sum(int(row["control_customers"]) for row in rows)
    if not total:
        raise ValueError("a gains chart needs deciles with control customers")
    contacted = np.r_[0.0, np.cumsum([int(row["control_customers"]) for row in rows]) / total]

    def curve(key: str) -> np.ndarray:
        return np.r_[0.0, [np.nan if row[key] is None else float(row[key]) for row in rows]]

    figure, (axes,) = _new_figure()
    axes.plot([0, 1], [0, 1], color=TRAINING_COLOR, linestyle="--", linewidth=1, label="random")
    axes.plot(
        contacted,
        curve("cumulative_gain_promised"),
        color=ACCENT_COLOR,
        linewidth=1.5,
        marker="o",
        markersize=3,
        label="promised",
    )
    axes.plot(
        contacted,
        curve("cumulative_gain_realized"),
        color=RUN_COLOR,
        linewidth=2,
        marker="o",
        markersize=3,
        label="realized",
    )
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize=7, loc="lower right", frameon=False)
    _style(
        axes,
        "Cumulative gains by decile: control customers",
        "share of control customers, best deciles first",
        "share of buyers reached",
    )
    return _to_png(figure, dpi)


def render_uplift_by_decile_png(
    deciles: Sequence[Mapping[str, Any]],
    overall: float | None = None,
    dpi: int = CHART_DPI,
) -> bytes:
    """Return a PNG of the uplift (percentage points) of each targeted decile with its interval."""
    rows = [row for row in deciles if row.get("uplift") is not None]
    if not rows:
        raise ValueError("an uplift chart needs deciles with a measured uplift")
    positions = np.arange(len(rows))
    values = np.array([100 * float(row["uplift"]) for row in rows])
    lows = np.array([100 * float(row["uplift_ci_low"]) for row in rows])
    highs = np.array([100 * float(row["uplift_ci_high"]) for row in rows])
    figure, (axes,) = _new_figure()
    colors = [RUN_COLOR if low > 0 else TRAINING_COLOR for low in lows]
    axes.bar(
        positions,
        values,
        width=0.6,
        color=colors,
        yerr=np.vstack([values - lows, highs - values]),
        error_kw={"elinewidth": 0.8, "capsize": 3, "ecolor": "#4a5560"},
    )
    axes.axhline(0, color="#4a5560", linewidth=0.8)
    if overall is not None:
        axes.axhline(
            100 * overall,
            color=ACCENT_COLOR,
            linestyle="--",
            linewidth=1,
            label=f"whole campaign {100 * overall:+.1f} points",
        )
        axes.legend(fontsize=7, frameon=False)
    axes.set_xticks(positions, [str(row["decile"]) for row in rows])
    _style(
        axes,
        "Uplift by targeted decile (95% interval)",
        "decile (1 = highest scores)",
        "uplift, percentage points",
    )
    return _to_png(figure, dpi)


def render_uplift_over_time_png(
    history: Sequence[Mapping[str, Any]], dpi: int = CHART_DPI
) -> bytes:
    """Return a PNG of each measured run's uplift by as-of date with its interval.

    Rows need "as_of", "uplift", "uplift_ci_low", "uplift_ci_high" and "provisional";
    provisional runs are drawn hollow.
    """
    rows = [row for row in history if row.get("uplift") is not None]
    if not rows:
        raise ValueError("an uplift-over-time chart needs runs with a measured uplift")
    dates = np.array([_as_date(row["as_of"]) for row in rows], dtype="datetime64[D]")
    values = np.array([100 * float(row["uplift"]) for row in rows])
    errors = np.vstack(
        [
            values - np.array([100 * float(row["uplift_ci_low"]) for row in rows]),
            np.array([100 * float(row["uplift_ci_high"]) for row in rows]) - values,
        ]
    )
    provisional = np.array([bool(row.get("provisional")) for row in rows])
    figure, (axes,) = _new_figure()
    axes.axhline(0, color="#4a5560", linewidth=0.8)
    for hollow, label in ((False, "final"), (True, "provisional")):
        chosen = provisional == hollow
        if not chosen.any():
            continue
        axes.errorbar(
            dates[chosen],
            values[chosen],
            yerr=errors[:, chosen],
            fmt="o",
            color=RUN_COLOR,
            markerfacecolor="white" if hollow else RUN_COLOR,
            elinewidth=0.8,
            capsize=2,
            label=label,
        )
    margin = np.timedelta64(max(7, int((dates.max() - dates.min()).astype(int)) // 20), "D")
    axes.set_xlim(dates.min() - margin, dates.max() + margin)
    axes.legend(fontsize=7, frameon=False)
    figure.autofmt_xdate()
    _style(axes, "Uplift of each run (95% interval)", "run as-of date", "uplift, percentage points")
    return _to_png(figure, dpi)


# ---------------------------------------------------------------- report


def build_outcomes_report(
    measurements: Sequence[RunMeasurement],
    history: Sequence[Mapping[str, Any]],
    measured_on: dt.date,
    settings: Settings,
    outcomes_table: str,
) -> RunReport:
    """The outcomes report of one measurement date: headline table, reasons, charts per run."""
    featured = sorted(measurements, key=lambda m: (-m.maturity, -m.run.as_of.toordinal()))
    figures = _figures(measurements, measured_on, settings)
    sections = [_summary_section(measurements, measured_on, settings, outcomes_table)]
    if measurements:
        sections.append(_reasons_section(measurements))
        sections.append(_purchases_section(measurements))
    if any(row.get("uplift") is not None for row in history):
        sections.append(
            ReportSection(
                "Uplift across runs over time",
                text=(
                    f"Every run in {outcomes_table} with a measured uplift, by its as-of date; "
                    "hollow markers are provisional (their horizon had not fully elapsed when "
                    "last measured)."
                ),
                image_png=render_uplift_over_time_png(history),
            )
        )
    html_sections = list(sections)
    markdown_sections = list(sections)
    for rank, measurement in enumerate(featured[:DETAILED_RUNS_HTML]):
        details = _run_sections(measurement)
        html_sections.extend(details)
        if rank < DETAILED_RUNS_MARKDOWN:
            markdown_sections.extend(details)
    title = f"Outcomes measured on {measured_on.isoformat()}"
    html_path = write_html_report(
        settings.reports_path / "outcomes" / measured_on.isoformat() / "report.html",
        title,
        html_sections,
        figures,
    )
    markdown = render_markdown_report(title, figures, markdown_sections)
    return RunReport(markdown, Path(html_path), [m.summary() for m in measurements])


def _figures(
    measurements: Sequence[RunMeasurement], measured_on: dt.date, settings: Settings
) -> dict[str, Any]:
    final = sum(1 for m in measurements if not m.provisional)
    return {
        "measured on": measured_on,
        "runs measured": len(measurements),
        "final": final,
        "provisional": len(measurements) - final,
        "decay alerts": sum(1 for m in measurements if m.decay),
        "horizon (days)": settings.outcome_horizon_days,
    }


def _summary_section(
    measurements: Sequence[RunMeasurement],
    measured_on: dt.date,
    settings: Settings,
    outcomes_table: str,
) -> ReportSection:
    if not measurements:
        return ReportSection(
            "Runs measured",
            text=(
                f"No run was due on {measured_on}: a published or backfilled run is measured "
                "once its as-of date has passed, and again on every measurement until its "
                f"{settings.outcome_horizon_days}-day horizon has elapsed (then it is final)."
            ),
        )
    provisional = [m.run.run_id for m in measurements if m.provisional]
    notes = [
        "A customer converted when they bought after the run's as-of date and no later than "
        f"{settings.outcome_horizon_days} days after it. Uplift = conversion rate of the "
        "targeted customers minus that of the comparable control customers (holdout customers "
        "scored at least as high as the lowest targeted one), with a 95% Newcombe interval; "
        "incremental = uplift x targeted. Realized AUC and Brier score: on the whole control "
        "group, which no campaign touched; promised AUC: the model's test-split AUC at "
        f"training time. Every figure is also in the {outcomes_table} table.",
    ]
    if provisional:
        notes.append(
            f"Provisional: {', '.join(provisional)}: their horizon has not fully elapsed, so "
            "more of their customers may still buy and these figures will change."
        )
    rows = [
        {
            "run": m.run.run_id,
            "as of": m.run.as_of,
            "maturity": m.maturity,
            "status": m.status,
            "targeted": m.outcome.targeted,
            "targeted rate": m.outcome.targeted_rate,
            "control": m.outcome.control,
            "control rate": m.outcome.control_rate,
            "uplift": m.outcome.uplift,
            "95% low": m.outcome.uplift_ci_low,
            "95% high": m.outcome.uplift_ci_high,
            "incremental": m.outcome.incremental_conversions,
            "realized AUC": m.outcome.realized_auc,
            "promised AUC": m.outcome.expected_auc,
            "Brier": m.outcome.brier,
        }
        for m in measurements
    ]
    return ReportSection("Runs measured", text="\n\n".join(notes), table=rows)


def _reasons_section(measurements: Sequence[RunMeasurement]) -> ReportSection:
    rows = [
        {
            "run": m.run.run_id,
            "status": m.status,
            "reason": m.reason,
            "uplift": m.outcome.uplift_note or "measured",
        }
        for m in measurements
    ]
    return ReportSection(
        "Status and reasons",
        text=(
            "decay: the run's realized AUC fell below the AUC its model promised by more than "
            "the tolerance (AUDIOBOOKS_DECAY_AUC_TOLERANCE) once mature enough "
            "(AUDIOBOOKS_DECAY_MIN_MATURITY); the measurement then asks for a retrain if that "
            "model is still the champion."
        ),
        table=rows,
    )


def _purchases_section(measurements: Sequence[RunMeasurement]) -> ReportSection:
    rows = [{"run": m.run.run_id, **m.purchases} for m in measurements]
    bad = sum(m.purchases["unknown_customer"] + m.purchases["missing_date"] for m in measurements)
    outside = sum(m.purchases["before_run"] + m.purchases["after_horizon"] for m in measurements)
    return ReportSection(
        "Purchases used and ignored",
        text=(
            f"Ignored and counted, never used: {bad} bad purchase rows (for a customer the run "
            "did not score: unknown customer; without a customer id or a date: missing date), "
            f"and {outside} purchases outside the outcome window (on or before the run's as-of "
            "date, read from one horizon before it: before run; after the horizon or the "
            "measurement date: after horizon)."
        ),
        table=rows,
    )


def _run_sections(measurement: RunMeasurement) -> list[ReportSection]:
    run_id = measurement.run.run_id
    deciles = measurement.decile_rows()
    calibration = [
        {
            "decile": row["decile"],
            "control_customers": row["control_customers"],
            "promised": row["mean_predicted"],
            "realized": row["observed_rate"],
            "gain_promised": row["cumulative_gain_promised"],
            "gain_realized": row["cumulative_gain_realized"],
        }
        for row in deciles
    ]
    has_control = any(row["control_customers"] for row in deciles)
    has_buyers = any(row["cumulative_gain_realized"] is not None for row in deciles)
    suffix = " (provisional)" if measurement.provisional else ""
    sections = [
        ReportSection(
            f"{run_id}: calibration by decile, realized against promised{suffix}",
            text=(
                "Control customers of each decile: the mean probability the model gave them "
                "(promised) and the share who bought within the horizon (realized)."
            ),
            table=calibration,
            image_png=render_outcome_calibration_png(deciles) if has_control else None,
        ),
        ReportSection(
            f"{run_id}: cumulative gains, realized against promised{suffix}",
            text=(
                "Share of the control group's buyers found in the best deciles: realized, "
                "and as the model's probabilities promised."
            ),
            image_png=render_outcome_gains_png(deciles) if has_control and has_buyers else None,
        ),
    ]
    targeted = [
        {
            key: row[key]
            for key in (
                "decile",
                "targeted",
                "targeted_rate",
                "control",
                "control_rate",
                "uplift",
                "uplift_ci_low",
                "uplift_ci_high",
            )
        }
        for row in deciles
        if row["targeted"]
    ]
    measured = any(row["uplift"] is not None for row in targeted)
    sections.append(
        ReportSection(
            f"{run_id}: uplift by targeted decile{suffix}",
            text=measurement.outcome.uplift_note
            or (
                "Each targeted decile's conversion rate against its comparable control "
                "customers', in percentage points with the 95% interval."
            ),
            table=targeted,
            image_png=render_uplift_by_decile_png(deciles, measurement.outcome.uplift)
            if measured
            else None,
        )
    )
    return sections


def _as_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


__all__ = [
    "build_outcomes_report",
    "render_outcome_calibration_png",
    "render_outcome_gains_png",
    "render_uplift_by_decile_png",
    "render_uplift_over_time_png",
]
