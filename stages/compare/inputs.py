"""One target's compare inputs, from stored rows or from results in memory (no torch).

:func:`target_inputs` is the one place that decides what a target's dataset side and dream side
are; the store reader (:func:`stages.compare.store.load_inputs`) and the in-memory path
(:func:`inputs_from_results`, behind :func:`reverie.compare`) both hand it rows.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

from reverie.sae_targets.spec import Target, objective_key
from reverie.stages.compare.core import TargetInputs

#: what the dataset side of a target is, by the rows it came from
SOURCE_WINDOWS = "every full-length window (the dream's length) of the top contexts, fed alone after BOS (searched Pareto frontier)"
SOURCE_COMBO_TOPS = "combination objective on the full-length windows ending at its latents' top examples' max tokens"
SOURCE_TOPS = "full-length windows ending at the latent's top examples' max tokens, fed alone after BOS (scan without window search)"
#: the fields of a random-prompt baseline row compare keeps (and writes into ``metrics_json``)
BASELINE_KEYS = ("objective_key", "n", "mean", "std", "max")


def target_inputs(target: Target, key: str, *, scan_id: str, window_len: int | None, scanned: Iterable[int],
                  dreams: Sequence[dict[str, Any]], attributions: Sequence[dict[str, Any]], baseline: dict[str, Any] | None,
                  latent_rows: dict[int, dict[str, Any]], dataset: Callable[[str], list[dict[str, Any]]],
                  top_tokens: Sequence[dict[str, Any]]) -> TargetInputs:
    """A target's :class:`TargetInputs` from its rows.

    Dataset side, first that exists: the scan's searched frontier (``scan_windows``) of the
    target's objective; for a combination, its objective on its latents' full-length top windows
    (``scan_objective_examples``); for one latent, its full-length top windows (older scans).
    Dream side: prompts whose length equals the scan's window length (others are counted).

    Args:
        key: the target's unscaled objective key (:func:`sae_targets.spec.target_objective_key`).
        window_len: the scan's window length (tokens); None = compare every dream.
        scanned: latent ids the scan covers.
        dreams: the target's dream prompts, all seeds: dicts with ``activation``, ``ce``, ``ce_rest``
            (nats/token), ``text``, ``dream_id``, ``idx``, ``latent_acts``, ``n_tokens``, ``seed``.
        attributions: dicts with ``dream_id``, ``idx``, ``position``, ``token``, ``drop_best``, ``drop_worst``.
        baseline: the objective's random-prompt row (``n``, ``mean``, ``std``, ``max``) or None.
        latent_rows: latent → its ``scan_latents`` row (``window_max``, ``max_act``).
        dataset: ``dataset(kind)`` → rows with ``window_act``, ``window_ce``, ``window_ce_rest`` for kind
            'windows', 'objective' (combinations) or 'top' (one latent); called lazily, in that order.
        top_tokens: the target's latents' top examples as dicts with ``tokens`` and ``max_pos``.
    Returns:
        :class:`TargetInputs` (notes say what is missing).
    """
    inp = TargetInputs(target_id=target.target_id, latents=list(target.latents), combine=target.combine, objective_key=key,
                       baseline=None if baseline is None else {k: baseline.get(k) for k in BASELINE_KEYS})
    inp.dreams = [d for d in dreams if window_len is None or int(d["n_tokens"]) == int(window_len)]
    inp.n_unmatched_dreams = len(dreams) - len(inp.dreams)
    inp.n_seeds = len({d["seed"] for d in inp.dreams})
    inp.attributions = list(attributions)
    have = {int(i) for i in scanned}
    missing = [i for i in target.latents if i not in have]
    if missing:
        inp.notes.append(f"latents {missing} are not in scan {scan_id}")
    inp.members = [{"latent": i, "window_max": latent_rows.get(i, {}).get("window_max"), "max_act": latent_rows.get(i, {}).get("max_act")}
                   for i in target.latents]
    if not target.is_combination:
        inp.data_max_in_context = latent_rows.get(target.latents[0], {}).get("max_act")
    inp.data = dataset("windows")
    if inp.data:
        inp.data_source = SOURCE_WINDOWS + (" of the combined objective" if target.is_combination else "")
    elif target.is_combination:
        inp.data, inp.data_source = dataset("objective"), SOURCE_COMBO_TOPS
    else:
        inp.data, inp.data_source = dataset("top"), SOURCE_TOPS
    inp.data_max_tokens = [r["tokens"][r["max_pos"]] for r in top_tokens]
    if baseline is None:
        inp.notes.append(f"no random-prompt baseline for objective {key} in scan {scan_id}; z-scores undefined "
                         "(rerun `reverie scan` for these targets)")
    return inp


def unscaled_key(key: str) -> str:
    """An objective key without its scale tag ('lp(p=0.1,offset=1.0,scale=z):pre:last:5+9' → 'lp(p=0.1,offset=1.0):pre:last:5+9')."""
    head, sep, rest = key.partition(":")
    return re.sub(r",scale=[^)]*", "", head) + sep + rest


def _scan_key_of(target: Target, settings: dict[str, Any] | None, dream_key: str) -> str:
    """The scan-side objective key of ``target``: from the scan's settings when it has them, else the dream's key unscaled."""
    if not settings:
        return unscaled_key(dream_key)
    o = settings.get("objective", {})
    return objective_key(target.latents, settings.get("rank_quantity", "pre"), o.get("reduce", "last"),
                         target.combine if target.is_combination else None, o.get("p", 0.1), o.get("offset", 1.0))


def inputs_from_results(dreams: Sequence[Any], scan: Any) -> list[TargetInputs]:
    """Compare inputs of in-memory dream results against an in-memory scan result (no store).

    Dream results of the same target (e.g. one per seed) are pooled. A dream prompt's id is its
    target id and its index in the pooled frontier.

    Args:
        dreams: :class:`stages.dream.result.DreamResult` objects.
        scan: a :class:`stages.scan.rows.ScanResult` (``scan_row``, ``latent_rows``, ``example_rows``,
            ``baseline_rows``, ``objective_rows``, ``window_rows``, ``settings``).
    Returns:
        One :class:`TargetInputs` per target, single latents first, then by latent ids.
    Raises:
        ValueError: a dream's objective reads another quantity or reduction than the scan ranked by.
    """
    by_target: dict[str, list[Any]] = {}
    for r in dreams:
        by_target.setdefault(r.target_id, []).append(r)
    settings = getattr(scan, "settings", None)
    n = scan.scan_row.get("window_len")
    latent_rows = {int(r["latent"]): r for r in scan.latent_rows}
    base = {r["objective_key"]: r for r in scan.baseline_rows}
    out = []
    for tid, rs in sorted(by_target.items(), key=lambda kv: (len(kv[1][0].latents), list(kv[1][0].latents))):
        target = Target(latents=[int(i) for i in rs[0].latents], combine=rs[0].combine)
        key = _scan_key_of(target, settings, rs[0].objective_key)
        for r in rs:
            if unscaled_key(r.objective_key) != key:
                raise ValueError(f"target {tid}: the dream's objective {r.objective_key!r} is not the scan's {key!r} "
                                 "(scan with the dream's quantity and reduce)")
        prompts, attrs = [], []
        for r in rs:
            for p in r.frontier:
                i = len(prompts)
                prompts.append({"activation": p.activation, "ce": p.ce, "ce_rest": p.ce_rest, "text": p.text, "dream_id": tid, "idx": i,
                                "latent_acts": list(p.latent_acts) or None, "n_tokens": len(p.token_ids), "seed": p.seed})
                attrs += [{"dream_id": tid, "idx": i, "position": a.position, "token": a.token, "drop_best": a.drop_best,
                           "drop_worst": a.drop_worst} for a in r.attributions.get(tuple(p.token_ids), [])]

        def dataset(kind: str, key: str = key, target: Target = target) -> list[dict[str, Any]]:
            if kind == "windows":
                return sorted((w for w in scan.window_rows if w["objective_key"] == key), key=lambda w: w["rank"])
            if kind == "objective":
                return [w for w in scan.objective_rows if w["objective_key"] == key and len(w["window_ids"]) == n]
            return [e for e in scan.example_rows if e["kind"] == "top" and e["latent"] == target.latents[0]
                    and len(e["window_ids"]) == n and e["window_ce"] is not None]

        tops = [e for e in scan.example_rows if e["kind"] == "top" and e["latent"] in target.latents]
        out.append(target_inputs(target, key, scan_id=scan.scan_id, window_len=n, scanned=latent_rows, dreams=prompts, attributions=attrs,
                                 baseline=base.get(key), latent_rows=latent_rows, dataset=dataset, top_tokens=tops))
    return out
