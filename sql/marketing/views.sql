-- customer_scores_explained: every customer of the current list, with the reason codes
-- in plain language (`reasons`, e.g. "listened for many minutes; left a review").
CREATE VIEW {customer_scores_explained_view} AS
SELECT
    customer_id,
    window_end,
    probability,
    rank,
    decile,
    is_target,
    holdout,
    reason_1,
    reason_2,
    reason_3,
    {reason_labels} AS reasons,
    model_version,
    run_id,
    scored_at
FROM {scores_table};

-- campaign_targets: who to target in the current campaign, best first, with why.
-- The holdout (control) group is excluded so uplift can be measured against it.
CREATE VIEW {campaign_targets_view} AS
SELECT
    customer_id,
    probability,
    rank,
    decile,
    reason_1,
    reason_2,
    reason_3,
    reasons,
    model_version,
    run_id,
    scored_at
FROM {customer_scores_explained_view}
WHERE is_target AND NOT holdout;

-- decile_summary: per decile of the current list (1 = most likely to buy again), in order:
-- how many customers, their probability range, the buyers to expect, targets and holdout.
-- Rounded for reading (4 places): min_probability, max_probability, mean_probability.
-- Full precision, for further computation: expected_buyers (the sum of the probabilities);
-- the exact probabilities of every customer are in customer_scores.
CREATE VIEW {decile_summary_view} AS
SELECT
    decile,
    count(*) AS customers,
    round(CAST(min(probability) AS NUMERIC(12, 6)), 4) AS min_probability,
    round(CAST(max(probability) AS NUMERIC(12, 6)), 4) AS max_probability,
    round(CAST(avg(probability) AS NUMERIC(12, 6)), 4) AS mean_probability,
    sum(probability) AS expected_buyers,
    sum(CASE WHEN is_target THEN 1 ELSE 0 END) AS targets,
    sum(CASE WHEN holdout THEN 1 ELSE 0 END) AS holdout_customers
FROM {scores_table}
GROUP BY decile
ORDER BY decile
