-- Drops the marketing views (run before they are re-created).
DROP VIEW IF EXISTS {campaign_targets_view};
DROP VIEW IF EXISTS {decile_summary_view};
DROP VIEW IF EXISTS {customer_scores_explained_view};
DROP VIEW IF EXISTS {campaign_uplift_view}
