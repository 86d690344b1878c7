-- Purchases: one row per purchase, for measuring what each published list achieved.
-- Adapt the FROM and WHERE clauses to your warehouse; keep the output column names:
-- customer_id, and purchased_at (a date or a timestamp; only its calendar date counts).
-- {purchases_table} is replaced by the configured, quoted table name.
-- Bound parameters (dates), one run at a time:
--   :since  one horizon before the run's as-of date: purchases dated before the run are
--           read too, so they are counted (never used) in the run's outcome;
--   :until  the day after the last day observed: the horizon's last day, or the
--           measurement date while the horizon has not elapsed.
-- Rows without a date are read as well: they are counted, never used.
SELECT customer_id, purchased_at
FROM {purchases_table}
WHERE purchased_at IS NULL
   OR (purchased_at >= :since AND purchased_at < :until)
