-- Dream stage: one dream run per (run, target, seed); its Pareto-frontier prompts; the
-- frontier's evolution; token attributions (paper Fig. 1).
CREATE TABLE dream_runs (
    dream_id      VARCHAR PRIMARY KEY,       -- '<run_id>/<target_id>/seed<seed>'
    run_id        VARCHAR NOT NULL,
    target_id     VARCHAR NOT NULL,
    seed          INTEGER NOT NULL,
    objective     VARCHAR NOT NULL,          -- human-readable objective description
    config_json   VARCHAR NOT NULL,          -- full EPO configuration
    n_iterations  INTEGER NOT NULL,
    n_candidates  BIGINT NOT NULL,
    wall_s        DOUBLE NOT NULL,
    created_at    TIMESTAMP NOT NULL,
    objective_key VARCHAR,                   -- Objective.key, e.g. 'pre:last:123' (baseline key)
    stop_reason   VARCHAR,                   -- 'iterations' | 'time_budget' | 'early_stop'
    timing_json   VARCHAR                    -- seconds in gradient / proposal / evaluation / selection
);

CREATE TABLE dream_prompts (
    dream_id      VARCHAR NOT NULL,
    idx           INTEGER NOT NULL,          -- rank on this seed's frontier, by activation desc
    token_ids     INTEGER[] NOT NULL,        -- optimized tokens only (no BOS/prefix/suffix)
    tokens        VARCHAR[] NOT NULL,        -- decoded token strings
    text          VARCHAR NOT NULL,
    activation    DOUBLE NOT NULL,           -- objective value f(t)
    ce            DOUBLE NOT NULL,           -- mean self-cross-entropy, nats/token
    perplexity    DOUBLE NOT NULL,           -- exp(ce)
    lam           DOUBLE,                    -- λ of the population slot whose member proposed it
    iteration     INTEGER NOT NULL,          -- iteration it was first evaluated
    token_acts    DOUBLE[],                  -- objective quantity at each optimized position
    latent_acts   DOUBLE[],                  -- per-latent value at the read position (combinations)
    PRIMARY KEY (dream_id, idx)
);

CREATE TABLE dream_history (
    dream_id      VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    activation    DOUBLE NOT NULL,
    ce            DOUBLE NOT NULL
);

CREATE TABLE dream_attributions (
    dream_id      VARCHAR NOT NULL,
    idx           INTEGER NOT NULL,          -- dream_prompts.idx
    position      INTEGER NOT NULL,
    token_id      INTEGER NOT NULL,
    token         VARCHAR NOT NULL,
    drop_worst    DOUBLE NOT NULL,           -- activation drop from the worst substitution
    drop_best     DOUBLE NOT NULL,           -- activation drop from the best alternative
    replacements_json VARCHAR NOT NULL,      -- [{"token": str, "token_id": int, "activation": float}, ...]
    PRIMARY KEY (dream_id, idx, position)
);
