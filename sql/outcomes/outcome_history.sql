-- Every measured run's headline figures, oldest first: the uplift across runs over time.
SELECT run_id, as_of, measured_on, maturity, provisional, status, uplift, uplift_ci_low,
       uplift_ci_high, realized_auc, expected_auc, targeted, control
FROM {outcomes_table}
ORDER BY as_of, run_id
