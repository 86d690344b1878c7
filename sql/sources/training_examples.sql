-- Training examples: historical 2-year windows whose 6-month outcome is known.
-- Adapt the FROM and WHERE clauses to your warehouse; keep the output column names.
-- {training_table} is replaced by the configured, quoted table name.
-- Bound parameter :as_of (date): use windows that ended on or before it.
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
    last_visit_days_after_purchase,
    converted
FROM {training_table}
WHERE window_end <= :as_of
