"""Hugging Face hub access: fail within seconds when it cannot be reached, naming the fix.

Offline mode and the hub's address come from ``huggingface_hub``'s own settings, the ones
``transformers``, ``sae-lens`` and ``datasets`` obey: ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) → :func:`huggingface_hub.constants.is_offline_mode`; ``HF_ENDPOINT`` (a
mirror) → :data:`huggingface_hub.constants.ENDPOINT`; proxies (``HTTPS_PROXY`` ...) and a custom
client (:func:`huggingface_hub.set_client_factory`) → :func:`huggingface_hub.get_session`. Like
the libraries, ``huggingface_hub`` reads these variables once, when it is first imported.
"""

from __future__ import annotations

import concurrent.futures
from contextlib import contextmanager
from typing import Iterator

from reverie.pipeline.errors import LoadError, OfflineError, ReverieError


def hub_offline(datasets: bool = False) -> bool:
    """True when Hugging Face hub access is off: ``huggingface_hub``'s offline mode
    (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read when it was imported).

    Args:
        datasets: also count ``datasets``' own switch (``HF_DATASETS_OFFLINE``, which overrides the
            hub's for dataset loading).
    """
    from huggingface_hub import constants

    if datasets:
        try:
            import datasets.config as dcfg

            return bool(dcfg.HF_HUB_OFFLINE)
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass
    return bool(constants.is_offline_mode())


def hub_endpoint() -> str:
    """The hub's base URL as ``huggingface_hub`` uses it: ``HF_ENDPOINT`` (a mirror) or https://huggingface.co."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def check_hub_reachable(what: str, fix: str, timeout_s: float = 3.0, datasets: bool = False) -> None:
    """Fail within ``timeout_s`` seconds when the hub cannot be reached, instead of minutes of retries.

    In offline mode nothing is probed (the libraries then read only the local cache and fail fast
    themselves; :func:`offline_error` words that failure). Otherwise one HEAD request goes to the
    configured endpoint (:func:`hub_endpoint`) through ``huggingface_hub``'s HTTP client, so
    proxies and a custom client factory apply; any HTTP answer, even an error status, counts as
    reachable.

    Args:
        what: the resource, for the message (e.g. "model 'gpt2-small'").
        fix: the sentence that says how to do without the hub.
        timeout_s: seconds to wait for an answer (name resolution included).
        datasets: the resource is a dataset (``HF_DATASETS_OFFLINE`` counts too).

    Raises:
        OfflineError: the endpoint gave no answer within ``timeout_s`` seconds or refused the
            connection. The message names ``what``, the endpoint and the ``fix``.
    """
    if hub_offline(datasets=datasets):
        return
    from huggingface_hub import get_session

    endpoint = hub_endpoint()
    # the client's timeout does not bound name resolution, so the whole probe runs in a thread
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    probe = pool.submit(lambda: get_session().head(endpoint, timeout=timeout_s, follow_redirects=False))
    try:
        probe.result(timeout=timeout_s + 0.5)
    except concurrent.futures.TimeoutError:
        raise OfflineError(f"cannot reach the Hugging Face hub at {endpoint} to load {what} (no answer within {timeout_s:g} s). "
                           f"{fix} (Or set HF_HUB_OFFLINE=1 to use the local cache only, or HF_ENDPOINT to a reachable mirror.)") from None
    except Exception as e:  # noqa: BLE001 - any transport error (DNS, refused, TLS, proxy) means unreachable
        raise OfflineError(f"cannot reach the Hugging Face hub at {endpoint} to load {what} ({type(e).__name__}: {e}). "
                           f"{fix} (Or set HF_HUB_OFFLINE=1 to use the local cache only, or HF_ENDPOINT to a reachable mirror.)") from e
    finally:
        pool.shutdown(wait=False)


def offline_error(what: str, fix: str, err: Exception) -> OfflineError:
    """The error for a hub resource requested in offline mode that is not in the local cache
    (returned, not raised; the caller raises it ``from`` ``err``)."""
    return OfflineError(f"{what} is not available offline (HF_HUB_OFFLINE is set and it is not in the local cache: {type(err).__name__}). {fix}")


@contextmanager
def hub_errors(what: str, fix: str, datasets: bool = False) -> Iterator[None]:
    """Word any failure of a hub download inside the block as reverie's error (raised ``from None``).

    A :class:`ReverieError` passes through unchanged. In offline mode the failure is
    :func:`offline_error` (not in the local cache); otherwise :class:`LoadError` naming ``what``,
    the exception's type and message. Used around ``from_pretrained`` (model, registry SAE) and
    ``load_dataset`` (hub corpus), after :func:`check_hub_reachable`.

    Args:
        what: the resource, for the message (e.g. "model 'gpt2-small'").
        fix: the sentence that says how to do without the hub (offline mode only).
        datasets: the resource is a dataset (``HF_DATASETS_OFFLINE`` counts too).
    Raises:
        OfflineError: the block failed in offline mode.
        LoadError: the block failed otherwise.
    """
    try:
        yield
    except ReverieError:
        raise
    except Exception as e:  # noqa: BLE001 - the libraries raise anything (HTTP, OS, value, key errors)
        if hub_offline(datasets=datasets):
            raise offline_error(what, fix, e) from None
        raise LoadError(f"cannot load {what} from the hub: {type(e).__name__}: {e}") from None
