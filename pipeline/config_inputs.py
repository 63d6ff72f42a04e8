"""Config sections naming what reverie reads: the project directory, the subject model, the SAE,
the corpus (``[scan.corpus]``), and the latents to explain (``[targets]``).

The first four are :class:`Source` sections: each names where something comes from, in one of
a few mutually exclusive ways, with the same rules (written once, in :class:`Source`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from reverie.pipeline.errors import ConfigError
from reverie.pipeline.paths import expand


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)



class Source(Section):
    """A section naming where something comes from, in one of a few mutually exclusive ways
    (``_sources``: alternatives, each a tuple of fields that go together, e.g. ``sae.path`` or
    ``sae.release`` + ``sae.sae_id``).

    Every source field reads "" as unset (how a TOML file or ``--set`` clears a value). Giving
    two alternatives is an error (``_both``), and so is half of one (``_partial``); giving none
    is allowed here and an error where the thing is used (:meth:`require`, ``_absent``).
    """

    _sources: ClassVar[tuple[tuple[str, ...], ...]] = ()
    _both: ClassVar[str] = ""
    _partial: ClassVar[str] = ""
    _absent: ClassVar[str] = ""

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any, info: ValidationInfo) -> Any:
        return None if v == "" and any(info.field_name in alt for alt in cls._sources) else v

    @model_validator(mode="after")
    def _one_source(self) -> "Source":
        given = [alt for alt in self._sources if any(getattr(self, f) for f in alt)]
        if len(given) > 1:
            raise ValueError(self._both)
        if any(not all(getattr(self, f) for f in alt) for alt in given):
            raise ValueError(self._partial)
        return self  # none: allowed here, an error where it is used (require)

    def missing(self) -> list[str]:
        """What is missing to use this source (one message per setting; empty when it is configured)."""
        return [] if any(all(getattr(self, f) for f in alt) for alt in self._sources) else [self._absent]

    def require(self) -> "Source":
        """Self, when the source is configured.

        Raises:
            ConfigError: none of its alternatives is set (the message names the keys to set).
        """
        if self.missing():
            raise ConfigError(self.missing()[0])
        return self


class ProjectConfig(Source):
    dir: str | None = Field(None, description="Project directory: holds reverie.duckdb, logs, checkpoints and reports. Relative paths are relative to the working directory. Needed by every command that reads or writes the database (or --project-dir).")

    _sources = (("dir",),)
    _absent = ("no project directory configured: set project.dir (where reverie.duckdb lives), "
               "e.g. [project] dir = \"runs/mine\" or --project-dir runs/mine")

    @property
    def path(self) -> Path:
        """The project directory, resolved.

        Raises:
            ConfigError: ``project.dir`` is not set.
        """
        if not self.dir:
            raise ConfigError(self.missing()[0])
        return Path(expand(self.dir)).resolve()


class ModelConfig(Source):
    name: str | None = Field(None, description="transformer_lens official model name (e.g. 'gpt2-small'), loaded from the Hugging Face hub. Mutually exclusive with `path`.")
    path: str | None = Field(None, description="Local Hugging Face model directory (config.json + weights + tokenizer), e.g. '{shared}/models/tinystories-656k' (configs/demo.toml). '{shared}' expands to the shared data folder. Mutually exclusive with `name`.")
    device: str = Field("cpu", description="torch device for the subject model and SAE: 'cpu', 'cuda', 'cuda:1', 'mps'.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights dtype of the subject model.")
    tokenizer_no_prefix_space: bool = Field(True, description="Replace a SentencePiece-style normalizer that prepends '▁' by Replace(' ', '▁'): right for models trained without the dummy prefix, such as the demo model. Set false for Llama-2-style tokenizers.")
    backend: Literal["hooked", "bridge"] = Field("hooked", description="How transformer_lens runs the model: 'hooked' = HookedTransformer (weights converted to transformer_lens's layout; deprecated in transformer_lens 3, removed in 4); 'bridge' = TransformerBridge in compatibility mode (the Hugging Face model itself behind the same hook names). Same numbers within 1e-4 (tested); part of the scan key and the dream fingerprint.")

    _sources = (("name",), ("path",))
    _both = "give either model.name (hub) or model.path (local directory), not both; set the other to \"\""
    _absent = ("no model configured: set model.name or model.path (a transformer_lens official name such as \"gpt2-small\", "
               "or a local Hugging Face folder)")


class SAEConfig(Source):
    release: str | None = Field(None, description="sae-lens registry release (e.g. 'gpt2-small-res-jb'); used with `sae_id`.")
    sae_id: str | None = Field(None, description="SAE id inside the release (e.g. 'blocks.6.hook_resid_pre').")
    path: str | None = Field(None, description="Local sae-lens directory (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]), e.g. '{shared}/saes/tinystories-656k-res/jumprelu-2048' (configs/demo.toml). Mutually exclusive with `release` + `sae_id`.")
    expected_model: str | None = Field(None, description="Model name the SAE must have been trained on; a mismatch warns. Default: the model's name.")
    norm_scaling_factor: float | None = Field(None, gt=0, description="For a local SAE saved with normalize_activations = 'expected_average_only_in': the factor sqrt(d_in)/E|x| to fold into its weights as sae-lens's from_pretrained does (default: the folder's activation_scaler.json; without either, a warning). Registry SAEs are folded by sae-lens.")

    _sources = (("path",), ("release", "sae_id"))
    _both = "give either sae.path (local directory) or sae.release + sae.sae_id (registry), not both"
    _partial = "set both sae.release and sae.sae_id (a registry SAE), or neither and sae.path"
    _absent = ("no SAE configured: set sae.path, or sae.release and sae.sae_id (a local sae-lens folder, "
               "or an SAE of the sae-lens registry)")

    @property
    def identity(self) -> str:
        """A stable string naming this SAE: 'release/sae_id' or the resolved path."""
        if self.path:
            return str(Path(expand(self.path)).resolve())
        return f"{self.release}/{self.sae_id}"


class CorpusConfig(Source):
    hf_dataset: str | None = Field(None, description="Hugging Face dataset streamed with `datasets` (production: 'monology/pile-uncopyrighted'). Mutually exclusive with `path`.")
    hf_split: str = Field("train", description="Split of the hub dataset.")
    path: str | None = Field(None, description="Local corpus: a .jsonl / .parquet / .txt file or a folder of them, e.g. '{shared}/corpora/tinystories-train.jsonl' (configs/demo.toml). Mutually exclusive with `hf_dataset`.")
    text_column: str = Field("text", description="Column / JSON key holding the document text.")

    _sources = (("hf_dataset",), ("path",))
    _both = "set exactly one of corpus.hf_dataset (hub) and corpus.path (local file or folder)"
    _absent = ("no corpus configured: set scan.corpus.path or scan.corpus.hf_dataset (a local .jsonl/.parquet/.txt file or "
               "folder, or a Hugging Face dataset)")


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
