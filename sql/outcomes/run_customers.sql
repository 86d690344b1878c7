-- The scored customers of one run: what its outcome is measured on.
-- Bound parameter :run_id.
SELECT customer_id, probability, decile, is_target, holdout
FROM {history_table}
WHERE run_id = :run_id
