-- DuckDB queries analysts run on a scored output. `scores` is a view over the Parquet files of the
-- complete runs (jobs.analyst.connect); on a local output, by hand:
--   CREATE VIEW scores AS SELECT * FROM read_parquet('OUT/run_date=*/*.parquet', hive_partitioning = true);
-- Parameters are written as $name (DuckDB prepared-statement syntax). tests/test_queries.py runs each one.

-- name: tonight_anomalies
-- Tonight's anomalies per product, worst first.
SELECT product, uri, score, score_normalised, peak_x, peak_y,
       rank() OVER (PARTITION BY product ORDER BY score DESC) AS rank_in_product
FROM scores
WHERE run_date = $run_date AND verdict = 'anomalous'
ORDER BY product, score DESC;

-- name: anomaly_rate_per_day_and_line
-- Share of scored images flagged, per audit date and production line.
SELECT run_date, line,
       count(*) FILTER (status = 'ok') AS scored,
       count(*) FILTER (verdict = 'anomalous') AS anomalies,
       round(count(*) FILTER (verdict = 'anomalous') / nullif(count(*) FILTER (status = 'ok'), 0), 4) AS anomaly_rate
FROM scores
GROUP BY run_date, line
ORDER BY run_date, line;

-- name: error_images
-- Images that could not be scored, and why.
SELECT run_date, uri, error
FROM scores
WHERE status = 'error'
ORDER BY run_date, uri;

-- name: score_drift
-- Score distribution of two nights side by side: a shift of the normal bulk means the line or the camera
-- changed (or the model no longer fits), before any verdict changes.
SELECT run_date,
       count(*) AS images,
       round(avg(score), 4) AS mean_score,
       round(quantile_cont(score, 0.5), 4) AS median_score,
       round(quantile_cont(score, 0.95), 4) AS p95_score,
       round(avg(score_normalised), 4) AS mean_normalised
FROM scores
WHERE status = 'ok' AND run_date IN ($night_a, $night_b)
GROUP BY run_date
ORDER BY run_date;

-- name: image_heatmap
-- One image's heatmap: anomaly_core.decode_heatmap(row) rebuilds the map from these columns (schema.md).
SELECT uri, run_date, score, verdict, heatmap_grid, heatmap_size, heatmap_sigma, heatmap_pose, heatmap_png,
       heatmap_min, heatmap_max, width, height
FROM scores
WHERE uri = $uri
ORDER BY run_time DESC
LIMIT 1;

-- name: night_drift
-- The score distribution of the last $nights nights (with scores) against the model's calibration, per
-- night and model. score_normalised is in calibration units: 0 = the mean score of the model's held-out
-- normal images, 1 = its threshold. Defects are rare, so a night's median is a normal part's score: it
-- sits near 0 while the line, the camera and the lighting are as they were at the fit. `drifted` flags a
-- night whose median lies more than $bound from 0 (jobs.report.DRIFT_BOUND: a quarter of the way to the
-- threshold), before the shift floods the verdicts. flagged_rate is the share flagged, to set beside the
-- model's target false-alarm rate (calibration.false_alarm_rate in its manifest).
SELECT run_date, model_id,
       count(*) AS images,
       quantile_cont(score_normalised, 0.05) AS p05,
       quantile_cont(score_normalised, 0.25) AS p25,
       quantile_cont(score_normalised, 0.5) AS median,
       quantile_cont(score_normalised, 0.75) AS p75,
       quantile_cont(score_normalised, 0.95) AS p95,
       avg(CAST(verdict = 'anomalous' AS DOUBLE)) AS flagged_rate,
       abs(quantile_cont(score_normalised, 0.5)) > $bound AS drifted
FROM scores
WHERE status = 'ok'
  AND run_date IN (SELECT DISTINCT run_date FROM scores ORDER BY run_date DESC LIMIT $nights)
GROUP BY run_date, model_id
ORDER BY run_date, model_id;

-- name: verdict_precision_per_night_and_line
-- Of the images flagged `anomalous`, how many reviewers confirmed as defects, per audit date and line
-- (labels joined by content_sha256, the label in force). precision = confirmed / reviewed: it covers the
-- reviewed flagged images only, so it estimates the verdict's precision when reviewers pick what to
-- review independently of the score.
SELECT s.run_date, s.line,
       count(*) AS flagged,
       count(l.label) AS reviewed,
       count(*) FILTER (l.label = 'defect') AS confirmed_defects,
       count(*) FILTER (l.label = 'normal') AS false_alarms,
       round(count(*) FILTER (l.label = 'defect') / nullif(count(l.label), 0), 4) AS precision
FROM scores s LEFT JOIN labels l ON l.content_sha256 = s.content_sha256
WHERE s.verdict = 'anomalous'
GROUP BY s.run_date, s.line
ORDER BY s.run_date, s.line;

-- name: missed_defects
-- Images reviewers labelled `defect` that the audit passed as `normal`: what the threshold let through.
SELECT s.run_date, s.line, s.uri, s.score, s.score_normalised, l.reviewer, l.comment,
       CAST(l.labelled_at AS TIMESTAMP) AS labelled_at_utc
FROM scores s JOIN labels l ON l.content_sha256 = s.content_sha256
WHERE l.label = 'defect' AND s.verdict = 'normal'
ORDER BY s.run_date, s.score DESC;
