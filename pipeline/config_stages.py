"""Config sections of the stages and the run: ``[dream]`` (EPO) → ``stages.dream`` ·
``[scan]`` → ``stages.scan`` · ``[compare]`` → ``stages.compare`` · ``[explain]`` →
``stages.explain`` · ``[report]`` → ``reports`` · ``[run]`` → ``pipeline.orchestrate``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from reverie.pipeline.config_inputs import CorpusConfig, Section


class EPOConfig(Section):
    """Evolutionary Prompt Optimization hyper-parameters. Defaults: Thompson et al. (2024), Table 1."""

    iterations: int = Field(300, ge=1, description="T: iterations of EPO.")
    population: int = Field(8, ge=1, description="M: population size, one λ per slot.")
    n_tokens: int = Field(12, ge=1, description="n: optimized prompt length in tokens.")
    lambda_min: float = Field(0.1, gt=0, description="Smallest fluency weight λ (λ_i are log-spaced from min to max).")
    lambda_max: float = Field(10.0, gt=0, description="Largest fluency weight λ.")
    children: int = Field(32, ge=1, description="r: children per population member per iteration.")
    topk: int = Field(512, ge=1, description="k: gradient top-k candidate tokens per position (capped at the allowed vocabulary).")
    restart_every: int = Field(30, ge=0, description="T_restart: iterations between restarts (0 = never).")
    restart_lambda_min: float = Field(0.667, description="λ_r,min: restart λ is drawn uniformly in [min, max].")
    restart_lambda_max: float = Field(6.0, description="λ_r,max.")
    time_budget_s: float | None = Field(None, description="Wall-clock budget per EPO run in seconds (None = no limit).")
    early_stop_patience: int | None = Field(None, description="Stop when the frontier has not improved for this many iterations (None = off).")
    batch_size: int | None = Field(None, description="Children evaluated per forward pass (None = adapt to memory).")
    prefix_cache: bool = Field(True, description="Evaluate children from their parent's cached keys/values before the first edited position (and the fixed prefix's keys/values once); false = full sequences every time.")
    kv_buckets: int = Field(4, ge=1, description="With prefix_cache: children are split into this many fixed ranges of their first edited position; each range is one batched forward from its first position, reusing the parents' keys/values before it (1 = one forward from the fixed prefix; more = less compute, more calls). Chosen by benchmarks/epo_vs_reference.py.")
    lean_forward: bool = Field(True, description="Run EPO's forward passes through reverie's fused forward (fused QKV, scaled_dot_product_attention) from the model's own weights where it covers the architecture (GPT-2, Llama/Mistral/NeoX-style); false = transformer_lens's forward. Same numbers within 1e-4 (tested).")
    search_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the search's matrix products (with lean_forward): bfloat16 uses tensor cores / AMX; the frontier is re-scored in float32 before it is stored, so reported numbers are float32 either way.")
    objective_scale: Literal["z", "dataset_max", "raw"] = Field("z", description="What EPO divides the objective by so that λ (nats⁻¹) means the same for every objective: 'z' = σ of the objective over random prompts (z-score units; paper §3.5), 'dataset_max' = the scan's max dataset activation of each latent, 'raw' = nothing. Stored values stay in the latent's own units; lp combinations divide each member latent by its scale.")
    batch_targets: int | None = Field(None, ge=1, description="Targets (× seeds) dreamed together as one batched EPO search (one gradient pass, one chunked forward per iteration). None = all targets of a unit of work that fit batch_memory_mb.")
    batch_memory_mb: int = Field(4096, ge=64, description="Memory budget of one batched EPO search (per-target state: parents' log-probs, keys/values, gradients); sets the default batch_targets.")
    # augmentations from the follow-up post (off by default)
    p_logit_proposals: float = Field(0.0, ge=0, le=1, description="Probability a child's token is sampled from the model's own next-token logits at temperature U(0,2).")
    p_no_topk_mask: float = Field(0.0, ge=0, le=1, description="Probability the gradient top-k mask is not applied to a logit proposal.")
    p_extra_resample: float = Field(0.0, ge=0, le=1, description="Probability each extra position is also resampled (the post uses 1.5/n).")
    p_swap: float = Field(0.0, ge=0, le=1, description="Probability two positions swap tokens.")
    # prompt template
    prefix: str = Field("", description="Fixed text before the optimized tokens (context, never scored).")
    suffix: str = Field("", description="Fixed text after the optimized tokens.")
    init_text: str | None = Field(None, description="Initial prompt text (else random allowed tokens).")
    banned_tokens: list[str] = Field(default_factory=list, description="Token strings that may never enter a prompt (special tokens are always banned).")
    retokenize_filter: bool = Field(False, description="Reject candidates whose decoded text re-encodes to different ids.")
    history_every: int = Field(25, ge=1, description="Record the frontier every this many iterations (for the frontier-evolution plot).")


class DreamConfig(EPOConfig):
    seeds: list[int] = Field(default_factory=lambda: [0], description="EPO seeds per target; their frontiers merge.")
    attribution_topk: int = Field(32, ge=1, description="Gradient top-k substitutions evaluated per position for token attribution (paper Fig. 1).")
    attribution_prompts: int = Field(3, ge=0, description="How many frontier prompts get token attribution: the most fluent prompt that beats the dataset's best window, the highest-activation prompt, then more winners by CE.")


class ScanConfig(Section):
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="Where the scan reads text.")
    context_size: int | None = Field(None, description="Tokens per context (None = the SAE's context size).")
    max_tokens: int = Field(200_000, ge=1, description="Token budget of the scan.")
    batch_size: int = Field(32, ge=1, description="Contexts per forward pass.")
    top_k: int = Field(64, ge=1, description="Top-activating contexts kept per latent.")
    example_window: int = Field(24, ge=2, description="Tokens shown around each example's max (before it, and a few after).")
    quantile_samples: int = Field(12, ge=0, description="Examples kept per activation decile (for explanation scoring: half are shown, half held out, so 10 deciles × 12 / 2 = up to 60 held-out activating examples).")
    random_samples: int = Field(60, ge=0, description="Random non-firing contexts kept per latent (negatives for explanation scoring).")
    hist_bins: int = Field(50, ge=2, description="Bins of the activation histogram.")
    window_ce_samples: int = Field(1024, ge=1, description="Random dream-length windows used for the corpus CE mean ± σ.")
    baseline_prompts: int = Field(1024, ge=1, description="Random-token prompts of dream length for the random-prompt baseline (paper §3.5).")
    checkpoint_every: int = Field(20, ge=1, description="Batches between resumable checkpoints.")
    all_latents: bool = Field(False, description="Scan all d_sae latents instead of only the targets.")
    random_prompt_examples: int = Field(20, ge=0, description="Random baseline prompts stored per latent as kind='random_prompt' examples (negatives when scoring explanations on dreams).")
    on_bad_document: Literal["skip", "fail"] = Field("skip", description="A corpus document that cannot be read (an unparsable JSON line, no text field): 'skip' it and count it (the counts are stored with the scan and shown on the report's index), or 'fail' the scan naming the file and line. Invalid UTF-8 bytes are always replaced (and counted), control characters and lone surrogates always cleaned before tokenization.")
    window_search_top: int = Field(64, ge=0, description="Top contexts per latent (by in-context max) whose every full-length (dream-length) window is evaluated alone after BOS; the Pareto frontier of those windows is the dataset side of the comparison (0 = none searched). May exceed top_k (more contexts are kept in the pass than shown; cost grows linearly); benchmarks/window_search.py measures how close it comes to an exhaustive pass.")
    cooccurrence_window: int = Field(16, ge=0, description="Tokens per window for latent co-occurrence (issue 12): each context is cut into consecutive windows of this many tokens, and for every target latent the pass counts the windows where it and each of all d_sae latents fire (Jaccard ranks the co-occurrence neighbours). 0 = not counted. Needs every latent's activations (one full SAE encode per batch) and O(targets × d_sae) memory; skipped when that exceeds 5e7 counts (e.g. scan.all_latents on a wide SAE).")
    hard_negative_samples: int = Field(40, ge=0, description="Contexts kept per latent where one of its decoder-cosine neighbours fires and it does not (hard negatives for explanation scoring; delphi's neighbour examples). 0 = none.")
    hard_negative_neighbours: int = Field(5, ge=1, description="Decoder-cosine neighbours per latent whose firing makes a context a hard-negative candidate.")


class CompareConfig(Section):
    ce_limit: float | Literal["p10", "p50", "in_dist"] = Field("p10", description="CE limit (nats/token) of the 'best at CE ≤ limit' columns: a corpus band stored with the scan ('p10' / 'p50' = that percentile of random matched-length corpus windows, 'in_dist' = their mean + 2σ), or a number. The paper's 4 nats (stages.scan.search.PILE_CE_LIMIT) holds for Pile-scale models only.")
    ce_convention: Literal["rest", "all"] = Field("rest", description="CE the verdicts use: 'rest' = mean over tokens 2..n (the first token unscored: a window cut from a text pays no price for its cut), 'all' = over all n tokens after BOS. 'rest' falls back to 'all' for a target whose dreams have no stored ce_rest (the row says so).")
    attribution_top_tokens: int = Field(3, ge=1, description="Most important dream tokens (by attribution) used for the overlap metric.")


class ExplainConfig(Section):
    enabled: bool = Field(True, description="Run the explain stage when credentials exist (otherwise skipped with one line).")
    model: str = Field("gpt-4o-mini", description="Chat model name at the endpoint.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (the key itself never goes in config).")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(5, ge=0, description="Retries on 429 / 5xx / timeouts / connection errors (exponential backoff with jitter).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    budget_tokens: int | None = Field(None, description="Stop the stage cleanly after this many total tokens in this run.")
    budget_usd: float | None = Field(None, description="Stop the stage cleanly after this estimated cost in USD.")
    price_per_mtok_in: float = Field(0.15, ge=0, description="USD per million prompt tokens (cost estimate).")
    price_per_mtok_out: float = Field(0.60, ge=0, description="USD per million completion tokens.")
    backoff_base_s: float = Field(1.0, gt=0, description="Retry backoff: exponential with full jitter, base wait in seconds (a server's retry-after wins).")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest backoff wait in seconds (a server's retry-after is honoured up to 60 s).")
    max_completion_tokens: int = Field(200, ge=1, description="Completion token cap per request.")
    token_limit_param: Literal["max_completion_tokens", "max_tokens"] = Field("max_completion_tokens", description="Request field that carries max_completion_tokens: OpenAI's current 'max_completion_tokens', or the older 'max_tokens' for servers that ignore the new name (llama-cpp-python's server does, and then answers until its context is full; `reverie explain --local` sets it).")
    label_format: Literal["text", "json_schema", "llama_cpp_schema"] = Field("text", description="How scoring requests ask for their labels: 'text' (free text, `Labels: [1, 0, ...]`, parsed leniently), 'json_schema' (OpenAI / vLLM structured output: response_format json_schema with exactly n 0/1 labels), or 'llama_cpp_schema' (the same schema in llama-cpp-python's json_object form; `reverie explain --local` sets it, since SmolLM2-135M rarely writes readable free-text labels). Explanations stay free text.")
    n_examples: int = Field(20, ge=1, description="Examples (or dreams) shown per explanation prompt; source 'both' shows half of each.")
    n_holdout: int = Field(50, ge=1, description="Held-out activating examples per score (and non-activating examples, unless n_holdout_negative is set); delphi uses 100 + 100. When the scan or the dreams hold fewer, the score uses what exists and records both numbers (explain_scores.n_pos / n_pos_wanted); the page says so.")
    n_holdout_negative: int | None = Field(None, ge=1, description="Held-out non-activating examples per score (None = n_holdout).")
    hard_negative_share: float = Field(0.5, ge=0, le=1, description="Share of the dataset non-activating examples drawn from hard negatives (contexts where a decoder-cosine neighbour fires and this latent does not; scan.hard_negative_samples); the rest are random non-firing contexts. Fewer hard negatives than the share: random contexts fill in.")
    fuzzing: bool = Field(True, description="Also score by fuzzing (delphi): the scorer sees held-out examples with tokens marked, the activating examples marked correctly or at wrongly chosen tokens, the non-activating ones at random tokens, and says whether the marks match the explanation.")
    detection_batch: int = Field(10, ge=1, description="Held-out examples labelled per scoring request (detection and fuzzing; delphi-style batches).")
    ci_bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples (stratified by class) for the 95% intervals of balanced accuracy and F1; precision and recall use Wilson intervals.")
    seed: int = Field(0, description="Seed of the held-out example shuffle (the same order for an explanation and its baseline).")
    max_answer_chars: int = Field(4000, ge=100, description="Longest LLM answer kept, in characters: a longer answer is cut to this length before it is cached and recorded as a failure ('over-long answer'), never used as an explanation.")


class ReportConfig(Section):
    out: str | None = Field(None, description="Report folder, used as is for every run (default: <project dir>/reports/<run id>).")
    dreams_shown: int = Field(30, ge=1, description="Frontier prompts listed per latent page.")
    examples_shown: int = Field(20, ge=1, description="Dataset examples listed per latent page.")


class RunConfig(Section):
    executor: Literal["local", "ray"] = Field("local", description="Where dream units run: in-process, or as Ray tasks.")
    ray_address: str | None = Field(None, description="Ray cluster address (None = start a local cluster).")
    ray_num_workers: int = Field(2, ge=1, description="Ray: concurrent dream tasks (actors) when starting a local cluster.")
    ray_num_cpus_per_task: float = Field(1.0, gt=0, description="Ray: CPUs per dream task.")
    ray_num_gpus_per_task: float = Field(0.0, ge=0, description="Ray: GPUs per dream task (e.g. 1).")
    run_id: str | None = Field(None, description="Run id (default: 'nightly-<date>'); rerunning the same id resumes it.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op CPU threads of the driver and each worker (None = torch's default). Tiny models run fastest with 1.")
    budget_s: float | None = Field(None, gt=0, description="Wall budget of a nightly in seconds: after the first pass, the time left goes to extra EPO seeds for targets whose best dream lost to the dataset or whose frontier still improved in its last 20% of iterations (pipeline/allocation.py); None = no extra seeds.")
    improving_min: float = Field(0.01, ge=0, description="With budget_s: a frontier whose best activation rose by more than this fraction over its last 20% of iterations counts as still improving.")
    max_extra_seeds: int = Field(2, ge=0, description="With budget_s: extra seeds per target at most.")
    reuse_dreams: bool = Field(True, description="A target already dreamed by an earlier run with the same model/SAE/objective/EPO fingerprint gets those dream rows instead of a new EPO run (false: always dream).")

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        from reverie.pipeline.paths import check_run_id

        return None if v is None else check_run_id(v, ValueError)
