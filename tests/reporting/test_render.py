"""Tests for run report charts, the self-contained HTML report and markdown artifacts."""

from __future__ import annotations

import base64
import datetime as dt
import re
import struct
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from audiobooks_scoring.reporting.render import (
    CHART_DPI,
    FIGURE_SIZE,
    ReportSection,
    compute_gains_curve,
    format_bin_labels,
    format_column,
    format_value,
    render_calibration_png,
    render_chart_png,
    render_decile_png,
    render_drift_png,
    render_feature_importance_png,
    render_gains_lift_png,
    render_markdown_report,
    render_markdown_table,
    render_score_distribution_png,
    write_html_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", png[16:24])
    return width, height


@pytest.fixture(scope="module")
def predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    probabilities = rng.beta(1.0, 4.0, size=5_000)
    labels = (rng.random(5_000) < probabilities).astype(int)
    return labels, probabilities


@pytest.fixture(scope="module")
def calibration_table() -> list[dict]:
    return [
        {"bin": 1, "count": 900, "mean_predicted": 0.05, "observed_rate": 0.06},
        {"bin": 2, "count": 80, "mean_predicted": 0.15, "observed_rate": 0.12},
        {"bin": 3, "count": 0, "mean_predicted": None, "observed_rate": None},
        {"bin": 4, "count": 20, "mean_predicted": 0.71, "observed_rate": 0.65},
    ]


@pytest.fixture(scope="module")
def decile_table() -> list[dict]:
    return [
        {"decile": d, "count": 500, "mean_predicted": 0.5 / d, "observed_rate": 0.45 / d}
        for d in range(1, 11)
    ]


@pytest.fixture(scope="module")
def charts(predictions, calibration_table, decile_table) -> dict[str, bytes]:
    labels, probabilities = predictions
    return {
        "gains": render_gains_lift_png(labels, probabilities),
        "calibration": render_calibration_png(calibration_table),
        "importance": render_feature_importance_png(
            [
                {"feature": "minutes_listened", "auc_drop": 0.08, "auc_drop_std": 0.01},
                {"feature": "review", "auc_drop": -0.001, "auc_drop_std": 0.002},
                {"feature": "price_total", "auc_drop": 0.03, "auc_drop_std": 0.004},
            ],
            value_key="auc_drop",
            error_key="auc_drop_std",
        ),
        "score": render_score_distribution_png(
            (0.05, 0.1, 0.3), (0.25, 0.25, 0.25, 0.25), (0.1, 0.2, 0.3, 0.4)
        ),
        "deciles": render_decile_png(decile_table),
        "drift": render_drift_png({"price_avg": 0.31, "review": 0.02}, score_psi=0.12),
    }


def test_every_chart_is_a_small_png_of_the_configured_size(charts):
    expected = (round(FIGURE_SIZE[0] * CHART_DPI), round(FIGURE_SIZE[1] * CHART_DPI))
    for name, png in charts.items():
        assert png_size(png) == expected, name
        assert len(png) < 60_000, name


def test_chart_dpi_scales_the_image(decile_table):
    png = render_decile_png(decile_table, dpi=2 * CHART_DPI)
    assert png_size(png) == (round(FIGURE_SIZE[0] * 160), round(FIGURE_SIZE[1] * 160))


def test_render_chart_png_dispatches_by_kind(decile_table):
    png = render_chart_png("deciles", decile_table, value_keys=("observed_rate",))
    assert png[:8] == PNG_SIGNATURE


def test_render_chart_png_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown chart kind 'pie'"):
        render_chart_png("pie", [])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("labels", "probabilities", "points"),
    [
        # ranked perfectly: both buyers are reached by the first half
        ([1, 0, 1, 0], [0.9, 0.2, 0.8, 0.1], {0.25: 0.5, 0.5: 1.0, 1.0: 1.0}),
        # one miss in between
        ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], {0.25: 0.5, 0.5: 0.5, 0.75: 1.0}),
        # all tied: contacting any share reaches that share of the buyers on average
        ([1, 0, 0, 1, 0], [0.3] * 5, {0.2: 0.2, 0.6: 0.6, 1.0: 1.0}),
        # a tie across the only buyer and a non-buyer, ranked first
        ([0, 1, 0, 0], [0.5, 0.5, 0.1, 0.1], {0.25: 0.5, 0.5: 1.0}),
    ],
)
def test_gains_curve_at_known_points(labels, probabilities, points):
    contacted, captured = compute_gains_curve(labels, probabilities)
    assert contacted[0] == 0.0 and captured[0] == 0.0
    assert contacted[-1] == 1.0 and captured[-1] == 1.0
    for share, expected in points.items():
        assert np.interp(share, contacted, captured) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "at least one positive"),
        ([0, 1], [0.1, 0.2, 0.3], "equally long"),
        ([], [], "non-empty"),
        ([0, 2], [0.1, 0.2], "0/1"),
        ([0, 1], [0.1, np.nan], "finite"),
    ],
)
def test_gains_chart_rejects_unusable_input(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        render_gains_lift_png(labels, probabilities)


def test_calibration_needs_usable_rows():
    with pytest.raises(ValueError, match="mean_predicted and observed_rate"):
        render_calibration_png([{"mean_predicted": None, "observed_rate": None, "count": 0}])


def test_score_distribution_needs_one_share_per_bin():
    with pytest.raises(ValueError, match="one share per bin"):
        render_score_distribution_png((0.5,), (0.5, 0.5), (1.0,))


def test_decile_chart_names_missing_keys(decile_table):
    with pytest.raises(ValueError, match="probability_mean"):
        render_decile_png(decile_table, value_keys=("probability_mean",))


@pytest.mark.parametrize(
    ("cuts", "expected"),
    [
        ((), ["all"]),
        ((0.1, 0.5), ["≤ 0.1", "0.1–0.5", "> 0.5"]),
        ((0.0000051, 0.25), ["≤ 0.0000051", "0.0000051–0.25", "> 0.25"]),
    ],
)
def test_bin_labels(cuts, expected):
    assert format_bin_labels(cuts) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "—"),
        (float("nan"), "—"),
        (True, "yes"),
        (np.bool_(False), "no"),
        (14084, "14,084"),
        (np.int64(-3), "-3"),
        (14084.0, "14,084"),
        (0.8123456, "0.8123"),
        (np.float32(0.5), "0.5000"),
        (12.345678, "12.35"),
        (123456.7, "123,457"),
        (0.0000123, "1.23e-05"),
        (float("inf"), "∞"),
        ("champion", "champion"),
        (dt.datetime(2025, 11, 25, 2, 30, 15, 999), "2025-11-25 02:30:15"),
        (dt.date(2025, 11, 25), "2025-11-25"),
        (Decimal("0.12345678"), "0.1235"),
        (Decimal("2237"), "2,237"),
    ],
)
def test_format_value(value, expected: str):
    assert format_value(value) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 2.0, 3000], ["1", "2", "3,000"]),
        ([0.25, 0.0000123, 1.0, None], ["0.2500", "0.0000", "1.0000", "—"]),
        ([4.9, 0.4495], ["4.90", "0.45"]),
        ([1603.8, 12.0], ["1,604", "12"]),
        (["a", 0.5], ["a", "0.5000"]),
        ([Decimal("0.25"), Decimal("3")], ["0.25", "3.00"]),
    ],
)
def test_format_column_shares_decimals(values, expected):
    assert format_column(values) == expected


def test_markdown_table_has_header_alignment_and_rows():
    rows = [
        {"feature": "price_avg", "psi": 0.31},
        {"feature": "a|b", "psi": 0.0123, "note": "line\nbreak"},
    ]
    lines = render_markdown_table(rows).splitlines()
    assert lines[0] == "| feature | psi | note |"
    assert lines[1] == "| --- | ---: | --- |"
    assert lines[2] == "| price_avg | 0.3100 | — |"
    assert lines[3] == "| a\\|b | 0.0123 | line break |"
    assert len(lines) == 4


def test_markdown_table_of_no_rows():
    assert render_markdown_table([]).strip() == "_no rows_"


def test_markdown_report_has_figures_sections_and_decodable_images(charts, decile_table):
    sections = [
        ReportSection(
            "Deciles", text="Decile 1 is the top.", table=decile_table, image_png=charts["deciles"]
        ),
        ReportSection("Drift [features]", image_png=charts["drift"]),
        ReportSection("Notes", text="Nothing else."),
    ]
    markdown = render_markdown_report(
        "Nightly run", {"rows scored": 14084, "AUC": 0.8912}, sections
    )
    assert markdown.startswith("# Nightly run\n")
    assert "| rows scored | 14,084 |" in markdown
    assert "| AUC | 0.8912 |" in markdown
    for heading in ("## Deciles", "## Drift [features]", "## Notes", "Decile 1 is the top."):
        assert heading in markdown
    assert "![Drift features](data:image/png;base64," in markdown
    images = DATA_URI.findall(markdown)
    assert len(images) == 2
    assert all(base64.b64decode(image)[:8] == PNG_SIGNATURE for image in images)


def test_markdown_report_with_every_chart_stays_under_200_kb(charts, decile_table):
    sections = [
        ReportSection(name, table=decile_table, image_png=png) for name, png in charts.items()
    ]
    markdown = render_markdown_report("Run", {"rows": 1}, sections)
    assert len(markdown.encode("utf-8")) < 200_000


@pytest.fixture
def html_report(tmp_path: Path, charts, calibration_table) -> tuple[Path, str]:
    sections = [
        ReportSection(
            "Model quality", text="First paragraph.\n\nSecond paragraph.", image_png=charts["gains"]
        ),
        ReportSection("Calibration", table=calibration_table, image_png=charts["calibration"]),
        ReportSection("Rejected <rows> & reasons", text="<script>alert(1)</script>", table=[]),
    ]
    path = write_html_report(
        tmp_path / "reports" / "run-1.html",
        "Scoring run 2025-11-25",
        sections,
        figures={"rows scored": 14084, "model": "v7", "run id": "0f1c2d3e-4b5a-6978"},
    )
    return path, path.read_text(encoding="utf-8")


def test_html_report_is_written_with_every_heading_and_figure(html_report):
    path, page = html_report
    assert path.is_file()
    assert path.parent.name == "reports"
    assert [p.name for p in path.parent.iterdir()] == ["run-1.html"]
    assert "<title>Scoring run 2025-11-25</title>" in page
    for heading in ("Model quality", "Calibration", "Rejected &lt;rows&gt; &amp; reasons"):
        assert f"<h2>{heading}</h2>" in page
    assert "14,084" in page and "v7" in page
    assert "<p>First paragraph.</p>" in page and "<p>Second paragraph.</p>" in page


def test_html_report_embeds_decodable_pngs(html_report):
    _, page = html_report
    images = DATA_URI.findall(page)
    assert len(images) == 2
    for image in images:
        assert base64.b64decode(image, validate=True)[:8] == PNG_SIGNATURE


def test_html_report_is_self_contained_and_escaped(html_report):
    _, page = html_report
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "url(" not in page
    assert re.findall(r'src="([^"]*)"', page) == [m.group(0) for m in DATA_URI.finditer(page)]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_html_table_formats_and_aligns_numbers(html_report):
    _, page = html_report
    assert '<th class="num">mean predicted</th>' in page
    assert '<td class="num">0.0500</td>' in page
    assert '<td class="num">—</td>' in page
    assert "<em>no rows</em>" in page


def test_html_report_replaces_an_existing_file(tmp_path: Path):
    path = tmp_path / "report.html"
    path.write_text("old")
    write_html_report(path, "New", [ReportSection("Only")])
    assert "<h2>Only</h2>" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_markdown_report_shows_html_as_text_instead_of_running_it():
    sections = [
        ReportSection(
            "Rejected <rows>",
            text="Sample: <script>alert(1)</script> & **bold** stays markdown",
            table=[{"reason": "<img src=x onerror=alert(1)>"}],
        )
    ]
    markdown = render_markdown_report("Run <1>", {}, sections)
    assert "<" not in markdown and ">" not in markdown.replace("---:", "")
    assert "# Run &lt;1&gt;" in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; **bold** stays markdown" in markdown
    assert "| &lt;img src=x onerror=alert(1)&gt; |" in markdown
