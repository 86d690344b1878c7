-- The current campaign targets for upload to ad platforms, best first (holdout excluded).
SELECT customer_id, probability, rank, decile, reason_1, reason_2, reason_3, reasons,
       model_version, run_id
FROM {campaign_targets_view}
ORDER BY rank
