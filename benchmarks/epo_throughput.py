"""EPO throughput: candidates/s and the time split (gradient / proposal / evaluation / selection).

(a) the demo subject (TinyStories-656K + JumpReLU SAE), (b) a GPT-2-small-shaped
HookedTransformer with random weights, the real GPT-2 tokenizer ({shared}/tokenizers/gpt2) and a
random sae-lens StandardSAE at blocks.6.hook_resid_pre. Paper defaults (M=8, r=32, k=512, n=12)
for a few iterations: children in full (``prefix_cache`` off) or from their parents' keys/values
in 1, 4 or 12 first-edit buckets, through the lean forward or transformer_lens's. For a
same-run comparison against the reference code, see ``epo_vs_reference.py``.

    .venv/bin/python benchmarks/epo_throughput.py [--demo-iterations 20] [--gpt2-iterations 3] [--threads 1] [--device cpu]
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
    cfg = EPOConfig(iterations=iterations, restart_every=30, **settings)
    obj = Objective(sae=subject.sae, latents=[latent])
    run_epo(subject, obj, cfg.model_copy(update={"iterations": 1}), seed=0)   # warm-up
    t = time.perf_counter()
    r = run_epo(subject, obj, cfg, seed=0)
    wall = time.perf_counter() - t
    evaluated = r.n_candidates - cfg.population
    return {"cand_s": evaluated / wall, "wall": wall, "it_s": wall / r.n_iterations, **{k: v / r.n_iterations for k, v in r.timing.items()}}


def report(name: str, subject: Subject, latent: int, iterations: int) -> None:
    print(f"\n== {name}: {iterations} iterations at M=8 r=32 k=512 n=12 (device {subject.device}, threads {torch.get_num_threads()})")
    print(f"{'mode':<26} {'cand/s':>8} {'s/iter':>7} {'gradient':>9} {'proposal':>9} {'evaluation':>11} {'selection':>10}")
    modes = (("full children (prefix_cache=off)", dict(prefix_cache=False)), ("KV, 1 bucket", dict(kv_buckets=1)),
             ("KV, 4 buckets (default)", dict(kv_buckets=4)), ("KV, 12 buckets", dict(kv_buckets=12)),
             ("KV 4, transformer_lens fwd", dict(kv_buckets=4, lean_forward=False)), ("KV 4, bf16 search", dict(kv_buckets=4, search_dtype="bfloat16")))
    for label, settings in modes:
        m = measure(subject, latent, iterations, **settings)
        print(f"{label:<26} {m['cand_s']:>8.0f} {m['it_s']:>7.3f} {m['gradient']:>9.3f} {m['proposal']:>9.3f} {m['evaluation']:>11.3f} {m['selection']:>10.3f}")
    print("(per-iteration seconds in each phase)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-iterations", type=int, default=20)
    ap.add_argument("--gpt2-iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-gpt2", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml", {"model.device": args.device})
    report("demo TinyStories-656K + jumprelu-2048", load_subject(cfg.model, cfg.sae), 958, args.demo_iterations)
    if not args.skip_gpt2:
        report("GPT-2-small-shaped, random weights + random StandardSAE @ blocks.6", gpt2_shaped_subject(device=args.device), 123, args.gpt2_iterations)


if __name__ == "__main__":
    main()
