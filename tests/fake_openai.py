"""A real OpenAI-compatible HTTP server on loopback, for testing the explain stage.

The openai package (v3, built on httpx2) is not intercepted by respx, so tests talk to this
server over TCP instead: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Deterministic, meaningful answers:

* explanation requests (system prompt asks for an ``Explanation:``) are read as Bills et al.
  (2023) ``token<TAB>activation`` lines; the answer names the (up to) three most frequent
  tokens marked ≥ 5, e.g. ``Explanation: fires on the words "cat", "dog".``
* detection requests (system prompt asks for ``labels``) carry an explanation and numbered
  ``Example N: text`` lines; the answer labels an example 1 when it contains a quoted word of the
  explanation, so a right explanation scores high and another latent's explanation near chance.

Faults are injected per request, in order (:meth:`FakeOpenAI.inject`), or for every request whose
body contains a substring (:meth:`FakeOpenAI.fail_when`): ``rate_limit`` (429 + ``retry-after``),
``server_error`` (500), ``slow`` (sleeps past the client timeout, then answers), ``malformed``
(200 with invalid JSON), ``empty_choices`` (200 with ``choices: []``), ``echo_key`` (500 whose
body repeats the request's Authorization header, to test redaction), and untrusted answers (issue 16):
``refusal`` (200: "I'm sorry, but I can't help with that."), ``escape`` (200: an explanation laden with
ESC / BEL terminal control sequences), ``huge`` (200: an answer of :data:`HUGE_CHARS` characters).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("rate_limit", "server_error", "slow", "malformed", "empty_choices", "echo_key", "refusal", "escape", "huge")
REFUSAL = "I'm sorry, but I can't help with that."
ESCAPE_ANSWER = 'Explanation: fires on \x1b[31m"red"\x1b[0m words\x07 and \x1b]0;pwned\x07 titles.'
HUGE_CHARS = 1_500_000
_QUOTED = re.compile(r'"([^"]+)"')
_EXAMPLE = re.compile(r"^Example (\d+): (.*)$", re.M)
_MARKED = re.compile(r"^(.*)\t(\d+)$", re.M)


@dataclass
class Received:
    """One request the server saw."""

    path: str
    body: dict[str, Any] | None
    authorization: str | None
    fault: str | None


@dataclass
class FakeOpenAI:
    """The server state. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    model: str = "fake-model"
    slow_s: float = 2.0
    retry_after: str = "0"
    requests: list[Received] = field(default_factory=list)
    _queue: list[str] = field(default_factory=list)
    _rules: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ control
    def inject(self, *faults: str) -> None:
        """Apply these faults to the next requests, one per request, in order."""
        for f in faults:
            assert f in FAULTS, f
        with self._lock:
            self._queue.extend(faults)

    def fail_when(self, substring: str, fault: str = "server_error") -> None:
        """Answer every request whose JSON body contains ``substring`` with ``fault``."""
        assert fault in FAULTS, fault
        with self._lock:
            self._rules.append((substring, fault))

    @property
    def completions(self) -> list[Received]:
        """The chat-completion requests received (faulty ones included)."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        """Listen on a free loopback port, serving from a daemon thread."""
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                state._record(self.path, None, self.headers.get("Authorization"), None)
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "fake"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
                    return
                auth = self.headers.get("Authorization")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                    return
                fault = state._next_fault(raw.decode("utf-8", "replace"))
                state._record(self.path, body, auth, fault)
                try:
                    self._answer(body, auth, fault)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _answer(self, body: dict[str, Any], auth: str | None, fault: str | None) -> None:
                if fault == "rate_limit":
                    self._send(429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
                               headers={"retry-after": state.retry_after})
                elif fault == "server_error":
                    self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                elif fault == "echo_key":
                    self._send(500, {"error": {"message": f"bad credentials: {auth}", "type": "server_error"}})
                elif fault == "malformed":
                    self._send_raw(200, b'{"id": "x", "choices": [{"message": {"content": "unterminated', "application/json")
                elif fault == "empty_choices":
                    self._send(200, completion(body, None, state.model))
                elif fault == "refusal":
                    self._send(200, completion(body, REFUSAL, state.model))
                elif fault == "escape":
                    self._send(200, completion(body, ESCAPE_ANSWER, state.model))
                elif fault == "huge":
                    self._send(200, completion(body, "Explanation: fires on " + "very " * (HUGE_CHARS // 5), state.model))
                else:
                    if fault == "slow":
                        time.sleep(state.slow_s)
                    self._send(200, completion(body, answer(body), state.model))

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    def _next_fault(self, raw: str) -> str | None:
        with self._lock:
            for sub, fault in self._rules:
                if sub in raw:
                    return fault
            return self._queue.pop(0) if self._queue else None

    def _record(self, path: str, body: dict[str, Any] | None, auth: str | None, fault: str | None) -> None:
        with self._lock:
            self.requests.append(Received(path, body, auth, fault))


def _text(body: dict[str, Any], role: str) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == role)


def answer(body: dict[str, Any]) -> str:
    """The deterministic reply to a chat request (see the module docstring)."""
    system, user = _text(body, "system"), _text(body, "user")
    if "marked like <<this>>" in system:  # fuzzing: 1 when a marked span holds a quoted word of the explanation
        head = user.split("Example 1:", 1)[0]
        words = [w.strip().lower() for w in _QUOTED.findall(head) if w.strip()]
        labels = [int(any(w in span.lower() for span in re.findall(r"<<(.*?)>>", text) for w in words))
                  for _, text in sorted(_EXAMPLE.findall(user), key=lambda m: int(m[0]))]
        return f"Labels: {json.dumps(labels)}"
    if "labels" in system.lower():
        head = user.split("Example 1:", 1)[0]
        words = [w.strip().lower() for w in _QUOTED.findall(head) if w.strip()]
        labels = []
        for _, text in sorted(_EXAMPLE.findall(user), key=lambda m: int(m[0])):
            low = text.lower()
            labels.append(int(any(w in low for w in words)))
        return f"Labels: {json.dumps(labels)}"
    if "explanation" in system.lower():
        strong = Counter(tok.strip() for tok, act in _MARKED.findall(user) if int(act) >= 5 and tok.strip())
        top = [t for t, _ in strong.most_common(3)]
        if not top:
            return "Explanation: no clear pattern."
        return "Here is my analysis.\nExplanation: fires on the words " + ", ".join(f'"{t}"' for t in top) + "."
    return "I am a fake model."


def completion(body: dict[str, Any], content: str | None, model: str) -> dict[str, Any]:
    """A chat.completion object; ``content=None`` gives an empty ``choices`` list."""
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    prompt_tokens = prompt_chars // 4 + 1
    completion_tokens = len(content or "") // 4 + 1 if content is not None else 0
    choices = [] if content is None else [{
        "index": 0, "finish_reason": "stop", "logprobs": None,
        "message": {"role": "assistant", "content": content, "refusal": None},
    }]
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model", model),
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }


if __name__ == "__main__":  # pragma: no cover - manual demos: python tests/fake_openai.py
    import sys

    server = FakeOpenAI(model=sys.argv[1] if len(sys.argv) > 1 else "fake-model").start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
