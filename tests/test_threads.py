"""run.torch_threads is applied by every command before the first tensor op (issue 10 item 1)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from reverie.pipeline.cli import app
from reverie.pipeline.errors import ReverieError
from tests.conftest import DEMO_CONFIG


@pytest.fixture()
def threads_restored():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("command", [["dream", "--latent", "5"], ["scan"], ["targets"], ["nightly", "--run-id", "t"]])
def test_commands_apply_torch_threads_before_loading(command, tmp_path, monkeypatch, threads_restored):
    """Inside `reverie dream` / `scan` / `targets` / `nightly` the model loads (the first tensor
    work) on run.torch_threads threads, whatever the process had before."""
    import reverie.sae_targets.loading as loading

    seen = []

    def fake_load(model_cfg, sae_cfg):
        seen.append(torch.get_num_threads())
        raise ReverieError("stop here: the thread count was observed")

    monkeypatch.setattr(loading, "load_subject", fake_load)
    for want in (1, 2):
        torch.set_num_threads(3 - want)
        r = CliRunner().invoke(app, [*command, "--config", str(DEMO_CONFIG), "--project-dir", str(tmp_path / "p"),
                                     "--set", f"run.torch_threads={want}"])
        assert r.exit_code == 2 and "stop here" in r.output, r.output
        assert seen[-1] == want


def test_apply_torch_threads_tolerates_a_second_call(threads_restored):
    from types import SimpleNamespace

    from reverie.pipeline.runtime import apply_torch_threads

    assert apply_torch_threads(SimpleNamespace(torch_threads=1)) == 1
    assert apply_torch_threads(SimpleNamespace(torch_threads=2)) == 2   # inter-op may already be fixed: no error
    before = torch.get_num_threads()
    assert apply_torch_threads(SimpleNamespace(torch_threads=None)) == before
