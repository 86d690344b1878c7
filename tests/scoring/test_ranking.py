"""Ranking on the scoring machine: sorted runs merged in bounded memory give the exact order."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pytest

from audiobooks_scoring.contract import CUSTOMER_ID, SCORE_REASON_CODES
from audiobooks_scoring.scoring.ranking import (
    campaign_limit,
    decile_of_ranks,
    open_spill_files,
    rank_keys,
    ranked_columns,
)
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import CodedColumn


def spill_chunks(tmp_path, chunks):
    runs = open_spill_files(tmp_path / "spill")
    for ids, probability in chunks:
        count = len(ids)
        runs.add(
            np.asarray(ids, dtype=np.int64),
            np.asarray(probability, dtype=np.float64),
            np.asarray(ids, dtype=np.int64) % 7 == 0,
            CodedColumn(np.zeros(count, dtype=np.int64), (date(2026, 1, 1),)),
            np.tile(np.array([[0, 3, -1]], dtype=np.int8), (count, 1)),
        )
    return runs


def collect(runs, settings):
    batches = list(ranked_columns(runs, settings))
    return {
        name: np.concatenate([columns[name] for columns, _ in batches])
        for name in (CUSTOMER_ID, "probability", "rank", "decile", "is_target", "holdout")
    }


@pytest.mark.parametrize(
    ("rows", "chunk", "block"),
    [(1, 1, 4), (9, 4, 2), (1_000, 130, 16), (5_000, 5_000, 64), (20_011, 997, 1_000)],
)
@pytest.mark.parametrize(
    ("id_offset", "probability_type"),
    [
        (0, np.float32),  # packed rank keys
        (0, np.float64),  # probabilities float32 cannot hold: lexsort
        (2**32 - 500, np.float32),  # some ids above 32 bits: runs with and without keys
        (-(2**40), np.float32),  # negative ids
    ],
)
def test_merged_runs_rank_like_one_full_sort(
    tmp_path, rows, chunk, block, id_offset, probability_type
):
    rng = np.random.default_rng(rows)
    ids = rng.permutation(rows * 3)[:rows].astype(np.int64) + id_offset
    levels = np.round(rng.random(rows), 2)  # many ties: the id decides
    if probability_type is np.float64:
        levels = levels + 1e-12
    probability = levels.astype(probability_type).astype(np.float64)
    runs = spill_chunks(
        tmp_path, [(ids[i : i + chunk], probability[i : i + chunk]) for i in range(0, rows, chunk)]
    )
    merged = np.concatenate([b[CUSTOMER_ID] for b in runs.merged(block_rows=block)])
    expected = ids[np.lexsort((ids, -probability))]
    assert np.array_equal(merged, expected)


@pytest.mark.parametrize("population", [1, 7, 10, 11, 19, 100, 1_003])
def test_deciles_match_ntile(population):
    ranks = np.arange(1, population + 1)
    buckets = np.array_split(ranks, 10)  # ntile(10): the first buckets one row larger
    expected = np.concatenate(
        [np.full(len(bucket), index + 1) for index, bucket in enumerate(buckets)]
    )
    assert np.array_equal(decile_of_ranks(ranks, population), expected)


@pytest.mark.parametrize(
    ("mode", "value"), [("top_n", 50), ("top_share", 0.25), ("min_probability", 0.6)]
)
def test_ranked_columns_flag_targets_outside_the_holdout(tmp_path, mode, value):
    rng = np.random.default_rng(3)
    ids = np.arange(1, 1_001)
    probability = rng.random(1_000)
    runs = spill_chunks(tmp_path, [(ids[:400], probability[:400]), (ids[400:], probability[400:])])
    settings = Settings(campaign_mode=mode, campaign_value=value)
    ranked = collect(runs, settings)
    assert np.array_equal(ranked["rank"], np.arange(1, 1_001))
    assert not (ranked["is_target"] & ranked["holdout"]).any()
    limit = campaign_limit(settings, runs.non_holdout)
    if limit is None:
        expected = ~ranked["holdout"] & (ranked["probability"] >= value)
    else:
        eligible = np.flatnonzero(~ranked["holdout"])[:limit]
        expected = np.zeros(1_000, dtype=bool)
        expected[eligible] = True
    assert np.array_equal(ranked["is_target"], expected)


def test_spill_files_are_removed_and_leftovers_cleared(tmp_path):
    runs = spill_chunks(tmp_path, [([1, 2], [0.1, 0.2])])
    assert runs.paths
    again = open_spill_files(tmp_path / "spill")  # the next run clears what a dead run left
    assert not any(Path(path).exists() for path in runs.paths)
    again.remove()
    assert not list((tmp_path / "spill").iterdir())


def test_merge_blocks_share_a_fixed_memory_budget(tmp_path, monkeypatch):
    import audiobooks_scoring.scoring.ranking as ranking

    monkeypatch.setattr(ranking, "MERGE_MEMORY_BYTES", 40 * 24 * 20)  # 20 rows a run, 40 runs
    monkeypatch.setattr(ranking, "MIN_MERGE_BLOCK_ROWS", 10)
    rng = np.random.default_rng(5)
    ids = np.arange(4_000)
    probability = rng.random(4_000)
    runs = spill_chunks(
        tmp_path, [(ids[i : i + 100], probability[i : i + 100]) for i in range(0, 4_000, 100)]
    )
    blocks = list(runs.merged())
    assert max(len(block) for block in blocks) <= 40 * 20
    merged = np.concatenate([block[CUSTOMER_ID] for block in blocks])
    assert np.array_equal(merged, ids[np.lexsort((ids, -probability))])


KEY_CASES = {
    "ids and float32 probabilities": ([3, 1, 2, 0xFFFFFFFF], [0.5, 0.5, 0.25, 0.0], True),
    "minus zero is zero": ([1, 2], [-0.0, 0.0], True),
    "an id above 32 bits": ([1, 2**32], [0.5, 0.25], False),
    "a negative id": ([-1, 2], [0.5, 0.25], False),
    "a probability float32 cannot hold": ([1, 2], [0.1, 0.25], False),
    "a NaN probability": ([1, 2], [float("nan"), 0.25], False),
}


@pytest.mark.parametrize(("ids", "probability", "keyed"), KEY_CASES.values(), ids=KEY_CASES.keys())
def test_rank_keys_exist_only_where_they_sort_like_probability_then_id(ids, probability, keyed):
    ids = np.asarray(ids, dtype=np.int64)
    probability = np.asarray(probability, dtype=np.float64)
    if keyed:
        probability = probability.astype(np.float32).astype(np.float64)
    keys = rank_keys(ids, probability)
    assert (keys is not None) == keyed
    if keyed:
        expected = np.lexsort((ids, -probability))
        assert np.array_equal(np.argsort(keys, kind="stable"), expected)


REPEAT_CASES = {
    "none": ([[5, 1, 9], [2, 8], [7, 3]], False),
    "across runs": ([[5, 1, 9], [2, 9], [7, 3]], True),
    "inside one run": ([[5, 1, 5], [2, 8]], True),
    "at a block end of both runs": ([[1, 2, 3, 4], [4, 5, 6, 7]], True),
    "first and last": ([[0, 50], [25, 75], [100, 0]], True),
}


@pytest.mark.parametrize(("chunks", "repeated"), REPEAT_CASES.values(), ids=REPEAT_CASES.keys())
def test_spilled_ids_tell_whether_a_customer_repeats(tmp_path, monkeypatch, chunks, repeated):
    import audiobooks_scoring.scoring.ranking as ranking

    monkeypatch.setattr(ranking, "MERGE_BLOCK_ROWS", 2)  # ids are merged two at a time
    runs = spill_chunks(tmp_path, [(ids, np.linspace(0.1, 0.9, len(ids))) for ids in chunks])
    assert runs.repeats_customer_ids() is repeated


def test_deferred_reason_codes_come_from_the_merged_inputs(tmp_path):
    rng = np.random.default_rng(11)
    ids = rng.permutation(5_000).astype(np.int64)
    probability = rng.random(5_000).astype(np.float32).astype(np.float64)
    inputs = rng.random((5_000, 4)).astype(np.float32)
    above = inputs > 0.5
    calls = []

    def explain(block_inputs, block_above):  # codes that identify each row's inputs
        calls.append(len(block_inputs))
        first = (block_inputs[:, 0] * 1000).astype(np.int64) % len(SCORE_REASON_CODES)
        flagged = block_above.sum(axis=1) % len(SCORE_REASON_CODES)
        return np.stack([first, flagged, np.full(len(first), -1)], axis=1).astype(np.int8)

    runs = open_spill_files(tmp_path / "spill")
    runs.defer_reasons(4, explain)
    for part in np.array_split(np.arange(5_000), 7):
        runs.add(
            ids[part],
            probability[part],
            np.zeros(len(part), dtype=bool),
            None,
            inputs=inputs[part],
            above=above[part],
        )
    batches = list(ranked_columns(runs, Settings()))
    assert sum(calls) == 5_000
    ranked_ids = np.concatenate([columns[CUSTOMER_ID] for columns, _ in batches])
    position = np.argsort(ids)[np.searchsorted(np.sort(ids), ranked_ids)]
    codes = {
        slot: np.concatenate([columns[f"reason_{slot}"].codes for columns, _ in batches])
        for slot in (1, 2, 3)
    }
    expected = explain(inputs[position], above[position])
    for slot in (1, 2, 3):
        assert np.array_equal(codes[slot], expected[:, slot - 1])
    with pytest.raises(ValueError, match="before the first run"):
        runs.defer_reasons(4, explain)
