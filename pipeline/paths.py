"""Where reverie finds its data: the shared folder and the project directory.

The shared folder holds real models, SAEs and corpora (never copied into the repo). Its
location is ``$REVERIE_SHARED`` when set, else ``../shared`` beside the repository root.
Config strings may contain ``{shared}``, which expands to that folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from reverie.pipeline.errors import ConfigError

SHARED_ENV = "REVERIE_SHARED"
REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir(must_exist: bool = True) -> Path:
    """Return the shared data folder.

    Returns:
        Absolute path: ``$REVERIE_SHARED`` if set, else ``<repo>/../shared``.

    Raises:
        ConfigError: ``must_exist`` and the folder is missing; the message says where it
            looked and which variable to set.
    """
    env = os.environ.get(SHARED_ENV)
    path = Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared").resolve()
    if must_exist and not path.is_dir():
        how = f"${SHARED_ENV}={env!r}" if env else f"the default beside the repository ({REPO_ROOT.parent}/shared)"
        raise ConfigError(
            f"shared data folder not found: looked at {path} ({how}). "
            f"Set the environment variable {SHARED_ENV} to the folder that holds models/, saes/ and corpora/, "
            "or give absolute paths in the config instead of '{shared}/...'."
        )
    return path


def expand(value: str | None) -> str | None:
    """Expand ``{shared}`` and ``~`` in a config path string; ``None`` passes through.

    Raises:
        ConfigError: the string uses ``{shared}`` and the shared folder is missing.
    """
    if value is None:
        return None
    if "{shared}" in value:
        value = value.replace("{shared}", str(shared_dir()))
    return os.path.expanduser(value)


_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_run_id(run_id: str, error: type[Exception] = ConfigError) -> str:
    """Check a run id is safe to use in file names (logs/<run id>.log, reports/<run id>/).

    Allowed: 1–128 characters from letters, digits, ``.``, ``_``, ``+``, ``-``, starting with a
    letter or digit, without ``..``; so no path separator, no parent reference, no control
    character.

    Returns:
        ``run_id`` unchanged.
    Raises:
        ``error`` (default :class:`ConfigError`): the id is not safe; the message says why and how to fix it.
    """
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id) or ".." in run_id:
        shown = repr(run_id).encode("ascii", "backslashreplace").decode()
        raise error(f"run id {shown} is not allowed: a run id names files (logs/<run id>.log, reports/<run id>/), so it may hold only "
                    "letters, digits, '.', '_', '+' and '-', must start with a letter or digit, must not contain '..', and is at most "
                    "128 characters; e.g. --run-id nightly-test")
    return run_id
