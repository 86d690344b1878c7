-- Per decile of one run: customers, probability range, expected buyers, targets, holdout.
SELECT
    decile,
    count(*) AS customers,
    min(probability) AS min_probability,
    max(probability) AS max_probability,
    avg(probability) AS mean_probability,
    sum(probability) AS expected_buyers,
    sum(CASE WHEN is_target THEN 1 ELSE 0 END) AS targets,
    sum(CASE WHEN holdout THEN 1 ELSE 0 END) AS holdout_customers
FROM {history_table}
WHERE run_id = :run_id
GROUP BY decile
ORDER BY decile
