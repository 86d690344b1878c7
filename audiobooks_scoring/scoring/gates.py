"""Run gates: the checks a run must pass before its list is published, and its ledger figures."""

from __future__ import annotations

from collections import Counter

from audiobooks_scoring.scoring.stage import StageResult


class RunGateError(RuntimeError):
    """The run cannot produce a trustworthy list; nothing is published."""


def account_duplicates(result: StageResult, duplicates: int) -> StageResult:
    """The result with `duplicates` staged rows moved from scored to rejected."""
    if not duplicates:
        return result
    counts = Counter(result.reject_counts)
    counts["duplicate_customer_id"] += duplicates
    samples = dict(result.reject_samples)
    samples.setdefault("duplicate_customer_id", f"{duplicates} rows share customer ids")
    return StageResult(
        rows_in=result.rows_in,
        rows_scored=result.rows_scored - duplicates,
        rows_rejected=result.rows_rejected + duplicates,
        reject_counts=counts,
        reject_samples=samples,
        score_sum=result.score_sum,
        drift=result.drift,
    )


def check_run_gates(result: StageResult, max_reject_share: float) -> None:
    """Raise `RunGateError` for an empty population, too many rejects or unaccounted rows."""
    if result.rows_in == 0:
        raise RunGateError("the scoring population is empty: rule 'population not empty'")
    if result.rows_in != result.rows_scored + result.rows_rejected:
        raise RunGateError(
            f"row accounting broken: rows_in {result.rows_in} != scored {result.rows_scored} "
            f"+ rejected {result.rows_rejected}"
        )
    share = result.rows_rejected / result.rows_in
    if share > max_reject_share:
        worst = ", ".join(
            f"{code}: {count} (e.g. {result.reject_samples.get(code, '')})"
            for code, count in result.reject_counts.most_common(3)
        )
        raise RunGateError(
            f"{result.rows_rejected} of {result.rows_in} rows ({share:.1%}) broke the feature "
            f"contract, above the max_reject_share setting {max_reject_share:.1%}: {worst}"
        )


def run_figures(result: StageResult, model_version: str) -> dict:
    """Ledger figures of a staged run."""
    return {
        "model_version": model_version,
        "rows_in": result.rows_in,
        "rows_scored": result.rows_scored,
        "rows_rejected": result.rows_rejected,
        "reject_share": result.rows_rejected / result.rows_in if result.rows_in else None,
        "score_mean": result.score_sum / result.rows_scored if result.rows_scored else None,
    }
