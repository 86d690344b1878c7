-- Answers: what did each campaign achieve against the control group, newest runs first?
-- Provisional rows may still change: their horizon has not fully elapsed.
SELECT run_id, as_of, maturity, provisional, targeted, targeted_rate, control, control_rate,
       uplift_points, uplift_points_ci_low, uplift_points_ci_high, verdict,
       incremental_conversions, uplift_note
FROM {campaign_uplift_view}
ORDER BY as_of DESC, run_id
