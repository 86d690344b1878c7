-- Customer ids staged more than once by a run: every copy is rejected as a duplicate.
SELECT customer_id FROM {staging_table} WHERE run_id = :run_id GROUP BY customer_id HAVING count(*) > 1
