"""reverie's EPO against the reference code (dreamy, the EPO paper's own ``epo()``), in one run.

Both arms run on the *same* transformer_lens model object, the same objective and the paper's
defaults (M=8, r=32, k=512, n=12, λ log-spaced 0.1–10, restarts every 30), alternately
(A B A B …, ``--pairs`` pairs per setting), at 1 and 2 torch threads:

(a) the demo TinyStories-656K model, pre-activation of a jumprelu-2048 latent at
    ``blocks.1.hook_resid_pre``, last token;
(b) a GPT-2-small-shaped model with random weights (real GPT-2 tokenizer), projection on a
    random unit direction at ``blocks.6.hook_resid_pre``, last token;
(c) reverie's batched EPO over 8 demo latents at once: candidates/s *per latent* against
    dreamy's single-latent candidates/s.

Before timing, it checks that both arms compute the same objective and CE on the same 64 random
prompts (max |Δ| ≤ 1e-5). dreamy scores CE from the second prompt token on (its logits[:, :-1]
vs ids[:, 1:]); reverie's ``ce_rest`` is that same quantity (its default CE also scores the
first token given BOS), so the check compares like with like.

dreamy is imported at run time from ``$REVERIE_SHARED/anchors/dreamy`` (default ../shared),
never copied. Output: candidates/s per arm and pair, ratio reverie/dreamy (min / median), with
``uptime`` before and after.

    .venv/bin/python benchmarks/epo_vs_reference.py [--pairs 3] [--demo-iters 40] [--gpt2-iters 3] [--threads 1 2] [--skip-gpt2]
        [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from reverie.pipeline.config import EPOConfig, load_config  # noqa: E402
from reverie.pipeline.paths import shared_dir  # noqa: E402
from reverie.sae_targets.loading import Subject, load_subject  # noqa: E402
from reverie.sae_targets.objectives import Objective  # noqa: E402
from reverie.stages.dream.epo import DreamJob, run_epo_batch  # noqa: E402
from reverie.stages.dream.evaluator import PromptEvaluator  # noqa: E402

from benchmarks.shapes import gpt2_shaped_subject  # noqa: E402

DEMO_LATENTS = [35, 85, 155, 551, 630, 1039, 1298, 1736]   # the demo's seed-0 draw


def load_dreamy():
    path = shared_dir() / "anchors" / "dreamy" / "dreamy" / "epo.py"
    spec = importlib.util.spec_from_file_location("dreamy_epo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _DreamyModel(torch.nn.Module):
    """What dreamy's ``epo`` needs of a model (``device``, ``get_input_embeddings``), over a
    transformer_lens model: the embedding shares the model's W_E."""

    def __init__(self, tl_model):
        super().__init__()
        self.tl = tl_model
        self.embed = torch.nn.Embedding.from_pretrained(tl_model.W_E, freeze=True)

    @property
    def device(self) -> torch.device:
        return self.tl.W_E.device

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed


def dreamy_cache_run(subject: Subject, objective: Objective):
    """dreamy's ``cache_run(input_ids=None, inputs_embeds=None) -> {target [B], logits [B, n, V]}``:
    BOS + prompt through the model; ``logits`` are those of the prompt's positions."""
    model, bos = subject.model, subject.bos_id

    def cache_run(input_ids=None, inputs_embeds=None):
        B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        ids = input_ids if input_ids is not None else torch.zeros(B, inputs_embeds.shape[1], dtype=torch.long, device=inputs_embeds.device)
        toks = torch.cat([torch.full((B, 1), bos, dtype=torch.long, device=ids.device), ids], dim=1)
        store = {}
        hooks = [(subject.hook_name, lambda x, hook: store.__setitem__("act", x))]
        if inputs_embeds is not None:
            hooks.append(("hook_embed", lambda e, hook: torch.cat([e[:, :1], inputs_embeds.to(e.dtype)], dim=1)))
        logits = model.run_with_hooks(toks, return_type="logits", fwd_hooks=hooks)
        return {"target": objective(store["act"]), "logits": logits[:, 1:]}

    return cache_run


def check_same_numbers(dreamy, subject: Subject, objective: Objective) -> float:
    """Max |Δ| between the arms' objective and CE on 64 random prompts."""
    ev = PromptEvaluator(subject, objective, EPOConfig())
    ids = ev.random_prompts(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        out = dreamy_cache_run(subject, objective)(input_ids=ids)
        d_ce = dreamy.calc_xentropy(out["logits"].float(), ids)
        r = ev.evaluate(ids)
    r_ce_rest = r.ce_terms[:, 1:].sum(-1) / (ev.n - 1)
    return max(float((out["target"] - r.act).abs().max()), float((d_ce - r_ce_rest).abs().max()))


def run_dreamy(dreamy, subject: Subject, objective: Objective, iters: int, seed: int) -> float:
    model = _DreamyModel(subject.model)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):          # its restart messages
        dreamy.epo(dreamy_cache_run(subject, objective), model, subject.tokenizer, seq_len=12, population_size=8, iters=iters,
                   explore_per_pop=32, batch_size=256, topk=512, restart_frequency=30, seed=seed, callback=lambda *a, **k: False)
    wall = time.perf_counter() - t
    return (iters * 256 + 8) / wall


def run_reverie(subject: Subject, objectives: list[Objective], iters: int, seed: int, **cfg) -> float:
    """Candidates/s per objective (the batch's candidates / objectives / wall)."""
    c = EPOConfig(iterations=iters, **cfg)
    t = time.perf_counter()
    res = run_epo_batch(subject, [DreamJob(o, seed) for o in objectives], c)
    wall = time.perf_counter() - t
    return sum(r.n_candidates for r in res) / len(objectives) / wall


def gpt2_shaped(device: str = "cpu") -> tuple[Subject, Objective]:
    """The GPT-2-small-shaped random model and the projection on a random unit direction at
    blocks.6.hook_resid_pre (a random StandardSAE's decoder row)."""
    subj = gpt2_shaped_subject(d_sae=16, device=device)
    return subj, Objective(sae=subj.sae, latents=[3], quantity="projection")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def compare(name: str, dreamy, subject: Subject, objective: Objective, iters: int, pairs: int, threads: list[int], reverie_cfg: dict) -> None:
    diff = check_same_numbers(dreamy, subject, objective)
    print(f"\n== {name}: {iters} iterations per arm, M=8 r=32 k=512 n=12; same-numbers check max |Δ| = {diff:.2e} "
          f"({'ok' if diff <= 1e-5 else 'FAILED'})")
    for th in threads:
        torch.set_num_threads(th)
        run_dreamy(dreamy, subject, objective, 1, 99)            # warm-up both arms
        run_reverie(subject, [objective], 1, 99, **reverie_cfg)
        d_s, r_s = [], []
        for k in range(pairs):
            d_s.append(run_dreamy(dreamy, subject, objective, iters, k))
            r_s.append(run_reverie(subject, [objective], iters, k, **reverie_cfg))
        ratios = [r / d for r, d in zip(r_s, d_s)]
        print(f"threads {th}: dreamy cand/s {' '.join(f'{x:8.1f}' for x in d_s)} | reverie cand/s {' '.join(f'{x:8.1f}' for x in r_s)}"
              f" | ratio min {min(ratios):.2f} median {statistics.median(ratios):.2f}   [{uptime()}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--demo-iters", type=int, default=40)
    ap.add_argument("--gpt2-iters", type=int, default=3)
    ap.add_argument("--batch-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--kv-buckets", type=int, default=None, help="override dream.kv_buckets for reverie")
    ap.add_argument("--no-prefix-cache", action="store_true")
    ap.add_argument("--device", default="cpu", help="torch device of both arms' model (e.g. cuda)")
    ap.add_argument("--bf16", action="store_true", help="reverie searches with bf16 matrix products (dream.search_dtype)")
    args = ap.parse_args()
    rcfg: dict = {}
    if args.kv_buckets is not None:
        rcfg["kv_buckets"] = args.kv_buckets
    if args.no_prefix_cache:
        rcfg["prefix_cache"] = False
    if args.bf16:
        rcfg["search_dtype"] = "bfloat16"
    print(f"start: {uptime()}  torch {torch.__version__}, {os.cpu_count()} CPUs, reverie settings {rcfg or 'defaults'}")
    dreamy = load_dreamy()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml", {"model.device": args.device})
    demo = load_subject(cfg.model, cfg.sae)
    obj = Objective(sae=demo.sae, latents=[DEMO_LATENTS[5]])
    compare("(a) demo TinyStories-656K, jumprelu-2048 latent 1039 pre-activation @ blocks.1.hook_resid_pre", dreamy, demo, obj,
            args.demo_iters, args.pairs, args.threads, rcfg)
    if not args.skip_gpt2:
        g_subj, g_obj = gpt2_shaped(args.device)
        compare("(b) GPT-2-small-shaped random model, random direction @ blocks.6.hook_resid_pre", dreamy, g_subj, g_obj,
                args.gpt2_iters, args.pairs, args.threads, rcfg)
    print(f"\n== (c) batched reverie EPO over 8 demo latents {DEMO_LATENTS}: per-latent cand/s vs dreamy single-latent, "
          f"{args.batch_iters} iterations")
    objs = [Objective(sae=demo.sae, latents=[i]) for i in DEMO_LATENTS]
    for th in args.threads:
        torch.set_num_threads(th)
        d_s, r_s = [], []
        for k in range(args.pairs):
            d_s.append(run_dreamy(dreamy, demo, objs[5], args.batch_iters, k))
            r_s.append(run_reverie(demo, objs, args.batch_iters, k, **rcfg))
        ratios = [r / d for r, d in zip(r_s, d_s)]
        print(f"threads {th}: dreamy single cand/s {' '.join(f'{x:8.1f}' for x in d_s)} | reverie per-latent cand/s (8 at once) "
              f"{' '.join(f'{x:8.1f}' for x in r_s)} | ratio min {min(ratios):.2f} median {statistics.median(ratios):.2f}   [{uptime()}]")
    print(f"\nend: {uptime()}")


if __name__ == "__main__":
    main()
