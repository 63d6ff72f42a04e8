"""reverie's configuration: one TOML file, validated by pydantic, one section per concern.

Every field is typed and documented (``Field(description=...)``); unknown keys are rejected
with a message naming the key and its section. CLI flags override file values through
:func:`apply_overrides` (dotted keys, e.g. ``dream.iterations=50``).

Sections and who reads them (data flows one way):
``[project]`` store location · ``[model]`` / ``[sae]`` / ``[targets]`` → ``sae_targets`` ·
``[dream]`` → ``stages.dream`` · ``[scan]`` → ``stages.scan`` · ``[compare]`` → ``stages.compare`` ·
``[explain]`` → ``stages.explain`` · ``[report]`` → ``reports`` · ``[run]`` → ``pipeline.orchestrate``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reverie.pipeline.errors import ConfigError
from reverie.pipeline.paths import expand


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectConfig(Section):
    dir: str | None = Field(None, description="Project directory: holds reverie.duckdb, logs, checkpoints and reports. Relative paths are relative to the working directory. Needed by every command that reads or writes the database (or --project-dir).")

    @field_validator("dir", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    def missing(self) -> list[str]:
        """What is missing for a command that uses the project's database (one message per setting; empty when set)."""
        return [] if self.dir else ["no project directory configured: set project.dir (where reverie.duckdb lives), "
                                    "e.g. [project] dir = \"runs/mine\" or --project-dir runs/mine"]

    @property
    def path(self) -> Path:
        """The project directory, resolved.

        Raises:
            ConfigError: ``project.dir`` is not set.
        """
        if not self.dir:
            raise ConfigError(self.missing()[0])
        return Path(expand(self.dir)).resolve()


class ModelConfig(Section):
    name: str | None = Field(None, description="transformer_lens official model name (e.g. 'gpt2-small'), loaded from the Hugging Face hub. Mutually exclusive with `path`.")
    path: str | None = Field(None, description="Local Hugging Face model directory (config.json + weights + tokenizer), e.g. '{shared}/models/tinystories-656k' (configs/demo.toml). '{shared}' expands to the shared data folder. Mutually exclusive with `name`.")
    device: str = Field("cpu", description="torch device for the subject model and SAE: 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights dtype of the subject model.")
    tokenizer_no_prefix_space: bool = Field(True, description="Replace a SentencePiece-style normalizer that prepends '▁' by Replace(' ', '▁'): right for models trained without the dummy prefix, such as the demo model. Set false for Llama-2-style tokenizers.")
    backend: Literal["hooked", "bridge"] = Field("hooked", description="How transformer_lens runs the model: 'hooked' = HookedTransformer (weights converted to transformer_lens's layout; deprecated in transformer_lens 3, removed in 4); 'bridge' = TransformerBridge in compatibility mode (the Hugging Face model itself behind the same hook names). Same numbers within 1e-4 (tested); part of the scan key and the dream fingerprint.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.name and self.path:
            raise ValueError("give either model.name (hub) or model.path (local directory), not both; set the other to \"\"")
        return self  # neither: allowed here, an error where a model is loaded (require)

    def missing(self) -> list[str]:
        """What is missing to load the model (one message per setting; empty when it can be loaded)."""
        return [] if (self.name or self.path) else [
            "no model configured: set model.name or model.path (a transformer_lens official name such as \"gpt2-small\", or a local Hugging Face folder)"]

    def require(self) -> "ModelConfig":
        """Self, when a model is configured.

        Raises:
            ConfigError: neither ``model.name`` nor ``model.path`` is set.
        """
        if self.missing():
            raise ConfigError(self.missing()[0])
        return self

    @field_validator("name", "path", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v


class SAEConfig(Section):
    release: str | None = Field(None, description="sae-lens registry release (e.g. 'gpt2-small-res-jb'); used with `sae_id`.")
    sae_id: str | None = Field(None, description="SAE id inside the release (e.g. 'blocks.6.hook_resid_pre').")
    path: str | None = Field(None, description="Local sae-lens directory (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]), e.g. '{shared}/saes/tinystories-656k-res/jumprelu-2048' (configs/demo.toml). Mutually exclusive with `release` + `sae_id`.")
    expected_model: str | None = Field(None, description="Model name the SAE must have been trained on; a mismatch warns. Default: the model's name.")
    norm_scaling_factor: float | None = Field(None, gt=0, description="For a local SAE saved with normalize_activations = 'expected_average_only_in': the factor sqrt(d_in)/E|x| to fold into its weights as sae-lens's from_pretrained does (default: the folder's activation_scaler.json; without either, a warning). Registry SAEs are folded by sae-lens.")

    @field_validator("release", "sae_id", "path", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @model_validator(mode="after")
    def _one_source(self) -> "SAEConfig":
        if self.path and (self.release or self.sae_id):
            raise ValueError("give either sae.path (local directory) or sae.release + sae.sae_id (registry), not both")
        if bool(self.release) != bool(self.sae_id):
            raise ValueError("set both sae.release and sae.sae_id (a registry SAE), or neither and sae.path")
        return self  # none: allowed here, an error where the SAE is loaded (require)

    def missing(self) -> list[str]:
        """What is missing to load the SAE (one message per setting; empty when it can be loaded)."""
        return [] if (self.path or (self.release and self.sae_id)) else [
            "no SAE configured: set sae.path, or sae.release and sae.sae_id (a local sae-lens folder, or an SAE of the sae-lens registry)"]

    def require(self) -> "SAEConfig":
        """Self, when an SAE is configured.

        Raises:
            ConfigError: neither ``sae.path`` nor ``sae.release`` + ``sae.sae_id`` is set.
        """
        if self.missing():
            raise ConfigError(self.missing()[0])
        return self

    @property
    def identity(self) -> str:
        """A stable string naming this SAE: 'release/sae_id' or the resolved path."""
        if self.path:
            return str(Path(expand(self.path)).resolve())
        return f"{self.release}/{self.sae_id}"


class TargetsConfig(Section):
    latents: list[int] = Field(default_factory=list, description="Explicit latent ids. When non-empty, random selection is off.")
    n_random: int = Field(8, ge=0, description="Number of random alive latents to draw when `latents` is empty.")
    seed: int | None = Field(None, description="Seed of the random latent draw. Omit for today's date as YYYYMMDD (a new draw each night).")
    log10_density_min: float = Field(-4.0, description="Alive floor: a latent is drawn only if log10(firing density) > this.")
    log10_density_max: float = Field(-1.0, description="Dense ceiling: latents with log10(density) >= this are not drawn (dense latents are rarely interpretable).")
    density_scan_tokens: int = Field(20_000, ge=1, description="Tokens of the configured corpus to scan for densities when the SAE has no sparsity.safetensors.")
    combinations: list[list[int]] = Field(default_factory=list, description="Multi-latent targets: each a list of latent ids (at the same position) optimized together with `combine`.")
    combine: Literal["lp", "sum", "min"] = Field("lp", description="How several latents combine into one objective: lp = (Σ relu(a_j+offset)^p)^(1/p), sum, or min.")
    p: float = Field(0.1, gt=0, lt=1, description="Exponent of the lp combination (p < 1 so one latent cannot be traded away for another).")
    offset: float = Field(1.0, description="Offset added before the ReLU of the lp combination, so negative activations still get a gradient.")
    quantity: Literal["pre", "post", "projection"] = Field("pre", description="What the objective reads: SAE pre-activation, post-activation (architecture-aware), or projection on the unit decoder direction.")
    reduce: Literal["last", "max"] = Field("last", description="Read the latent at the last prompt token, or the max over optimized positions.")
    allow_repeats: bool = Field(False, description="Random draw: false = prefer latents of the SAE that no earlier nightly explained (repeats only when too few new ones are alive); true = draw uniformly, repeats allowed.")

    @field_validator("combinations")
    @classmethod
    def _distinct_members(cls, v: list[list[int]]) -> list[list[int]]:
        for combo in v:
            dup = sorted({i for i in combo if combo.count(i) > 1})
            if dup:
                raise ValueError(f"the combination {combo} repeats latent(s) {dup}; a combination needs distinct latents, e.g. [{combo[0]}, <another id>]")
            if any(i < 0 for i in combo):
                raise ValueError(f"the combination {combo} has a negative latent id; latent ids are 0 .. d_sae - 1")
        return v

    @field_validator("latents")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        bad = [i for i in v if i < 0]
        if bad:
            raise ValueError(f"negative latent id(s) {bad}; latent ids are 0 .. d_sae - 1")
        return v


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


class CorpusConfig(Section):
    hf_dataset: str | None = Field(None, description="Hugging Face dataset streamed with `datasets` (production: 'monology/pile-uncopyrighted'). Mutually exclusive with `path`.")
    hf_split: str = Field("train", description="Split of the hub dataset.")
    path: str | None = Field(None, description="Local corpus: a .jsonl / .parquet / .txt file or a folder of them, e.g. '{shared}/corpora/tinystories-train.jsonl' (configs/demo.toml). Mutually exclusive with `hf_dataset`.")
    text_column: str = Field("text", description="Column / JSON key holding the document text.")

    @field_validator("hf_dataset", "path", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @model_validator(mode="after")
    def _one_source(self) -> "CorpusConfig":
        if self.hf_dataset and self.path:
            raise ValueError("set exactly one of corpus.hf_dataset (hub) and corpus.path (local file or folder)")
        return self  # neither: allowed here, an error where the corpus is read (require)

    def missing(self) -> list[str]:
        """What is missing to read the corpus (one message per setting; empty when it can be read)."""
        return [] if (self.hf_dataset or self.path) else [
            "no corpus configured: set scan.corpus.path or scan.corpus.hf_dataset (a local .jsonl/.parquet/.txt file or folder, or a Hugging Face dataset)"]

    def require(self) -> "CorpusConfig":
        """Self, when a corpus is configured.

        Raises:
            ConfigError: neither ``scan.corpus.path`` nor ``scan.corpus.hf_dataset`` is set.
        """
        if self.missing():
            raise ConfigError(self.missing()[0])
        return self


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


class ReverieConfig(Section):
    """The whole configuration. Load with :func:`load_config`."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    dream: DreamConfig = Field(default_factory=DreamConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def require(self, *what: Literal["project", "model", "sae", "corpus"]) -> "ReverieConfig":
        """Self, when every named setting a command needs is configured: ``project`` (project.dir),
        ``model``, ``sae``, ``corpus`` (scan.corpus). The defaults set none of them (the demo's
        values live in configs/demo.toml).

        Raises:
            ConfigError: one line per missing setting, each naming the keys to set.
        """
        parts = {"project": self.project, "model": self.model, "sae": self.sae, "corpus": self.scan.corpus}
        problems = [m for w in what for m in parts[w].missing()]
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError("the configuration lacks settings this command needs (see configs/demo.toml for a complete file):\n  "
                              + "\n  ".join(problems))
        return self

    def to_toml_dict(self) -> dict[str, Any]:
        """Plain dict of every field (defaults included), JSON/TOML-serializable."""
        return self.model_dump(mode="json")

    def fingerprint(self, *sections: str) -> str:
        """sha256 (hex, 16 chars) of the named sections (all if none): a content key for caching."""
        data = self.to_toml_dict()
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError, source: str, overridden: tuple[str, ...] = ()) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        dotted = ".".join(loc)
        flag = next((k for k in overridden if dotted == k or dotted.startswith(k + ".")), None)
        msg = e["msg"].removeprefix("Value error, ")
        origin = f" (given on the command line, --set {flag}=... or its own flag, not in {source})" if flag is not None else ""
        if e["type"] == "extra_forbidden":
            key = loc[-1]
            section = ".".join(loc[:-1]) or "top level"
            lines.append(f"  unknown key '{key}' in section [{section}]{origin}; check the spelling against `reverie config show`")
        else:
            where = ".".join(loc) or "top level"
            lines.append(f"  {where}{origin}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {dotted!r}: '{k}' is not a section")
    cur[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ReverieConfig:
    """Read a TOML config, apply dotted-key overrides (CLI flags win), validate.

    Args:
        path: TOML file; None = all defaults (no project directory, model, SAE or corpus: those
            are checked where used, see :meth:`ReverieConfig.require`).
        overrides: ``{"dream.iterations": 50, ...}``; ``None`` values are ignored.

    Raises:
        ConfigError: missing/unparsable file, unknown key (names key and section), bad value.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}. Pass an existing TOML file, e.g. --config configs/demo.toml")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return ReverieConfig.model_validate(data)
    except ValidationError as e:
        flags = tuple(k for k, v in (overrides or {}).items() if v is not None)
        raise ConfigError(_format_validation_error(e, source, flags)) from None


def dump_toml(cfg: ReverieConfig) -> str:
    """Render the effective configuration as TOML text with ``tomli_w`` (valid TOML for any
    string, emoji included). TOML has no null: unset (None) fields are listed in a comment
    above their section instead."""
    import tomli_w

    out: list[str] = []

    def split(d: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        kept, unset = {}, []
        for k, v in d.items():
            if v is None:
                unset.append(k)
            elif isinstance(v, dict):
                kept[k] = split(v)[0]
            else:
                kept[k] = v
        return kept, unset

    for name, d in cfg.to_toml_dict().items():
        kept, unset = split(d)
        if unset:
            out.append(f"# [{name}] unset: {', '.join(unset)}")
        out.append(tomli_w.dumps({name: kept}))
    return "\n".join(out)
