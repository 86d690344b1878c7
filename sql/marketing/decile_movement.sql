-- Answers: between the two latest runs, how many customers moved between deciles?
SELECT previous.decile AS previous_decile, latest.decile AS latest_decile, count(*) AS customers
FROM {history_table} AS latest
JOIN {history_table} AS previous ON previous.customer_id = latest.customer_id
WHERE latest.run_id = (SELECT run_id FROM {runs_table} WHERE published ORDER BY finished_at DESC LIMIT 1)
  AND previous.run_id = (
      SELECT run_id FROM {runs_table} WHERE published ORDER BY finished_at DESC LIMIT 1 OFFSET 1
  )
GROUP BY previous.decile, latest.decile
ORDER BY previous.decile, latest.decile
