-- Foundation: runs, their targets, and the (run, target, stage) units of a batch.
CREATE TABLE runs (
    run_id        VARCHAR PRIMARY KEY,
    kind          VARCHAR NOT NULL,          -- 'targets' | 'dream' | 'scan' | 'nightly' | ...
    config_json   VARCHAR NOT NULL,          -- the effective configuration
    config_hash   VARCHAR NOT NULL,
    code_version  VARCHAR NOT NULL,          -- package version + git commit
    started_at    TIMESTAMP NOT NULL,
    ended_at      TIMESTAMP,
    status        VARCHAR NOT NULL,          -- 'running' | 'done' | 'failed'
    wall_s        DOUBLE,
    summary_json  VARCHAR
);

CREATE TABLE targets (
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,         -- '123' for one latent, '12+345' for a combination
    model_key      VARCHAR NOT NULL,
    sae_key        VARCHAR NOT NULL,         -- SAE identity: 'release/sae_id' or resolved path
    hook_name      VARCHAR NOT NULL,
    latents        INTEGER[] NOT NULL,
    combine        VARCHAR,                  -- NULL for one latent; 'lp' | 'sum' | 'min'
    log10_density  DOUBLE[],                 -- per latent, log10 firing frequency
    density_source VARCHAR,                  -- 'sparsity.safetensors' | 'corpus scan'
    PRIMARY KEY (run_id, target_id)
);

CREATE TABLE units (
    run_id      VARCHAR NOT NULL,
    target_id   VARCHAR NOT NULL,            -- '*' for run-level units (scan, report)
    stage       VARCHAR NOT NULL,
    status      VARCHAR NOT NULL,            -- 'done' | 'failed' | 'skipped'
    started_at  TIMESTAMP,
    ended_at    TIMESTAMP,
    wall_s      DOUBLE,
    error       VARCHAR,
    PRIMARY KEY (run_id, target_id, stage)
);
