"""Hugging Face hub access: fail within seconds when it cannot be reached, naming the fix."""

from __future__ import annotations

import concurrent.futures
import os
import socket

from reverie.pipeline.errors import OfflineError

HUB_HOST = "huggingface.co"


def hub_offline() -> bool:
    """True when Hugging Face hub access is off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_hub_reachable(what: str, fix: str, timeout_s: float = 3.0) -> None:
    """Fail within ``timeout_s`` seconds when the hub cannot be reached, instead of minutes of retries.

    Raises:
        OfflineError: offline mode is set and the resource is not cached, or a TCP connection to
            the hub fails. The message names ``what`` and the ``fix``.
    """
    if hub_offline():
        return  # libraries then read only the local cache and fail fast themselves
    # the socket timeout does not bound DNS resolution, so the whole probe runs in a thread
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    probe = pool.submit(lambda: socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close())
    try:
        probe.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise OfflineError(f"cannot reach the Hugging Face hub to load {what} (no answer within {timeout_s:g} s). {fix}") from None
    except OSError as e:
        raise OfflineError(f"cannot reach the Hugging Face hub to load {what} ({e}). {fix}") from None
    finally:
        pool.shutdown(wait=False)


def offline_error(what: str, fix: str, err: Exception) -> OfflineError:
    """The error for a hub resource requested in offline mode that is not cached."""
    return OfflineError(f"{what} is not available offline (HF_HUB_OFFLINE is set and it is not in the local cache: {type(err).__name__}). {fix}")
