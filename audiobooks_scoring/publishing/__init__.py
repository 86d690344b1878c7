"""Publication: the run ledger, building the list beside the live one, the atomic swap.

Decisions (each covered by tests/publishing and tests/reliability):
- A run's list is built as `<scores>_next` beside the live one: from spill files merged on
  the scoring machine (one process) or ranked in the warehouse from staging (partitions).
  Customer ids are checked unique before it is published (spilled ids, or a query); when
  one repeats, every copy is rejected and the list is built again from staging.
- The warehouse adapter swaps it in atomically: readers see the whole previous list or the
  whole new one. How is the engine's business (renames and a partition on PostgreSQL, a
  transactional copy elsewhere); the README's reliability table says what each gives.
- A killed run leaves at most `<scores>_next`, staged rows or spill files, which the next
  run replaces; its ledger row, still `running`, is marked `abandoned` by the next run.
- Publication re-checks, inside its transaction, that this run still holds the run lock.
- Transient errors (lost connection, lock timeout, deadlock, a busy file) are retried with
  exponential backoff; others fail at once. A publication that still fails raises
  `PublicationError`, leaving the previous list untouched.
"""
