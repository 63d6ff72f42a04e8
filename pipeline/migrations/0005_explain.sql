-- Explain stage: LLM explanations, their detection scores, failures, the response cache and usage.
CREATE TABLE llm_cache (
    key            VARCHAR PRIMARY KEY,      -- sha256 of (model, messages, parameters)
    model          VARCHAR NOT NULL,
    response_text  VARCHAR NOT NULL,
    prompt_tokens  INTEGER,
    completion_tokens INTEGER,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE llm_calls (
    run_id         VARCHAR NOT NULL,
    key            VARCHAR NOT NULL,
    model          VARCHAR NOT NULL,
    cached         BOOLEAN NOT NULL,
    prompt_tokens  INTEGER,
    completion_tokens INTEGER,
    cost_usd       DOUBLE,
    latency_s      DOUBLE,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE explanations (
    explanation_id VARCHAR PRIMARY KEY,      -- '<run_id>/<target_id>/<source>'
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,         -- 'dataset' | 'dreams' | 'both'
    model          VARCHAR NOT NULL,
    text           VARCHAR NOT NULL,
    prompt_hash    VARCHAR NOT NULL,
    prompt_tokens  INTEGER,
    completion_tokens INTEGER,
    created_at     TIMESTAMP NOT NULL
);

CREATE TABLE explain_scores (
    explanation_id VARCHAR NOT NULL,
    holdout_set    VARCHAR NOT NULL,         -- 'dataset' (quantiles + non-firing) | 'dreams' (dreams + random prompts)
    baseline       BOOLEAN NOT NULL,         -- true: another latent's explanation scored on this latent
    metric         VARCHAR NOT NULL,         -- 'balanced_accuracy' | 'f1'
    value          DOUBLE NOT NULL,
    n              INTEGER NOT NULL,
    PRIMARY KEY (explanation_id, holdout_set, baseline, metric)
);

CREATE TABLE explain_failures (
    run_id         VARCHAR NOT NULL,
    target_id      VARCHAR NOT NULL,
    what           VARCHAR NOT NULL,
    why            VARCHAR NOT NULL,
    created_at     TIMESTAMP NOT NULL
);
