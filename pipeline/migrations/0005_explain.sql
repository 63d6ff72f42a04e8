-- Explain stage: LLM explanations, their detection scores, failures, the response cache and usage.
-- The API key is never stored: rows hold model names, hashes, texts and token counts only.
CREATE TABLE llm_cache (
    key            VARCHAR PRIMARY KEY,      -- sha256 of (model, messages, parameters)
    model          VARCHAR NOT NULL,
    response_text  VARCHAR NOT NULL,
    prompt_tokens  INTEGER,
    completion_tokens INTEGER,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE llm_calls (                     -- one row per answered request (append-only log)
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR,
    purpose        VARCHAR NOT NULL,         -- 'explain:<source>' | 'detect:<source>:<holdout_set>[:baseline]'
    key            VARCHAR NOT NULL,         -- llm_cache.key
    model          VARCHAR NOT NULL,
    cached         BOOLEAN NOT NULL,         -- answered from llm_cache (nothing paid)
    attempts       INTEGER NOT NULL,         -- HTTP attempts (1 + retries); 0 when cached
    prompt_tokens  INTEGER,
    completion_tokens INTEGER,
    cost_usd       DOUBLE,                   -- estimated from explain.price_per_mtok_*; 0 when cached
    latency_s      DOUBLE,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE explanations (
    explanation_id VARCHAR PRIMARY KEY,      -- '<run_id>/<target_id>/<source>'
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,         -- 'dataset' | 'dreams' | 'both'
    model          VARCHAR NOT NULL,
    text           VARCHAR NOT NULL,         -- the parsed one-sentence explanation
    raw_text       VARCHAR NOT NULL,         -- the model's whole answer
    prompt_hash    VARCHAR NOT NULL,         -- llm_cache.key of the explanation request
    n_dataset      INTEGER NOT NULL,         -- dataset examples shown
    n_dreams       INTEGER NOT NULL,         -- dream prompts shown
    prompt_tokens  INTEGER,
    completion_tokens INTEGER,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE explain_scores (
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,
    explanation_id VARCHAR NOT NULL,         -- this target's explanation
    scored_explanation_id VARCHAR NOT NULL,  -- the explanation given to the scorer (another target's when baseline)
    holdout_set    VARCHAR NOT NULL,         -- 'dataset' (quantiles + non-firing) | 'dreams' (dreams + random prompts)
    baseline       BOOLEAN NOT NULL,         -- true: another latent's explanation scored on this latent
    metric         VARCHAR NOT NULL,         -- 'balanced_accuracy' | 'f1' | 'precision' | 'recall'
    value          DOUBLE NOT NULL,
    n              INTEGER NOT NULL,         -- labelled held-out examples
    n_pos          INTEGER NOT NULL,
    n_neg          INTEGER NOT NULL,
    PRIMARY KEY (explanation_id, holdout_set, baseline, metric)
);

CREATE TABLE explain_failures (
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,         -- '*' for run-level failures (e.g. the budget cap)
    what           VARCHAR NOT NULL,         -- e.g. 'explain:dreams', 'detect:both:dataset', 'baseline'
    why            VARCHAR NOT NULL,         -- redacted error text
    created_at     TIMESTAMP NOT NULL
);
