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
    round(CAST(min(probability) AS DECIMAL(12, 6)), 4) AS min_probability,
    round(CAST(max(probability) AS DECIMAL(12, 6)), 4) AS max_probability,
    round(CAST(avg(probability) AS DECIMAL(12, 6)), 4) AS mean_probability,
    sum(probability) AS expected_buyers,
    sum(CASE WHEN is_target THEN 1 ELSE 0 END) AS targets,
    sum(CASE WHEN holdout THEN 1 ELSE 0 END) AS holdout_customers
FROM {scores_table}
GROUP BY decile
ORDER BY decile;

-- campaign_uplift: what each measured list achieved, one row per run (its latest
-- measurement). Uplift = conversion rate of the targeted customers minus that of the
-- comparable control customers (holdout customers scored at least as high as the lowest
-- targeted one), with its 95% interval; in percentage points for reading (2 places) and in
-- full precision. verdict reads the interval: above zero, below zero, or containing it.
-- provisional: the run's horizon (AUDIOBOOKS_OUTCOME_HORIZON_DAYS) has not fully elapsed
-- on measured_on, so more buyers may still come; maturity is the share elapsed.
CREATE VIEW {campaign_uplift_view} AS
SELECT
    run_id,
    as_of,
    measured_on,
    maturity,
    provisional,
    status,
    model_version,
    targeted,
    targeted_rate,
    control,
    control_rate,
    round(CAST(100 * uplift AS DECIMAL(12, 6)), 2) AS uplift_points,
    round(CAST(100 * uplift_ci_low AS DECIMAL(12, 6)), 2) AS uplift_points_ci_low,
    round(CAST(100 * uplift_ci_high AS DECIMAL(12, 6)), 2) AS uplift_points_ci_high,
    CASE
        WHEN uplift IS NULL THEN 'not measurable'
        WHEN uplift_ci_low > 0 THEN 'more buyers than without the campaign'
        WHEN uplift_ci_high < 0 THEN 'fewer buyers than without the campaign'
        ELSE 'no clear difference'
    END AS verdict,
    incremental_conversions,
    uplift,
    uplift_ci_low,
    uplift_ci_high,
    realized_auc,
    expected_auc,
    uplift_note,
    reason
FROM {outcomes_table}
