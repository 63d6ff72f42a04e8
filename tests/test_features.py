"""Feature facts (issue 12): the logit lens against W_dec @ W_U read straight from the weight files,
decoder-cosine neighbours, and the scan's co-occurrence counts and hard negatives against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from reverie.pipeline.corpus import iter_documents
from reverie.pipeline.store import Store
from reverie.sae_targets.activations import latent_activations
from reverie.sae_targets.contexts import hook_activations, iter_contexts
from reverie.stages.features import decoder_neighbours, ensure_features, logit_lens_rows
from reverie.stages.scan.rows import finish_scan
from reverie.stages.scan.stage import scan_pass

LATENTS = [5, 9, 100]


def _small(cfg, **kw):
    base = {"scan.max_tokens": 5000, "scan.batch_size": 4, "scan.top_k": 8, "scan.window_search_top": 2, "scan.window_ce_samples": 32,
            "scan.baseline_prompts": 32, "scan.random_prompt_examples": 2, "scan.cooccurrence_window": 16, "scan.hard_negative_samples": 30}
    base.update(kw)
    data = cfg.to_toml_dict()
    data["targets"]["combinations"] = []
    for k, v in base.items():
        sec, key = k.split(".")
        data[sec][key] = v
    return type(cfg).model_validate(data)


def test_logit_lens_matches_weight_files(subject, shared, one_torch_thread):
    """Values checked against (W_dec[i] * final RMSNorm weight) @ lm_head.weightᵀ read from the
    safetensors files themselves (not through transformer_lens or sae-lens)."""
    model_dir = shared / "models" / "tinystories-656k"
    sae_dir = shared / "saes" / "tinystories-656k-res" / "jumprelu-2048"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        W_U = f.get_tensor("lm_head.weight").double()  # [d_vocab, d_model] (tied embeddings: only lm_head is stored)
        norm = f.get_tensor("model.norm.weight").double()
    with safe_open(str(sae_dir / "sae_weights.safetensors"), "pt") as f:
        W_dec = f.get_tensor("W_dec").double()  # [d_sae, d_in]
    expected = (W_dec[LATENTS] * norm) @ W_U.T  # [L, d_vocab]

    rows = logit_lens_rows(subject, LATENTS)
    assert [r["latent"] for r in rows] == LATENTS
    for r, exp in zip(rows, expected.numpy()):
        assert "ln_final.w" in r["norm_scale"] and r["d_vocab"] == exp.size
        top = np.argsort(-exp)[:10]
        bottom = np.argsort(exp)[:10]
        assert r["top_ids"] == [int(i) for i in top] and r["bottom_ids"] == [int(i) for i in bottom]
        np.testing.assert_allclose(r["top_logits"], exp[top], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["bottom_logits"], exp[bottom], rtol=1e-4, atol=1e-5)
        assert r["top_tokens"] == subject.decode_tokens([int(i) for i in top])
        assert sum(r["hist_counts"]) == exp.size and len(r["hist_edges"]) == len(r["hist_counts"]) + 1
        assert r["hist_edges"][0] == pytest.approx(exp.min(), abs=1e-4) and r["hist_edges"][-1] == pytest.approx(exp.max(), abs=1e-4)
        assert r["mean"] == pytest.approx(exp.mean(), abs=1e-5)
        # the plain product without the norm's scale gives different tokens' logits: the scale was applied
        assert not np.allclose((W_dec[r["latent"]] @ W_U.T).numpy()[top], exp[top])


def test_decoder_neighbours_and_store(subject, tmp_path, one_torch_thread):
    ids, cos = decoder_neighbours(subject.sae, LATENTS, 5)
    W = subject.sae.W_dec.detach().double()
    W = W / W.norm(dim=-1, keepdim=True)
    for j, lat in enumerate(LATENTS):
        sims = (W @ W[lat]).numpy()
        sims[lat] = -np.inf
        assert list(ids[j]) == list(np.argsort(-sims, kind="stable")[:5])
        np.testing.assert_allclose(cos[j], sims[ids[j]], atol=1e-5)
    with Store(tmp_path / "p") as store:
        assert ensure_features(subject, store, LATENTS) == 3
        assert ensure_features(subject, store, LATENTS) == 0  # computed once per (SAE, latent)
        assert store.fetch_one("SELECT count(*) AS n FROM logit_lens")["n"] == 3
        rows = store.fetch("SELECT * FROM latent_neighbours WHERE kind = 'decoder_cosine' AND latent = 5 ORDER BY rank")
        assert [r["neighbour"] for r in rows] == list(ids[0])


def test_scan_cooccurrence_and_hard_negatives_against_brute_force(demo_cfg, subject, one_torch_thread):
    cfg = _small(demo_cfg)
    state = scan_pass(cfg, subject, LATENTS, progress=False)
    res = finish_scan(cfg, subject, "scan-test", state)

    # brute force: every context alone, every latent's firing, 16-token windows
    contexts, seen = [], 0
    for c in iter_contexts(subject, iter_documents(cfg.scan.corpus), subject.context_size):
        contexts.append(c)
        seen += len(c.ids) - 1
        if seen >= cfg.scan.max_tokens:
            break
    assert len(contexts) == state.n_contexts
    wins, ctx_fires = [], []
    for c in contexts:
        with torch.no_grad():
            post = latent_activations(subject.sae, hook_activations(subject, torch.tensor([c.ids]))[0], None).post
        fires = (post > 0).numpy()
        fires[0] = False  # BOS
        ctx_fires.append(fires.any(0))
        wins += [fires[s: s + 16].any(0) for s in range(0, len(c.ids), 16)]
    wins = np.array(wins)
    assert state.n_cooc_windows == len(wins)
    np.testing.assert_array_equal(state.win_fires, wins.sum(0))
    for j, lat in enumerate(LATENTS):
        both = (wins[:, [lat]] & wins).sum(0)
        np.testing.assert_array_equal(state.cooc[j], both)
        union = wins[:, lat].sum() + wins.sum(0) - both
        jac = np.where(union > 0, both / np.maximum(union, 1), 0.0)
        jac[lat] = -1
        got = [r for r in res.neighbour_rows if r["latent"] == lat]
        assert got, f"latent {lat} has co-occurrence neighbours"
        assert got[0]["value"] == pytest.approx(jac.max())
        for r in got:
            assert r["value"] == pytest.approx(jac[r["neighbour"]])

    # hard negatives: the stored neighbour fires in the context, the latent nowhere
    hard = [r for r in res.example_rows if r["kind"] == "hard_negative"]
    assert hard and all(r["neighbour"] is not None for r in hard)
    for r in hard:
        j = LATENTS.index(r["latent"])
        assert r["neighbour"] in state.hn_ids[j]
        fires = ctx_fires[r["context_idx"]]
        assert fires[r["neighbour"]] and not fires[r["latent"]], (r["context_idx"], r["neighbour"], r["neighbour_act"], bool(fires[r["neighbour"]]), bool(fires[r["latent"]]))
        assert r["neighbour_act"] > 0 and max(r["post_acts"]) == 0.0
