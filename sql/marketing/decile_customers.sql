-- Answers: which customers are in a given decile of the current list (1 = top)?
-- Bound parameter :decile (1..10).
SELECT customer_id, probability, rank, holdout, is_target, reasons
FROM {customer_scores_explained_view}
WHERE decile = :decile
ORDER BY rank
