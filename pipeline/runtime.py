"""Process-wide runtime settings applied once, before the first tensor operation."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("reverie.runtime")


def apply_torch_threads(run_cfg: Any) -> int:
    """Apply ``run.torch_threads`` to torch: intra-op threads (``torch.set_num_threads``) and
    inter-op threads (``torch.set_num_interop_threads``).

    The one place every command, the nightly driver and each Ray worker set threads. Inter-op
    threads can only be set once per process, before any inter-op parallel work; a later call
    (e.g. a second command in one test process) keeps the earlier value (logged at debug level).

    Args:
        run_cfg: the ``[run]`` section (:class:`pipeline.config.RunConfig`) or None; its
            ``torch_threads`` (int ≥ 1, or None = torch's default, nothing changed).
    Returns:
        ``torch.get_num_threads()`` after applying.
    """
    import torch

    n = getattr(run_cfg, "torch_threads", None)
    if n:
        torch.set_num_threads(int(n))
        try:
            if torch.get_num_interop_threads() != int(n):
                torch.set_num_interop_threads(int(n))
        except RuntimeError as e:  # already set, or parallel work already started
            log.debug("inter-op threads stay %d: %s", torch.get_num_interop_threads(), e)
    return torch.get_num_threads()
