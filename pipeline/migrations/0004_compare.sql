-- Compare stage: dreams vs dataset examples per target, and the batch summary.
CREATE TABLE comparisons (
    run_id              VARCHAR NOT NULL,
    target_id           VARCHAR NOT NULL,
    scan_id             VARCHAR NOT NULL,
    dream_max           DOUBLE,
    data_max            DOUBLE,              -- best dataset window activation (same length, fed alone)
    ratio               DOUBLE,              -- dream_max / data_max
    dream_best_ce_limit DOUBLE,              -- best dream with CE <= compare.ce_limit
    data_best_ce_limit  DOUBLE,
    dream_best_in_dist  DOUBLE,              -- best dream with CE <= in-distribution threshold
    data_best_in_dist   DOUBLE,
    dream_z             DOUBLE,              -- z-score vs random prompts (paper eq. 5)
    data_z              DOUBLE,
    n_beating           INTEGER,             -- frontier prompts above data_max
    attribution_overlap DOUBLE,              -- fraction of top attributed dream tokens among dataset max tokens
    beats_data          BOOLEAN,
    beats_data_in_dist  BOOLEAN,
    metrics_json        VARCHAR,
    PRIMARY KEY (run_id, target_id)
);

CREATE TABLE compare_summary (
    run_id              VARCHAR PRIMARY KEY,
    n_targets           INTEGER NOT NULL,
    frac_beats          DOUBLE,
    frac_beats_in_dist  DOUBLE,
    ce_mean             DOUBLE,
    ce_std              DOUBLE,
    in_dist_threshold   DOUBLE
);
