-- Answers: did the model rank buyers as well as it promised? Realized ROC AUC and Brier
-- score on each run's control group (customers no campaign touched) against the test-split
-- AUC its model promised at training time, newest runs first.
SELECT run_id, as_of, maturity, provisional, model_version, realized_auc, expected_auc,
       expected_auc - realized_auc AS auc_shortfall, brier, status, reason
FROM {outcomes_table}
ORDER BY as_of DESC, run_id
