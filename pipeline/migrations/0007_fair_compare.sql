-- Fair comparison (issues 17 and 11): matched-length windows searched over every position of
-- the top contexts, CE both ways, corpus-calibrated CE bands, dominance verdicts.
--
-- CE conventions (nats/token), for dreams and dataset windows alike, both fed alone after BOS:
--   ce       mean over all n tokens, each scored given BOS and the tokens before it (the dream stage's);
--   ce_rest  mean over tokens 2..n (the first token unscored: dreamy's convention), which removes
--            the cost a window cut from the middle of a text pays for its first token.

-- corpus CE bands from the scan's random matched-length windows (both conventions)
ALTER TABLE scans ADD COLUMN ce_p10 DOUBLE;
ALTER TABLE scans ADD COLUMN ce_p50 DOUBLE;
ALTER TABLE scans ADD COLUMN ce_rest_mean DOUBLE;
ALTER TABLE scans ADD COLUMN ce_rest_std DOUBLE;
ALTER TABLE scans ADD COLUMN ce_rest_p10 DOUBLE;
ALTER TABLE scans ADD COLUMN ce_rest_p50 DOUBLE;
ALTER TABLE scans ADD COLUMN ce_rest_in_dist_threshold DOUBLE;   -- ce_rest_mean + 2 ce_rest_std

ALTER TABLE scan_latents ADD COLUMN window_max DOUBLE;           -- best matched-length window fed alone (searched)
ALTER TABLE scan_latents ADD COLUMN n_windows_searched BIGINT;   -- distinct full-length windows evaluated
ALTER TABLE scan_latents ADD COLUMN n_contexts_searched INTEGER; -- top contexts whose every window was evaluated
ALTER TABLE scan_latents ADD COLUMN n_short_contexts INTEGER;    -- of those, too short to supply one full-length window

ALTER TABLE scan_examples ADD COLUMN window_ce_rest DOUBLE;      -- window_ids' CE without its first token
ALTER TABLE scan_examples ADD COLUMN context_ids INTEGER[];      -- kind='top': the whole context (BOS first), for window search

ALTER TABLE scan_objective_examples ADD COLUMN window_ce_rest DOUBLE;

-- The searched dataset side: per objective, the Pareto frontier (activation up, CE down) of every
-- full-length window of the top contexts, under either CE convention; it holds the best window of
-- every CE band.
CREATE TABLE scan_windows (
    scan_id        VARCHAR NOT NULL,
    objective_key  VARCHAR NOT NULL,
    rank           INTEGER NOT NULL,         -- by window_ce ascending
    latent         INTEGER NOT NULL,         -- latent whose top context supplied the window
    source_rank    INTEGER NOT NULL,         -- that context's top-example rank
    context_idx    BIGINT NOT NULL,
    end_pos        INTEGER NOT NULL,         -- position of the window's last token in the context (BOS = 0)
    window_ids     INTEGER[] NOT NULL,       -- exactly window_len tokens
    tokens         VARCHAR[] NOT NULL,
    window_ce      DOUBLE NOT NULL,
    window_ce_rest DOUBLE,
    window_act     DOUBLE NOT NULL,          -- the objective at the last token, window fed alone
    latent_acts    DOUBLE[],                 -- combination: each member latent's own value (member order)
    frontier_all   BOOLEAN NOT NULL,         -- on the frontier under ce
    frontier_rest  BOOLEAN NOT NULL,         -- on the frontier under ce_rest
    PRIMARY KEY (scan_id, objective_key, rank)
);

-- dominance verdict (paper Fig. 3: the activation–CE plane) and the calibrated bands
ALTER TABLE comparisons ADD COLUMN ce_convention VARCHAR;        -- 'all' | 'rest': which CE the verdict uses
ALTER TABLE comparisons ADD COLUMN data_best_act DOUBLE;         -- the dataset's best matched window (alone)
ALTER TABLE comparisons ADD COLUMN data_best_ce DOUBLE;          -- its CE (verdict convention)
ALTER TABLE comparisons ADD COLUMN dream_at_data_ce DOUBLE;      -- best dream activation at CE <= data_best_ce
ALTER TABLE comparisons ADD COLUMN dream_at_data_ce_ce DOUBLE;   -- that dream's CE
ALTER TABLE comparisons ADD COLUMN dominates BOOLEAN;            -- a dream dominates the best window; NULL: undecidable
ALTER TABLE comparisons ADD COLUMN frontier_dominated DOUBLE;    -- fraction of the dataset frontier some dream dominates
ALTER TABLE comparisons ADD COLUMN n_data_frontier INTEGER;
ALTER TABLE comparisons ADD COLUMN verdict VARCHAR;              -- state of the dominance verdict, in words
ALTER TABLE comparisons ADD COLUMN in_dist_state VARCHAR;        -- state of the mean + 2σ column
ALTER TABLE comparisons ADD COLUMN data_max_in_context DOUBLE;   -- scan max at the max token, in context
ALTER TABLE comparisons ADD COLUMN is_combination BOOLEAN;

ALTER TABLE compare_summary ADD COLUMN ce_convention VARCHAR;
ALTER TABLE compare_summary ADD COLUMN n_single INTEGER;          -- single-latent targets (batch fractions use only these)
ALTER TABLE compare_summary ADD COLUMN n_dominance_known INTEGER;
ALTER TABLE compare_summary ADD COLUMN n_dominates INTEGER;
ALTER TABLE compare_summary ADD COLUMN frac_dominates DOUBLE;
ALTER TABLE compare_summary ADD COLUMN ce_p10 DOUBLE;
ALTER TABLE compare_summary ADD COLUMN ce_p50 DOUBLE;
