"""The model-backend seam (sae_targets/backend.py), each test run on both backends of the demo
model: ``hooked`` (HookedTransformer) and ``bridge`` (TransformerBridge in compatibility mode)."""

from __future__ import annotations

import warnings

import pytest
import torch

from reverie.pipeline.config import EPOConfig, load_config
from reverie.pipeline.errors import ConfigError
from reverie.sae_targets.activations import latent_activations
from reverie.sae_targets.backend import BridgeTail
from reverie.sae_targets.contexts import hook_activations
from reverie.sae_targets.loading import load_subject
from reverie.stages.dream.lean import lean_unsupported
from reverie.sae_targets.objectives import Objective
from reverie.stages.dream.epo import run_epo
from reverie.stages.dream.evaluator import PromptEvaluator
from reverie.stages.dream.proposals import propose_children, topk_candidates
from tests.conftest import DEMO_CONFIG
from tests.test_real_saes import gpt2_dir, local_names  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKENDS = ["hooked", "bridge"]
LATENT = 552
SMALL = dict(population=4, children=16, topk=64, iterations=6, restart_every=3, history_every=3)


@pytest.fixture(scope="module")
def bridge_subject():
    cfg = load_config(DEMO_CONFIG, {"model.backend": "bridge"})
    return load_subject(cfg.model, cfg.sae)


@pytest.fixture(params=BACKENDS)
def subj(request, subject, bridge_subject):
    """The demo subject on each backend (the hooked one is conftest's session fixture)."""
    s = subject if request.param == "hooked" else bridge_subject
    assert s.backend == request.param
    return s


@pytest.fixture(scope="module")
def hf_model(shared):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(shared / "models" / "tinystories-656k"), dtype=torch.float32)
    return m.eval()


def _tokens(subject, texts, n=6, max_len=128) -> list[list[int]]:
    return [subject.with_bos(subject.encode(t))[:max_len] for t in texts[:n]]


def test_bridge_is_a_transformer_bridge_in_compatibility_mode(bridge_subject):
    from transformer_lens.model_bridge import TransformerBridge

    m = bridge_subject.model
    assert isinstance(m, TransformerBridge) and m.compatibility_mode
    assert bridge_subject.hook_name in m.hook_dict and bridge_subject.device == torch.device("cpu")
    assert lean_unsupported(m, bridge_subject.hook_name) is None          # Llama: the lean forward runs from the bridge's weights


def test_logits_match_transformers(subj, heldout_texts, hf_model):
    worst, n_tok = 0.0, 0
    for ids in _tokens(subj, heldout_texts):
        t = torch.tensor([ids])
        with torch.no_grad():
            worst = max(worst, (subj.model(t) - hf_model(t).logits).abs().max().item())
        n_tok += len(ids)
    assert n_tok > 400
    assert worst <= 1e-4, worst


def test_sae_activations_match_sae_encode_on_transformers_hidden_states(subj, heldout_texts, hf_model):
    """Latents read through the backend (stop-at-layer hook activation → reverie's column read)
    equal sae-lens's ``SAE.encode`` of transformers' own residual stream (hidden_states[L] is
    the residual entering block L)."""
    assert subj.hook_name == f"blocks.{subj.layer}.hook_resid_pre"
    for ids in _tokens(subj, heldout_texts, n=4):
        t = torch.tensor([ids])
        x = hook_activations(subj, t)
        with torch.no_grad():
            ref_x = hf_model(t, output_hidden_states=True).hidden_states[subj.layer]
            ref = subj.sae.encode(ref_x)
        assert (x - ref_x).abs().max().item() <= 1e-4
        assert (latent_activations(subj.sae, x).post - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("template", [dict(), dict(prefix="Once upon a time", suffix=" and then")])
def test_kv_cached_children_equal_uncached(subj, lean, template):
    """Children evaluated from the parents' cached keys/values (lean forward, or the backend's own
    cache: transformer_lens's for hooked, HF's DynamicCache for the bridge) equal a full forward."""
    ev = PromptEvaluator(subj, Objective(sae=subj.sae, latents=[LATENT]), EPOConfig(**SMALL, lean_forward=lean, **template))
    assert (ev.lean is not None) == lean and ev.prefix_cache
    g = torch.Generator().manual_seed(0)
    pop = ev.random_prompts(4, g)
    grad, pout, state = ev.gradients(pop, torch.ones(4))
    assert state.kv is not None
    kids = propose_children(pop, topk_candidates(grad, ev.allowed, 64), state.logprobs, ev.allowed,
                            EPOConfig(**{**SMALL, "children": 32}), g, torch.Generator().manual_seed(1))
    cached = ev.evaluate_children(kids.tokens, kids.slot, kids.first, state)
    plain = ev.evaluate(kids.tokens)
    ev.prefix_cache = False                                             # from position 0, BOS recomputed
    from_zero = ev.evaluate(kids.tokens)
    for f in ("act", "ce", "values", "ce_terms"):
        assert (getattr(cached, f) - getattr(from_zero, f)).abs().max() <= 1e-4, f
        assert (getattr(plain, f) - getattr(from_zero, f)).abs().max() <= 1e-4, f


def test_evaluator_numbers_agree_across_backends(subject, bridge_subject):
    """f, CE and token gradients: bridge (lean or its own forward) vs hooked."""
    template = dict(prefix="Once upon a time", suffix=" and then")
    ref = PromptEvaluator(subject, Objective(sae=subject.sae, latents=[LATENT]), EPOConfig(lean_forward=False, **template))
    pop = ref.random_prompts(6, torch.Generator().manual_seed(4))
    lam = torch.linspace(0.1, 10, 6)
    g0, o0, _ = ref.gradients(pop, lam)
    for lean in (True, False):
        ev = PromptEvaluator(bridge_subject, Objective(sae=bridge_subject.sae, latents=[LATENT]), EPOConfig(lean_forward=lean, **template))
        g1, o1, _ = ev.gradients(pop, lam)
        for f in ("act", "ce", "values", "ce_terms"):
            assert (getattr(o1, f) - getattr(o0, f)).abs().max() <= 1e-4, (lean, f)
        assert (g1 - g0).abs().max() <= 1e-3 * g0.abs().max(), lean


@pytest.mark.parametrize("lean", [True, False])
def test_same_seed_same_frontier(subj, lean):
    obj = Objective(sae=subj.sae, latents=[LATENT])
    cfg = EPOConfig(**SMALL, lean_forward=lean)
    a, b = run_epo(subj, obj, cfg, seed=3), run_epo(subj, obj, cfg, seed=3)
    assert a.frontier and [(p.token_ids, p.activation, p.ce) for p in a.frontier] == [(p.token_ids, p.activation, p.ce) for p in b.frontier]


def test_broken_bridge_cache_is_detected_and_evaluation_runs_uncached(bridge_subject, monkeypatch):
    """Given only the HF model's own cache argument, the bridge's attention (transformer_lens 3.9 on
    transformers 5.x, whose Llama layers pass the cache on as ``cache``) ignores the cache: the
    once-per-model check sees it, warns, and the evaluator then runs every child from position 0
    with the same numbers. With ``layer_past`` (the default order of modes) the cache is used."""
    m = bridge_subject.model
    monkeypatch.setattr(BridgeTail, "KV_MODES", ("model",))
    monkeypatch.setattr(m, "_reverie_kv_mode", "unchecked", raising=False)
    cfg = EPOConfig(**SMALL, lean_forward=False, prefix="Once upon a time")
    with pytest.warns(UserWarning, match="key/value cache does not reproduce"):
        ev = PromptEvaluator(bridge_subject, Objective(sae=bridge_subject.sae, latents=[LATENT]), cfg)
    assert not ev.tail.caches and not ev.prefix_cache
    pop = ev.random_prompts(4, torch.Generator().manual_seed(0))
    grad, out, state = ev.gradients(pop, torch.ones(4))
    assert state.kv is None
    kids = propose_children(pop, topk_candidates(grad, ev.allowed, 64), state.logprobs, ev.allowed,
                            EPOConfig(**SMALL), torch.Generator().manual_seed(2), torch.Generator().manual_seed(1))
    res = ev.evaluate_children(kids.tokens, kids.slot, kids.first, state)
    monkeypatch.undo()
    m._reverie_kv_mode = "unchecked"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        good = PromptEvaluator(bridge_subject, Objective(sae=bridge_subject.sae, latents=[LATENT]), cfg)
    assert good.tail.kv_mode == "layer_past" and good.prefix_cache
    _, _, gstate = good.gradients(pop, torch.ones(4))
    cached = good.evaluate_children(kids.tokens, kids.slot, kids.first, gstate)
    for f in ("act", "ce", "values", "ce_terms"):
        assert (getattr(res, f) - getattr(cached, f)).abs().max() <= 1e-4, f


def test_backend_is_part_of_scan_key_and_dream_fingerprint(demo_cfg, subject, bridge_subject):
    from reverie.pipeline.reuse import dream_fingerprint
    from reverie.sae_targets.selection import Target
    from reverie.stages.scan.stage import scan_key

    bridge_cfg = type(demo_cfg).model_validate({**demo_cfg.to_toml_dict(), "model": {**demo_cfg.to_toml_dict()["model"], "backend": "bridge"}})
    t = Target(latents=[LATENT])
    assert scan_key(demo_cfg, subject, [LATENT]) != scan_key(bridge_cfg, bridge_subject, [LATENT])
    assert scan_key(demo_cfg, subject, [LATENT]) == scan_key(demo_cfg, subject, [LATENT])
    assert dream_fingerprint(demo_cfg, subject, t) != dream_fingerprint(bridge_cfg, bridge_subject, t)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="backend"):
        load_config(DEMO_CONFIG, {"model.backend": "native"})


@pytest.mark.parametrize("kind,mode", [("gpt2", "layer_past"), ("neox", "model"), ("gemma3", None)])
def test_bridge_on_other_architectures(kind, mode, shared, tmp_path):
    """Random-weight GPT-2, GPT-NeoX and Gemma-3 folders (tests/realshapes.py) on the bridge: logits
    equal transformers', the cache is handed over the way the check found (NeoX: the model's own
    argument; GPT-2: also as ``layer_past``; Gemma-3: none works, its sliding-window cache layers keep only the window, so EPO
    evaluates uncached) and cached children equal a full forward."""
    from transformers import AutoModelForCausalLM

    from reverie.pipeline.config import ModelConfig, SAEConfig
    from tests.realshapes import build_model, save_sae

    model_dir = build_model(tmp_path / f"tiny-{kind}", shared, kind)
    sae_dir = save_sae(tmp_path / "sae", 64, "blocks.1.hook_resid_pre", f"tiny-{kind}", d_sae=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = load_subject(ModelConfig(path=str(model_dir), tokenizer_no_prefix_space=False, backend="bridge"), SAEConfig(path=str(sae_dir)))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor([s.with_bos(s.encode("The quick brown fox jumps over the lazy dog, then it naps in the sun."))])
    with torch.no_grad():
        assert (s.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    cfg = EPOConfig(population=4, children=16, topk=32, lean_forward=True, prefix="Once upon", suffix=" end")
    if mode is None:
        with pytest.warns(UserWarning, match="key/value cache does not reproduce"):
            ev = PromptEvaluator(s, Objective(sae=s.sae, latents=[3]), cfg)
    else:
        ev = PromptEvaluator(s, Objective(sae=s.sae, latents=[3]), cfg)
    assert ev.lean is None and ev.tail.kv_mode == mode and ev.prefix_cache == (mode is not None)
    g = torch.Generator().manual_seed(0)
    pop = ev.random_prompts(4, g)
    grad, _, state = ev.gradients(pop, torch.ones(4))
    kids = propose_children(pop, topk_candidates(grad, ev.allowed, 32), state.logprobs, ev.allowed, cfg, g, torch.Generator().manual_seed(1))
    cached = ev.evaluate_children(kids.tokens, kids.slot, kids.first, state)
    ev.prefix_cache = False
    plain = ev.evaluate(kids.tokens)
    for f in ("act", "ce", "values", "ce_terms"):
        assert (getattr(cached, f) - getattr(plain, f)).abs().max() <= 1e-4, f


def test_logit_lens_agrees_across_backends(subject, bridge_subject):
    """The logit lens reads ``W_U`` and ``ln_final.w`` from either model: same logits."""
    from reverie.stages.features import lens_logits

    (a, note_a), (b, note_b) = lens_logits(subject, [LATENT, 1300]), lens_logits(bridge_subject, [LATENT, 1300])
    assert note_a == note_b and a.shape == b.shape == (2, subject.vocab_size)
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kwargs", [{"center_writing_weights": False, "fold_ln": False},
                                    {"center_writing_weights": True, "fold_ln": True}])
def test_bridge_processes_weights_as_sae_lens_does(gpt2_dir, tmp_path, local_names, kwargs):
    """The SAE's ``model_from_pretrained_kwargs`` (centring changes a LayerNorm model's residuals)
    reach the bridge's compatibility mode: its latents equal sae-lens's own path
    (``HookedSAETransformer.from_pretrained_no_processing(**kwargs)`` + ``run_with_cache_with_saes``)."""
    from reverie.pipeline.config import ModelConfig, SAEConfig
    from tests.realshapes import save_sae
    from tests.test_real_saes import HOOK as GPT2_HOOK, _reverie_acts, _sae_lens_acts, _tokens as gpt2_tokens

    sae_dir = save_sae(tmp_path / "sae", 64, GPT2_HOOK, "tiny-gpt2", model_kwargs=kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = load_subject(ModelConfig(path=str(gpt2_dir), tokenizer_no_prefix_space=False, backend="bridge"), SAEConfig(path=str(sae_dir)))
    assert s.backend == "bridge" and s.model._reverie_processing["center_writing_weights"] == kwargs["center_writing_weights"]
    toks = gpt2_tokens(s)
    ours = _reverie_acts(s, toks)
    ref = _sae_lens_acts(gpt2_dir, s.sae, toks, s.tokenizer)
    assert float(ref.abs().max()) > 0.1 and int((ref > 0).sum()) > 20
    assert (ours - ref).abs().max().item() <= 1e-5


def test_bridge_hub_name_offline_fails_fast():
    """A hub name on the bridge backend goes through the same hub check as the hooked one."""
    import time

    from reverie.pipeline.errors import OfflineError
    from reverie.sae_targets.loading import load_model

    cfg = load_config(DEMO_CONFIG, {"model.path": "", "model.name": "gpt2", "model.backend": "bridge"})
    t = time.time()
    with pytest.raises(OfflineError) as e:
        load_model(cfg.model)
    assert time.time() - t < 20 and "model.path" in str(e.value)


def test_bridge_load_failure_names_the_fix(monkeypatch):
    """When transformer_lens cannot wrap the model (here: boot_transformers raising, as it does for an
    architecture without an adapter), the LoadError names the folder and model.backend = "hooked"."""
    from transformer_lens.model_bridge import TransformerBridge

    from reverie.pipeline.errors import LoadError
    from reverie.sae_targets.loading import load_model

    def refuse(*a, **k):
        raise ValueError("Unsupported architecture: NoSuchArchForCausalLM")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    cfg = load_config(DEMO_CONFIG, {"model.backend": "bridge"})
    with pytest.raises(LoadError, match='TransformerBridge from .*tinystories-656k.*Unsupported architecture.*model.backend = "hooked"'):
        load_model(cfg.model)
