"""Demo purchases with a known campaign effect, so a new user sees the outcome loop close.

The demo scores a backfill run on an earlier activity window, then draws whether each of its
customers bought within the horizon: with `(1 - effect)` times the probability the model gave
them, plus `effect` when the campaign targeted them. So the campaign adds exactly `effect` to
every targeted customer's chance (no chance can exceed 1, whatever the probability), the
true uplift is known, and the measurement should find it within its interval. A purchase's
date is uniform over the run's horizon; non-buyers get no row. The same seed gives the same
purchases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

import numpy as np
import pandas as pd
from sqlalchemy import delete, func, select

from audiobooks_scoring.contract import CUSTOMER_ID, WINDOW_END
from audiobooks_scoring.inputs.demo_data import iter_demo_activity
from audiobooks_scoring.outcomes.loop import RunCustomers, read_run_customers
from audiobooks_scoring.warehouse import WarehouseAdapter

logger = logging.getLogger(__name__)

DEMO_EARLIER_RUN_DAYS = 200
"""The demo's earlier run is scored this many days before today (past its 183-day horizon)."""

DEMO_CAMPAIGN_EFFECT = 0.05
"""The simulated campaign adds this much to each targeted customer's chance to buy."""


@dataclass(frozen=True)
class SimulatedPurchases:
    """Simulated purchases of one run's customers and the campaign uplift they carry."""

    frame: pd.DataFrame
    effect: float
    targeted: int

    @property
    def true_uplift(self) -> float | None:
        """The campaign's true uplift: `effect` on every targeted customer (None: none)."""
        return self.effect if self.targeted else None

    def describe(self) -> str:
        """The simulated effect in words, for the demo's output."""
        return f"+{100 * self.effect:.1f} points on each targeted customer's chance to buy"


def simulate_purchases(
    customers: RunCustomers,
    as_of: date,
    horizon_days: int,
    effect: float,
    seed: int,
) -> SimulatedPurchases:
    """Purchases drawn with `(1 - effect)` x each customer's probability, + `effect` if targeted."""
    if not 0.0 <= effect < 1.0:
        raise ValueError(f"effect must lie in [0, 1), got {effect}")
    rng = np.random.default_rng(seed)
    targeted = customers.is_target & ~customers.holdout
    chance = (1.0 - effect) * customers.probability + effect * targeted
    bought = rng.random(chance.size) < chance
    buyers = int(np.count_nonzero(bought))
    days = rng.integers(1, horizon_days + 1, buyers)
    seconds = rng.integers(0, 24 * 3600, buyers)
    start = np.datetime64(datetime.combine(as_of, time()), "s")
    stamps = start + days.astype("timedelta64[D]") + seconds.astype("timedelta64[s]")
    frame = pd.DataFrame(
        {CUSTOMER_ID: customers.customer_id[bought], "purchased_at": pd.to_datetime(stamps)}
    )
    return SimulatedPurchases(frame, effect, int(np.count_nonzero(targeted)))


def load_demo_earlier_window(
    warehouse: WarehouseAdapter, customers: int, seed: int, window_end: date, chunk_size: int
) -> int:
    """Rows written: the demo activity again as a window ending `window_end` (replaced)."""
    activity = warehouse.tables.activity
    with warehouse.engine.begin() as conn:
        conn.execute(delete(activity).where(activity.c[WINDOW_END] == window_end))
    rows = 0
    for chunk in iter_demo_activity(customers, seed, window_end, chunk_size):
        with warehouse.engine.begin() as conn:
            rows += warehouse.write_frame(conn, activity, chunk)
    logger.info("demo activity window ending %s: %s customers", window_end, rows)
    return rows


def has_window_on_or_before(warehouse: WarehouseAdapter, day: date) -> bool:
    """Whether the activity table holds a window ending on or before `day`."""
    activity = warehouse.tables.activity
    with warehouse.engine.connect() as conn:
        earliest = conn.execute(select(func.min(activity.c[WINDOW_END]))).scalar()
    if earliest is None:
        return False
    return pd.Timestamp(earliest).date() <= day


def load_demo_purchases(
    warehouse: WarehouseAdapter,
    run_id: str,
    as_of: date,
    horizon_days: int,
    effect: float = DEMO_CAMPAIGN_EFFECT,
    seed: int = 7,
) -> SimulatedPurchases:
    """Replace the purchases table with purchases simulated for one run's customers.

    The customers are drawn for in id order: the engine returns them in its own (physical)
    order, and the same seed must give the same purchases on every engine.
    """
    customers = by_customer_id(read_run_customers(warehouse, run_id, warehouse.settings.chunk_size))
    simulated = simulate_purchases(customers, as_of, horizon_days, effect, seed)
    purchases = warehouse.tables.purchases
    with warehouse.engine.begin() as conn:
        conn.execute(delete(purchases))
        warehouse.write_frame(conn, purchases, simulated.frame)
    logger.info(
        "demo purchases for run %s: %s of %s customers bought within %s days",
        run_id,
        len(simulated.frame),
        customers.customer_id.size,
        horizon_days,
    )
    return simulated


def by_customer_id(customers: RunCustomers) -> RunCustomers:
    """The same customers, ordered by id."""
    order = np.argsort(customers.customer_id, kind="stable")
    return RunCustomers(
        **{name: getattr(customers, name)[order] for name in RunCustomers.__dataclass_fields__}
    )


def earlier_run_date(today: date) -> date:
    """The as-of date of the demo's earlier run."""
    return today - timedelta(days=DEMO_EARLIER_RUN_DAYS)
