"""A second real architecture, offline (issue 14): random-weight Gemma-3 and GPT-NeoX (Pythia)
models with their real architecture configs (tests/realshapes.py), each with a random sae-lens SAE
at a residual hook, through targets → scan → dream (few tokens, few iterations).

Gemma-3 loads from a local folder although transformer_lens 3.x converts it only by hub name
(sae_targets.model_setup._gemma3_cfg); NeoX has d_vocab 50,304 > the tokenizer's 50,277 ids, and no
dream may hold a padding id. Gemma-3 runs EPO on transformer_lens's forward (the lean forward does
not cover local attention); NeoX runs on the lean forward (parallel attention + MLP), which gives
transformer_lens's numbers.
"""

from __future__ import annotations

import pytest
import torch

from reverie.pipeline.config import ModelConfig, SAEConfig
from reverie.pipeline.store import Store
from reverie.sae_targets.loading import load_subject
from tests.realshapes import build_model, save_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.1.hook_resid_pre"
LATENTS = [3, 17]


@pytest.fixture(scope="module", params=["gemma3", "neox"])
def arch(request, tmp_path_factory, shared):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = build_model(root / f"tiny-{request.param}", shared, request.param)
    sae_dir = save_sae(root / "sae", 64, HOOK, f"tiny-{request.param}", d_sae=48)
    subject = load_subject(ModelConfig(path=str(model_dir), tokenizer_no_prefix_space=False), SAEConfig(path=str(sae_dir)))
    return request.param, model_dir, sae_dir, subject


def _cfg(demo_cfg, model_dir, sae_dir, tmp_path):
    data = demo_cfg.to_toml_dict()
    data["project"]["dir"] = str(tmp_path / "project")
    data["model"].update(path=str(model_dir), tokenizer_no_prefix_space=False)
    data["sae"].update(path=str(sae_dir))
    data["targets"].update(latents=LATENTS, combinations=[], density_scan_tokens=1000)
    data["scan"].update(max_tokens=1500, batch_size=4, top_k=6, window_search_top=6, window_ce_samples=32,
                        baseline_prompts=32, random_prompt_examples=2, checkpoint_every=50)
    data["dream"].update(population=4, children=8, topk=32, iterations=3, restart_every=3, history_every=1,
                         attribution_prompts=0)
    return type(demo_cfg).model_validate(data)


def test_logits_match_transformers(arch):
    """The transformer_lens model built from the local folder computes what transformers computes."""
    from transformers import AutoModelForCausalLM

    kind, model_dir, _, subject = arch
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = torch.tensor([subject.with_bos(subject.encode("The quick brown fox jumps over the lazy dog, then it naps in the sun."))])
    assert ids.shape[1] > 12     # past Gemma-3's sliding window (8): local and global layers differ
    with torch.no_grad():
        diff = (subject.model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, (kind, diff)


def test_lean_forward_covers_neox_and_falls_back_for_gemma3(arch):
    from reverie.stages.dream.lean import LeanForward, unsupported

    kind, _, _, subject = arch
    why = unsupported(subject.model, subject.hook_name)
    if kind == "gemma3":
        assert why is not None and "local attention" in why
        return
    assert why is None
    ids = torch.tensor([subject.with_bos(subject.encode("The quick brown fox jumps over the lazy dog."))])
    store = {}
    with torch.no_grad():
        subject.model.run_with_hooks(ids, fwd_hooks=[(subject.hook_name, lambda x, hook: store.__setitem__("a", x))])
        a, _, _ = LeanForward(subject.model, subject.hook_name).run(ids, 0, None)
    assert (a - store["a"]).abs().max().item() <= 1e-4 * max(1.0, store["a"].abs().max().item())


def test_targets_scan_dream(arch, demo_cfg, tmp_path):
    from reverie.pipeline.orchestrate import record_targets
    from reverie.sae_targets.selection import select_targets
    from reverie.stages.dream import dream_target, write_dream
    from reverie.stages.scan import run_scan

    kind, model_dir, sae_dir, subject = arch
    cfg = _cfg(demo_cfg, model_dir, sae_dir, tmp_path)
    targets, source = select_targets(subject, cfg.targets, cfg.scan.corpus)
    assert [t.latents for t in targets] == [[3], [17]]
    run_id = record_targets(cfg, subject, targets, source, run_id=f"{kind}-run", kind="dream")
    with Store(cfg.project.path) as store:
        sae_row = store.fetch_one("SELECT * FROM run_saes WHERE run_id = ?", [run_id])
        assert (sae_row["d_in"], sae_row["d_sae"], sae_row["hook_name"]) == (64, 48, HOOK)
        scan_id = run_scan(cfg, subject, store, targets, progress=False)
        scan = store.fetch_one("SELECT status, tokens_seen FROM scans WHERE scan_id = ?", [scan_id])
        assert scan["status"] == "done" and scan["tokens_seen"] >= 1500
        n_examples = store.fetch_one("SELECT count(*) AS n FROM scan_examples WHERE scan_id = ?", [scan_id])["n"]
        assert n_examples > 0
        result = dream_target(cfg, subject, targets[0], seed=0)
        assert result.frontier
        n_tok = len(subject.tokenizer)
        special = subject.special_ids()
        for p in result.frontier:
            assert all(0 <= i < n_tok and i not in special for i in p.token_ids)   # never a padding id (NeoX: 50,277..50,303)
            assert torch.isfinite(torch.tensor([p.activation, p.ce])).all()
        write_dream(store, run_id, targets[0], result)
        assert store.fetch_one("SELECT count(*) AS n FROM dream_prompts WHERE dream_id LIKE ?", [f"{run_id}/%"])["n"] == len(result.frontier)


def test_random_baseline_prompts_never_hold_padding_ids(arch):
    """The random-prompt baseline draws the same ids dreams may hold: no never-trained padding id
    (NeoX: d_vocab 50,304 > the tokenizer's ids) and no special token."""
    from reverie.sae_targets.baseline import random_prompts

    _, _, _, subject = arch
    ids = random_prompts(subject, 512, 12, seed=0)
    assert not (set(ids.flatten().tolist()) & subject.unusable_ids())
    assert int(ids.max()) < len(subject.tokenizer)
