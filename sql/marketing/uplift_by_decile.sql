-- Answers: in which deciles of one run's list did the campaign bring extra buyers?
-- Uplift per targeted decile: its targeted customers' conversion rate minus that of the
-- comparable control customers of the same decile, with the 95% interval.
-- Bound parameter :run_id (e.g. 'score-2026-05-01').
SELECT decile, targeted, targeted_rate, control, control_rate, uplift, uplift_ci_low,
       uplift_ci_high
FROM {outcome_deciles_table}
WHERE run_id = :run_id AND targeted > 0
ORDER BY decile
