"""Run reports: PNG charts, a self-contained HTML file and markdown for Prefect artifacts.

Everything here is a pure function of the data it is handed (labels and probabilities,
calibration and decile tables as lists of dicts, importance lists, drift figures): it
draws and formats, and computes nothing but what a chart needs (the gains curve).

Charts are drawn on `matplotlib.figure.Figure` objects and rendered by the Agg canvas
directly, without importing `pyplot`: no GUI backend is ever selected, no global figure
state is shared between threads (Prefect runs tasks in threads), and importing this module
does not switch the backend of a notebook that imports it. The default size (6 x 3.5 in at
80 dpi, 480 x 280 px) keeps a markdown artifact with several charts well under 200 KB;
pass a larger `dpi` for the HTML report if wanted.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import html
import io
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from audiobooks_scoring.files import write_atomically

logger = logging.getLogger(__name__)

FIGURE_SIZE = (6.0, 3.5)
CHART_DPI = 80
GAINS_POINTS = 201
MISSING = "—"
LONG_FIGURE_CHARS = 16

RUN_COLOR = "#1f6fb2"
TRAINING_COLOR = "#a3adb8"
ACCENT_COLOR = "#e07b39"
WARNING_COLOR = "#e0a800"
ALERT_COLOR = "#c8372d"
OK_COLOR = "#2e8b57"

ChartKind = Literal[
    "gains_lift", "calibration", "feature_importance", "score_distribution", "deciles", "drift"
]


@dataclass(frozen=True)
class ReportSection:
    """One titled part of a report: optional text, table (list of dicts) and PNG chart."""

    heading: str
    text: str | None = None
    table: list[dict[str, Any]] | None = None
    image_png: bytes | None = None


# ---------------------------------------------------------------- formatting


def format_value(value: Any) -> str:
    """Return a cell's text: thousands separators, 4 decimals below 1, a dash for missing."""
    if value is None:
        return MISSING
    if isinstance(value, decimal.Decimal):
        value = float(value)
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return MISSING
        if math.isinf(number):
            return "∞" if number > 0 else "-∞"
        if number.is_integer() and abs(number) < 1e15:
            return f"{int(number):,}"
        magnitude = abs(number)
        if magnitude >= 1000:
            return f"{number:,.0f}"
        if magnitude >= 1:
            return f"{number:,.2f}"
        if magnitude >= 1e-4:
            return f"{number:.4f}"
        return f"{number:.2e}"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def format_column(values: Sequence[Any]) -> list[str]:
    """Return a table column's cells, numbers sharing one format so decimals line up.

    Whole numbers get thousands separators; otherwise the decimals follow the largest
    magnitude in the column (4 up to 1, so shares and rates keep theirs; 2 below 10,
    1 below 1000, none above).
    """
    numbers_only = [float(v) for v in values if is_numeric(v) and math.isfinite(float(v))]
    if not numbers_only or all(n.is_integer() and abs(n) < 1e15 for n in numbers_only):
        return [format_value(v) for v in values]
    largest = max(abs(n) for n in numbers_only)
    decimals = 4 if largest <= 1 else 2 if largest < 10 else 1 if largest < 1000 else 0
    return [
        f"{float(v):,.{decimals}f}"
        if is_numeric(v) and math.isfinite(float(v))
        else format_value(v)
        for v in values
    ]


def is_numeric(value: Any) -> bool:
    """Return True for numbers (not booleans; SQL decimals too), which tables right-align."""
    if isinstance(value, decimal.Decimal):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def format_heading(key: str) -> str:
    """Return a column key as a header: underscores become spaces."""
    return str(key).replace("_", " ")


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the union of the rows' keys, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            columns.setdefault(str(key), None)
    return list(columns)


def png_data_uri(png: bytes) -> str:
    """Return a PNG as a `data:image/png;base64,...` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- charts


def _new_figure(columns: int = 1) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _style(axes: Axes, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=10, loc="left")
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(True, color="#e5e8eb", linewidth=0.6)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _to_png(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def compute_gains_curve(
    labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return (share contacted, share of positives captured) on a 0..1 grid, highest first.

    Customers with tied probabilities are contacted together, so within a tie the curve is
    the straight line a random order would give on average.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(
            f"labels and probabilities must be non-empty and equally long; got {y.size} "
            f"and {p.size}"
        )
    if not (np.all(np.isfinite(p)) and np.all(np.isin(y, (0.0, 1.0)))):
        raise ValueError("labels must be 0/1 and probabilities finite for a gains chart")
    positives = y.sum()
    if positives == 0:
        raise ValueError("a gains chart needs at least one positive label")
    order = np.argsort(-p, kind="stable")
    sorted_p, sorted_y = p[order], y[order]
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    group_sizes = np.diff(np.r_[starts, sorted_p.size])
    group_positives = np.add.reduceat(sorted_y, starts)
    contacted = np.r_[0.0, np.cumsum(group_sizes)] / y.size
    captured = np.r_[0.0, np.cumsum(group_positives)] / positives
    grid = np.linspace(0.0, 1.0, GAINS_POINTS)
    return grid, np.interp(grid, contacted, captured)


def render_gains_lift_png(
    labels: Sequence[float] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    dpi: int = CHART_DPI,
) -> bytes:
    """Return a PNG with the cumulative gains curve (left) and the cumulative lift (right)."""
    contacted, captured = compute_gains_curve(labels, probabilities)
    base_rate = float(np.mean(np.asarray(labels, dtype=np.float64)))
    figure, (gains, lift) = _new_figure(2)
    gains.plot([0, 1], [0, 1], color=TRAINING_COLOR, linestyle="--", linewidth=1, label="random")
    perfect = np.minimum(contacted / base_rate, 1.0)
    gains.plot(contacted, perfect, color=ACCENT_COLOR, linewidth=1, linestyle=":", label="perfect")
    gains.plot(contacted, captured, color=RUN_COLOR, linewidth=2, label="model")
    gains.set_xlim(0, 1)
    gains.set_ylim(0, 1.02)
    gains.legend(fontsize=7, loc="lower right", frameon=False)
    _style(gains, "Cumulative gains", "share of customers contacted", "share of buyers reached")

    with np.errstate(divide="ignore", invalid="ignore"):
        cumulative_lift = np.where(contacted > 0, captured / contacted, np.nan)
    shown = contacted >= 0.05
    lift.plot(contacted[shown], cumulative_lift[shown], color=RUN_COLOR, linewidth=2)
    lift.axhline(1.0, color=TRAINING_COLOR, linestyle="--", linewidth=1)
    decile_at = np.searchsorted(contacted, 0.1)
    top_decile = float(cumulative_lift[decile_at])
    lift.plot([0.1], [top_decile], marker="o", color=ACCENT_COLOR)
    lift.annotate(
        f"top 10%: {top_decile:.2f}x",
        (0.1, top_decile),
        xytext=(8, 4),
        textcoords="offset points",
        fontsize=7,
    )
    lift.set_xlim(0, 1)
    lift.set_ylim(0, max(1.2, float(np.nanmax(cumulative_lift[shown])) * 1.1))
    _style(lift, "Cumulative lift", "share of customers contacted", "lift over random")
    return _to_png(figure, dpi)


def render_calibration_png(table: Sequence[Mapping[str, Any]], dpi: int = CHART_DPI) -> bytes:
    """Return a PNG of observed rate against mean predicted probability per bin, with y = x.

    Rows need "mean_predicted" and "observed_rate" (rows where either is None are skipped)
    and may have "count", which sizes the markers.
    """
    points = [
        (float(row["mean_predicted"]), float(row["observed_rate"]), row.get("count"))
        for row in table
        if row.get("mean_predicted") is not None and row.get("observed_rate") is not None
    ]
    if not points:
        raise ValueError("a calibration chart needs rows with mean_predicted and observed_rate")
    predicted = np.array([p for p, _, _ in points])
    observed = np.array([o for _, o, _ in points])
    counts = np.array([c if c is not None else 1 for _, _, c in points], dtype=np.float64)
    sizes = 15 + 85 * np.sqrt(counts / counts.max())
    upper = min(1.0, max(0.1, float(max(predicted.max(), observed.max())) * 1.1))
    figure, (axes,) = _new_figure()
    axes.plot(
        [0, upper],
        [0, upper],
        color=TRAINING_COLOR,
        linestyle="--",
        linewidth=1,
        label="perfectly calibrated",
    )
    axes.plot(predicted, observed, color=RUN_COLOR, linewidth=1.5, label="model")
    axes.scatter(predicted, observed, s=sizes, color=RUN_COLOR, alpha=0.8, zorder=3)
    axes.set_xlim(0, upper)
    axes.set_ylim(0, upper)
    axes.legend(fontsize=7, loc="upper left", frameon=False)
    _style(
        axes,
        "Calibration (marker size: customers in bin)",
        "mean predicted probability",
        "observed buy-again rate",
    )
    return _to_png(figure, dpi)


def render_feature_importance_png(
    importances: Sequence[Mapping[str, Any]],
    value_key: str = "importance",
    error_key: str | None = None,
    dpi: int = CHART_DPI,
) -> bytes:
    """Return a PNG bar chart of feature importance, largest at the top.

    Rows need "feature" and `value_key` (e.g. "auc_drop" for permutation importance) and,
    when `error_key` is given, that spread (drawn as error bars).
    """
    if not importances:
        raise ValueError("a feature importance chart needs at least one row")
    rows = sorted(importances, key=lambda row: float(row[value_key]))
    names = [str(row["feature"]) for row in rows]
    values = np.array([float(row[value_key]) for row in rows])
    errors = np.array([float(row[error_key]) for row in rows]) if error_key else None
    figure, (axes,) = _new_figure()
    colors = [RUN_COLOR if v >= 0 else TRAINING_COLOR for v in values]
    axes.barh(
        names,
        values,
        xerr=errors,
        color=colors,
        height=0.6,
        error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#4a5560"},
    )
    axes.axvline(0, color="#4a5560", linewidth=0.8)
    _style(axes, "Feature importance", format_heading(value_key), "")
    axes.grid(True, axis="x", color="#e5e8eb", linewidth=0.6)
    axes.grid(False, axis="y")
    return _to_png(figure, dpi)


def format_bin_labels(cuts: Sequence[float]) -> list[str]:
    """Return one label per right-closed bin of `cuts`: "≤ c0", "c0–c1", ..., "> ck"."""
    if not cuts:
        return ["all"]
    texts = [
        np.format_float_positional(c, precision=2, unique=True, fractional=False, trim="-")
        for c in cuts
    ]
    middle = [f"{a}–{b}" for a, b in zip(texts, texts[1:], strict=False)]
    return [f"≤ {texts[0]}", *middle, f"> {texts[-1]}"]


def render_score_distribution_png(
    cuts: Sequence[float],
    training_shares: Sequence[float],
    run_shares: Sequence[float],
    dpi: int = CHART_DPI,
) -> bytes:
    """Return a PNG of this run's share of customers per score bin next to training's."""
    if not (len(training_shares) == len(run_shares) == len(cuts) + 1):
        raise ValueError(
            f"need one share per bin ({len(cuts) + 1}) for training and run; got "
            f"{len(training_shares)} and {len(run_shares)}"
        )
    labels = format_bin_labels(cuts)
    positions = np.arange(len(labels))
    figure, (axes,) = _new_figure()
    axes.bar(positions - 0.2, training_shares, width=0.4, color=TRAINING_COLOR, label="training")
    axes.bar(positions + 0.2, run_shares, width=0.4, color=RUN_COLOR, label="this run")
    axes.set_xticks(positions, labels, rotation=35, ha="right")
    axes.legend(fontsize=7, frameon=False)
    _style(axes, "Score distribution: this run vs training", "score bin", "share of customers")
    return _to_png(figure, dpi)


def render_decile_png(
    rows: Sequence[Mapping[str, Any]],
    value_keys: Sequence[str] = ("mean_predicted", "observed_rate"),
    label_key: str = "decile",
    dpi: int = CHART_DPI,
) -> bytes:
    """Return a PNG of grouped bars per decile, one bar per key in `value_keys`."""
    if not rows or not value_keys:
        raise ValueError("a decile chart needs at least one row and one value key")
    missing = [key for key in (label_key, *value_keys) if key not in rows[0]]
    if missing:
        raise ValueError(f"decile rows lack the keys {missing}; they have {list(rows[0])}")
    positions = np.arange(len(rows))
    width = 0.8 / len(value_keys)
    palette = [TRAINING_COLOR, RUN_COLOR, ACCENT_COLOR, OK_COLOR]
    figure, (axes,) = _new_figure()
    for k, key in enumerate(value_keys):
        values = [np.nan if row.get(key) is None else float(row[key]) for row in rows]
        offset = (k - (len(value_keys) - 1) / 2) * width
        axes.bar(
            positions + offset,
            values,
            width=width,
            color=palette[k % len(palette)],
            label=format_heading(key),
        )
    axes.set_xticks(positions, [format_value(row[label_key]) for row in rows])
    axes.legend(fontsize=7, frameon=False)
    _style(axes, "By decile (1 = highest scores)", format_heading(label_key), "")
    return _to_png(figure, dpi)


def render_drift_png(
    feature_psi: Mapping[str, float],
    score_psi: float | None = None,
    warning: float = 0.1,
    alert: float = 0.25,
    dpi: int = CHART_DPI,
) -> bytes:
    """Return a PNG of PSI per feature (and the score), coloured by status, with thresholds."""
    if not feature_psi:
        raise ValueError("a drift chart needs at least one feature PSI")
    items = [(name, float(psi)) for name, psi in feature_psi.items()]
    if score_psi is not None:
        items.append(("score", float(score_psi)))
    items.sort(key=lambda item: item[1])
    values = np.array([psi for _, psi in items])
    colors = [
        ALERT_COLOR if v >= alert else WARNING_COLOR if v >= warning else OK_COLOR for v in values
    ]
    figure, (axes,) = _new_figure()
    bars = axes.barh([name for name, _ in items], values, color=colors, height=0.6)
    axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=7)
    axes.axvline(warning, color=WARNING_COLOR, linestyle="--", linewidth=1, label="warning")
    axes.axvline(alert, color=ALERT_COLOR, linestyle="--", linewidth=1, label="alert")
    axes.set_xlim(0, max(alert * 1.3, float(values.max()) * 1.18))
    axes.legend(fontsize=7, frameon=False, loc="lower right")
    _style(axes, "Drift against training (PSI)", "population stability index", "")
    axes.grid(False, axis="y")
    return _to_png(figure, dpi)


_CHARTS: dict[str, Callable[..., bytes]] = {
    "gains_lift": render_gains_lift_png,
    "calibration": render_calibration_png,
    "feature_importance": render_feature_importance_png,
    "score_distribution": render_score_distribution_png,
    "deciles": render_decile_png,
    "drift": render_drift_png,
}


def render_chart_png(kind: ChartKind, *args: Any, **kwargs: Any) -> bytes:
    """Return the PNG of the chart `kind`, passing the data on to its `render_*_png` helper."""
    try:
        renderer = _CHARTS[kind]
    except KeyError:
        raise ValueError(f"unknown chart kind {kind!r}; choose one of {sorted(_CHARTS)}") from None
    return renderer(*args, **kwargs)


# ---------------------------------------------------------------- markdown


def escape_markdown_html(text: str) -> str:
    """Return `text` with &, < and > as entities, so markdown shows them instead of running HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _markdown_cell(text: str) -> str:
    text = escape_markdown_html(text).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r", " ").replace("\n", " ")


def render_markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return a markdown table of `rows` (columns: every key, in first-seen order)."""
    if not rows:
        return "_no rows_\n"
    columns = table_columns(rows)
    numeric = {c: any(is_numeric(row.get(c)) for row in rows) for c in columns}
    cells = {c: format_column([row.get(c) for row in rows]) for c in columns}
    lines = [
        "| " + " | ".join(_markdown_cell(format_heading(c)) for c in columns) + " |",
        "| " + " | ".join("---:" if numeric[c] else "---" for c in columns) + " |",
    ]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(_markdown_cell(cells[c][i]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _markdown_alt(text: str) -> str:
    return escape_markdown_html("".join(ch for ch in text if ch not in "[]\n\r"))


def render_markdown_report(
    title: str, figures: Mapping[str, Any], sections: Sequence[ReportSection]
) -> str:
    """Return a markdown report (title, key figures, sections) with charts as data URIs."""
    parts = [f"# {escape_markdown_html(title)}\n"]
    if figures:
        parts.append(
            render_markdown_table(
                [{"figure": name, "value": format_value(value)} for name, value in figures.items()]
            )
        )
    for section in sections:
        parts.append(f"## {escape_markdown_html(section.heading)}\n")
        if section.text:
            parts.append(escape_markdown_html(section.text.strip()) + "\n")
        if section.table is not None:
            parts.append(render_markdown_table(section.table))
        if section.image_png is not None:
            parts.append(
                f"![{_markdown_alt(section.heading)}]({png_data_uri(section.image_png)})\n"
            )
    return "\n".join(parts)


# ---------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f5f7; color: #1d2730;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header { background: #1d3d5c; color: #fff; border-radius: 10px; padding: 20px 24px 22px;
  margin-bottom: 20px; }
header h1 { margin: 0 0 14px; font-size: 24px; font-weight: 600; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
  gap: 10px; }
.figure { background: rgba(255,255,255,0.10); border-radius: 8px; padding: 10px 12px; }
.figure .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em;
  color: #c7d6e4; overflow-wrap: anywhere; }
.figure .value { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums;
  overflow-wrap: anywhere; }
.figure .value.long { font-size: 13px; font-weight: 500; padding-top: 5px;
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
section { background: #fff; border: 1px solid #dde2e7; border-radius: 10px;
  padding: 16px 20px 20px; margin-bottom: 16px; }
section h2 { margin: 0 0 10px; font-size: 18px; font-weight: 600; color: #1d3d5c; }
section p { margin: 0 0 12px; max-width: 80ch; }
.content { display: flex; flex-wrap: wrap; gap: 16px 28px; align-items: flex-start; }
.table-wrap { overflow-x: auto; max-width: 100%; flex: 0 1 auto; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e5e8eb; text-align: left;
  white-space: nowrap; }
th { background: #f0f3f6; font-weight: 600; color: #3a4753; border-bottom: 2px solid #cfd6dd; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) td { background: #fafbfc; }
figure.chart { margin: 0; flex: 0 1 auto; min-width: 0; }
figure.chart img { display: block; max-width: 100%; height: auto;
  border: 1px solid #eef1f4; border-radius: 6px; }
footer { color: #6b7782; font-size: 12px; text-align: center; margin-top: 24px; }
"""


def _html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    columns = table_columns(rows)
    numeric = {c: any(is_numeric(row.get(c)) for row in rows) for c in columns}
    cells = {c: format_column([row.get(c) for row in rows]) for c in columns}

    def cell(tag: str, column: str, text: str) -> str:
        css = ' class="num"' if numeric[column] else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", c, format_heading(c)) for c in columns)
    body = "\n".join(
        "<tr>" + "".join(cell("td", c, cells[c][i]) for c in columns) + "</tr>"
        for i in range(len(rows))
    )
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def _html_text(text: str) -> str:
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)


def render_html_report(
    title: str,
    sections: Sequence[ReportSection],
    figures: Mapping[str, Any] | None = None,
) -> str:
    """Return a self-contained HTML page: inline CSS, tables, and charts as data URIs."""
    cards = []
    for name, value in (figures or {}).items():
        text = format_value(value)
        css = "value long" if len(text) > LONG_FIGURE_CHARS else "value"
        cards.append(
            f'<div class="figure"><div class="label">{html.escape(str(name))}</div>'
            f'<div class="{css}">{html.escape(text)}</div></div>'
        )
    figure_cards = "".join(cards)
    parts = []
    for section in sections:
        body = [f"<h2>{html.escape(section.heading)}</h2>"]
        if section.text:
            body.append(_html_text(section.text))
        content = []
        if section.table is not None:
            content.append(_html_table(section.table))
        if section.image_png is not None:
            content.append(
                f'<figure class="chart"><img src="{png_data_uri(section.image_png)}" '
                f'alt="{html.escape(section.heading, quote=True)}"></figure>'
            )
        if content:
            body.append('<div class="content">' + "\n".join(content) + "</div>")
        parts.append("<section>\n" + "\n".join(body) + "\n</section>")
    figures_block = f'<div class="figures">{figure_cards}</div>' if figure_cards else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>{html.escape(title)}</h1>{figures_block}</header>\n"
        + "\n".join(parts)
        + "\n<footer>audiobooks-scoring run report</footer>\n</main>\n</body>\n</html>\n"
    )


def write_html_report(
    path: Path,
    title: str,
    sections: Sequence[ReportSection],
    figures: Mapping[str, Any] | None = None,
) -> Path:
    """Write the self-contained HTML report to `path` (atomically) and return the path."""
    target = Path(path)
    page = render_html_report(title, sections, figures)
    write_atomically(target, page.encode("utf-8"))
    logger.info("wrote report %s (%d bytes)", target, len(page.encode("utf-8")))
    return target
