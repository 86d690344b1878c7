"""Tests of reading the public audiobooks CSV, with and without a header."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audiobooks_scoring.contract import CUSTOMER_ID, FEATURES, LABEL, TRAINING_COLUMNS, WINDOW_END
from audiobooks_scoring.inputs.csv_file import CsvFormatError, read_audiobooks_csv

REAL_CSV = Path(__file__).parents[1] / "data" / "audiobooks_data.csv"
REAL_ROWS = 14_084
REAL_CONVERTED = 2_237  # stated in the data README
WINDOW = datetime.date(2024, 6, 30)

HEADER = ",".join((CUSTOMER_ID, *FEATURES, LABEL))
COURSE_HEADER = (
    "ID,Book_length(mins)_overall,Book_length(mins)_avg,Price_overall,Price_avg,Review,"
    "Review10/10,Completion,Minutes_listened,Support_Request,Last_Visited_mins_Purchase_date,"
    "Target"
)


def row(customer_id: int = 1, **changes: str) -> str:
    """A valid data line (values from the real file's first row), with fields replaced."""
    values = dict(
        zip(
            (CUSTOMER_ID, *FEATURES, LABEL),
            (str(customer_id), "1620", "1620", "19.73", "19.73", "1", "10.00", "0.99",
             "1603.80", "5", "92", "0"),
            strict=True,
        )
    )  # fmt: skip
    values.update(changes)
    return ",".join(values.values())


def write(tmp_path: Path, *lines: str, name: str = "input.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def headerless_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = REAL_CSV.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith(CUSTOMER_ID)
    path = tmp_path_factory.mktemp("csv") / "audiobooks_no_header.csv"
    path.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("source", ["with_header", "headerless"])
def test_real_file_loads_in_both_layouts(source: str, headerless_copy: Path) -> None:
    path = REAL_CSV if source == "with_header" else headerless_copy
    frame = read_audiobooks_csv(path, WINDOW)

    assert list(frame.columns) == list(TRAINING_COLUMNS)
    assert len(frame) == REAL_ROWS
    assert frame[CUSTOMER_ID].dtype == np.int64
    assert frame[LABEL].dtype == np.int8
    assert all(frame[name].dtype == np.float64 for name in FEATURES)
    assert (frame[WINDOW_END] == WINDOW).all()
    assert frame[CUSTOMER_ID].is_unique
    assert int(frame[LABEL].sum()) == REAL_CONVERTED
    assert (frame["book_length_avg_min"] <= frame["book_length_total_min"]).all()
    assert (frame["price_avg"] <= frame["price_total"]).all()


def test_both_layouts_give_the_same_rows(headerless_copy: Path) -> None:
    pd.testing.assert_frame_equal(
        read_audiobooks_csv(headerless_copy, WINDOW), read_audiobooks_csv(REAL_CSV, WINDOW)
    )


def test_course_header_is_mapped_by_position_not_by_its_swapped_names(tmp_path: Path) -> None:
    # The course header says "overall" first, but the first column holds the average.
    line = row(1, book_length_avg_min="540", book_length_total_min="1080", price_avg="4",
               price_total="8")  # fmt: skip
    frame = read_audiobooks_csv(write(tmp_path, COURSE_HEADER, line), WINDOW)

    assert frame.loc[0, "book_length_avg_min"] == 540
    assert frame.loc[0, "book_length_total_min"] == 1080
    assert frame.loc[0, "price_avg"] == 4
    assert frame.loc[0, "price_total"] == 8


def test_contract_header_in_another_order_is_mapped_by_name(tmp_path: Path) -> None:
    names = [LABEL, *reversed(FEATURES), CUSTOMER_ID]
    values = dict(zip((CUSTOMER_ID, *FEATURES, LABEL), row(7).split(","), strict=True))
    path = write(tmp_path, ",".join(names), ",".join(values[name] for name in names))
    frame = read_audiobooks_csv(path, WINDOW)

    assert frame.loc[0, CUSTOMER_ID] == 7
    assert frame.loc[0, "minutes_listened"] == pytest.approx(1603.8)
    assert frame.loc[0, "last_visit_days_after_purchase"] == 92
    assert frame.loc[0, LABEL] == 0


def test_bom_crlf_blank_lines_and_padded_fields_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "windows.csv"
    text = "\r\n".join([HEADER.upper(), row(1), "", " " + row(2).replace(",", " , "), ""])
    path.write_bytes(("\ufeff" + text).encode("utf-8"))
    frame = read_audiobooks_csv(path, WINDOW)

    assert frame[CUSTOMER_ID].tolist() == [1, 2]


def test_input_window_end_is_used_for_every_row(tmp_path: Path) -> None:
    other = datetime.date(2023, 12, 31)
    frame = read_audiobooks_csv(write(tmp_path, row(1), row(2)), other)
    assert frame[WINDOW_END].tolist() == [other, other]


@pytest.mark.parametrize(
    ("lines", "line", "column", "fragment"),
    [
        pytest.param(
            [HEADER, row(1), ",".join(row(2).split(",")[:-1])],
            3,
            LABEL,
            "11 fields",
            id="too-few-fields",
        ),
        pytest.param([row(1), row(2) + ",7"], 2, LABEL, "13 fields", id="too-many-fields"),
        pytest.param(
            [HEADER, row(1), row(2, price_avg="5,33")],
            3,
            LABEL,
            "13 fields",
            id="decimal-comma-splits-a-field",
        ),
        pytest.param(
            [HEADER, row(1), row(2, price_total="abc")],
            3,
            "price_total",
            "'abc'",
            id="non-numeric-feature",
        ),
        pytest.param([row(1), row(2, completion="")], 2, "completion", "empty", id="empty-value"),
        pytest.param(
            [HEADER, row(1, review_score="nan")], 2, "review_score", "finite", id="nan-feature"
        ),
        pytest.param([row(1, converted="2")], 1, LABEL, "0 or 1", id="label-two"),
        pytest.param([row(1), row(2, converted="yes")], 2, LABEL, "'yes'", id="label-text"),
        pytest.param([row(1, converted="")], 1, LABEL, "empty", id="label-empty"),
        pytest.param(
            [HEADER, row(5), row(6), row(5)],
            4,
            CUSTOMER_ID,
            "first on line 2",
            id="duplicate-customer-id",
        ),
        pytest.param([row(1), "1.5" + row(1)[1:]], 2, CUSTOMER_ID, "whole", id="fractional-id"),
        pytest.param(
            [HEADER.replace("review_score", "score"), row(1)],
            1,
            "score",
            "unknown",
            id="unknown-header-name",
        ),
        pytest.param(
            [HEADER.replace(",converted", ""), row(1)], 1, LABEL, "lacks", id="header-missing-label"
        ),
        pytest.param(
            [HEADER.replace("review_score", "review"), row(1)],
            1,
            "review",
            "twice",
            id="header-duplicate-name",
        ),
        pytest.param(
            [HEADER, row(1), "", row(2, support_requests="x")],
            4,
            "support_requests",
            "'x'",
            id="blank-lines-still-counted",
        ),
        pytest.param(
            [row(1, review="no"), row(2), "1,2,3"],
            1,
            "review",
            "'no'",
            id="earliest-problem-wins",
        ),
    ],
)
def test_malformed_file_names_line_and_column(
    tmp_path: Path, lines: list[str], line: int, column: str, fragment: str
) -> None:
    path = write(tmp_path, *lines)
    with pytest.raises(CsvFormatError) as caught:
        read_audiobooks_csv(path, WINDOW)

    assert caught.value.line == line
    assert caught.value.column == column
    message = str(caught.value)
    assert f"line {line}" in message
    assert repr(column) in message
    assert fragment in message


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        pytest.param([], "empty", id="empty-file"),
        pytest.param([HEADER], "no data rows", id="header-only"),
    ],
)
def test_file_without_rows_is_rejected(tmp_path: Path, lines: list[str], fragment: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(CsvFormatError, match=fragment):
        read_audiobooks_csv(path, WINDOW)


def test_non_utf8_file_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes((row(1) + "\n").encode() + b"\xff\xfe,\n")
    with pytest.raises(CsvFormatError, match="UTF-8") as caught:
        read_audiobooks_csv(path, WINDOW)
    assert caught.value.line == 2
