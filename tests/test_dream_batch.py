"""Batched multi-target EPO, objective scales and the lp combination (issues 10, 17, 11)."""

from __future__ import annotations

import pytest
import torch

from reverie.pipeline.config import EPOConfig, load_config
from reverie.sae_targets.objectives import Objective, combine_latents
from reverie.sae_targets.selection import Target, random_alive_latents
from reverie.stages.dream import DreamJob, dream_targets, objective_scales, run_epo, run_epo_batch
from reverie.stages.dream.proposals import select_with_replacement

SMALL = dict(population=4, children=16, topk=64, iterations=24, restart_every=8, history_every=8)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latents(subject) -> list[int]:
    return random_alive_latents(subject.log10_density, 4, seed=3, floor=-3.0, ceiling=-1.5)


def _frontier(r):
    return [(p.token_ids, p.iteration) for p in r.frontier]


def _values(r):
    return torch.tensor([[p.activation, p.ce] for p in r.frontier], dtype=torch.float64)


@pytest.mark.parametrize("buckets", [1, 3])
def test_batched_equals_solo(subject, latents, buckets):
    """Each job of a batched search gives exactly its solo frontier (the same prompts, found at the
    same iterations), restarts and counts (CPU). Values agree to float rounding (≤ 1e-6 relative):
    a matrix product over more rows may round its last bit differently."""
    cfg = EPOConfig(**SMALL, kv_buckets=buckets)
    jobs = [
        DreamJob(Objective(sae=subject.sae, latents=[latents[0]]), seed=0, scale=2.0),
        DreamJob(Objective(sae=subject.sae, latents=[latents[1]]), seed=7, scale=0.5),
        DreamJob(Objective(sae=subject.sae, latents=[latents[2], latents[3]], combine="lp"), seed=1),
        DreamJob(Objective(sae=subject.sae, latents=[latents[0]], reduce="max"), seed=0),
    ]
    batched = run_epo_batch(subject, jobs, cfg)
    for job, b in zip(jobs, batched):
        solo = run_epo(subject, job.objective, cfg, job.seed, scale=job.scale)
        assert _frontier(b) == _frontier(solo)
        assert torch.allclose(_values(b), _values(solo), rtol=1e-6, atol=1e-6)
        assert [(e.iteration, e.lam_r, e.kept_slot) for e in b.restarts] == [(e.iteration, e.lam_r, e.kept_slot) for e in solo.restarts]
        assert b.n_candidates == solo.n_candidates and b.batch_jobs == len(jobs)
        assert [(h.iteration, len(h.activation)) for h in b.history] == [(h.iteration, len(h.activation)) for h in solo.history]


def test_scaled_objective_is_raw_objective_at_scaled_lambda(subject, latents):
    """f/s − λ·CE orders candidates exactly as f − (λ·s)·CE: same frontier at fixed λ·scale."""
    s = 4.0    # a power of two: the division and the multiplication are exact in floating point
    obj = Objective(sae=subject.sae, latents=[latents[1]])
    base = dict(SMALL, iterations=16)
    scaled = run_epo(subject, obj, EPOConfig(**base), seed=2, scale=s)
    raw = run_epo(subject, obj, EPOConfig(**{**base, "lambda_min": 0.1 * s, "lambda_max": 10.0 * s,
                                             "restart_lambda_min": 0.667 * s, "restart_lambda_max": 6.0 * s}), seed=2)
    assert [p.token_ids for p in scaled.frontier] == [p.token_ids for p in raw.frontier]
    act, ce = torch.randn(50), torch.rand(50) * 10
    lam = torch.logspace(-1, 1, 8)
    assert torch.equal(select_with_replacement(act / s, ce, lam), select_with_replacement(act, ce, lam * s))


def test_lp_one_dead_latent_has_no_epsilon():
    """A dead member (relu(a + offset) = 0) contributes 0, not ε^p, and has zero gradient."""
    p, off = 0.1, 1.0
    a = torch.tensor([[2.0, -5.0]], requires_grad=True)
    v = combine_latents(a, "lp", p, off)
    want = (((2.0 + off) ** p + 0.0) / 2) ** (1 / p)          # power mean with the dead term masked
    assert float(v.detach()) == pytest.approx(want, rel=1e-5)
    old_eps_value = (((2.0 + off) + 1e-6) ** p + (1e-6) ** p) ** (1 / p)
    assert old_eps_value / float(v) > 1000                     # what ε inside the power did
    v.sum().backward()
    assert torch.isfinite(a.grad).all() and float(a.grad[0, 1]) == 0.0
    both = combine_latents(torch.tensor([[3.0, 3.0]]), "lp", p, 0.0)
    assert float(both) == pytest.approx(3.0, rel=1e-5)          # L latents at x give x: one latent's scale
    dead = combine_latents(torch.tensor([[-3.0, -3.0]]), "lp", p, 1.0)
    assert float(dead) == 0.0


def test_objective_scales_z_and_dataset_max(subject, latents):
    single = Objective(sae=subject.sae, latents=[latents[0]])
    combo = Objective(sae=subject.sae, latents=[latents[1], latents[2]], combine="lp")
    (o1, s1), (o2, s2) = objective_scales(subject, [single, combo], "z", 12, n_prompts=256)
    assert o1 is single and s1 > 0
    assert o2.scales is not None and all(x > 0 for x in o2.scales) and "scale=z" in o2.key and s2 > 0
    # the scale is σ over the baseline's random prompts
    from reverie.sae_targets.baseline import BASELINE_SEED, baselines, random_prompts

    sigma = baselines(subject, random_prompts(subject, 256, 12, BASELINE_SEED), [single])[0].std
    assert s1 == pytest.approx(sigma)
    dm = {latents[0]: 3.0, latents[1]: 2.0, latents[2]: 5.0}
    (d1, t1), (d2, t2) = objective_scales(subject, [single, combo], "dataset_max", 12, dataset_max=dm)
    assert t1 == 3.0 and d2.scales == [2.0, 5.0] and t2 == 1.0
    from reverie.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="reverie scan"):
        objective_scales(subject, [single], "dataset_max", 12, dataset_max={})


def test_dream_targets_batches_and_reports_post(subject, latents, tmp_path):
    """dream_targets: several targets in one batch; 'post' is optimized through 'pre' and reported as post."""
    cfg = load_config(None, {"project.dir": str(tmp_path), "model.path": "{shared}/models/tinystories-656k",
                             "sae.path": "{shared}/saes/tinystories-656k-res/jumprelu-2048", "targets.quantity": "post",
                             "dream.iterations": 10, "dream.population": 4, "dream.children": 8, "dream.topk": 32,
                             "dream.seeds": [0, 1], "dream.attribution_prompts": 0, "scan.baseline_prompts": 128})
    targets = [Target(latents=[latents[0]]), Target(latents=[latents[1], latents[2]], combine="lp")]
    out = dream_targets(cfg, subject, targets)
    assert [len(r) for r in out] == [2, 2]
    r = out[0][0]
    assert r.batch_jobs == 4 and r.objective_scale == "z" and r.scale > 0
    assert r.objective_key.startswith("post:") and "pre-activation" in r.objective
    post = Objective(sae=subject.sae, latents=[latents[0]], quantity="post")
    from reverie.stages.dream.evaluator import PromptEvaluator

    ev = PromptEvaluator(subject, post, cfg.dream)
    got = ev.evaluate(torch.tensor([p.token_ids for p in r.frontier])).act
    assert torch.allclose(got, torch.tensor([p.activation for p in r.frontier]), atol=1e-5)
    assert all(p.ce_rest is not None for p in r.frontier)


def test_attribution_prompts_prefer_fluent_winner():
    from reverie.stages.dream.result import DreamPrompt
    from reverie.stages.dream.stage import attribution_prompts

    def p(i, a, c):
        return DreamPrompt(token_ids=[i], tokens=[str(i)], text=str(i), activation=a, ce=c, lam=None, iteration=0, seed=0)

    fr = [p(1, 9.0, 12.0), p(2, 6.0, 7.0), p(3, 5.0, 4.0), p(4, 2.0, 2.0)]
    assert [x.token_ids[0] for x in attribution_prompts(fr, 3, data_max=4.5)] == [3, 1, 2]
    assert [x.token_ids[0] for x in attribution_prompts(fr, 2, data_max=20.0)] == [1, 2]   # none beats: top activation first
    assert attribution_prompts(fr, 0, 1.0) == []
