-- Real SAEs, real models (issue 14): the SAE a run read, recorded at run start (one row per run).
-- Reports read the Neuronpedia id from here (registry SAEs included), never from the SAE's folder.
CREATE TABLE run_saes (
    run_id               VARCHAR PRIMARY KEY,
    sae_key              VARCHAR NOT NULL,   -- 'release/sae_id' (registry) or the resolved folder path
    source               VARCHAR NOT NULL,   -- 'registry' | 'local'
    release              VARCHAR,            -- registry release, NULL for a folder
    sae_id               VARCHAR,            -- registry id, NULL for a folder
    sae_sha              VARCHAR,            -- content hash of the folder's files ('name:<key>' for the registry)
    architecture         VARCHAR NOT NULL,   -- sae-lens architecture: standard, jumprelu, topk, gated, ...
    d_in                 INTEGER NOT NULL,
    d_sae                INTEGER NOT NULL,
    hook_name            VARCHAR NOT NULL,
    prepend_bos          BOOLEAN NOT NULL,
    context_size         INTEGER,
    normalization        VARCHAR NOT NULL,   -- normalize_activations as saved (before folding)
    norm_scaling_factor  DOUBLE,             -- expected_average_only_in factor folded into the weights, or NULL
    model_kwargs_json    VARCHAR NOT NULL,   -- the SAE's model_from_pretrained_kwargs the model was loaded with
    neuronpedia_id       VARCHAR,
    model_key            VARCHAR NOT NULL,
    model_sha            VARCHAR,
    recorded_at          TIMESTAMP NOT NULL
);
