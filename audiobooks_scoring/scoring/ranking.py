"""Ranking a scored population on the scoring machine, in bounded memory (an external sort).

Each scored chunk is sorted (probability descending, then customer id ascending: the order
of the published rank) and spilled to a local file of compact records. The files are then
merged block by block into rank order, so memory holds one block per file, never the
population. The merged blocks carry rank, decile (`ntile(10)`) and the campaign flag, ready
for one bulk write of the finished list: the warehouse sorts nothing.

A record holds the row's three reason codes (24 bytes), or, when the spill defers them, the
row's model inputs and above-median flags (69 bytes with ten features): the codes are then
computed block by block during the merge, while the warehouse ingests the previous block.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from audiobooks_scoring.contract import CUSTOMER_ID, SCORE_REASON_CODES, WINDOW_END
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse.columns import CodedColumn

RANK_FIELDS = [
    ("probability", "<f8"),
    (CUSTOMER_ID, "<i8"),
    ("window_end", "<i2"),
    ("holdout", "u1"),
]
RUN_RECORD = np.dtype([*RANK_FIELDS, ("reason_1", "i1"), ("reason_2", "i1"), ("reason_3", "i1")])
ReasonCoder = Callable[[np.ndarray, np.ndarray], np.ndarray]
MERGE_BLOCK_ROWS = 65_536
MIN_MERGE_BLOCK_ROWS = 1_024
MERGE_MEMORY_BYTES = 32 << 20
SPILL_PREFIX = "ranking-"


def rank_keys(customer_ids: np.ndarray, probability: np.ndarray) -> np.ndarray | None:
    """One uint64 per row that sorts in rank order, or None when the rows do not fit one.

    The key is the descending float32 bit pattern of the probability over the customer id,
    so it exists when ids lie in [0, 2**32) and probabilities are non-negative float32
    values (as the model gives); sorting it is one vectorised argsort instead of a lexsort.
    """
    if len(customer_ids) == 0:
        return np.empty(0, dtype=np.uint64)
    if customer_ids.min() < 0 or customer_ids.max() > 0xFFFFFFFF:
        return None
    narrow = probability.astype(np.float32) + np.float32(0.0)  # -0.0 becomes +0.0
    if not (np.all(narrow >= 0) and np.array_equal(narrow, probability)):
        return None
    descending = np.uint32(0xFFFFFFFF) - narrow.view(np.uint32)
    return (descending.astype(np.uint64) << np.uint64(32)) | customer_ids.astype(np.uint64)


def rank_order(customer_ids: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """Indices that sort rows by probability descending, then customer id ascending."""
    keys = rank_keys(customer_ids, probability)
    if keys is not None:
        return np.argsort(keys)
    return np.lexsort((customer_ids, -probability))


@dataclass
class SpillFiles:
    """Scored chunks, each sorted into rank order and spilled to a local file, and their counts."""

    directory: str
    paths: list[str] = field(default_factory=list)
    window_ends: list[date | None] = field(default_factory=list)
    rows: int = 0
    non_holdout: int = 0
    record: np.dtype = RUN_RECORD
    explain: ReasonCoder | None = None
    id_paths: list[str] = field(default_factory=list)
    repeated_in_run: bool = False

    def defer_reasons(self, inputs: int, explain: ReasonCoder) -> None:
        """Spill `inputs` model inputs and above-median flags instead of reason codes.

        `explain(inputs, above)` gives the codes (n x 3, -1 for none) of a merged block.
        """
        if self.paths:
            raise ValueError("reason codes can only be deferred before the first run is spilled")
        self.record = np.dtype(
            [*RANK_FIELDS, ("inputs", "<f4", (inputs,)), ("above", "?", (inputs,))]
        )
        self.explain = explain

    def add(
        self,
        customer_ids: np.ndarray,
        probability: np.ndarray,
        holdout: np.ndarray,
        window_end: CodedColumn | None,
        reasons: np.ndarray | None = None,
        inputs: np.ndarray | None = None,
        above: np.ndarray | None = None,
    ) -> None:
        """Sort one scored chunk into rank order and spill it as a run.

        The chunk brings its reason codes, or (when deferred) its model inputs and flags.
        """
        count = len(customer_ids)
        if count == 0:
            return
        order = rank_order(customer_ids, probability)
        records = np.empty(count, dtype=self.record)
        records["probability"] = probability
        records[CUSTOMER_ID] = customer_ids
        records["holdout"] = holdout
        records["window_end"] = self._window_end_codes(window_end, count)
        if self.explain is None:
            if reasons is None:
                raise ValueError("a spill that does not defer reasons needs each row's reasons")
            for slot in range(3):
                records[f"reason_{slot + 1}"] = reasons[:, slot]
        else:
            records["inputs"] = inputs
            records["above"] = above
        records = np.take(records, order)  # whole records: faster than per-field gathers
        path = Path(self.directory) / f"run-{len(self.paths):06d}.bin"
        records.tofile(path)
        self.paths.append(str(path))
        ids = np.sort(customer_ids)
        self.repeated_in_run |= bool(np.any(ids[1:] == ids[:-1]))
        id_path = Path(self.directory) / f"ids-{len(self.id_paths):06d}.bin"
        ids.astype("<i8").tofile(id_path)
        self.id_paths.append(str(id_path))
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
        many files a large population spills.
        """
        if block_rows is None:
            share = MERGE_MEMORY_BYTES // (max(len(self.paths), 1) * self.record.itemsize)
            block_rows = int(min(MERGE_BLOCK_ROWS, max(MIN_MERGE_BLOCK_ROWS, share)))
        readers = [_SpillReader(path, block_rows, self.record) for path in self.paths]
        try:
            yield from _merge(readers)
        finally:
            for reader in readers:
                reader.close()

    def repeats_customer_ids(self) -> bool:
        """Whether a customer id was spilled more than once (a merge of the sorted id files)."""
        if self.repeated_in_run:
            return True
        handles = [open(path, "rb") for path in self.id_paths]  # noqa: SIM115 - closed below
        try:
            blocks = [
                np.fromfile(handle, dtype="<i8", count=MERGE_BLOCK_ROWS) for handle in handles
            ]
            while True:
                live = [index for index, block in enumerate(blocks) if len(block)]
                if not live:
                    return False
                # Every id up to the smallest block end is in this round, from every file.
                cutoff = min(blocks[index][-1] for index in live)
                taken = []
                for index in live:
                    count = int(np.searchsorted(blocks[index], cutoff, side="right"))
                    taken.append(blocks[index][:count])
                    blocks[index] = blocks[index][count:]
                    if not len(blocks[index]):
                        blocks[index] = np.fromfile(
                            handles[index], dtype="<i8", count=MERGE_BLOCK_ROWS
                        )
                ids = np.sort(np.concatenate(taken))
                if np.any(ids[1:] == ids[:-1]):
                    return True
        finally:
            for handle in handles:
                handle.close()

    def columns_of(self, block: np.ndarray) -> dict:
        """A merged block as the list's per-customer columns (codes for the text ones)."""
        columns = {
            CUSTOMER_ID: block[CUSTOMER_ID],
            WINDOW_END: CodedColumn(block["window_end"].astype(np.int64), tuple(self.window_ends)),
            "probability": block["probability"],
            "holdout": block["holdout"].astype(bool),
        }
        if self.explain is None:
            reasons = np.stack([block[f"reason_{slot + 1}"] for slot in range(3)], axis=1)
        else:
            reasons = self.explain(block["inputs"], block["above"])
        for slot in range(3):
            codes = reasons[:, slot].astype(np.int64)
            columns[f"reason_{slot + 1}"] = CodedColumn(codes, SCORE_REASON_CODES)
        return columns

    def remove(self) -> None:
        """Delete the spill files and their directory."""
        for path in [*self.paths, *self.id_paths]:
            Path(path).unlink(missing_ok=True)
        if Path(self.directory).is_dir():
            Path(self.directory).rmdir()
        self.paths, self.id_paths = [], []


def open_spill_files(parent: Path) -> SpillFiles:
    """An empty set of sorted spill files in a new directory under `parent`.

    Called under the run lock: directories left there by runs that died are removed first.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(f"{SPILL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return SpillFiles(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=parent))


class _SpillReader:
    """Reads one sorted run file a block at a time, with the block's rank keys when it has them."""

    def __init__(self, path: str, block_rows: int, record: np.dtype) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.block_rows = block_rows
        self.record = record
        self.block = np.empty(0, dtype=record)
        self.keys: np.ndarray | None = np.empty(0, dtype=np.uint64)
        self.refill()

    def refill(self) -> None:
        if len(self.block) == 0:
            self.block = np.fromfile(self.handle, dtype=self.record, count=self.block_rows)
            self.keys = rank_keys(self.block[CUSTOMER_ID], self.block["probability"])

    def take(self, count: int) -> np.ndarray:
        """The first `count` rows of the block, removed from it."""
        taken, self.block = self.block[:count], self.block[count:]
        if self.keys is not None:
            self.keys = self.keys[count:]
        return taken

    def close(self) -> None:
        self.handle.close()


def _count_up_to(block: np.ndarray, probability: float, customer_id: int) -> int:
    """How many rows of a rank-ordered block come no later than (probability, customer id)."""
    descending = -block["probability"]
    first = int(np.searchsorted(descending, -probability, side="left"))
    last = int(np.searchsorted(descending, -probability, side="right"))
    tied = block[CUSTOMER_ID][first:last]
    return first + int(np.searchsorted(tied, customer_id, side="right"))


def _merge(readers: list[_SpillReader]) -> Iterator[np.ndarray]:
    """Blocks in rank order: each round takes every row no later than the earliest block end."""
    live = [reader for reader in readers if len(reader.block)]
    while live:
        keys = [reader.keys for reader in live]
        if all(block_keys is not None for block_keys in keys):
            known = [block_keys for block_keys in keys if block_keys is not None]
            cutoff_key = min(block_keys[-1] for block_keys in known)
            counts = [
                int(np.searchsorted(block_keys, cutoff_key, side="right")) for block_keys in known
            ]
        else:
            ends = [reader.block[-1] for reader in live]
            cutoff = min(ends, key=lambda row: (-row["probability"], row[CUSTOMER_ID]))
            counts = [
                _count_up_to(reader.block, cutoff["probability"], cutoff[CUSTOMER_ID])
                for reader in live
            ]
        taken = []
        for reader, count in zip(live, counts, strict=True):
            if count:
                taken.append(reader.take(count))
            reader.refill()
        if len(taken) == 1:
            yield taken[0]
        else:
            block = _concatenate(taken)
            yield np.take(block, rank_order(block[CUSTOMER_ID], block["probability"]))
        live = [reader for reader in live if len(reader.block)]


def _concatenate(blocks: list[np.ndarray]) -> np.ndarray:
    """`blocks` one after the other (`np.concatenate` copies odd-sized records slowly)."""
    joined = np.empty(sum(len(block) for block in blocks), dtype=blocks[0].dtype)
    start = 0
    for block in blocks:
        joined[start : start + len(block)] = block
        start += len(block)
    return joined


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


def ranked_columns(spill: SpillFiles, settings: Settings) -> Iterator[tuple[dict, int]]:
    """The finished list in rank order, as (columns, rows) batches for `write_columns`."""
    limit = campaign_limit(settings, spill.non_holdout)
    ranked = 0
    campaign_ranked = 0
    for block in spill.merged():
        count = len(block)
        columns = spill.columns_of(block)
        ranks = np.arange(ranked + 1, ranked + count + 1, dtype=np.int64)
        holdout = columns["holdout"]
        campaign_rank = campaign_ranked + np.cumsum(~holdout)
        if limit is None:
            chosen = block["probability"] >= settings.campaign_value
        else:
            chosen = campaign_rank <= limit
        columns.update(
            rank=ranks, decile=decile_of_ranks(ranks, spill.rows), is_target=~holdout & chosen
        )
        yield columns, count
        ranked += count
        campaign_ranked += int(count - np.count_nonzero(holdout))
