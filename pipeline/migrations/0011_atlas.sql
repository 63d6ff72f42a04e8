-- Nights that add up (issue 15): the atlas across nights, night-over-night diffs, cross-night
-- reuse of dreams, and retention.

-- One summary row per (night, target): what the atlas shows. It is written when a night's report
-- is rendered and is never dropped by `reverie gc` (which drops bulky rows only), so the atlas
-- lists every latent ever explained even after old nights' dreams and samples are gone.
CREATE TABLE atlas_latents (
    run_id          VARCHAR NOT NULL,
    target_id       VARCHAR NOT NULL,
    night           VARCHAR NOT NULL,        -- run start date, YYYY-mm-dd (UTC)
    started_at      TIMESTAMP,
    model_key       VARCHAR NOT NULL,
    sae_key         VARCHAR NOT NULL,
    hook_name       VARCHAR NOT NULL,
    latents         INTEGER[] NOT NULL,
    combine         VARCHAR,
    log10_density   DOUBLE[],
    dream_fp        VARCHAR,                 -- fingerprint of model, SAE, objective and EPO settings
    config_hash     VARCHAR,                 -- the run's whole-config fingerprint
    verdict         VARCHAR,                 -- comparisons.verdict (dominance headline)
    dominates       BOOLEAN,
    dream_max       DOUBLE,
    data_max        DOUBLE,
    ratio           DOUBLE,
    best_dream      VARCHAR,                 -- text of the top-activation dream
    best_dream_act  DOUBLE,
    best_dream_ce   DOUBLE,
    top_example     VARCHAR,                 -- text of the top dataset example (first latent)
    explanation     VARCHAR,                 -- summary explanation text (source order: both, dataset, dreams)
    explanation_source VARCHAR,
    score_metric    VARCHAR,                 -- e.g. 'detection balanced_accuracy on dataset'
    score           DOUBLE,
    score_ci_low    DOUBLE,
    score_ci_high   DOUBLE,
    n_seeds         INTEGER,                 -- EPO seeds behind the dreams
    seed_max_min    DOUBLE,                  -- spread of the per-seed best activation
    seed_max_max    DOUBLE,
    dreams_reused_from VARCHAR,              -- run id whose dreams were reused (NULL: dreamed this night)
    page            VARCHAR,                 -- the latent page, relative to <project>/reports/
    updated_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, target_id)
);

-- Night-over-night differences (`reverie diff RUN_A RUN_B`; each night against the night before).
CREATE TABLE night_diffs (
    run_a       VARCHAR NOT NULL,            -- the earlier night
    run_b       VARCHAR NOT NULL,            -- the later night
    target_id   VARCHAR NOT NULL,            -- '*' for run-level rows (fingerprint changes)
    sae_key     VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL,            -- 'new' | 'changed' | 'regression' | 'dropped' | 'fingerprint'
    field       VARCHAR NOT NULL,            -- 'target' | 'best_dream' | 'verdict' | 'explanation' | 'score' | section name
    before      VARCHAR,
    after       VARCHAR,
    detail      VARCHAR,                     -- why it counts (e.g. the CIs that do not overlap)
    created_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (run_a, run_b, target_id, sae_key, kind, field)
);

-- Cross-night reuse: the fingerprint a dream was computed under, and where reused rows came from.
ALTER TABLE dream_runs ADD COLUMN fingerprint VARCHAR;
ALTER TABLE dream_runs ADD COLUMN reused_from VARCHAR;     -- dream_id whose rows were copied (NULL: computed here)

-- Retention: when `reverie gc` dropped a run's bulky rows.
ALTER TABLE runs ADD COLUMN gc_at TIMESTAMP;
