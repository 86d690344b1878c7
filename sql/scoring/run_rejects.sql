-- Rejected rows of one run by reason code, with one example reason.
SELECT reason_code, count(*) AS rows_rejected, min(reason) AS example
FROM {rejected_table}
WHERE run_id = :run_id
GROUP BY reason_code
ORDER BY count(*) DESC
