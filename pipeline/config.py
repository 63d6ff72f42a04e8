"""reverie's configuration: one TOML file, validated by pydantic, one section per concern.

Every field is typed and documented (``Field(description=...)``); unknown keys are rejected
with a message naming the key and its section. CLI flags override file values through
:func:`load_config`'s ``overrides`` (dotted keys, e.g. ``dream.iterations=50``).

Sections and who reads them (data flows one way):
``[project]`` store location · ``[model]`` / ``[sae]`` / ``[targets]`` → ``sae_targets`` ·
``[dream]`` → ``stages.dream`` · ``[scan]`` → ``stages.scan`` · ``[compare]`` → ``stages.compare`` ·
``[explain]`` → ``stages.explain`` · ``[report]`` → ``reports`` · ``[run]`` → ``pipeline.orchestrate``.

The sections live in :mod:`pipeline.config_inputs` (project, model, SAE, corpus, targets) and
:mod:`pipeline.config_stages` (dream, scan, compare, explain, report, run); this module holds
the whole (:class:`ReverieConfig`), loading and TOML output.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from reverie.pipeline.config_inputs import CorpusConfig, ModelConfig, ProjectConfig, SAEConfig, Section, TargetsConfig
from reverie.pipeline.config_stages import (CompareConfig, DreamConfig, EPOConfig, ExplainConfig, ReportConfig, RunConfig,
                                            ScanConfig)
from reverie.pipeline.errors import ConfigError
from reverie.pipeline.hashing import content_key

# re-exported: imported from reverie.pipeline.config elsewhere (stages, sae_targets, tests, reverie.EPOConfig)
__all__ = ["CompareConfig", "CorpusConfig", "DreamConfig", "EPOConfig", "ExplainConfig", "ModelConfig", "ReverieConfig",
           "SAEConfig", "ScanConfig", "TargetsConfig", "dump_toml", "load_config"]


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
        return content_key(data)


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
