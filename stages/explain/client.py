"""An OpenAI-compatible chat client for the explain stage: bounded concurrency, retries, a response
cache in DuckDB, token usage and cost per call, and a budget cap.

* Concurrency: an ``asyncio.Semaphore`` of ``explain.max_concurrency`` requests in flight.
* Retries: tenacity, on 429, 5xx, timeouts, connection errors and unreadable answers (malformed
  JSON, no choices); exponential backoff with full jitter (``explain.backoff_base_s`` ·
  2^attempt, capped at ``explain.backoff_max_s``); a server's ``retry-after-ms`` / ``retry-after``
  header wins when present (honoured up to 60 s, the openai client's own limit). The openai client's own retries are off (``max_retries=0``).
* Fatal answers (401 / 403 / 404: bad key, no access, unknown model) stop the stage.
* Cache: key = sha256 of the JSON of (model, messages, parameters); a hit costs nothing and sends
  no request. Rows live in ``llm_cache`` (see :class:`StoreCache`).
* Budget: before each request that is not cached, the run's spend (tokens and estimated USD,
  earlier invocations included) is compared with ``explain.budget_tokens`` / ``budget_usd``; at
  the cap the stage stops. Requests already in flight finish, so the cap can be exceeded by at
  most ``max_concurrency`` requests.
* Untrusted answers: each answer is cut to ``explain.max_answer_chars`` before it is cached (its
  received length is kept in ``llm_cache.answer_chars``); the cache is the one place an answer is
  stored (``explanations.prompt_hash`` points at it).
* Secrets: the API key lives only inside the openai client; every error text that leaves this
  module passes through :func:`redact`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from reverie.pipeline.config import ExplainConfig
from reverie.pipeline.hashing import content_key
from reverie.pipeline.store import Store, now

log = logging.getLogger("reverie.explain")

REDACTED = "[REDACTED]"
MAX_RETRY_AFTER_S = 60.0


class StageStop(Exception):
    """The stage must stop (budget reached, endpoint refused the key or model); message says why."""


class BudgetExceeded(StageStop):
    """The run's token or cost budget is spent."""


class EndpointRejected(StageStop):
    """The endpoint answered 401 / 403 / 404: wrong key, no access, or an unknown model."""


class LLMError(Exception):
    """A request failed for good (after retries); the message is redacted."""


class BadResponse(Exception):
    """The endpoint answered 200 with something unusable (no choices, no content)."""


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by ``[REDACTED]``."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    return text


def storable(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate (JSON allows ``"\\ud800"``; DuckDB refuses
    to store one, which would stop the stage) becomes U+FFFD; surrogate pairs become their character."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def cache_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of (model, messages, parameters)."""
    return content_key({"model": model, "messages": messages, "params": params}, length=None, ensure_ascii=False)


@dataclass(frozen=True)
class Completion:
    """An answer: its text (cut to ``explain.max_answer_chars``), cache key and usage (tokens;
    ``cached`` answers cost nothing); ``answer_chars`` is its length as received (larger than
    ``len(text)`` when it was cut)."""

    text: str
    key: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    answer_chars: int = 0


@dataclass(frozen=True)
class CallRecord:
    """One row of ``llm_calls``."""

    target_id: str | None
    purpose: str
    key: str
    model: str
    cached: bool
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float
    created_at: Any


class ResponseCache(Protocol):
    """Where answers are cached: ``get(key)`` → row dict or None; ``put(row)`` stores one."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, row: dict[str, Any]) -> None: ...


class StoreCache:
    """The ``llm_cache`` table of a project's store (called from the event-loop thread only)."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, key: str) -> dict[str, Any] | None:
        return self.store.fetch_one("SELECT * FROM llm_cache WHERE key = ?", [key])

    def put(self, row: dict[str, Any]) -> None:
        if self.get(row["key"]) is None:  # no await between check and insert: no race in one loop
            self.store.insert("llm_cache", [row])


@dataclass
class Budget:
    """Spend of a run so far and its caps (None = no cap)."""

    max_tokens: int | None = None
    max_usd: float | None = None
    tokens: int = 0
    usd: float = 0.0

    def check(self) -> None:
        """Raises BudgetExceeded when a cap is reached."""
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            raise BudgetExceeded(f"budget cap reached: {self.tokens:,} tokens used of explain.budget_tokens = {self.max_tokens:,}")
        if self.max_usd is not None and self.usd >= self.max_usd:
            raise BudgetExceeded(f"budget cap reached: ${self.usd:.4f} spent of explain.budget_usd = ${self.max_usd:.4f}")

    def add(self, tokens: int, usd: float) -> None:
        self.tokens += tokens
        self.usd += usd


def retryable(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying: 429, 408, 409, 5xx, timeouts, connection
    errors, and unreadable 200 answers (malformed JSON, no choices)."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError, BadResponse))


def retry_after_s(exc: BaseException | None) -> float | None:
    """Seconds asked for by a ``retry-after-ms`` or ``retry-after`` (seconds) response header."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: fall back to backoff
    return None


class wait_retry_after(wait_base):
    """tenacity wait: the server's retry-after when given (at most ``cap`` seconds), else ``fallback``."""

    def __init__(self, fallback: wait_base, cap: float = MAX_RETRY_AFTER_S):
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after_s(exc)
        return min(asked, self.cap) if asked is not None and asked > 0 else self.fallback(retry_state)


@dataclass
class LLMClient:
    """Cached, retried, budgeted chat completions against one OpenAI-compatible endpoint.

    Args:
        cfg: the ``[explain]`` section (model, timeouts, retries, prices, caps).
        api_key: the key (kept inside the openai client; redacted from every error; not in repr).
        cache: where answers are cached.
        base_url: the endpoint, e.g. ``https://api.openai.com/v1`` (None: the openai default).
        budget: the run's spend and caps (updated in place).
    """

    cfg: ExplainConfig
    api_key: str = field(repr=False)
    cache: ResponseCache = field(repr=False)
    base_url: str | None = None
    budget: Budget = field(default_factory=Budget)
    calls: list[CallRecord] = field(default_factory=list)
    stopped: str | None = None

    def __post_init__(self) -> None:
        self._client = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0, timeout=self.cfg.timeout_s)
        self._sem = asyncio.Semaphore(self.cfg.max_concurrency)

    @property
    def params(self) -> dict[str, Any]:
        """Request parameters besides model and messages (part of the cache key); the token cap goes
        in the field named by ``explain.token_limit_param``."""
        return {"temperature": self.cfg.temperature, self.cfg.token_limit_param: self.cfg.max_completion_tokens}

    def _redact(self, text: str) -> str:
        return redact(text, self.api_key)

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.cfg.price_per_mtok_in + completion_tokens * self.cfg.price_per_mtok_out) / 1e6

    def _describe(self, exc: BaseException) -> str:
        return self._redact(f"{type(exc).__name__}: {exc}")

    async def check_endpoint(self) -> None:
        """``GET /models`` once: a rejected key stops the stage; other problems only warn.

        Raises:
            EndpointRejected: 401 / 403.
        """
        try:
            page = await self._client.models.list()
            ids = [m.id async for m in page]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            self.stopped = f"the endpoint rejected the API key: {self._describe(e)}"
            raise EndpointRejected(self.stopped) from None
        except Exception as e:  # noqa: BLE001 - /models is optional for compatible servers
            log.warning("could not list models at the endpoint (%s); going on", self._describe(e))
            return
        if ids and self.cfg.model not in ids:
            log.warning("model %r is not among the %d models the endpoint lists", self.cfg.model, len(ids))

    async def complete(self, messages: list[dict[str, str]], purpose: str, target_id: str | None = None,
                       response_format: dict[str, Any] | None = None) -> Completion:
        """One chat completion, from the cache when possible.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            purpose: what the call is for (stored in ``llm_calls``).
            target_id: the target it serves (stored in ``llm_calls``).
            response_format: the request's ``response_format`` (e.g.
                :func:`stages.explain.prompts.labels_response_format`), part of the cache key; None
                sends none (and keeps the keys of earlier answers).
        Returns:
            The answer text and its usage (tokens; prompt tokens estimated as chars/4 when the
            endpoint reports no usage).
        Raises:
            StageStop: the budget is spent or the endpoint refused the key/model (also for every
                later uncached call).
            LLMError: the request failed after retries, or failed in a way retrying cannot fix
                (e.g. 400); the message is redacted.
        """
        model = self.cfg.model
        params = self.params if response_format is None else {**self.params, "response_format": response_format}
        key = cache_key(model, messages, params)
        t0 = time.perf_counter()
        hit = self.cache.get(key)
        if hit is not None:
            pt, ct = int(hit["prompt_tokens"] or 0), int(hit["completion_tokens"] or 0)
            self.calls.append(CallRecord(target_id, purpose, key, model, True, 0, pt, ct, 0.0, time.perf_counter() - t0, now()))
            text = hit["response_text"]
            return Completion(text, key, pt, ct, True, int(hit.get("answer_chars") or len(text)))
        async with self._sem:
            if self.stopped:
                raise StageStop(self.stopped)
            try:
                self.budget.check()
            except BudgetExceeded as e:
                self.stopped = str(e)
                raise
            t0 = time.perf_counter()
            attempts = 0
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.cfg.max_retries + 1),
                wait=wait_retry_after(wait_random_exponential(multiplier=self.cfg.backoff_base_s, max=self.cfg.backoff_max_s)),
                retry=retry_if_exception(retryable),
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        attempts += 1
                        response = await self._client.chat.completions.create(model=model, messages=messages, **params)
                        if not response.choices or response.choices[0].message is None or response.choices[0].message.content is None:
                            raise BadResponse("the answer has no choices or no message content")
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                self.stopped = f"the endpoint refused the request ({self._describe(e)}); check the API key, base_url and explain.model"
                raise EndpointRejected(self.stopped) from None
            except Exception as e:  # noqa: BLE001 - every failure is reported redacted
                raise LLMError(f"{purpose} failed after {attempts} attempt(s): {self._describe(e)}") from None
        text = response.choices[0].message.content
        received = len(text)
        text = storable(text[: self.cfg.max_answer_chars])  # untrusted: capped and made storable before it is stored (once, here)
        usage = response.usage
        pt = int(usage.prompt_tokens) if usage and usage.prompt_tokens is not None else sum(len(m["content"]) for m in messages) // 4
        ct = int(usage.completion_tokens) if usage and usage.completion_tokens is not None else received // 4
        cost = self._cost(pt, ct)
        self.budget.add(pt + ct, cost)
        self.cache.put({"key": key, "model": model, "response_text": text, "prompt_tokens": pt, "completion_tokens": ct,
                        "created_at": now(), "answer_chars": received})
        self.calls.append(CallRecord(target_id, purpose, key, model, False, attempts, pt, ct, cost, time.perf_counter() - t0, now()))
        return Completion(text, key, pt, ct, False, received)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info("retrying after %s (attempt %d, waiting %.2fs)", self._describe(exc) if exc else "?", state.attempt_number, wait)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()
