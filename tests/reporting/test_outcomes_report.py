"""The outcomes report's charts: PNGs of the expected size from decile and run rows; refusals."""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from audiobooks_scoring.reporting.outcomes_report import (
    render_outcome_calibration_png,
    render_outcome_gains_png,
    render_uplift_by_decile_png,
    render_uplift_over_time_png,
)
from audiobooks_scoring.reporting.render import CHART_DPI, FIGURE_SIZE

DECILES = [
    {
        "decile": d,
        "control_customers": 0 if d == 10 else 20,
        "mean_predicted": None if d == 10 else 0.9 - 0.08 * d,
        "observed_rate": None if d == 10 else 0.85 - 0.08 * d,
        "cumulative_gain_realized": None if d == 10 else min(1.0, 0.2 * d),
        "cumulative_gain_promised": None if d == 10 else min(1.0, 0.18 * d),
        "targeted": 30 if d <= 2 else 0,
        "uplift": {1: 0.05, 2: -0.01}.get(d),
        "uplift_ci_low": {1: 0.01, 2: -0.08}.get(d),
        "uplift_ci_high": {1: 0.09, 2: 0.06}.get(d),
    }
    for d in range(1, 11)
]
RUNS = [
    {"as_of": dt.date(2026, 1, 5), "uplift": 0.04, "uplift_ci_low": 0.0, "uplift_ci_high": 0.08,
     "provisional": False},
    {"as_of": "2026-03-02", "uplift": 0.02, "uplift_ci_low": -0.03, "uplift_ci_high": 0.07,
     "provisional": True},
    {"as_of": dt.date(2026, 4, 1), "uplift": None, "uplift_ci_low": None, "uplift_ci_high": None,
     "provisional": True},
]  # fmt: skip


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


@pytest.mark.parametrize(
    ("render", "rows"),
    [
        (render_outcome_calibration_png, DECILES),
        (render_outcome_gains_png, DECILES),
        (render_uplift_by_decile_png, DECILES),
        (render_uplift_over_time_png, RUNS),
        (render_uplift_over_time_png, RUNS[:1]),
    ],
)
def test_each_chart_is_a_png_of_the_standard_size(render, rows):
    width, height = FIGURE_SIZE
    assert png_size(render(rows)) == (round(width * CHART_DPI), round(height * CHART_DPI))


@pytest.mark.parametrize(
    ("render", "rows"),
    [
        (render_outcome_calibration_png, [{**DECILES[9]}]),
        (render_outcome_gains_png, []),
        (render_uplift_by_decile_png, DECILES[2:]),
        (render_uplift_over_time_png, RUNS[2:]),
    ],
)
def test_charts_refuse_rows_without_anything_to_draw(render, rows):
    with pytest.raises(ValueError):
        render(rows)
