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
