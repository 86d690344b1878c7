"""Synthetic audiobook customers that look like the real public data set, for demos and tests.

Calibration (done once, offline, on the 14,084-row public file; the tables below are the
result, so nothing here reads the CSV at run time):

- The real customers fall in three segments with different rules: multi-book buyers (4.6%,
  never listened, all converted), single-book listeners (41.1%, completion > 0, none
  converted) and single-book non-listeners (54.3%, 20.8% converted). Each synthetic
  customer is drawn from one segment with the real shares.
- Inside a segment, discrete fields (book length, number of books, review score, support
  count, the common prices 5.33 / 8.00 / 10.13 ...) are drawn from hard-coded empirical
  frequency tables; continuous-ish fields (other prices, completion, days to last visit)
  by inverse-CDF interpolation of hard-coded 41- or 51-point quantile tables, then rounded
  like the source (prices, completion, minutes to 0.01; days to whole days).
- Dependencies kept: review and support rates by completion band (listeners), review rate
  by "visited after purchase" and support rate by review (non-listeners); minutes_listened
  = completion x total length; avg <= total for length and price; review_score is 8.91
  exactly when there is no review (the real file has 204 exceptions, 1.4%, not reproduced).
- Non-listeners convert with a logistic model fitted on the real non-listeners (no
  intercept; one weight per book length, plus last visit, review, support, log price),
  whose within-segment AUC on the real data is 0.75 (gradient boosting reaches 0.76).
- Generation is in fixed blocks of `BLOCK_ROWS` customers, each seeded from
  (seed, stream, block index), so a customer's values depend on the seed and its position
  only: the same customers come out whatever the chunk size.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from audiobooks_scoring.contract import (
    ACTIVITY_COLUMNS,
    CUSTOMER_ID,
    FEATURES,
    LABEL,
    REVIEW_SCORE_DEFAULT,
    TRAINING_COLUMNS,
    WINDOW_END,
)

logger = logging.getLogger(__name__)

NEW_CUSTOMER_SHARE = 0.1  # the activity window adds this share of new customers
BLOCK_ROWS = 16_384
MAX_LAST_VISIT_DAYS = 730  # a window is two years long

_STREAM_BASE = 0
_STREAM_DRIFT = 1
_STREAM_NEW = 2

_N_BOOKS = "n_books"  # internal: number of books bought, kept for the next-window drift

# --- calibration tables (counts or shares from the real file) ---------------------------

# Segment sizes in the real file: multi-book buyers, single-book listeners, non-listeners.
SEGMENT_COUNTS = (644, 5_789, 7_651)
_MULTI, _LISTENER, _NON_LISTENER = 0, 1, 2

# Single-book customers: (book length in minutes, customers), per segment.
LENGTH_COUNTS_LISTENER = (
    (216, 2), (324, 69), (540, 57), (648, 327), (756, 3),
    (1080, 270), (1188, 1119), (1620, 1932), (2160, 2010),
)  # fmt: skip
LENGTH_COUNTS_NON_LISTENER = (
    (216, 49), (324, 231), (540, 58), (648, 385), (756, 7),
    (1080, 288), (1188, 1725), (1620, 2206), (2160, 2702),
)  # fmt: skip

# Multi-book buyers: number of books -> ((total length in minutes, customers), ...).
MULTI_BOOK_COUNTS: Mapping[int, tuple[tuple[int, int], ...]] = {
    2: ((540, 1), (756, 1), (864, 3), (972, 6), (1188, 3), (1404, 3), (1512, 11), (1728, 10),
        (1836, 15), (1944, 6), (2160, 6), (2268, 49), (2484, 11), (2700, 21), (2808, 102),
        (3240, 7), (3348, 98), (3780, 110)),
    3: ((1296, 1), (1512, 2), (1728, 2), (1836, 1), (2052, 3), (2160, 1), (2484, 1), (2592, 3),
        (2916, 1), (3024, 3), (3132, 4), (3348, 7), (3456, 8), (3564, 3), (3672, 5), (3780, 1),
        (3888, 7), (3996, 14), (4104, 5), (4320, 1), (4428, 23), (4860, 4), (4968, 27)),
    4: ((2376, 1), (3240, 1), (3780, 1), (3996, 1), (4320, 2), (4536, 3), (4644, 2), (4752, 4),
        (4968, 2), (5076, 2), (5184, 3), (5508, 5), (5616, 10), (5724, 1), (6048, 5)),
    5: ((4644, 1), (5292, 1), (6156, 1), (6264, 1), (6696, 1)),
    6: ((5940, 1), (6372, 1), (6480, 1), (6588, 1), (7020, 1)),
    7: ((7020, 1),),
}  # fmt: skip

# Average price per book: the common prices with their share, and 41 quantiles (0, 2.5%,
# ..., 100%) of the other prices, per segment.
PRICE_SPIKES = (
    ((5.33, 0.2842), (8.0, 0.0792), (6.67, 0.0637), (10.13, 0.0404), (6.22, 0.0202),
     (6.66, 0.0186), (5.87, 0.0186), (6.13, 0.0171), (7.73, 0.0155), (6.93, 0.0124),
     (5.6, 0.0109), (6.4, 0.0109)),
    ((5.33, 0.342), (8.0, 0.184), (10.13, 0.0793), (7.99, 0.0273), (5.87, 0.0159),
     (6.4, 0.0157), (5.61, 0.0157), (6.93, 0.0152), (7.47, 0.0117)),
    ((5.33, 0.4044), (8.0, 0.1372), (10.13, 0.0422), (5.87, 0.0289), (7.99, 0.0237),
     (6.93, 0.0214), (5.61, 0.0203), (6.4, 0.0162), (7.47, 0.0142), (5.53, 0.012),
     (6.58, 0.0111), (6.13, 0.0103)),
)  # fmt: skip
PRICE_OTHER_QUANTILES = (
    (3.99, 4.46, 4.62, 4.99, 5.51, 5.61, 5.66, 5.73, 5.77, 5.9, 5.98, 6.0, 6.09, 6.39, 6.57,
     6.62, 6.71, 6.75, 6.86, 6.99, 7.11, 7.19, 7.3, 7.47, 7.48, 7.63, 7.76, 7.82, 7.96, 8.13,
     8.26, 8.41, 8.5, 8.54, 8.8, 9.07, 9.83, 11.21, 12.79, 16.24, 55.73),
    (3.86, 4.1, 4.46, 5.01, 5.53, 5.54, 5.67, 5.74, 5.77, 5.86, 5.95, 5.97, 5.99, 6.07, 6.13,
     6.14, 6.39, 6.53, 6.58, 6.75, 6.92, 7.18, 7.54, 7.6, 7.68, 7.77, 8.06, 8.3, 8.42, 8.49,
     8.61, 8.85, 9.66, 9.8, 10.07, 10.81, 11.83, 13.15, 19.73, 25.6, 130.94),
    (3.86, 4.1, 4.46, 4.93, 5.07, 5.58, 5.66, 5.69, 5.74, 5.77, 5.86, 5.9, 5.95, 5.97, 5.99,
     6.01, 6.09, 6.28, 6.41, 6.53, 6.59, 6.75, 6.92, 7.08, 7.34, 7.54, 7.61, 7.68, 7.76, 8.06,
     8.38, 8.45, 8.53, 8.67, 9.14, 9.81, 9.87, 10.81, 12.45, 25.07, 104.0),
)  # fmt: skip

# Days between purchase and last visit: share of 0, and 41 quantiles of the positive values.
LAST_VISIT_ZERO_SHARE: tuple[float, float, float] = (
    0.3385,
    float("nan"),
    0.637,
)  # listeners: by completion band, below
LAST_VISIT_POSITIVE_QUANTILES = (
    (1, 2, 5, 7, 10, 15, 18, 23, 27, 30, 34, 43, 49, 57, 65, 76, 87, 96, 105, 112, 122, 133,
     140, 145, 153, 167, 176, 183, 191, 202, 212, 224, 232, 246, 258, 263, 282, 288, 306, 328,
     374),
    (1, 1, 2, 3, 5, 6, 8, 10, 13, 15, 18, 21, 25, 28, 32, 37, 42, 47, 54, 61, 68, 77, 85, 94,
     104, 113, 124, 135, 145, 158, 169, 181, 192, 203, 214, 229, 240, 256, 277, 302, 464),
    (1, 1, 1, 2, 4, 5, 7, 9, 11, 15, 19, 22, 26, 29, 33, 38, 44, 51, 57, 65, 73, 80, 88, 99,
     109, 121, 130, 140, 151, 162, 170, 178, 190, 203, 215, 230, 244, 258, 280, 305, 388),
)  # fmt: skip

# Listeners: 51 quantiles (0, 2%, ..., 100%) of completion for books shorter than
# `LONG_BOOK_MIN` minutes and for longer ones (short books are finished more often), and by
# completion band (upper edges below) the share with a review, with a support request and
# with last visit 0.
LONG_BOOK_MIN = 1188
COMPLETION_QUANTILES_SHORT_BOOK = (
    0.02, 0.02, 0.03, 0.046, 0.07, 0.08, 0.1, 0.12, 0.14, 0.14, 0.16, 0.17, 0.18, 0.19, 0.206,
    0.22, 0.24, 0.26, 0.29, 0.33, 0.34, 0.37, 0.39, 0.43, 0.45, 0.465, 0.49, 0.516, 0.56, 0.6,
    0.622, 0.65, 0.67, 0.7, 0.73, 0.75, 0.79, 0.83, 0.855, 0.9, 0.95, 0.97, 0.99, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
)  # fmt: skip
COMPLETION_QUANTILES_LONG_BOOK = (
    0.01, 0.01, 0.01, 0.02, 0.02, 0.02, 0.03, 0.03, 0.04, 0.04, 0.04, 0.05, 0.06, 0.06, 0.07,
    0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.17, 0.19, 0.2, 0.22, 0.23, 0.24,
    0.26, 0.28, 0.29, 0.31, 0.33, 0.34, 0.36, 0.39, 0.41, 0.44, 0.47, 0.51, 0.55, 0.59, 0.64,
    0.72, 0.81, 0.9, 0.99, 1.0, 1.0,
)  # fmt: skip
COMPLETION_BAND_EDGES = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
LISTENER_REVIEW_SHARE = (0.0541, 0.2023, 0.2163, 0.3664, 0.4853, 0.511, 0.5811, 0.7128)
LISTENER_SUPPORT_SHARE = (0.0025, 0.0091, 0.0079, 0.019, 0.1485, 0.2348, 0.3378, 0.4256)
LISTENER_LAST_VISIT_ZERO_SHARE = (0.1582, 0.1025, 0.0668, 0.0246, 0.0147, 0.0221, 0.045, 0.0282)

# Multi-book buyers: review and support shares. Non-listeners: review share without and with
# a visit after purchase, support share without and with a review.
MULTI_REVIEW_SHARE = 0.146
MULTI_SUPPORT_SHARE = 0.0637
NON_LISTENER_REVIEW_SHARE = (0.0217, 0.0961)
NON_LISTENER_SUPPORT_SHARE = (0.0045, 0.2011)

# Support requests among customers with at least one: (requests, customers).
SUPPORT_COUNTS = (
    (1, 410), (2, 142), (3, 36), (4, 12), (5, 6), (6, 4), (7, 1), (8, 2), (10, 2), (12, 1),
    (30, 1),
)  # fmt: skip

# Review scores of customers who left a review: (score, customers).
REVIEW_SCORE_COUNTS = (
    (1.0, 10), (1.5, 1), (2.0, 5), (3.0, 8), (4.0, 14), (4.5, 1), (5.0, 39), (5.5, 2),
    (6.0, 98), (6.5, 4), (6.67, 1), (7.0, 147), (7.5, 2), (7.75, 1), (8.0, 371), (8.33, 2),
    (8.5, 9), (8.67, 1), (9.0, 343), (9.4, 1), (9.5, 18), (9.67, 1), (10.0, 1185),
)  # fmt: skip

# Non-listeners' log-odds of converting (logistic regression on the real non-listeners,
# L2 C=10, no intercept): a weight per book length plus these terms.
CONVERSION_LENGTH_WEIGHTS: Mapping[int, float] = {
    216: -2.949, 324: -2.363, 540: -1.278, 648: -2.012, 756: -2.441,
    1080: -2.574, 1188: -2.032, 1620: -2.229, 2160: -2.367,
}  # fmt: skip
CONVERSION_WEIGHTS: Mapping[str, float] = {
    "last_visit_is_zero": -0.598,
    "log1p_last_visit": 0.224,
    "review": 2.267,
    "has_support_request": 4.016,
    "log_price": 0.327,
}

# Next window (activity) drift: who buys, listens, visits, reviews and asks for support.
DRIFT_SECOND_EXTRA_BOOK_SHARE = 0.15
DRIFT_LISTEN_SHARE = (0.45, 0.12)  # customers who listened before, who had not
DRIFT_LISTEN_MAX_GAIN = 0.5  # at most this share of the unlistened minutes is added
DRIFT_OTHER_VISIT_SHARE = 0.10
DRIFT_MAX_VISIT_DAYS = 180
DRIFT_NEW_REVIEW_SHARE = 0.08
DRIFT_SUPPORT_SHARE = 0.02


# --- sampling helpers --------------------------------------------------------------------


def _cumulative(weights: Sequence[float]) -> np.ndarray:
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    return cdf / cdf[-1]


class _Categorical:
    """Values with weights, drawn by inverse CDF through a 2**16-entry lookup table.

    The table makes a draw one gather (several times faster than a binary search); it
    rounds each probability to a multiple of 2**-16, far below the tables' own precision.
    """

    LOOKUP_SIZE = 1 << 16

    def __init__(self, pairs: Iterable[tuple[float, float]]) -> None:
        values, weights = zip(*pairs, strict=True)
        cdf = _cumulative(weights)
        midpoints = (np.arange(self.LOOKUP_SIZE) + 0.5) / self.LOOKUP_SIZE
        index = np.minimum(np.searchsorted(cdf, midpoints, side="right"), len(values) - 1)
        self.lookup = np.asarray(values, dtype=np.float64)[index]

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self.lookup[rng.integers(0, self.LOOKUP_SIZE, size)]

    def draw_where(
        self, rng: np.random.Generator, mask: np.ndarray, default: np.ndarray | float
    ) -> np.ndarray:
        """`default` everywhere except where `mask` is true, which gets fresh draws."""
        out = np.array(np.broadcast_to(default, mask.shape), dtype=np.float64)
        out[mask] = self.draw(rng, int(np.count_nonzero(mask)))
        return out


def _draw_quantiles(
    rng: np.random.Generator, quantiles: np.ndarray, size: int, log_scale: bool = False
) -> np.ndarray:
    """Draw by linear interpolation between equally spaced quantiles (inverse CDF)."""
    points = np.log(quantiles) if log_scale else quantiles
    position = rng.random(size) * (len(points) - 1)
    index = np.minimum(position.astype(np.int64), len(points) - 2)
    fraction = position - index
    values = points[index] + fraction * (points[index + 1] - points[index])
    return np.exp(values) if log_scale else values


class _PriceModel:
    """Common prices with their shares, else interpolated (in log space) between quantiles."""

    def __init__(self, spikes: Sequence[tuple[float, float]], others: Sequence[float]) -> None:
        spike_share = sum(share for _, share in spikes)
        self.choices = _Categorical([*spikes, (math.nan, 1.0 - spike_share)])
        self.others = np.asarray(others, dtype=np.float64)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        prices = self.choices.draw(rng, size)
        other = np.isnan(prices)
        prices[other] = _draw_quantiles(rng, self.others, int(other.sum()), log_scale=True)
        return np.round(prices, 2)


_SINGLE_LENGTHS = {
    _LISTENER: _Categorical(LENGTH_COUNTS_LISTENER),
    _NON_LISTENER: _Categorical(LENGTH_COUNTS_NON_LISTENER),
}
_MULTI_BOOKS = [(n, total, count) for n, rows in MULTI_BOOK_COUNTS.items() for total, count in rows]
_MULTI_BOOK_INDEX = _Categorical((index, row[2]) for index, row in enumerate(_MULTI_BOOKS))
_MULTI_BOOK_N = np.array([row[0] for row in _MULTI_BOOKS], dtype=np.int64)
_MULTI_BOOK_TOTAL = np.array([row[1] for row in _MULTI_BOOKS], dtype=np.float64)
_PRICES = tuple(
    _PriceModel(spikes, others)
    for spikes, others in zip(PRICE_SPIKES, PRICE_OTHER_QUANTILES, strict=True)
)
_LAST_VISIT_QUANTILES = tuple(
    np.asarray(q, dtype=np.float64) for q in LAST_VISIT_POSITIVE_QUANTILES
)
_COMPLETION_SHORT = np.asarray(COMPLETION_QUANTILES_SHORT_BOOK, dtype=np.float64)
_COMPLETION_LONG = np.asarray(COMPLETION_QUANTILES_LONG_BOOK, dtype=np.float64)
_SEGMENT_SHARES = np.asarray(SEGMENT_COUNTS, dtype=np.float64) / sum(SEGMENT_COUNTS)
_SUPPORT = _Categorical(SUPPORT_COUNTS)
_REVIEW_SCORES = _Categorical(REVIEW_SCORE_COUNTS)
_LENGTH_WEIGHT_KEYS = np.array(sorted(CONVERSION_LENGTH_WEIGHTS), dtype=np.float64)
_LENGTH_WEIGHT_VALUES = np.array(
    [CONVERSION_LENGTH_WEIGHTS[key] for key in sorted(CONVERSION_LENGTH_WEIGHTS)]
)


def _draw_last_visit(
    rng: np.random.Generator, segment: int, zero_share: np.ndarray | float, size: int
) -> np.ndarray:
    positive = np.round(_draw_quantiles(rng, _LAST_VISIT_QUANTILES[segment], size))
    return np.where(rng.random(size) < zero_share, 0.0, positive)


def _draw_support(rng: np.random.Generator, share: np.ndarray | float, size: int) -> np.ndarray:
    return _SUPPORT.draw_where(rng, rng.random(size) < share, 0.0)


def _segment_rows(rng: np.random.Generator, segment: int, size: int) -> dict[str, np.ndarray]:
    """Raw draws of one segment: books, total length, price per book, behaviour, label."""
    zeros = np.zeros(size)
    if segment == _MULTI:
        pick = _MULTI_BOOK_INDEX.draw(rng, size).astype(np.int64)
        n_books, total = _MULTI_BOOK_N[pick], _MULTI_BOOK_TOTAL[pick]
        completion = zeros
        review = rng.random(size) < MULTI_REVIEW_SHARE
        support = _draw_support(rng, MULTI_SUPPORT_SHARE, size)
        last_visit = _draw_last_visit(rng, segment, LAST_VISIT_ZERO_SHARE[segment], size)
        label = np.ones(size, dtype=np.int8)
    elif segment == _LISTENER:
        n_books = np.ones(size, dtype=np.int64)
        total = _SINGLE_LENGTHS[segment].draw(rng, size)
        completion = np.where(
            total < LONG_BOOK_MIN,
            _draw_quantiles(rng, _COMPLETION_SHORT, size),
            _draw_quantiles(rng, _COMPLETION_LONG, size),
        )
        completion = np.clip(np.round(completion, 2), 0.01, 1.0)
        band = np.searchsorted(COMPLETION_BAND_EDGES, completion, side="left")
        review = rng.random(size) < np.take(LISTENER_REVIEW_SHARE, band)
        support = _draw_support(rng, np.take(LISTENER_SUPPORT_SHARE, band), size)
        zero_share = np.take(LISTENER_LAST_VISIT_ZERO_SHARE, band)
        last_visit = _draw_last_visit(rng, segment, zero_share, size)
        label = np.zeros(size, dtype=np.int8)
    else:
        n_books = np.ones(size, dtype=np.int64)
        total = _SINGLE_LENGTHS[segment].draw(rng, size)
        completion = zeros
        last_visit = _draw_last_visit(rng, segment, LAST_VISIT_ZERO_SHARE[segment], size)
        no_visit_share, visit_share = NON_LISTENER_REVIEW_SHARE
        review = rng.random(size) < np.where(last_visit > 0, visit_share, no_visit_share)
        no_review_share, review_share = NON_LISTENER_SUPPORT_SHARE
        support = _draw_support(rng, np.where(review, review_share, no_review_share), size)
        label = np.zeros(size, dtype=np.int8)  # set below, once the price is known
    price = _PRICES[segment].draw(rng, size)
    if segment == _NON_LISTENER:
        probability = _conversion_probability(total, price, review, support, last_visit)
        label = (rng.random(size) < probability).astype(np.int8)
    return {
        _N_BOOKS: n_books,
        "book_length_total_min": total,
        "price_per_book": price,
        "review": review.astype(np.float64),
        "completion": completion,
        "support_requests": support,
        "last_visit_days_after_purchase": last_visit,
        LABEL: label,
    }


def _conversion_probability(
    total: np.ndarray,
    price: np.ndarray,
    review: np.ndarray,
    support: np.ndarray,
    last_visit: np.ndarray,
) -> np.ndarray:
    """Non-listeners' chance to convert, from the logistic model fitted on the real file."""
    length_index = np.searchsorted(_LENGTH_WEIGHT_KEYS, total)
    logit = (
        _LENGTH_WEIGHT_VALUES[np.minimum(length_index, len(_LENGTH_WEIGHT_VALUES) - 1)]
        + CONVERSION_WEIGHTS["last_visit_is_zero"] * (last_visit == 0)
        + CONVERSION_WEIGHTS["log1p_last_visit"] * np.log1p(last_visit)
        + CONVERSION_WEIGHTS["review"] * review
        + CONVERSION_WEIGHTS["has_support_request"] * (support > 0)
        + CONVERSION_WEIGHTS["log_price"] * np.log(price)
    )
    return 1.0 / (1.0 + np.exp(-logit))


def _finish_rows(
    rng: np.random.Generator,
    n_books: np.ndarray,
    total: np.ndarray,
    price_total: np.ndarray,
    review: np.ndarray,
    review_score: np.ndarray | None,
    completion: np.ndarray,
    support: np.ndarray,
    last_visit: np.ndarray,
) -> dict[str, np.ndarray]:
    """The ten features from raw draws, with the real data's relations and rounding."""
    if review_score is None:
        review_score = _REVIEW_SCORES.draw_where(rng, review > 0, REVIEW_SCORE_DEFAULT)
    return {
        "book_length_avg_min": np.round(total / n_books, 6),
        "book_length_total_min": total,
        "price_avg": np.round(price_total / n_books, 2),
        "price_total": price_total,
        "review": review,
        "review_score": review_score,
        "completion": completion,
        "minutes_listened": np.round(completion * total, 2),
        "support_requests": support,
        "last_visit_days_after_purchase": last_visit,
        _N_BOOKS: n_books,
    }


def _block_rng(seed: int, stream: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, block]))


def _generate_block(seed: int, stream: int, block: int, size: int) -> dict[str, np.ndarray]:
    """One block of customers (features, label and book count), in shuffled order."""
    rng = _block_rng(seed, stream, block)
    sizes = rng.multinomial(size, _SEGMENT_SHARES)
    parts = [_segment_rows(rng, segment, int(n)) for segment, n in enumerate(sizes)]
    raw = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    order = rng.permutation(size)
    raw = {name: values[order] for name, values in raw.items()}
    rows = _finish_rows(
        rng,
        n_books=raw[_N_BOOKS],
        total=raw["book_length_total_min"],
        price_total=np.round(raw["price_per_book"] * raw[_N_BOOKS], 2),
        review=raw["review"],
        review_score=None,
        completion=raw["completion"],
        support=raw["support_requests"],
        last_visit=raw["last_visit_days_after_purchase"],
    )
    rows[LABEL] = raw[LABEL]
    return rows


def _drift_block(seed: int, block: int, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same customers one window later: buyers add books, some listen, visit, review."""
    rng = _block_rng(seed, _STREAM_DRIFT, block)
    size = len(rows[_N_BOOKS])
    bought = rows[LABEL] == 1
    second = bought & (rng.random(size) < DRIFT_SECOND_EXTRA_BOOK_SHARE)
    lengths = _SINGLE_LENGTHS[_NON_LISTENER]
    prices = _PRICES[_NON_LISTENER]
    extra_length = lengths.draw_where(rng, bought, 0.0) + lengths.draw_where(rng, second, 0.0)
    extra_price = np.zeros(size)
    for buyers in (bought, second):
        extra_price[buyers] += prices.draw(rng, int(np.count_nonzero(buyers)))
    n_books = rows[_N_BOOKS] + bought + second
    total = rows["book_length_total_min"] + extra_length
    price_total = np.round(rows["price_total"] + extra_price, 2)

    listened_before = rows["completion"] > 0
    listener_share, non_listener_share = DRIFT_LISTEN_SHARE
    listen = rng.random(size) < np.where(listened_before, listener_share, non_listener_share)
    minutes = rows["minutes_listened"]
    gain = listen * rng.random(size) ** 2 * DRIFT_LISTEN_MAX_GAIN * (total - minutes)
    completion = np.clip(np.round((minutes + gain) / total, 2), 0.0, 1.0)

    visited = listen | bought | (rng.random(size) < DRIFT_OTHER_VISIT_SHARE)
    visit_days = rng.integers(1, DRIFT_MAX_VISIT_DAYS + 1, size)
    last_visit = np.minimum(
        rows["last_visit_days_after_purchase"] + visited * visit_days, MAX_LAST_VISIT_DAYS
    )

    new_review = listen & (rows["review"] == 0) & (rng.random(size) < DRIFT_NEW_REVIEW_SHARE)
    review = np.where(new_review, 1.0, rows["review"])
    review_score = _REVIEW_SCORES.draw_where(rng, new_review, rows["review_score"])
    support = rows["support_requests"] + _draw_support(rng, DRIFT_SUPPORT_SHARE, size)
    return _finish_rows(
        rng, n_books, total, price_total, review, review_score, completion, support, last_visit
    )


def _iter_blocks(
    seed: int, stream: int, count: int, first_id: int, drift: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    for block, start in enumerate(range(0, count, BLOCK_ROWS)):
        size = min(BLOCK_ROWS, count - start)
        rows = _generate_block(seed, stream, block, BLOCK_ROWS)
        if size < BLOCK_ROWS:
            rows = {name: values[:size] for name, values in rows.items()}
        if drift:
            rows = _drift_block(seed, block, rows)
        rows[CUSTOMER_ID] = np.arange(first_id + start, first_id + start + size, dtype=np.int64)
        yield rows


def _rechunk(
    blocks: Iterable[dict[str, np.ndarray]], chunk_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Regroup blocks into pieces of exactly `chunk_size` rows (the last may be shorter)."""
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for block in blocks:
        pending.append(block)
        pending_rows += len(block[CUSTOMER_ID])
        if pending_rows < chunk_size:
            continue
        merged = {name: np.concatenate([part[name] for part in pending]) for name in block}
        offset = 0
        while pending_rows - offset >= chunk_size:
            yield {name: values[offset : offset + chunk_size] for name, values in merged.items()}
            offset += chunk_size
        pending = [{name: values[offset:] for name, values in merged.items()}]
        pending_rows -= offset
    if pending_rows:
        yield {name: np.concatenate([part[name] for part in pending]) for name in pending[0]}


def _to_frame(
    rows: Mapping[str, np.ndarray], columns: Sequence[str], window_end: datetime.date | None
) -> pd.DataFrame:
    size = len(rows[CUSTOMER_ID])
    data: dict[str, object] = {}
    for name in columns:
        if name == WINDOW_END:
            data[name] = np.full(size, window_end, dtype=object)
        elif name == CUSTOMER_ID:
            data[name] = rows[name].astype(np.int64, copy=False)
        elif name == LABEL:
            data[name] = rows[name].astype(np.int8, copy=False)
        else:
            data[name] = rows[name].astype(np.float64, copy=False)
    return pd.DataFrame(data, columns=list(columns))


def _check_arguments(
    count: int, seed: int, chunk_size: int = 1, window_end: datetime.date | None = None
) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if window_end is not None and not isinstance(window_end, datetime.date):
        raise TypeError(f"window_end must be a datetime.date, got {type(window_end).__name__}")


def _frames(
    pieces: Iterable[Mapping[str, np.ndarray]],
    columns: Sequence[str],
    window_end: datetime.date,
) -> Iterator[pd.DataFrame]:
    for rows in pieces:
        yield _to_frame(rows, columns, window_end)


def generate_customers(count: int, seed: int, first_id: int = 1) -> pd.DataFrame:
    """Return `count` synthetic labeled customers (id, ten features, label), same for a seed."""
    _check_arguments(count, seed)
    columns = (CUSTOMER_ID, *FEATURES, LABEL)
    blocks = list(_iter_blocks(seed, _STREAM_BASE, count, first_id))
    if not blocks:
        return _to_frame({name: np.empty(0) for name in columns}, columns, None)
    rows = {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    return _to_frame(rows, columns, None)


def iter_demo_training(
    count: int, seed: int, window_end: datetime.date, chunk_size: int
) -> Iterator[pd.DataFrame]:
    """Yield `count` labeled demo customers (ids 1..count) as TRAINING_COLUMNS chunks."""
    _check_arguments(count, seed, chunk_size, window_end)
    blocks = _iter_blocks(seed, _STREAM_BASE, count, first_id=1)
    return _frames(_rechunk(blocks, chunk_size), TRAINING_COLUMNS, window_end)


def iter_demo_activity(
    count: int,
    seed: int,
    window_end: datetime.date,
    chunk_size: int,
    new_customer_share: float = NEW_CUSTOMER_SHARE,
) -> Iterator[pd.DataFrame]:
    """Yield the next window of the `count` training customers plus new ones, as chunks.

    The first `count` ids are the customers of `iter_demo_training(count, seed, ...)` one
    window later (buyers added books, some listened more, visited later, reviewed); then
    `round(count * new_customer_share)` new customers follow with ids above `count`.
    """
    _check_arguments(count, seed, chunk_size, window_end)
    if not (math.isfinite(new_customer_share) and new_customer_share >= 0):
        raise ValueError(f"new_customer_share must be >= 0, got {new_customer_share}")
    new_count = round(count * new_customer_share)

    def blocks() -> Iterator[dict[str, np.ndarray]]:
        returning = _iter_blocks(seed, _STREAM_BASE, count, first_id=1, drift=True)
        new = _iter_blocks(seed, _STREAM_NEW, new_count, first_id=count + 1)
        for rows in itertools.chain(returning, new):
            yield {name: rows[name] for name in (CUSTOMER_ID, *FEATURES)}

    logger.debug("demo activity: %d returning and %d new customers", count, new_count)
    return _frames(_rechunk(blocks(), chunk_size), ACTIVITY_COLUMNS, window_end)
