-- Share of customers in both this run and the previous published run whose decile changed.
SELECT
    count(*) AS customers_in_both,
    sum(CASE WHEN latest.decile <> previous.decile THEN 1 ELSE 0 END) AS customers_moved
FROM {history_table} AS latest
JOIN {history_table} AS previous ON previous.customer_id = latest.customer_id
WHERE latest.run_id = :run_id AND previous.run_id = :previous_run_id
