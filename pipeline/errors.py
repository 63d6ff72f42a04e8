"""Errors reverie raises on bad input. Each message says what was wrong and how to fix it."""

from __future__ import annotations


class ReverieError(Exception):
    """Base class: a user-facing error. The CLI prints its message without a traceback."""


class ConfigError(ReverieError):
    """The configuration file, a flag or an environment variable is wrong."""


class LoadError(ReverieError):
    """A model, SAE, tokenizer or corpus could not be loaded (missing, corrupt, offline)."""


class TargetError(ReverieError):
    """A latent or hook point does not fit the SAE or the model."""


class OfflineError(LoadError):
    """A hub resource was requested while the hub is unreachable (e.g. ``HF_HUB_OFFLINE=1``)."""
