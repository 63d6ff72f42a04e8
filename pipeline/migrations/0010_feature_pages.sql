-- Feature pages and explanation scores (issue 12).

-- Logit lens of each decoder direction (SAEDashboard LogitsTableData): W_dec[i] @ W_U, through the
-- final norm's scale where the model keeps one (norm_scale says which); computed once per (SAE, model, latent).
CREATE TABLE logit_lens (
    sae_key       VARCHAR NOT NULL,
    model_key     VARCHAR NOT NULL,
    latent        INTEGER NOT NULL,
    sae_sha       VARCHAR NOT NULL,          -- content hash of the SAE's files ('' when unknown)
    norm_scale    VARCHAR NOT NULL,          -- how the final norm entered, in words
    d_vocab       INTEGER NOT NULL,
    top_ids       INTEGER[] NOT NULL,        -- 10 most positive logits, descending
    top_tokens    VARCHAR[] NOT NULL,        -- display pieces (sae_targets.tokens)
    top_logits    DOUBLE[] NOT NULL,
    bottom_ids    INTEGER[] NOT NULL,        -- 10 most negative logits, ascending
    bottom_tokens VARCHAR[] NOT NULL,
    bottom_logits DOUBLE[] NOT NULL,
    hist_edges    DOUBLE[] NOT NULL,         -- histogram of all d_vocab logits
    hist_counts   BIGINT[] NOT NULL,
    mean          DOUBLE,
    std           DOUBLE,
    created_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (sae_key, model_key, latent)
);

-- Nearest latents: 'decoder_cosine' (source_id = sae_key; value = cosine of unit decoder directions)
-- and 'cooccurrence' (source_id = scan_id; value = Jaccard of the token windows where each fires).
CREATE TABLE latent_neighbours (
    source_id     VARCHAR NOT NULL,
    latent        INTEGER NOT NULL,
    kind          VARCHAR NOT NULL,          -- 'decoder_cosine' | 'cooccurrence'
    rank          INTEGER NOT NULL,          -- 0 = most similar
    neighbour     INTEGER NOT NULL,
    value         DOUBLE NOT NULL,
    n_both        BIGINT,                    -- co-occurrence: windows where both fire
    n_latent      BIGINT,                    -- windows where this latent fires
    n_neighbour   BIGINT,                    -- windows where the neighbour fires
    PRIMARY KEY (source_id, latent, kind, rank)
);

-- co-occurrence windows of a scan; hard negatives (kind 'hard_negative': a decoder-cosine neighbour
-- fires in the context, this latent nowhere) name the neighbour shown
ALTER TABLE scans ADD COLUMN cooc_window INTEGER;          -- tokens per co-occurrence window (NULL: not counted)
ALTER TABLE scans ADD COLUMN n_cooc_windows BIGINT;        -- windows counted
ALTER TABLE scan_examples ADD COLUMN neighbour INTEGER;    -- kind 'hard_negative': the neighbour that fires
ALTER TABLE scan_examples ADD COLUMN neighbour_act DOUBLE; -- its post-activation at the shown position

-- Scores: detection and fuzzing (delphi), each with the n it used, the n it wanted, and a 95% CI.
CREATE TABLE explain_scores_v2 (
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,
    explanation_id VARCHAR NOT NULL,
    scored_explanation_id VARCHAR NOT NULL,
    holdout_set    VARCHAR NOT NULL,         -- 'dataset' | 'dreams'
    baseline       BOOLEAN NOT NULL,
    scorer         VARCHAR NOT NULL DEFAULT 'detection', -- 'detection' | 'fuzzing'
    metric         VARCHAR NOT NULL,         -- 'balanced_accuracy' | 'f1' | 'precision' | 'recall'
    value          DOUBLE NOT NULL,
    n              INTEGER NOT NULL,         -- labelled examples the value rests on
    n_pos          INTEGER NOT NULL,
    n_neg          INTEGER NOT NULL,
    ci_low         DOUBLE,                   -- 95% confidence interval
    ci_high        DOUBLE,
    ci_method      VARCHAR,                  -- 'wilson' | 'bootstrap'
    n_pos_wanted   INTEGER,                  -- the settings' sample sizes (n_pos < n_pos_wanted: too few examples existed)
    n_neg_wanted   INTEGER,
    n_hard_neg     INTEGER,                  -- negatives from contexts where a decoder neighbour fires
    n_requests     INTEGER,                  -- scoring requests behind the value
    PRIMARY KEY (explanation_id, holdout_set, baseline, scorer, metric)
);
INSERT INTO explain_scores_v2 (run_id, target_id, explanation_id, scored_explanation_id, holdout_set, baseline, scorer, metric, value, n, n_pos, n_neg)
    SELECT run_id, target_id, explanation_id, scored_explanation_id, holdout_set, baseline, 'detection', metric, value, n, n_pos, n_neg FROM explain_scores;
DROP TABLE explain_scores;
ALTER TABLE explain_scores_v2 RENAME TO explain_scores;
