"""EPO engine on the real demo model + JumpReLU SAE (small settings so the file runs in ~1 min)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reverie.pipeline.config import EPOConfig
from reverie.sae_targets.objectives import Objective, combine_latents
from reverie.sae_targets.selection import random_alive_latents
from reverie.stages.dream.epo import run_epo
from reverie.stages.dream.evaluator import PromptEvaluator, banned_ids
from reverie.stages.dream.proposals import propose_children, restart_choice, select_with_replacement, topk_candidates

SMALL = dict(population=4, children=16, topk=64, iterations=30, restart_every=10, history_every=10)
BANNED = ["the▁", "was▁", ".", "girl "]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latents(subject) -> list[int]:
    return random_alive_latents(subject.log10_density, 3, seed=1, floor=-3.0, ceiling=-1.5)


@pytest.fixture(scope="module")
def short_dream(subject, latents):
    obj = Objective(sae=subject.sae, latents=[latents[0]])
    return run_epo(subject, obj, EPOConfig(**SMALL), seed=0)


def _evaluator(subject, latents, **kw) -> PromptEvaluator:
    return PromptEvaluator(subject, Objective(sae=subject.sae, latents=[latents[0]]), EPOConfig(**{**SMALL, **kw}))


@pytest.mark.parametrize("path", ["gradient", "logit_masked", "logit_unmasked", "extra_resample", "swap"])
def test_each_proposal_path_never_emits_banned_or_special(subject, latents, path):
    probs = {
        "gradient": {},
        "logit_masked": {"p_logit_proposals": 1.0},
        "logit_unmasked": {"p_logit_proposals": 1.0, "p_no_topk_mask": 1.0},
        "extra_resample": {"p_extra_resample": 1.0},
        "swap": {"p_swap": 1.0},
    }[path]
    ev = _evaluator(subject, latents, banned_tokens=BANNED, children=64, **probs)
    banned = torch.tensor(sorted(ev.banned))
    assert set(subject.special_ids()) <= ev.banned and len(ev.banned) >= len(subject.special_ids()) + len(BANNED)
    g = torch.Generator().manual_seed(3)
    pop = ev.random_prompts(4, g)
    grad, _, state = ev.gradients(pop, torch.ones(4))
    grad[..., banned] = 1e6          # make banned tokens the most attractive: the mask must still hold
    state.logprobs[..., banned] = 0.0  # and the most likely under the model's own logits
    topk = topk_candidates(grad, ev.allowed, 64)
    assert not torch.isin(topk, banned).any()
    kids = propose_children(pop, topk, state.logprobs, ev.allowed, ev.cfg, g, torch.Generator().manual_seed(4))
    assert kids.tokens.shape == (4 * 64, ev.n)
    assert not torch.isin(kids.tokens, banned).any()
    assert (kids.tokens != pop[kids.slot]).any(1).float().mean() > 0.5
    # positions before the recorded first edit equal the parent's (the cached path relies on it)
    same = kids.tokens == pop[kids.slot]
    for c in range(kids.tokens.shape[0]):
        assert same[c, : kids.first[c]].all()


def test_dream_with_all_augmentations_keeps_ban_list(subject, latents):
    cfg = EPOConfig(**{**SMALL, "iterations": 6, "banned_tokens": BANNED, "p_logit_proposals": 0.5,
                       "p_no_topk_mask": 0.2, "p_extra_resample": 1.5 / 12, "p_swap": 0.1})
    res = run_epo(subject, Objective(sae=subject.sae, latents=[latents[0]]), cfg, seed=1)
    bad = banned_ids(subject, BANNED)
    assert all(not (set(p.token_ids) & bad) for p in res.frontier)


def test_selection_is_with_replacement():
    act = torch.tensor([0.0, 5.0, 1.0, 2.0])
    ce = torch.tensor([1.0, 1.0, 1.0, 9.0])
    lam = torch.tensor([0.1, 1.0, 10.0])
    # candidate 1 is best for every λ: all slots take it (without replacement it could fill only one)
    assert select_with_replacement(act, ce, lam).tolist() == [1, 1, 1]
    # trade-off: small λ prefers high activation, large λ low CE
    act, ce = torch.tensor([10.0, 1.0]), torch.tensor([5.0, 0.0])
    assert select_with_replacement(act, ce, torch.tensor([0.1, 10.0])).tolist() == [0, 1]


def test_restart_uses_the_drawn_lambda(short_dream):
    assert len(short_dream.restarts) == 2, "restart_every=10 over 30 iterations restarts at 10 and 20"
    for ev in short_dream.restarts:
        assert 0.667 <= ev.lam_r <= 6.0
        a, c = np.array(ev.population_activation), np.array(ev.population_ce)
        assert ev.kept_slot == int(np.argmax(a - ev.lam_r * c))
    # restart_choice really depends on λ_r
    act, ce = torch.tensor([10.0, 1.0]), torch.tensor([5.0, 0.0])
    assert restart_choice(act, ce, 0.667) == 0 and restart_choice(act, ce, 6.0) == 1


def test_frontier_is_non_dominated_and_unique(short_dream):
    pts = [(p.activation, p.ce) for p in short_dream.frontier]
    for i, (a, c) in enumerate(pts):
        assert not any(a2 >= a and c2 <= c and (a2 > a or c2 < c) for j, (a2, c2) in enumerate(pts) if j != i)
    assert len({tuple(p.token_ids) for p in short_dream.frontier}) == len(short_dream.frontier)
    assert short_dream.n_candidates == 4 + 30 * 4 * 16
    assert [h.iteration for h in short_dream.history] == [10, 20, 30]
    for p in short_dream.frontier:
        assert len(p.token_acts) == 12 and p.token_acts[-1] == pytest.approx(p.activation, abs=1e-3)


def test_same_seed_same_frontier(subject, latents, short_dream):
    again = run_epo(subject, Objective(sae=subject.sae, latents=[latents[0]]), EPOConfig(**SMALL), seed=0)
    assert [(p.token_ids, p.activation, p.ce) for p in again.frontier] == [(p.token_ids, p.activation, p.ce) for p in short_dream.frontier]
    other = run_epo(subject, Objective(sae=subject.sae, latents=[latents[0]]), EPOConfig(**{**SMALL, "iterations": 3}), seed=5)
    assert [p.token_ids for p in other.frontier] != [p.token_ids for p in short_dream.frontier]


@pytest.mark.parametrize("template", [dict(), dict(prefix="Once upon a time", suffix=" and then"), dict(reduce="max")])
def test_cached_path_agrees_with_plain_path(subject, latents, template):
    reduce = template.pop("reduce", "last")
    obj = Objective(sae=subject.sae, latents=[latents[1]], reduce=reduce)
    ev = PromptEvaluator(subject, obj, EPOConfig(**SMALL, **template))
    g = torch.Generator().manual_seed(0)
    pop = ev.random_prompts(4, g)
    grad, pout, state = ev.gradients(pop, torch.ones(4))
    plain_parents = ev.evaluate(pop)
    assert torch.allclose(pout.act, plain_parents.act, atol=1e-4) and torch.allclose(pout.ce, plain_parents.ce, atol=1e-4)
    kids = propose_children(pop, topk_candidates(grad, ev.allowed, 64), state.logprobs, ev.allowed,
                            EPOConfig(**{**SMALL, "children": 32, "p_extra_resample": 0.1, "p_swap": 0.2}), g, torch.Generator().manual_seed(1))
    cached = ev.evaluate_children(kids.tokens, kids.slot, kids.first, state)
    plain = ev.evaluate(kids.tokens)
    for f in ("act", "ce", "values", "ce_terms"):
        assert (getattr(cached, f) - getattr(plain, f)).abs().max() <= 1e-4, f
    for buckets in (1, 2, 5, 12):   # any fixed split of first-edit positions: same numbers
        ev.kv_buckets = buckets
        coarse = ev.evaluate_children(kids.tokens, kids.slot, kids.first, state)
        for f in ("act", "ce", "values", "ce_terms"):
            assert (getattr(coarse, f) - getattr(plain, f)).abs().max() <= 1e-4, (buckets, f)
    ev.prefix_cache = False   # plain path from position 0 (BOS recomputed): same numbers
    for f in ("act", "ce", "values", "ce_terms"):
        assert (getattr(ev.evaluate(kids.tokens), f) - getattr(plain, f)).abs().max() <= 1e-4, f


def test_ce_matches_model_loss(subject, latents):
    """CE = mean next-token CE (nats) of the optimized tokens given BOS, as the model's own loss."""
    ev = _evaluator(subject, latents)
    opt = ev.random_prompts(3, torch.Generator().manual_seed(2))
    full = ev.full(opt)
    with torch.no_grad():
        ref = subject.model(full, return_type="loss", loss_per_token=True).mean(-1)   # 12 terms after BOS
    assert torch.allclose(ev.evaluate(opt).ce, ref, atol=1e-4)


def test_short_dream_beats_random_prompts(subject, latents, short_dream):
    ev = _evaluator(subject, latents)
    rand = ev.evaluate(ev.random_prompts(1024, torch.Generator().manual_seed(9)))
    assert short_dream.best.activation > float(rand.act.max())


def test_two_latent_lp_objective(subject, latents):
    a, b = latents[0], latents[2]
    obj = Objective(sae=subject.sae, latents=[a, b], combine="lp", p=0.1, offset=1.0)
    res = run_epo(subject, obj, EPOConfig(**{**SMALL, "iterations": 12}), seed=0)
    for p in res.frontier:
        assert len(p.latent_acts) == 2
        want = float(combine_latents(torch.tensor(p.latent_acts)[None], "lp", 0.1, 1.0)[0])
        assert p.activation == pytest.approx(want, rel=1e-3)
    ev = PromptEvaluator(subject, obj, EPOConfig(**SMALL))
    rand = ev.evaluate(ev.random_prompts(256, torch.Generator().manual_seed(9)))
    assert res.best.activation > float(rand.act.max())
