"""Scoring helpers: reason codes agree with the model, a stable salted holdout, export."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_limits

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.contract import SCORE_REASON_LABELS as REASON_LABELS
from audiobooks_scoring.inputs.demo_data import generate_customers
from audiobooks_scoring.model.network import predict_probability
from audiobooks_scoring.model.scoring_model import load_scoring_model
from audiobooks_scoring.model.store import ModelStore
from audiobooks_scoring.reporting.export import export_targets
from audiobooks_scoring.scoring import reasons as scoring
from audiobooks_scoring.scoring.control_group import control_group_mask
from audiobooks_scoring.scoring.stage import FollowingWork
from tests.helpers import run_scoring
from tests.scoring.reference import reason_contributions, score_features
from tests.test_pipeline import AS_OF, fill_activity


@pytest.fixture(scope="module")
def model(trained_store_dir):
    store = ModelStore(trained_store_dir)
    return load_scoring_model(store, store.champion())


def test_reason_codes_name_features_whose_move_to_the_median_lowers_the_score(model):
    raw = generate_customers(2_000, seed=21)[list(FEATURES)].to_numpy(np.float64)
    probability, codes = score_features(model, raw, batch_size=512)
    medians = np.asarray(model.preprocessing.medians)
    checked = 0
    for row, code in zip(raw, codes[:, 0], strict=True):
        if code is None:
            continue
        assert code in REASON_LABELS
        feature = code.rsplit("_", 1)[0]
        j = FEATURES.index(feature)
        moved = row.copy()
        moved[j] = medians[j]
        before = predict_probability(model.weights, model.preprocessing.transform(row[None]))[0]
        after = predict_probability(model.weights, model.preprocessing.transform(moved[None]))[0]
        assert after < before
        assert (row[j] > medians[j]) == code.endswith("_high")
        checked += 1
    assert checked > 500


def stable_sort_reasons(contributions, raw, medians) -> list[list[int]]:
    """Per row the codes of the three largest contributions (stable sort), -1 unless > 0."""
    rows = []
    for values, row in zip(contributions, raw, strict=True):
        order = sorted(range(len(values)), key=lambda j: -values[j])[: scoring.REASON_COUNT]
        rows.append([2 * j + (row[j] <= medians[j]) if values[j] > 0 else -1 for j in order])
    return rows


def test_reason_codes_are_the_three_largest_positive_contributions():
    medians = np.ones(len(FEATURES))
    raw = np.full((3, len(FEATURES)), 2.0)
    raw[0, 2] = 0.0
    contributions = np.zeros((3, len(FEATURES)), np.float32)
    contributions[0, [0, 1, 2, 9]] = [0.1, 0.3, 0.3, -0.2]  # a tie goes to the earlier feature
    contributions[1, 5] = 0.01  # one reason only
    contributions[2] = -0.5  # none
    indices = scoring.reason_code_indices(contributions, raw, medians)
    assert indices.tolist() == [[2, 5, 0], [10, -1, -1], [-1, -1, -1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reason_codes_match_a_stable_sort_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    contributions = rng.choice([-0.2, 0.0, 0.1, 0.3], size=(400, len(FEATURES)))
    raw = rng.choice([0.0, 1.0, 2.0], size=(400, len(FEATURES)))
    medians = np.ones(len(FEATURES))
    indices = scoring.reason_code_indices(contributions.astype(np.float32), raw, medians)
    assert indices.tolist() == stable_sort_reasons(contributions, raw, medians)


def test_fast_reason_contributions_are_the_median_counterfactual(model, monkeypatch):
    raw = generate_customers(3_000, seed=5)[list(FEATURES)].to_numpy(np.float64, copy=True)
    medians = np.asarray(model.preprocessing.medians)
    raw[::7] = medians  # rows at the median
    raw[:512, 8] = medians[8]  # a feature that moves in no row of the first block
    scaled = model.preprocessing.transform(raw)
    medians_scaled = model.preprocessing.medians_scaled()
    expected = reason_contributions(model.weights, scaled, medians_scaled)
    monkeypatch.setattr(scoring, "REASON_BLOCK_ROWS", 512)  # several blocks, over two threads
    with ThreadPoolExecutor(2) as pool, threadpool_limits(limits=1, user_api="blas"):
        fast = scoring.reason_contributions_fast(model.weights, scaled, medians_scaled, pool)
        indices = scoring.score_reasons(model, raw, scaled, pool)
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-6)
    assert np.all(fast[raw == medians] == 0.0) and np.count_nonzero(fast) > raw.size // 3
    assert np.array_equal(indices, scoring.reason_code_indices(fast, raw, medians))


def test_holdout_share_is_close_to_the_setting_and_stable_across_runs():
    ids = np.arange(1, 100_001, dtype=np.int64)
    first = control_group_mask(ids, "salt-a", 0.10)
    assert abs(first.mean() - 0.10) < 0.01
    assert np.array_equal(first, control_group_mask(ids[::-1], "salt-a", 0.10)[::-1])
    assert np.array_equal(first[:500], control_group_mask(ids[:500], "salt-a", 0.10))
    other_salt = control_group_mask(ids, "salt-b", 0.10)
    assert 0.15 < (first != other_salt).mean() < 0.21
    assert not control_group_mask(ids, "salt-a", 0.0).any()


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_round_trips_the_campaign_targets(settings, warehouse, tmp_path, file_format):
    fill_activity(warehouse, customers=1_500)
    figures = run_scoring(settings, warehouse, "run-x", AS_OF)
    out = tmp_path / f"targets.{file_format}"
    rows = export_targets(warehouse, out, file_format, chunk_size=400)
    assert rows == figures["targets"]
    back = pd.read_csv(out) if file_format == "csv" else pq.read_table(out).to_pandas()
    schema = warehouse.tables.metadata.schema
    view = f"{schema}.campaign_targets" if schema else "campaign_targets"
    targets = warehouse.read_frame(f"SELECT * FROM {view} ORDER BY rank")
    assert list(back["customer_id"]) == list(targets["customer_id"])
    assert np.allclose(back["probability"], targets["probability"], rtol=0, atol=0)
    assert list(back["reasons"].fillna("")) == list(targets["reasons"].fillna(""))
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_read_ahead_keeps_order_passes_errors_and_closes_the_source():
    from audiobooks_scoring.scoring.stage import read_ahead

    assert list(read_ahead(iter(range(50)), depth=1)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("lost the connection")

    seen = []
    with pytest.raises(ValueError, match="lost the connection"):
        for item in read_ahead(failing(), depth=1):
            seen.append(item)
    assert seen == [1]

    closed = []

    def endless():
        try:
            number = 0
            while True:
                number += 1
                yield number
        finally:
            closed.append(True)

    for item in read_ahead(endless(), depth=2):
        if item == 3:
            break
    assert closed == [True]


@pytest.mark.parametrize("failing", [0, 2])  # the error surfaces at the next chunk or on leaving
def test_following_work_runs_in_order_and_raises_its_error(failing):
    done = []

    def work(number: int) -> None:
        if number == failing:
            raise OSError("disk full")
        done.append(number)

    with pytest.raises(OSError, match="disk full"), FollowingWork() as following:
        for number in range(3):
            following.submit(lambda number=number: work(number))
    assert done == [number for number in range(3) if number < failing]
