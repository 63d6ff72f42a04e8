"""Output formatting of the ``reverie`` command line (:mod:`pipeline.cli`): the dream frontier
table (:func:`dream_table`), numbers to significant digits (:func:`sig`) and perplexities (:func:`ppl`).
"""

from __future__ import annotations

import math
from typing import Any


def dream_table(result: Any, n_stored: int | None = None, sort: str = "ce", max_rows: int = 30, width: int = 64) -> str:
    """A merged dream frontier as a text table: CE (nats/token) with its perplexity, activation,
    λ, iteration, seed, and the prompt's text in the display convention of
    :func:`sae_targets.tokens.display_text`.

    Args:
        result: a ``DreamResult``, normally :func:`stages.dream.merge_results` of a target's seeds.
        n_stored: frontier prompts stored over all seeds (``dream_prompts`` rows); shown next to
            the merged count when it differs.
        sort: 'ce' (ascending: most fluent first) or 'activation' (descending).
        max_rows: rows printed (the rest are counted).
        width: characters of text; a longer prompt loses its START ('…' + end), never its last
            token, where the objective is read.
    Returns:
        The table (numbers to 3 significant digits).
    """
    from reverie.sae_targets.tokens import display_text, truncate_start

    key = (lambda p: (p.ce, -p.activation)) if sort == "ce" else (lambda p: (-p.activation, p.ce))
    prompts = sorted(result.frontier, key=key)
    n = len(prompts)
    stored = f"; {n_stored} stored over {len(result.seeds)} seeds" if n_stored is not None and n_stored != n else ""
    order = "lowest CE first" if sort == "ce" else "highest activation first"
    lines = [f"target {result.target_id}: {result.objective}",
             f"  {n} prompts on the merged Pareto frontier over seeds {result.seeds}{stored}; {result.n_candidates:,} candidates, "
             f"{result.wall_s:.1f} s; {order}",
             f"{'#':>3} {'CE':>6} {'(ppl)':>9} {'activation':>10} {'λ':>6} {'iter':>5} {'seed':>4}  text (start cut if long; the objective reads the last token)"]
    for i, p in enumerate(prompts[:max_rows]):
        text = truncate_start(display_text(p.text), width)
        lam = sig(p.lam) if p.lam is not None else "-"
        lines.append(f"{i:>3} {sig(p.ce):>6} {ppl(p.ce):>9} {sig(p.activation):>10} {lam:>6} {p.iteration:>5} {p.seed:>4}  {text}")
    if n > max_rows:
        lines.append(f"    … {n - max_rows} more (--rows)")
    return "\n".join(lines)


def sig(v: float | None, digits: int = 3) -> str:
    """A number to ``digits`` significant digits ('—' for None / NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}g}"


def ppl(ce: float | None) -> str:
    """Perplexity exp(ce) of a CE in nats/token, 3 significant digits ('—' for None)."""
    if ce is None or (isinstance(ce, float) and math.isnan(ce)):
        return "—"
    return sig(math.exp(min(float(ce), 700.0)))
