"""pipeline.hub.hub_errors: the one place a failed hub download becomes reverie's error (model,
registry SAE and hub corpus all go through it)."""

from __future__ import annotations

import pytest

from reverie.pipeline import hub
from reverie.pipeline.errors import ConfigError, LoadError, OfflineError


def test_offline_failure_names_the_fix(monkeypatch):
    monkeypatch.setattr(hub, "hub_offline", lambda datasets=False: True)
    with pytest.raises(OfflineError, match=r"model 'gpt2' is not available offline .*OSError\)\. Set model\.path") as e:
        with hub.hub_errors("model 'gpt2'", "Set model.path."):
            raise OSError("not in cache")
    assert e.value.__suppress_context__   # raised from None: no library traceback


def test_online_failure_names_what_and_the_cause(monkeypatch):
    seen = []
    monkeypatch.setattr(hub, "hub_offline", lambda datasets=False: seen.append(datasets) or False)
    with pytest.raises(LoadError, match=r"^cannot load dataset 'x/y' from the hub: KeyError: 'train'$") as e:
        with hub.hub_errors("dataset 'x/y'", "fix", datasets=True):
            raise KeyError("train")
    assert not isinstance(e.value, OfflineError) and seen == [True]


def test_reverie_errors_and_success_pass_through(monkeypatch):
    monkeypatch.setattr(hub, "hub_offline", lambda datasets=False: pytest.fail("asked for a ReverieError"))
    with pytest.raises(ConfigError, match="^bad setting$"):
        with hub.hub_errors("model 'gpt2'", "fix"):
            raise ConfigError("bad setting")
    with hub.hub_errors("model 'gpt2'", "fix"):
        x = 1
    assert x == 1


def test_corpus_and_sae_loaders_use_it(monkeypatch):
    """A hub corpus and a registry SAE that fail to load (hub reachable) both say 'cannot load ... from the hub'."""
    import datasets
    import sae_lens

    from reverie.pipeline import corpus
    from reverie.pipeline.config import CorpusConfig, SAEConfig
    from reverie.sae_targets import loading

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(hub, "hub_offline", lambda datasets=False: False)
    monkeypatch.setattr(corpus, "check_hub_reachable", lambda *a, **k: None)
    monkeypatch.setattr(loading, "check_hub_reachable", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(LoadError, match=r"cannot load dataset 'someone/corpus' from the hub: RuntimeError: boom"):
        list(corpus.iter_documents(CorpusConfig(path=None, hf_dataset="someone/corpus")))
    monkeypatch.setattr(sae_lens.SAE, "from_pretrained_with_cfg_and_sparsity", staticmethod(boom))
    with pytest.raises(LoadError, match=r"cannot load SAE gpt2-small-res-jb/blocks\.6\.hook_resid_pre from the hub: RuntimeError: boom"):
        loading.load_sae(SAEConfig(path=None, release="gpt2-small-res-jb", sae_id="blocks.6.hook_resid_pre"), "cpu")
