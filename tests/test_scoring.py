"""Scoring helpers: reason codes agree with the model, a stable salted holdout, export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from audiobooks_scoring.contract import FEATURES
from audiobooks_scoring.demo_data import generate_customers
from audiobooks_scoring.exporting import export_targets
from audiobooks_scoring.lifecycle import load_scoring_model
from audiobooks_scoring.model import predict_probability
from audiobooks_scoring.model_store import ModelStore
from audiobooks_scoring.scoring import REASON_LABELS, holdout_mask, score_features
from audiobooks_scoring.scoring_run import run_scoring
from audiobooks_scoring.warehouse import read_frame
from tests.test_scoring_integration import AS_OF, fill_activity


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


def test_holdout_share_is_close_to_the_setting_and_stable_across_runs():
    ids = np.arange(1, 100_001, dtype=np.int64)
    first = holdout_mask(ids, "salt-a", 0.10)
    assert abs(first.mean() - 0.10) < 0.01
    assert np.array_equal(first, holdout_mask(ids[::-1], "salt-a", 0.10)[::-1])
    assert np.array_equal(first[:500], holdout_mask(ids[:500], "salt-a", 0.10))
    other_salt = holdout_mask(ids, "salt-b", 0.10)
    assert 0.15 < (first != other_salt).mean() < 0.21
    assert not holdout_mask(ids, "salt-a", 0.0).any()


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
    targets = read_frame(warehouse.engine, f"SELECT * FROM {view} ORDER BY rank")
    assert list(back["customer_id"]) == list(targets["customer_id"])
    assert np.allclose(back["probability"], targets["probability"], rtol=0, atol=0)
    assert list(back["reasons"].fillna("")) == list(targets["reasons"].fillna(""))
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
