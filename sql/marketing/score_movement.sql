-- Answers: how did one customer's score, rank and decile move from run to run?
-- Bound parameter :customer_id (integer).
SELECT run_id, scored_at, probability, rank, decile, is_target, model_version
FROM {history_table}
WHERE customer_id = :customer_id
ORDER BY scored_at
