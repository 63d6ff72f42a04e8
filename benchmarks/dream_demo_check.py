"""The dream stage's "must show" numbers on the real demo model and SAE.

1. For 5 random alive latents (seeded), EPO at the paper's Table 1 settings (iterations
   configurable) vs the best of 1,024 uniformly random prompts of the same length (paper §3.5):
   best dream activation, random best, and the frontier's CE span (nats/token).
2. A two-latent ``lp`` (p = 0.1) run on the first two latents: the best frontier prompt on
   min_j(a_j / single_best_j); both must exceed 0.5.

    .venv/bin/python benchmarks/dream_demo_check.py [--iterations 150] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from reverie.pipeline.config import EPOConfig, load_config  # noqa: E402
from reverie.sae_targets.loading import load_subject  # noqa: E402
from reverie.sae_targets.objectives import Objective  # noqa: E402
from reverie.sae_targets.selection import random_alive_latents  # noqa: E402
from reverie.stages.dream.epo import run_epo  # noqa: E402
from reverie.stages.dream.evaluator import PromptEvaluator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the latent draw and of EPO")
    ap.add_argument("--pair", type=int, nargs=2, default=None, help="indices (0-4) of the two latents for the lp run (default: 0 1)")
    ap.add_argument("--lp-iterations", type=int, default=None, help="iterations of the lp run (default: --iterations)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml")
    subject = load_subject(cfg.model, cfg.sae)
    latents = random_alive_latents(subject.log10_density, 5, args.seed, cfg.targets.log10_density_min, cfg.targets.log10_density_max)
    epo = EPOConfig(iterations=args.iterations)
    print(f"EPO M={epo.population} r={epo.children} k={epo.topk} n={epo.n_tokens} T={epo.iterations} restarts every {epo.restart_every}; "
          f"objective: SAE pre-activation at the last token; random baseline: 1,024 uniform prompts of {epo.n_tokens} tokens")
    print(f"{'latent':>6} {'log10 dens':>10} {'dream best':>10} {'its CE':>7} {'random best':>11} {'beats':>5} "
          f"{'frontier CE min..max':>21} {'n':>3} {'wall s':>7}")
    best: dict[int, float] = {}
    wins = 0
    for lat in latents:
        obj = Objective(sae=subject.sae, latents=[lat])
        ev = PromptEvaluator(subject, obj, epo)
        rand = float(ev.evaluate(ev.random_prompts(1024, torch.Generator().manual_seed(1000 + lat))).act.max())
        r = run_epo(subject, obj, epo, seed=args.seed)
        b = r.best
        best[lat] = b.activation
        ces = [p.ce for p in r.frontier]
        wins += b.activation > rand
        print(f"{lat:>6} {float(subject.log10_density[lat]):>10.2f} {b.activation:>10.3f} {b.ce:>7.2f} {rand:>11.3f} "
              f"{'yes' if b.activation > rand else 'NO':>5} {min(ces):>9.2f} .. {max(ces):<9.2f} {len(ces):>3} {r.wall_s:>7.1f}")
        print(f"{'':>6} best dream: {b.text!r}   most fluent: {r.frontier[-1].text!r} (CE {r.frontier[-1].ce:.2f})")
    print(f"dream beats the random-prompt maximum on {wins}/5 latents")

    i, j = args.pair or (0, 1)
    a, c = latents[i], latents[j]
    obj = Objective(sae=subject.sae, latents=[a, c], combine="lp", p=0.1, offset=1.0)
    r = run_epo(subject, obj, epo.model_copy(update={"iterations": args.lp_iterations or epo.iterations}), seed=args.seed)
    scored = [(min(p.latent_acts[0] / best[a], p.latent_acts[1] / best[c]), p) for p in r.frontier]
    frac, p = max(scored, key=lambda x: x[0])
    print(f"\nlp(p=0.1) of latents {a}+{c}, {r.n_iterations} iterations: best frontier prompt reaches {p.latent_acts[0]:.3f} / {best[a]:.3f} and "
          f"{p.latent_acts[1]:.3f} / {best[c]:.3f} of the single-latent bests (min fraction {frac:.2f}; "
          f"{'both above half' if frac > 0.5 else 'NOT both above half'}); CE {p.ce:.2f}; text {p.text!r}")


if __name__ == "__main__":
    main()
