-- Answers: who are the N customers most likely to buy again (holdout excluded), and why?
-- Bound parameter :top_n (integer).
SELECT customer_id, probability, rank, decile, reasons
FROM {campaign_targets_view}
ORDER BY rank
LIMIT :top_n
