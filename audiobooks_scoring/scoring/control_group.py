"""The holdout (control) group: customers kept out of every campaign so uplift can be measured."""

from __future__ import annotations

import hashlib

import numpy as np


def salt_key(salt: str) -> np.uint64:
    """A 64-bit key derived from the holdout salt."""
    return np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little"))


def control_group_mask(customer_ids: np.ndarray, salt: str, share: float) -> np.ndarray:
    """Whether each customer is in the holdout (control) group: a salted hash below `share`.

    The hash is splitmix64 of the id keyed by the salt: deterministic, the same customers
    across runs for the same salt, independent of the model.
    """
    with np.errstate(over="ignore"):
        z = customer_ids.astype(np.int64).view(np.uint64) ^ salt_key(salt)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share
