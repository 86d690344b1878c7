"""Run reports: the retrain and scoring reports as markdown (Prefect) and self-contained HTML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import select

from audiobooks_scoring.model.lifecycle import Challenger, Decision, TrainingData
from audiobooks_scoring.model.scoring_model import ScoringModel
from audiobooks_scoring.reporting.render import (
    ReportSection,
    render_calibration_png,
    render_decile_png,
    render_drift_png,
    render_feature_importance_png,
    render_gains_lift_png,
    render_markdown_report,
    render_score_distribution_png,
    write_html_report,
)
from audiobooks_scoring.settings import Settings
from audiobooks_scoring.warehouse import WarehouseAdapter, reasons_column

TOP_ROWS = 20


@dataclass(frozen=True)
class RunReport:
    """A report as markdown for the Prefect UI, the written HTML file, and the top of the list."""

    markdown: str
    html_path: Path
    top_rows: list[dict[str, Any]]


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame's rows as dicts keyed by column name."""
    return [{str(key): value for key, value in row.items()} for row in frame.to_dict("records")]


def build_retrain_report(
    data: TrainingData,
    challenger: Challenger,
    version: str,
    decision: Decision,
    champion_metrics: dict | None,
    reports_dir: Path,
) -> RunReport:
    """The retrain report: test-split evaluation, deciles, calibration, importance, decision."""
    evaluation = challenger.evaluation
    test = challenger.test_index
    labels = data.labels[test]
    probability = challenger.trained.predict_raw(data.features[test])
    figures = {
        "model version": version,
        "decision": "promoted to champion" if decision.promote else "stays challenger",
        "test-split AUC": evaluation.auc,
        "balanced accuracy": evaluation.balanced_accuracy,
        "Brier score": evaluation.brier,
        "log loss": evaluation.log_loss,
        "lift in top decile": evaluation.lift_top_decile,
        "training rows": len(data.labels),
        "test-split rows": len(test),
    }
    comparison = [{"model": f"challenger {version}", **_headline(evaluation.to_dict())}]
    if champion_metrics:
        comparison.append(
            {"model": f"champion {champion_metrics['version']}", **_headline(champion_metrics)}
        )
    importance = [
        {"feature": row["feature"], "importance": row["auc_drop"]} for row in challenger.importance
    ]
    confusion = [evaluation.confusion]
    sections = [
        ReportSection("Decision", text=decision.reason, table=comparison),
        ReportSection(
            "Deciles of the test split",
            text="Decile 1 holds the customers the model ranks most likely to buy again.",
            table=evaluation.deciles,
            image_png=render_gains_lift_png(labels, probability),
        ),
        ReportSection(
            "Calibration",
            text="Mean predicted probability against the observed conversion rate per bin.",
            table=evaluation.calibration,
            image_png=render_calibration_png(evaluation.calibration),
        ),
        ReportSection(
            "Feature importance",
            text="Drop in test-split ROC AUC when the feature is shuffled (permutation importance)",
            table=challenger.importance,
            image_png=render_feature_importance_png(importance),
        ),
        ReportSection(f"Confusion matrix at threshold {evaluation.threshold:.3f}", table=confusion),
    ]
    title = f"Retrain report: model {version}"
    html_path = write_html_report(
        reports_dir / "models" / version / "report.html", title, sections, figures
    )
    markdown = render_markdown_report(title, figures, _without_images(sections, keep=1))
    return RunReport(markdown, html_path, [])


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("auc", "balanced_accuracy", "brier", "log_loss", "calibration_error", "lift_top_decile")
    return {key: metrics.get(key) for key in keys}


def _without_images(sections: list[ReportSection], keep: int) -> list[ReportSection]:
    """The sections with only the first `keep` charts, so Prefect artifacts stay small."""
    kept: list[ReportSection] = []
    for section in sections:
        if section.image_png is not None and keep <= 0:
            section = ReportSection(section.heading, section.text, section.table, None)
        elif section.image_png is not None:
            keep -= 1
        kept.append(section)
    return kept


def build_scoring_report(
    warehouse: WarehouseAdapter,
    run_id: str,
    model: ScoringModel,
    drift: dict[str, Any] | None,
    settings: Settings,
) -> RunReport:
    """The scoring report of a run: counts, rejects, deciles, drift, the model, top of the list."""
    tables = warehouse.tables
    runs = tables.runs
    run = warehouse.read_frame(select(runs).where(runs.c.run_id == run_id)).iloc[0].to_dict()
    history = tables.history
    deciles = records(
        warehouse.read_frame(warehouse.render_sql("scoring/run_deciles"), {"run_id": run_id})
    )
    top = records(
        warehouse.read_frame(
            select(
                history.c.rank,
                history.c.customer_id,
                history.c.probability,
                history.c.decile,
                history.c.is_target,
                history.c.holdout,
                reasons_column(),
            )
            .where(history.c.run_id == run_id)
            .order_by(history.c.rank)
            .limit(TOP_ROWS),
        )
    )
    reject_rows = records(
        warehouse.read_frame(warehouse.render_sql("scoring/run_rejects"), {"run_id": run_id})
    )
    metrics = model.metrics
    figures = {
        "run id": run_id,
        "status": run["status"],
        "as of": run["as_of"],
        "model version": run["model_version"],
        "rows in": run["rows_in"],
        "rows scored": run["rows_scored"],
        "rows rejected": run["rows_rejected"],
        "targets": run["targets"],
        "published": bool(run["published"]),
        "model test-split AUC": metrics.get("auc"),
        "drift": run["drift_status"],
        "deciles changed": run["decile_change_share"],
    }
    sections = [
        ReportSection(
            "Deciles of this run",
            text="Decile 1 = most likely to buy again. Expected buyers = sum of probabilities.",
            table=deciles,
            image_png=render_decile_png(deciles, value_keys=("mean_probability",))
            if deciles
            else None,
        ),
        ReportSection(
            "Rejected rows by reason",
            text=f"Every rejected row is in the {tables.rejected.name} table with this run id.",
            table=reject_rows,
        ),
    ]
    if drift:
        sections.append(
            ReportSection(
                "Drift against the champion's training data",
                text=(
                    f"Population stability index per feature; warning at {settings.psi_warning},"
                    f" alert at {settings.psi_alert}. Score PSI {drift['score_psi']:.4f}."
                ),
                table=[{"feature": k, "psi": v} for k, v in drift["feature_psi"].items()],
                image_png=render_drift_png(
                    drift["feature_psi"],
                    drift["score_psi"],
                    settings.psi_warning,
                    settings.psi_alert,
                ),
            )
        )
        sections.append(score_distribution_section(drift))
    sections.extend(model_sections(model))
    sections.append(ReportSection(f"Top {TOP_ROWS} of the list", table=top))
    title = f"Scoring run {run_id}"
    html_path = write_html_report(
        settings.reports_path / "runs" / run_id / "report.html", title, sections, figures
    )
    markdown = render_markdown_report(title, figures, _without_images(sections, keep=1))
    return RunReport(markdown, html_path, top)


def model_sections(model: ScoringModel) -> list[ReportSection]:
    """Sections on the champion that scored the run: test-split lift, calibration, importance."""
    metrics = model.metrics
    sections = []
    if metrics.get("deciles"):
        sections.append(
            ReportSection(
                f"Model {model.version}: cumulative gains and lift on its test split",
                text="Observed conversion per decile of the model's test split, against predicted.",
                table=metrics["deciles"],
                image_png=render_decile_png(metrics["deciles"]),
            )
        )
    if metrics.get("calibration"):
        sections.append(
            ReportSection(
                f"Model {model.version}: calibration on its test split",
                table=metrics["calibration"],
                image_png=render_calibration_png(metrics["calibration"]),
            )
        )
    if model.importance:
        importance = [
            {"feature": r["feature"], "importance": r["auc_drop"]} for r in model.importance
        ]
        sections.append(
            ReportSection(
                f"Model {model.version}: feature importance",
                text="Drop in test-split ROC AUC when the feature is shuffled.",
                table=importance,
                image_png=render_feature_importance_png(importance),
            )
        )
    return sections


def score_distribution_section(detail: dict[str, Any]) -> ReportSection:
    """A section comparing this run's score distribution with training's."""
    return ReportSection(
        "Score distribution against training",
        text="Share of customers per score bin (bins: deciles of the training scores).",
        image_png=render_score_distribution_png(
            detail["score_cuts"], detail["score_expected_shares"], detail["score_actual_shares"]
        ),
    )
