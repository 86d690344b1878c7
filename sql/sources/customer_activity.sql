-- Scoring population: every customer's latest 2-year window ending on or before :as_of.
-- Adapt the FROM and WHERE clauses to your warehouse; keep the output column names.
-- {activity_table} is replaced by the configured, quoted table name.
-- Bound parameter :as_of (date): the scoring date (today for the nightly run, earlier for backfills).
SELECT
    customer_id,
    window_end,
    book_length_avg_min,
    book_length_total_min,
    price_avg,
    price_total,
    review,
    review_score,
    completion,
    minutes_listened,
    support_requests,
    last_visit_days_after_purchase
FROM {activity_table}
WHERE window_end = (
    SELECT max(window_end) FROM {activity_table} WHERE window_end <= :as_of
)
