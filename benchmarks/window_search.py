"""How close the scan's window search comes to an exhaustive pass over every corpus window (issue 17 §2).

The scan evaluates every full-length (dream-length) window ending at every position of each
latent's top ``scan.window_search_top`` contexts (ranked by the in-context max) and keeps their
Pareto frontier. This script runs that scan on the demo (its 8 random latents of seed 0 and the
552+1300 ``lp`` combination, 200k tokens of ``tinystories-train.jsonl``), then evaluates *every*
full-length window of every context of the same scan alone after BOS (CE both ways and every
objective), and prints, per objective and per corpus CE band (10th percentile, median,
mean + 2σ, no limit) and CE convention, the best activation found exhaustively and by the
search, and the gap (exhaustive − searched) / |exhaustive|. Target: every gap ≤ 2%.

    .venv/bin/python benchmarks/window_search.py [--max-tokens 200000] [--top 64] [--threads 1]

Prints numbers; asserts nothing. Units: activation = the objective (SAE pre-activation at the last
token; for the combination the lp value); CE in nats/token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=200_000)
    ap.add_argument("--top", type=int, default=64, help="scan.window_search_top (and scan.top_k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from reverie.pipeline.config import load_config
    from reverie.pipeline.corpus import iter_documents
    from reverie.pipeline.store import Store
    from reverie.sae_targets.contexts import hook_activations, iter_contexts
    from reverie.sae_targets.loading import load_subject
    from reverie.sae_targets.objectives import build_objective
    from reverie.sae_targets.selection import select_targets
    from reverie.stages.scan import run_scan
    from reverie.stages.scan.search import context_windows, evaluate_matched
    from reverie.stages.scan.stage import context_size

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="window-search-"))
    cfg = load_config(root / "configs" / "demo.toml", {"project.dir": str(tmp), "scan.max_tokens": args.max_tokens,
                                                          "scan.top_k": max(args.top, 1), "scan.window_search_top": args.top})
    subject = load_subject(cfg.model, cfg.sae)
    targets, _ = select_targets(subject, cfg.targets, cfg.scan.corpus)
    objectives = [build_objective(subject.sae, t, cfg.targets) for t in targets]
    n = cfg.dream.n_tokens
    body0 = subject.n_bos

    t0 = time.perf_counter()
    with Store(cfg.project.path) as store:
        sid = run_scan(cfg, subject, store, targets, progress=False)
        scan = store.fetch_one("SELECT * FROM scans WHERE scan_id = ?", [sid])
        found = {o.key: store.fetch("SELECT window_ids, window_ce, window_ce_rest, window_act, context_idx FROM scan_windows "
                                    "WHERE scan_id = ? AND objective_key = ?", [sid, o.key]) for o in objectives}
        searched = {int(r["latent"]): int(r["n_windows_searched"]) for r in store.fetch("SELECT * FROM scan_latents WHERE scan_id = ?", [sid])}
        top_ctx = {}
        for r in store.fetch("SELECT latent, context_idx FROM scan_examples WHERE scan_id = ? AND kind = 'top' AND rank < ?", [sid, args.top]):
            top_ctx.setdefault(int(r["latent"]), set()).add(int(r["context_idx"]))
    scan_s = time.perf_counter() - t0
    print(f"scan {sid}: {scan['tokens_seen']:,} tokens, {scan['n_contexts']:,} contexts, window length {n}, "
          f"search over the top {args.top} contexts per latent: {scan_s:.1f} s (pass {scan['pass_wall_s']:.1f} s)")
    print(f"windows searched per latent: {', '.join(f'{k}: {v:,}' for k, v in sorted(searched.items()))}")

    # every full-length window of every context of the same scan
    t1 = time.perf_counter()
    wins, ctx_of = [], []
    for ci, c in enumerate(iter_contexts(subject, iter_documents(cfg.scan.corpus), context_size(cfg, subject))):
        if ci >= scan["n_contexts"]:
            break
        w, _ = context_windows(c.ids, n, body0)
        wins.append(w)
        ctx_of.append(np.full(len(w), ci))
    W, C = np.concatenate(wins), np.concatenate(ctx_of)
    U, first, inv = np.unique(W, axis=0, return_index=True, return_inverse=True)
    print(f"exhaustive: {len(W):,} full-length windows ({len(U):,} distinct) in {scan['n_contexts']:,} contexts")
    ce, rest = np.empty(len(U)), np.empty(len(U))
    vals = {o.key: np.empty(len(U)) for o in objectives}
    for s in range(0, len(U), args.chunk):
        part = U[s : s + args.chunk]
        ce[s : s + len(part)], rest[s : s + len(part)], _ = evaluate_matched(subject, part, [])
        toks = torch.from_numpy(np.concatenate([np.full((len(part), body0), subject.bos_id or 0), part], axis=1))
        with torch.no_grad():
            x = hook_activations(subject, toks)
            for o in objectives:
                vals[o.key][s : s + len(part)] = o(x, slice(body0, None)).double().cpu().numpy()
        print(f"  {min(s + args.chunk, len(U)):,} / {len(U):,} windows, {time.perf_counter() - t1:.0f} s", flush=True)
    ex_s = time.perf_counter() - t1
    ctx_first = C[first]  # first context holding each distinct window

    bands = {"all": {"p10": scan["ce_p10"], "p50": scan["ce_p50"], "mean+2σ": scan["in_dist_threshold"], "none": None},
             "rest": {"p10": scan["ce_rest_p10"], "p50": scan["ce_rest_p50"], "mean+2σ": scan["ce_rest_in_dist_threshold"], "none": None}}
    print(f"exhaustive pass: {ex_s:.0f} s")
    print("corpus CE bands (nats/token): " + "; ".join(f"{c}: " + ", ".join(f"{k} {v:.3f}" for k, v in b.items() if v is not None)
                                                      for c, b in bands.items()))
    print()
    print(f"{'objective':>42} {'CE':>4} {'band':>7} {'limit':>6} {'exhaustive':>10} {'searched':>9} {'gap':>7}  best window's context")
    gaps, misses = [], []
    for o in objectives:
        fr = found[o.key]
        a = vals[o.key]
        for conv, cev in (("all", ce), ("rest", rest)):
            fce = [r["window_ce"] if conv == "all" else r["window_ce_rest"] for r in fr]
            for band, lim in bands[conv].items():
                ok = np.isfinite(a) & np.isfinite(cev) & ((cev <= lim) if lim is not None else True)
                if not ok.any():
                    continue
                i = int(np.flatnonzero(ok)[np.argmax(a[ok])])
                ex = float(a[i])
                sv = [r["window_act"] for r, c in zip(fr, fce) if c is not None and (lim is None or c <= lim)]
                srch = max(sv) if sv else float("nan")
                gap = (ex - srch) / abs(ex) if ex != 0 and np.isfinite(srch) else float("inf")
                gaps.append(gap)
                lats = [int(x) for x in o.key.rsplit(":", 1)[-1].split("+")]
                in_top = any(int(ctx_first[i]) in top_ctx.get(lat, set()) for lat in lats)
                where = f"{int(ctx_first[i])} ({'a searched top context' if in_top else 'not among the top contexts'})"
                if gap > 0.02:
                    misses.append((o.key, conv, band, gap, in_top))
                print(f"{o.key[-42:]:>42} {conv:>4} {band:>7} {('—' if lim is None else f'{lim:.2f}'):>6} {ex:>10.4g} {srch:>9.4g} {gap:>7.2%}  {where}")
    print()
    g = np.array(gaps)
    print(f"{len(g)} (objective, CE convention, band) cells: {np.sum(g <= 0.02)} within 2% of exhaustive, {np.sum(g <= 1e-6)} exact; "
          f"median gap {np.median(g):.2%}, worst {g.max():.2%}")
    if misses:
        outside = sum(1 for m in misses if not m[4])
        print(f"{len(misses)} cells miss the 2% target; in {outside} of them the exhaustive best window lies in a context that is not among the "
              f"latent's top {args.top} contexts by in-context max (the search cannot see it: a fluent window of a context whose peak is elsewhere or lower).")
    print(f"time: scan with search {scan_s:.0f} s, exhaustive pass {ex_s:.0f} s ({len(U) / max(ex_s, 1e-9):,.0f} windows/s)")


if __name__ == "__main__":
    main()
