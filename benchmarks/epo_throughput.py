"""EPO throughput: candidates/s and the time split (gradient / proposal / evaluation / selection).

(a) the demo subject (TinyStories-656K + JumpReLU SAE), (b) a GPT-2-small-shaped
HookedTransformer (or TransformerBridge over a GPT2LMHeadModel) with random weights, the real GPT-2 tokenizer ({shared}/tokenizers/gpt2) and a
random sae-lens StandardSAE at blocks.6.hook_resid_pre. Paper defaults (M=8, r=32, k=512, n=12)
for a few iterations: children in full (``prefix_cache`` off) or from their parents' keys/values
in 1, 4 or 12 first-edit buckets, through the lean forward or the backend's own forward
(transformer_lens's HookedTransformer with its cache, or the TransformerBridge with HF's cache).
The demo runs on ``--backend`` hooked, bridge or both (default): with both, each mode runs the
backends interleaved (hooked, bridge, hooked, bridge, ... ``--pairs`` times) in one process, and
the frontiers of the same seed are compared across backends. For a same-run comparison against
the reference code, see ``epo_vs_reference.py``.

    .venv/bin/python benchmarks/epo_throughput.py [--backend both] [--pairs 2] [--demo-iterations 20] [--gpt2-iterations 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from reverie.pipeline.config import EPOConfig, load_config  # noqa: E402
from reverie.sae_targets.loading import Subject, load_subject  # noqa: E402
from reverie.sae_targets.objectives import Objective  # noqa: E402
from reverie.stages.dream.epo import run_epo  # noqa: E402

from benchmarks.shapes import gpt2_shaped_subject  # noqa: E402


def measure(subject: Subject, latent: int, iterations: int, **settings) -> dict:
    """One timed EPO run (seed 0) after a one-iteration warm-up: candidates/s, wall seconds,
    seconds per iteration and per phase, and the frontier as ``[(token_ids, activation, ce)]``."""
    cfg = EPOConfig(iterations=iterations, restart_every=30, **settings)
    obj = Objective(sae=subject.sae, latents=[latent])
    run_epo(subject, obj, cfg.model_copy(update={"iterations": 1}), seed=0)   # warm-up
    t = time.perf_counter()
    r = run_epo(subject, obj, cfg, seed=0)
    wall = time.perf_counter() - t
    evaluated = r.n_candidates - cfg.population
    return {"cand_s": evaluated / wall, "wall": wall, "it_s": wall / r.n_iterations, **{k: v / r.n_iterations for k, v in r.timing.items()},
            "frontier": [(tuple(p.token_ids), p.activation, p.ce) for p in r.frontier]}


MODES = (("full children (prefix_cache=off)", dict(prefix_cache=False)), ("KV, 1 bucket", dict(kv_buckets=1)),
         ("KV, 4 buckets (default)", dict(kv_buckets=4)), ("KV, 12 buckets", dict(kv_buckets=12)),
         ("KV 4, backend's own fwd", dict(kv_buckets=4, lean_forward=False)), ("KV 4, bf16 search", dict(kv_buckets=4, search_dtype="bfloat16")))


def _frontier_diff(a: list, b: list) -> str:
    """How two frontiers of the same seed differ: identical, same prompts with value differences, or other prompts."""
    if a == b:
        return "identical frontiers"
    if [t for t, _, _ in a] == [t for t, _, _ in b]:
        da = max(abs(x[1] - y[1]) for x, y in zip(a, b))
        dc = max(abs(x[2] - y[2]) for x, y in zip(a, b))
        return f"same prompts, max |Δf| {da:.2e}, max |ΔCE| {dc:.2e}"
    return (f"different prompts: best f {max(x[1] for x in a):.4f} vs {max(x[1] for x in b):.4f}, "
            f"{len(a)} vs {len(b)} frontier points")


def report(name: str, subject: Subject, latent: int, iterations: int) -> None:
    print(f"\n== {name}: {iterations} iterations at M=8 r=32 k=512 n=12 (device {subject.device}, threads {torch.get_num_threads()})")
    print(f"{'mode':<26} {'cand/s':>8} {'s/iter':>7} {'gradient':>9} {'proposal':>9} {'evaluation':>11} {'selection':>10}")
    for label, settings in MODES:
        m = measure(subject, latent, iterations, **settings)
        print(f"{label:<26} {m['cand_s']:>8.0f} {m['it_s']:>7.3f} {m['gradient']:>9.3f} {m['proposal']:>9.3f} {m['evaluation']:>11.3f} {m['selection']:>10.3f}")
    print("(per-iteration seconds in each phase)")


def report_backends(name: str, subjects: dict[str, Subject], latent: int, iterations: int, pairs: int, modes=MODES) -> None:
    """Each mode on every backend, interleaved (A B A B ...) ``pairs`` times; then the frontier
    difference between backends (same seed, same settings)."""
    print(f"\n== {name}: {iterations} iterations at M=8 r=32 k=512 n=12, backends interleaved {pairs}x "
          f"(threads {torch.get_num_threads()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(f"{'mode':<26} {'backend':<7} {'cand/s':>8} {'s/iter':>7} {'gradient':>9} {'proposal':>9} {'evaluation':>11} {'selection':>10}")
    for label, settings in modes:
        runs: dict[str, list[dict]] = {b: [] for b in subjects}
        for _ in range(pairs):
            for b, subject in subjects.items():
                m = measure(subject, latent, iterations, **settings)
                runs[b].append(m)
                print(f"{label:<26} {b:<7} {m['cand_s']:>8.0f} {m['it_s']:>7.3f} {m['gradient']:>9.3f} {m['proposal']:>9.3f} {m['evaluation']:>11.3f} {m['selection']:>10.3f}")
        if len(subjects) == 2:
            (a, ra), (b, rb) = runs.items()
            best = {k: max(m["cand_s"] for m in v) for k, v in runs.items()}
            print(f"{'':<26} best {a} {best[a]:.0f} / {b} {best[b]:.0f} cand/s = {best[b] / best[a]:.2f}x; "
                  f"{_frontier_diff(ra[0]['frontier'], rb[0]['frontier'])}")
    print(f"(per-iteration seconds in each phase; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-iterations", type=int, default=20)
    ap.add_argument("--gpt2-iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--backend", choices=("hooked", "bridge", "both"), default="both",
                    help="model.backend of the subjects; 'both' interleaves them")
    ap.add_argument("--pairs", type=int, default=2, help="interleaved repetitions per mode with --backend both")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
    backends = ("hooked", "bridge") if args.backend == "both" else (args.backend,)
    subjects = {}
    for b in backends:
        cfg = load_config(demo, {"model.device": args.device, "model.backend": b})
        subjects[b] = load_subject(cfg.model, cfg.sae)
    report_backends("demo TinyStories-656K + jumprelu-2048", subjects, 958, args.demo_iterations, args.pairs if len(backends) == 2 else 1)
    if not args.skip_gpt2:
        name = "GPT-2-small-shaped, random weights + random StandardSAE @ blocks.6"
        if len(backends) == 1 and backends[0] == "hooked":
            report(name, gpt2_shaped_subject(device=args.device), 123, args.gpt2_iterations)
        else:   # the bridge has no lean forward for GPT-2: the default mode and the backend's own forward
            g2 = {b: gpt2_shaped_subject(device=args.device, backend=b) for b in backends}
            report_backends(name + " (bridge: other random weights)", g2, 123, args.gpt2_iterations, args.pairs if len(backends) == 2 else 1,
                            modes=(MODES[2], MODES[4]))


if __name__ == "__main__":
    main()
