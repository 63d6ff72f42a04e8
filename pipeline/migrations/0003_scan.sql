-- Scan stage: a corpus pass keyed by a content hash (model, SAE, corpus, settings, latents),
-- shared by every target of a run and reused across runs.
CREATE TABLE scans (
    scan_id           VARCHAR PRIMARY KEY,   -- content hash
    model_key         VARCHAR NOT NULL,
    sae_key           VARCHAR NOT NULL,
    hook_name         VARCHAR NOT NULL,
    corpus_json       VARCHAR NOT NULL,
    settings_json     VARCHAR NOT NULL,
    latents           INTEGER[] NOT NULL,
    status            VARCHAR NOT NULL,      -- 'running' | 'done'
    tokens_seen       BIGINT NOT NULL,
    n_contexts        BIGINT NOT NULL,
    window_len        INTEGER,               -- dream length used for window CE
    ce_mean           DOUBLE,                -- CE of random dream-length corpus windows, nats/token
    ce_std            DOUBLE,
    n_ce_windows      INTEGER,               -- corpus windows behind ce_mean / ce_std
    in_dist_threshold DOUBLE,                -- ce_mean + 2 ce_std
    wall_s            DOUBLE,                -- corpus pass + window CE + baselines, seconds
    pass_wall_s       DOUBLE,                -- corpus pass only (resumed scans: summed over sessions)
    created_at        TIMESTAMP NOT NULL,
    updated_at        TIMESTAMP NOT NULL
);

CREATE TABLE scan_checkpoints (
    scan_id      VARCHAR PRIMARY KEY,
    state        BLOB NOT NULL,              -- serialized streaming state (top-k heaps, histograms, position)
    updated_at   TIMESTAMP NOT NULL
);

CREATE TABLE scan_latents (
    scan_id      VARCHAR NOT NULL,
    latent       INTEGER NOT NULL,
    n_tokens     BIGINT NOT NULL,
    n_firing     BIGINT NOT NULL,
    density      DOUBLE NOT NULL,            -- n_firing / n_tokens
    max_act      DOUBLE,                     -- ranking quantity (settings_json.rank_quantity), best context
    mean_act     DOUBLE,                     -- post-activation, mean over firing tokens
    hist_edges   DOUBLE[],
    hist_counts  BIGINT[],
    PRIMARY KEY (scan_id, latent)
);

CREATE TABLE scan_examples (
    scan_id      VARCHAR NOT NULL,
    latent       INTEGER NOT NULL,
    kind         VARCHAR NOT NULL,           -- 'top' | 'quantile' | 'random' (non-firing) | 'random_prompt' (baseline prompt)
    rank         INTEGER NOT NULL,
    bin          INTEGER,                    -- decile for 'quantile'
    context_idx  BIGINT NOT NULL,            -- index of the context in the scan's stream
    start        INTEGER NOT NULL,           -- first shown token's position in the context
    token_ids    INTEGER[] NOT NULL,
    tokens       VARCHAR[] NOT NULL,
    acts         DOUBLE[] NOT NULL,          -- ranking quantity (settings_json.rank_quantity) per shown token
    post_acts    DOUBLE[],                   -- SAE post-activation per shown token
    max_act      DOUBLE NOT NULL,
    max_pos      INTEGER NOT NULL,           -- index into tokens of the max
    window_ids   INTEGER[],                  -- dream-length window ending at the max token
    window_ce    DOUBLE,                     -- its CE after BOS, nats/token
    window_act   DOUBLE,                     -- the objective at its last token, window fed alone
    PRIMARY KEY (scan_id, latent, kind, rank)
);

CREATE TABLE baselines (
    scan_id      VARCHAR NOT NULL,
    objective_key VARCHAR NOT NULL,          -- e.g. 'pre:last:123' or 'lp(p=0.1,offset=1.0):pre:last:12+345'
    n            INTEGER NOT NULL,
    length       INTEGER NOT NULL,
    mean         DOUBLE NOT NULL,
    std          DOUBLE NOT NULL,
    max          DOUBLE NOT NULL,
    PRIMARY KEY (scan_id, objective_key)
);

-- Dataset side of combination targets: the combination objective evaluated on the
-- dream-length windows of its latents' top examples (fed alone after BOS).
CREATE TABLE scan_objective_examples (
    scan_id       VARCHAR NOT NULL,
    objective_key VARCHAR NOT NULL,
    rank          INTEGER NOT NULL,          -- by window_act desc
    latent        INTEGER NOT NULL,          -- latent whose top example gave the window
    source_rank   INTEGER NOT NULL,          -- that example's rank
    window_ids    INTEGER[] NOT NULL,
    window_ce     DOUBLE,
    window_act    DOUBLE,
    PRIMARY KEY (scan_id, objective_key, rank)
);
