"""The explain stage: LLM explanations of each target from three sources, detection-scored.

For every target of a run (table ``targets``):

1. Draft one-sentence explanations from source ``'dataset'`` (top-k + quantile examples),
   ``'dreams'`` (EPO frontier prompts, Thompson et al. 2024) and ``'both'`` (half of each), shown in
   the Bills et al. (2023) token<TAB>activation format (see :mod:`stages.explain.prompts`).
2. Score each explanation by detection (delphi; Paulo et al. 2024 §3) on two held-out sets:
   ``'dataset'`` = held-out quantile samples (firing) + non-firing contexts, and ``'dreams'`` =
   held-out dreams (firing) + random prompts (not firing); balanced accuracy, F1, precision, recall.
3. Baseline: the same source's explanation of another target (the next one in target order that
   has one and shares no latent with this one) scored on this target's held-out sets, with the same example order, so a score can be
   read against chance-with-a-plausible-explanation.

Compute (:func:`compute_explain`, async, returns an :class:`~stages.explain.results.ExplainResult`) is
split from writing (:func:`stages.explain.store.write_explain`). Failures of one target are recorded in ``explain_failures`` and the others
finish. LLM answers are untrusted: an empty, refused or over-long answer (:func:`stages.explain.prompts.check_answer`)
is a failure, never an explanation, so it is neither scored nor used as another target's baseline;
an answer is stored once (capped, in ``llm_cache``); a budget cap or a refused key stops the stage cleanly with a message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Awaitable

from tqdm.auto import tqdm

from reverie.pipeline.config import ReverieConfig
from reverie.pipeline.errors import ReverieError
from reverie.pipeline.hashing import content_seed
from reverie.pipeline.lookup import latest_run, scan_for
from reverie.pipeline.store import Store
from reverie.stages.explain.client import Budget, LLMClient, LLMError, StageStop, StoreCache, redact
from reverie.stages.explain.inputs import Example, HeldOut, TargetInputs, load_inputs, spread
from reverie.stages.explain.prompts import (ParseError, check_answer, detection_messages, explanation_messages, labels_response_format,
                                            parse_explanation, parse_labels)
from reverie.stages.explain.results import ExplainResult, ExplainSummary, Explanation, Failure, Score
from reverie.stages.explain.scoring import detection_metrics
from reverie.stages.explain.store import prior_spend, write_explain
from reverie.stages.explain.fuzzing import fuzz_items, fuzz_messages
from reverie.stages.explain.uncertainty import score_intervals

log = logging.getLogger("reverie.explain")

SOURCES = ("dataset", "dreams", "both")
HOLDOUT_SETS = ("dataset", "dreams")
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"


# ---------------------------------------------------------------------------- availability
def endpoint(cfg: ReverieConfig) -> str:
    """The endpoint used: ``explain.base_url``, else ``$OPENAI_BASE_URL``, else OpenAI's."""
    return cfg.explain.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_URL


def explain_available(cfg: ReverieConfig) -> tuple[bool, str]:
    """Whether the stage can run: enabled, and an API key in ``$<explain.api_key_env>``.

    Returns:
        (True, 'explain: <model> at <endpoint>') or (False, one line saying why and how to fix it).
    """
    e = cfg.explain
    if not e.enabled:
        return False, "explain is disabled (explain.enabled = false)"
    if not os.environ.get(e.api_key_env):
        return False, (f"explain needs an API key: set ${e.api_key_env} "
                       "(and OPENAI_BASE_URL or explain.base_url for an endpoint other than OpenAI)")
    return True, f"explain: {e.model} at {endpoint(cfg)}"


# ---------------------------------------------------------------------------- compute
def _mixed(shown: list[Example], k: int) -> list[Example]:
    """``k`` of the shown dataset examples keeping the top/quantile mix (a quarter quantiles)."""
    top = [e for e in shown if e.kind == "top"]
    quant = [e for e in shown if e.kind != "top"]
    n_q = min(k // 4, len(quant))
    return top[: k - n_q] + spread(quant, n_q)


def _views(inp: TargetInputs, n_examples: int) -> dict[str, tuple[list[Example], list[Example]] | str]:
    """Per source: (dataset examples, dreams) to show, or the reason the source is skipped."""
    half = max(1, n_examples // 2)
    views: dict[str, tuple[list[Example], list[Example]] | str] = {
        "dataset": (inp.dataset_shown, []) if inp.dataset_shown else inp.notes.get("dataset", "no dataset examples"),
        "dreams": ([], inp.dreams_shown) if inp.dreams_shown else inp.notes.get("dreams", "no dreams"),
    }
    if inp.dataset_shown and inp.dreams_shown:
        views["both"] = (_mixed(inp.dataset_shown, n_examples - half), spread(inp.dreams_shown, half))
    else:
        views["both"] = "; ".join(inp.notes.get(s, f"no {s}") for s in ("dataset", "dreams") if s in inp.notes)
    return views


class _Stage:
    """One run's compute: holds the client, the inputs and the collected results."""

    def __init__(self, cfg: ReverieConfig, client: LLMClient, run_id: str, scan_id: str | None, inputs: list[TargetInputs]):
        self.cfg, self.client, self.inputs = cfg, client, inputs
        self.result = ExplainResult(run_id, scan_id, cfg.explain.model, len(inputs))
        self.by_target: dict[str, dict[str, Explanation]] = {}

    def fail(self, target_id: str, what: str, why: str) -> None:
        why = redact(why, self.client.api_key)
        log.warning("explain %s %s: %s", target_id, what, why)
        self.result.failures.append(Failure(target_id, what, why))

    async def guarded(self, target_id: str, what: str, coro: Awaitable[Any]) -> Any:
        """Await ``coro``; LLM and parse errors become recorded failures; a stage stop is remembered."""
        try:
            return await coro
        except StageStop as e:
            self.result.stopped = self.result.stopped or str(e)
        except (LLMError, ParseError, ValueError) as e:
            self.fail(target_id, what, str(e))
        return None

    async def explain(self, inp: TargetInputs, source: str, dataset: list[Example], dreams: list[Example]) -> Explanation:
        note = inp.notes.get("combination") if dataset else None
        messages = explanation_messages(dataset, dreams, note)
        c = await self.client.complete(messages, f"explain:{source}", inp.target_id)
        check_answer(c.text, c.answer_chars, self.cfg.explain.max_answer_chars)  # refusal / empty / over-long: a failure
        text = check_answer(parse_explanation(c.text), None, self.cfg.explain.max_answer_chars)
        eid = f"{self.result.run_id}/{inp.target_id}/{source}"
        return Explanation(eid, inp.target_id, source, text, None, c.key, len(dataset), len(dreams), c.prompt_tokens, c.completion_tokens)

    async def detect(self, inp: TargetInputs, explanation: Explanation, scored: Explanation, holdout_set: str,
                     scorer: str = "detection") -> Score | None:
        """Label this target's held-out set with ``scored``'s text (``scorer``: 'detection', or
        'fuzzing' on marked copies, :mod:`stages.explain.fuzzing`); metrics and 95% intervals
        (:mod:`stages.explain.uncertainty`) over the readable batches."""
        baseline = scored.target_id != inp.target_id
        verb = "detect" if scorer == "detection" else "fuzz"
        what = f"{verb}:{explanation.source}:{holdout_set}" + (":baseline" if baseline else "")
        held: list[HeldOut] = list(inp.holdout[holdout_set])
        random.Random(content_seed(self.cfg.explain.seed, inp.target_id, holdout_set)).shuffle(held)
        items = [(h.text, h.fires) for h in held] if scorer == "detection" else fuzz_items(held, content_seed(self.cfg.explain.seed, inp.target_id, holdout_set, "fuzz"))
        size = self.cfg.explain.detection_batch
        batches = [items[i: i + size] for i in range(0, len(items), size)]
        build = detection_messages if scorer == "detection" else fuzz_messages

        async def label(batch: list[tuple[str, bool]]) -> list[bool]:
            c = await self.client.complete(build(scored.text, [t for t, _ in batch]), what, inp.target_id,
                                           labels_response_format(len(batch), self.cfg.explain.label_format))
            return parse_labels(check_answer(c.text, c.answer_chars, self.cfg.explain.max_answer_chars), len(batch))

        outcomes = await asyncio.gather(*(self.guarded(inp.target_id, f"{what} batch {i}", label(b)) for i, b in enumerate(batches)))
        truth, pred = [], []
        for batch, labels in zip(batches, outcomes):
            if labels is not None:
                truth += [f for _, f in batch]
                pred += labels
        if self.result.stopped or not truth:
            return None
        metrics = detection_metrics(truth, pred)
        e = self.cfg.explain
        intervals = score_intervals(truth, pred, e.ci_bootstrap, content_seed(e.seed, inp.target_id, holdout_set, scorer) % (2 ** 32))
        wanted = inp.wanted if holdout_set == "dataset" else (e.n_holdout, e.n_holdout)
        n_hard = sum(1 for h in held if h.hard and not h.fires) if len(truth) == len(items) else 0
        return Score(inp.target_id, explanation.explanation_id, scored.explanation_id, holdout_set, baseline, metrics,
                     scorer, intervals, wanted, n_hard, len(batches))

    def baseline_for(self, index: int, source: str) -> Explanation | None:
        """The ``source`` explanation of the next target (cyclically) that has one and shares no
        latent with target ``index`` (a combination containing this latent is no baseline), else None."""
        n, mine = len(self.inputs), set(self.inputs[index].latents)
        for step in range(1, n):
            cand = self.inputs[(index + step) % n]
            other = self.by_target.get(cand.target_id, {}).get(source)
            if other is not None and not mine & set(cand.latents):
                return other
        return None

    async def run(self) -> ExplainResult:
        res = self.result
        # phase 1: explanations
        jobs: list[tuple[TargetInputs, str, Awaitable[Any]]] = []
        for inp in self.inputs:
            for source, view in _views(inp, self.cfg.explain.n_examples).items():
                if isinstance(view, str):
                    self.fail(inp.target_id, f"explain:{source}", f"skipped: {view}")
                else:
                    jobs.append((inp, source, self.explain(inp, source, *view)))
        for (inp, source, _), exp in zip(jobs, await self._gather([(i.target_id, f"explain:{s}", j) for i, s, j in jobs], "explanations")):
            if exp is not None:
                res.explanations.append(exp)
                self.by_target.setdefault(inp.target_id, {})[source] = exp
        if res.stopped:
            return res
        # phase 2: detection scores, each explanation and its baseline on both held-out sets
        scoring: list[tuple[str, str, Awaitable[Any]]] = []
        for index, inp in enumerate(self.inputs):
            for source, exp in self.by_target.get(inp.target_id, {}).items():
                other = self.baseline_for(index, source)
                if other is None:
                    self.fail(inp.target_id, f"baseline:{source}", f"no target with other latents has a {source} explanation to serve as the random-explanation baseline")
                for hs in HOLDOUT_SETS:
                    if hs not in inp.holdout:
                        self.fail(inp.target_id, f"detect:{source}:{hs}", f"skipped: no held-out {hs} examples ({inp.notes.get(hs, 'none stored')})")
                        continue
                    for scored in (exp, other):
                        for scorer in ("detection", "fuzzing") if self.cfg.explain.fuzzing else ("detection",):
                            if scored is not None:
                                what = f"{'detect' if scorer == 'detection' else 'fuzz'}:{source}:{hs}" + (":baseline" if scored is other else "")
                                scoring.append((inp.target_id, what, self.detect(inp, exp, scored, hs, scorer)))
        res.scores.extend(s for s in await self._gather(scoring, "scores") if s is not None)
        return res

    async def _gather(self, jobs: list[tuple[str, str, Awaitable[Any]]], desc: str) -> list[Any]:
        bar = tqdm(total=len(jobs), desc=f"explain {desc}", disable=None, leave=False)

        async def one(target_id: str, what: str, coro: Awaitable[Any]) -> Any:
            try:
                return await self.guarded(target_id, what, coro)
            finally:
                bar.update(1)

        try:
            return await asyncio.gather(*(one(*j) for j in jobs))
        finally:
            bar.close()


async def compute_explain(cfg: ReverieConfig, inputs: list[TargetInputs], client: LLMClient, run_id: str, scan_id: str | None) -> ExplainResult:
    """Draft and score explanations for every target (see the module docstring).

    Args:
        inputs: from :func:`stages.explain.inputs.load_inputs`.
        client: an open :class:`LLMClient` (its cache and budget are used; not closed here).
    Returns:
        :class:`ExplainResult`; ``stopped`` holds the reason when a budget cap or a refused key
        ended the stage early (everything finished before that is kept).
    """
    stage = _Stage(cfg, client, run_id, scan_id, inputs)
    try:
        await client.check_endpoint()
    except StageStop as e:
        stage.result.stopped = str(e)
    if not stage.result.stopped:
        await stage.run()
    res = stage.result
    res.calls = list(client.calls)
    if res.stopped:
        done = {e.target_id for e in res.explanations}
        res.failures.append(Failure("*", "stage", f"stopped: {res.stopped}"))
        res.failures.extend(Failure(i.target_id, "stage", "not finished: the stage stopped") for i in inputs if i.target_id not in done)
    return res


# ---------------------------------------------------------------------------- entry point
def run_explain(cfg: ReverieConfig, store: Store, run_id: str | None = None, scan_id: str | None = None) -> ExplainSummary:
    """Run the explain stage for a run and store its results.

    Args:
        run_id: the run whose targets are explained (None: the latest run with targets).
        scan_id: the scan with the dataset examples (None: :func:`pipeline.lookup.scan_for`).
    Returns:
        :class:`ExplainSummary`; ``skipped`` with a one-line ``message`` when disabled or without
        an API key; ``stopped`` when a budget cap or a refused key ended it early.
    Raises:
        ReverieError: no run with targets.
    """
    ok, message = explain_available(cfg)
    if not ok:
        log.info(message)
        return ExplainSummary(run_id, scan_id, cfg.explain.model, True, message)
    t0 = time.perf_counter()
    run_id = run_id or latest_run(store, having="targets")
    if run_id is None:
        raise ReverieError(f"no run with targets in {store.path}; run `reverie targets` (or the dream and scan stages) first")
    scan_id = scan_id or scan_for(store, run_id)
    e = cfg.explain
    inputs = load_inputs(store, run_id, scan_id, e.n_examples, e.n_holdout, e.n_holdout_negative, e.hard_negative_share)
    if not inputs:
        raise ReverieError(f"run {run_id} has no targets; pass an existing --run or run `reverie targets` first")
    tokens, usd = prior_spend(store, run_id)
    key = os.environ[e.api_key_env]
    http_log = logging.getLogger("httpx2")
    if http_log.level == logging.NOTSET:  # one INFO line per request would drown the stage's own log
        http_log.setLevel(logging.WARNING)
    log.info("%s; run %s, scan %s, %d targets", message, run_id, scan_id, len(inputs))

    async def go() -> ExplainResult:
        client = LLMClient(e, key, StoreCache(store), base_url=endpoint(cfg), budget=Budget(e.budget_tokens, e.budget_usd, tokens, usd))
        try:
            return await compute_explain(cfg, inputs, client, run_id, scan_id)
        finally:
            await client.aclose()

    result = asyncio.run(go())
    write_explain(store, result)
    paid = [c for c in result.calls if not c.cached]
    summary = ExplainSummary(
        run_id, scan_id, e.model, False, "", n_targets=len(inputs), n_explanations=len(result.explanations),
        n_scores=len(result.scores), n_failures=len(result.failures), n_requests=len(paid),
        n_cached=len(result.calls) - len(paid), prompt_tokens=sum(c.prompt_tokens for c in paid),
        completion_tokens=sum(c.completion_tokens for c in paid), cost_usd=sum(c.cost_usd for c in paid),
        stopped=result.stopped, wall_s=time.perf_counter() - t0,
    )
    summary.message = (
        f"explain: {summary.n_explanations} explanations and {summary.n_scores} scores for {summary.n_targets} targets, "
        f"{summary.n_failures} failures; {summary.n_requests} requests ({summary.n_cached} cached answers), "
        f"{summary.prompt_tokens + summary.completion_tokens:,} tokens, ~${summary.cost_usd:.4f}"
        + (f"; STOPPED: {result.stopped}" if result.stopped else "")
    )
    log.info(summary.message)
    return summary
