"""Scan throughput vs. a bare forward pass to the hook layer, and peak memory vs. corpus length.

For the demo model (TinyStories-656K + JumpReLU SAE, TinyStories corpus) and a GPT-2-small-shaped
HookedTransformer with random weights (real GPT-2 tokenizer, random sae-lens StandardSAE at
blocks.6.hook_resid_pre, C4 corpus):

* scan tokens/s: ``stages.scan.scan_pass`` (tokenization, model to the hook layer, latent
  activations of the targets, streaming top-k / histograms / samples);
* bare tokens/s: ``model(tokens, stop_at_layer=subject.stop_at_layer)`` on the very same padded batches,
  pre-tokenized (the limit the scan can reach);
* memory of the scan pass for two corpus lengths 10× apart, each in a fresh process: the
  process's peak RSS, its RSS at the end of the pass, and the size of the streaming state
  (the pickled checkpoint: top-k heaps, histograms, samples).

Run: ``.venv/bin/python benchmarks/scan_throughput.py [--demo-tokens N] [--gpt2-tokens N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from reverie.pipeline.config import ReverieConfig, load_config  # noqa: E402
from reverie.pipeline.corpus import iter_documents  # noqa: E402
from reverie.sae_targets.contexts import iter_contexts, pad_batch  # noqa: E402
from reverie.sae_targets.loading import Subject, load_subject  # noqa: E402
from reverie.stages.scan.stage import context_size, scan_pass  # noqa: E402

DEMO_LATENTS = [5, 9, 100, 212, 333, 777, 1024, 1500]


def demo_setup(max_tokens: int, batch_size: int) -> tuple[ReverieConfig, Subject, list[int]]:
    cfg = load_config(REPO / "configs" / "demo.toml", {"scan.max_tokens": max_tokens, "scan.batch_size": batch_size})
    return cfg, load_subject(cfg.model, cfg.sae), DEMO_LATENTS


def gpt2_setup(max_tokens: int, batch_size: int) -> tuple[ReverieConfig, Subject, list[int]]:
    """GPT-2-small shape (12 layers, d_model 768, vocab 50257), random weights; random StandardSAE (24,576 latents)."""
    from benchmarks.shapes import gpt2_shaped_subject

    subject = gpt2_shaped_subject(d_sae=24576)
    cfg = load_config(REPO / "configs" / "demo.toml", {"scan.max_tokens": max_tokens, "scan.batch_size": batch_size,
                                                        "scan.corpus.path": "{shared}/corpora/c4-validation-2k.parquet"})
    return cfg, subject, [3, 141, 592, 6535, 8979, 12000, 20000, 24000]


def same_batches(cfg: ReverieConfig, subject: Subject) -> tuple[list[torch.Tensor], int]:
    """The scan's padded batches (pre-tokenized) and their corpus-token count."""
    body0 = subject.n_bos
    pad = subject.tokenizer.pad_token_id or 0
    batches, seen, cur = [], 0, []
    for c in iter_contexts(subject, iter_documents(cfg.scan.corpus), context_size(cfg, subject)):
        cur.append(c)
        seen += len(c.ids) - body0
        if len(cur) >= cfg.scan.batch_size or seen >= cfg.scan.max_tokens:
            batches.append(pad_batch(cur, pad)[0])
            cur = []
        if seen >= cfg.scan.max_tokens:
            break
    if cur:
        batches.append(pad_batch(cur, pad)[0])
    return batches, seen


def bare_forward(subject: Subject, batches: list[torch.Tensor]) -> float:
    """Seconds for ``model(tokens, stop_at_layer=subject.stop_at_layer)`` over all batches."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            subject.model(b.to(subject.device), stop_at_layer=subject.stop_at_layer)
    return time.perf_counter() - t0


def throughput(name: str, setup, max_tokens: int, batch_size: int, repeats: int) -> dict:
    cfg, subject, latents = setup(max_tokens, batch_size)
    batches, n_tok = same_batches(cfg, subject)
    bare_forward(subject, batches[:1])  # warm-up
    scan_s, bare_s = [], []
    for _ in range(repeats):  # interleaved, best of each: the machine is shared
        t0 = time.perf_counter()
        st = scan_pass(cfg, subject, latents, progress=False)
        scan_s.append(time.perf_counter() - t0)
        bare_s.append(bare_forward(subject, batches))
    assert st.tokens_seen == n_tok, (st.tokens_seen, n_tok)
    out = {"model": name, "tokens": n_tok, "batches": len(batches), "batch_size": batch_size, "latents": len(latents),
           "scan_tok_s": n_tok / min(scan_s), "bare_tok_s": n_tok / min(bare_s)}
    out["ratio"] = out["scan_tok_s"] / out["bare_tok_s"]
    return out


def memory_child(name: str, max_tokens: int, batch_size: int) -> None:
    setup = demo_setup if name == "demo" else gpt2_setup
    cfg, subject, latents = setup(max_tokens, batch_size)
    rss = []

    def sample(state) -> None:  # current resident set size, read every few batches
        rss.append(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)

    cfg.scan.checkpoint_every = 5
    st = scan_pass(cfg, subject, latents, on_checkpoint=sample, progress=False)
    sample(st)
    print(json.dumps({"tokens": st.tokens_seen, "state_mib": len(pickle.dumps(st)) / 2**20, "rss_last_mib": rss[-1],
                      "max_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(name: str, tokens: int, batch_size: int) -> list[dict]:
    rows = []
    for n in (tokens, tokens * 10):
        out = subprocess.run([sys.executable, __file__, "--_memory", name, str(n), str(batch_size)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-tokens", type=int, default=100_000)
    ap.add_argument("--gpt2-tokens", type=int, default=8_192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory-tokens", type=int, default=30_000, help="demo memory: this and 10× this corpus tokens")
    ap.add_argument("--gpt2-memory-tokens", type=int, default=1_000)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._memory:
        memory_child(a._memory[0], int(a._memory[1]), int(a._memory[2]))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    print(f"torch threads {torch.get_num_threads()}, device cpu")
    runs = [("demo (TinyStories-656K, 2 layers)", demo_setup, a.demo_tokens)]
    if not a.skip_gpt2:
        runs.append(("GPT-2-small shape, random weights", gpt2_setup, a.gpt2_tokens))
    print(f"{'model':<36} {'tokens':>8} {'scan tok/s':>11} {'bare fwd tok/s':>15} {'ratio':>6}")
    for name, setup, n in runs:
        r = throughput(name, setup, n, a.batch_size, a.repeats)
        print(f"{name:<36} {r['tokens']:>8} {r['scan_tok_s']:>11,.0f} {r['bare_tok_s']:>15,.0f} {r['ratio']:>6.2f}", flush=True)
    print("\nmemory of the scan pass (fresh process each)")
    print(f"{'model':<8} {'tokens':>9} {'state MiB':>10} {'RSS at end MiB':>15} {'peak RSS MiB':>13}")
    mem = [("demo", a.memory_tokens)] + ([] if a.skip_gpt2 else [("gpt2", a.gpt2_memory_tokens)])
    for name, n in mem:
        for r in memory(name, n, a.batch_size):
            print(f"{name:<8} {r['tokens']:>9} {r['state_mib']:>10.2f} {r['rss_last_mib']:>15.0f} {r['max_rss_mib']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
