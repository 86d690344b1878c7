"""Ranking a scored population on the scoring machine, in bounded memory (an external sort).

Each scored chunk is sorted (probability descending, then customer id ascending: the order
of the published rank) and spilled to a local file of compact records (24 bytes a row). The
runs are then merged block by block into rank order, so memory holds one block per run,
never the population. The merged blocks carry rank, decile (`ntile(10)`) and the campaign
flag, ready for one bulk write of the finished list: the warehouse sorts nothing.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from audiobooks_scoring.contract import CUSTOMER_ID, SCORE_REASON_CODES, WINDOW_END
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import CodedColumn

RUN_RECORD = np.dtype(
    [
        ("probability", "<f8"),
        (CUSTOMER_ID, "<i8"),
        ("window_end", "<i2"),
        ("holdout", "u1"),
        ("reason_1", "i1"),
        ("reason_2", "i1"),
        ("reason_3", "i1"),
    ],
    align=False,
)
MERGE_BLOCK_ROWS = 65_536
MIN_MERGE_BLOCK_ROWS = 1_024
MERGE_MEMORY_BYTES = 32 << 20
SPILL_PREFIX = "ranking-"


def rank_order(records: np.ndarray) -> np.ndarray:
    """Indices that sort records by probability descending, then customer id ascending."""
    return np.lexsort((records[CUSTOMER_ID], -records["probability"]))


@dataclass
class SortedRuns:
    """Sorted runs of scored rows spilled to local files, with what ranking needs to know."""

    directory: str
    paths: list[str] = field(default_factory=list)
    window_ends: list[date | None] = field(default_factory=list)
    rows: int = 0
    non_holdout: int = 0

    def add(
        self,
        customer_ids: np.ndarray,
        probability: np.ndarray,
        holdout: np.ndarray,
        window_end: CodedColumn | None,
        reasons: np.ndarray,
    ) -> None:
        """Sort one scored chunk into rank order and spill it as a run."""
        count = len(customer_ids)
        if count == 0:
            return
        records = np.empty(count, dtype=RUN_RECORD)
        records["probability"] = probability
        records[CUSTOMER_ID] = customer_ids
        records["holdout"] = holdout
        records["window_end"] = self._window_end_codes(window_end, count)
        for slot in range(3):
            records[f"reason_{slot + 1}"] = reasons[:, slot]
        path = Path(self.directory) / f"run-{len(self.paths):06d}.bin"
        records[rank_order(records)].tofile(path)
        self.paths.append(str(path))
        self.rows += count
        self.non_holdout += int(count - np.count_nonzero(holdout))

    def _window_end_codes(self, window_end: CodedColumn | None, count: int) -> np.ndarray:
        if window_end is None:
            return np.full(count, self._code_of(None), dtype=np.int16)
        lookup = np.array(
            [self._code_of(value) for value in window_end.values] + [self._code_of(None)],
            dtype=np.int16,
        )
        codes = np.asarray(window_end.codes)
        return lookup[np.where(codes < 0, len(window_end.values), codes)]

    def _code_of(self, value: date | None) -> int:
        if value not in self.window_ends:
            self.window_ends.append(value)
        return self.window_ends.index(value)

    def merged(self, block_rows: int | None = None) -> Iterator[np.ndarray]:
        """The spilled rows in rank order, in blocks; memory is one block per run.

        By default the blocks share `MERGE_MEMORY_BYTES`, so memory stays bounded however
        many runs a large population spills.
        """
        if block_rows is None:
            share = MERGE_MEMORY_BYTES // (max(len(self.paths), 1) * RUN_RECORD.itemsize)
            block_rows = int(min(MERGE_BLOCK_ROWS, max(MIN_MERGE_BLOCK_ROWS, share)))
        readers = [_RunReader(path, block_rows) for path in self.paths]
        try:
            yield from _merge(readers)
        finally:
            for reader in readers:
                reader.close()

    def remove(self) -> None:
        """Delete the spill files and their directory."""
        for path in self.paths:
            Path(path).unlink(missing_ok=True)
        if Path(self.directory).is_dir():
            Path(self.directory).rmdir()
        self.paths = []


def spill_runs(parent: Path) -> SortedRuns:
    """An empty set of sorted runs in a new directory under `parent`.

    Called under the run lock: directories left there by runs that died are removed first.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(f"{SPILL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return SortedRuns(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=parent))


class _RunReader:
    """Reads one sorted run file a block at a time."""

    def __init__(self, path: str, block_rows: int) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.block_rows = block_rows
        self.block = np.empty(0, dtype=RUN_RECORD)
        self.refill()

    def refill(self) -> None:
        if len(self.block) == 0:
            self.block = np.fromfile(self.handle, dtype=RUN_RECORD, count=self.block_rows)

    def close(self) -> None:
        self.handle.close()


def _count_up_to(block: np.ndarray, probability: float, customer_id: int) -> int:
    """How many rows of a rank-ordered block come no later than (probability, customer id)."""
    descending = -block["probability"]
    first = int(np.searchsorted(descending, -probability, side="left"))
    last = int(np.searchsorted(descending, -probability, side="right"))
    tied = block[CUSTOMER_ID][first:last]
    return first + int(np.searchsorted(tied, customer_id, side="right"))


def _merge(readers: list[_RunReader]) -> Iterator[np.ndarray]:
    """Blocks in rank order: each round takes every row no later than the earliest block end."""
    live = [reader for reader in readers if len(reader.block)]
    while live:
        ends = [reader.block[-1] for reader in live]
        cutoff = min(ends, key=lambda row: (-row["probability"], row[CUSTOMER_ID]))
        taken = []
        for reader in live:
            count = _count_up_to(reader.block, cutoff["probability"], cutoff[CUSTOMER_ID])
            if count:
                taken.append(reader.block[:count])
                reader.block = reader.block[count:]
            reader.refill()
        block = taken[0] if len(taken) == 1 else np.concatenate(taken)
        yield block[rank_order(block)] if len(taken) > 1 else block
        live = [reader for reader in live if len(reader.block)]


def decile_of_ranks(ranks: np.ndarray, population: int) -> np.ndarray:
    """`ntile(10)` of 1-based ranks over `population` rows."""
    bounds = decile_bounds(population)
    return (np.searchsorted(bounds, ranks, side="left") + 1).astype(np.int16)


def decile_bounds(population: int) -> list[int]:
    """The last rank of deciles 1..9 of `ntile(10)` over `population` ranked rows."""
    size, larger = divmod(population, 10)
    bounds, last = [], 0
    for decile in range(9):
        last += size + (1 if decile < larger else 0)
        bounds.append(last)
    return bounds


def campaign_limit(settings: Settings, non_holdout: int) -> int | None:
    """How many non-holdout customers the campaign targets; None when a probability floor."""
    if settings.campaign_mode == "min_probability":
        return None
    if settings.campaign_mode == "top_n":
        return int(settings.campaign_value)
    return math.ceil(settings.campaign_value * non_holdout)


def record_columns(block: np.ndarray, window_ends: tuple) -> dict:
    """A block of run records as the list's per-customer columns (codes for the text ones)."""
    columns = {
        CUSTOMER_ID: block[CUSTOMER_ID],
        WINDOW_END: CodedColumn(block["window_end"].astype(np.int64), window_ends),
        "probability": block["probability"],
        "holdout": block["holdout"].astype(bool),
    }
    for slot in range(3):
        name = f"reason_{slot + 1}"
        columns[name] = CodedColumn(block[name].astype(np.int64), SCORE_REASON_CODES)
    return columns


def ranked_columns(runs: SortedRuns, settings: Settings) -> Iterator[tuple[dict, int]]:
    """The finished list in rank order, as (columns, rows) batches for `write_columns`."""
    limit = campaign_limit(settings, runs.non_holdout)
    ranked = 0
    campaign_ranked = 0
    window_ends = tuple(runs.window_ends)
    for block in runs.merged():
        count = len(block)
        columns = record_columns(block, window_ends)
        ranks = np.arange(ranked + 1, ranked + count + 1, dtype=np.int64)
        holdout = columns["holdout"]
        campaign_rank = campaign_ranked + np.cumsum(~holdout)
        if limit is None:
            chosen = block["probability"] >= settings.campaign_value
        else:
            chosen = campaign_rank <= limit
        columns.update(
            rank=ranks, decile=decile_of_ranks(ranks, runs.rows), is_target=~holdout & chosen
        )
        yield columns, count
        ranked += count
        campaign_ranked += int(count - np.count_nonzero(holdout))
