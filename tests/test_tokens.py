"""Readable token pieces (issue 11 item 3): one renderer, exact round trip on real tokenizers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from reverie.sae_targets.tokens import display_text, from_display, token_pieces, truncate_start, visible


@pytest.fixture(scope="module")
def demo_tok(shared: Path):
    """The demo tokenizer exactly as the project loads it (configs/demo.toml: no dummy prefix)."""
    from reverie.pipeline.config import load_config
    from reverie.sae_targets.loading import load_tokenizer
    from tests.conftest import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    return load_tokenizer(shared / "models" / "tinystories-656k", no_prefix_space=cfg.model.tokenizer_no_prefix_space)


@pytest.fixture(scope="module")
def gpt2_tok(shared: Path):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(shared / "tokenizers" / "gpt2"))


@pytest.fixture(scope="module")
def heldout_all(shared: Path) -> list[str]:
    import json

    lines = (shared / "corpora" / "tinystories-heldout.jsonl").read_text().splitlines()
    return [json.loads(l)["text"] for l in lines]


@pytest.fixture(scope="module")
def byte_fallback_tok():
    """A small SentencePiece-style BPE with byte-fallback tokens <0x00>..<0xFF> (Llama's scheme)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "c", "t", "h", "e", "▁the", "▁cat", "cat", "."]:
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("which", ["demo_tok", "gpt2_tok"])
def test_pieces_concatenate_to_the_decoded_text(which, request, heldout_all):
    """On every held-out story: one piece per id, and the pieces read back give tokenizer.decode(ids)."""
    tok = request.getfixturevalue(which)
    for text in heldout_all:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = token_pieces(tok, ids)
        assert len(pieces) == len(ids)
        assert from_display("".join(pieces)) == tok.decode(ids), text[:80]
        assert all("\n" not in p and "\t" not in p for p in pieces)  # one line per piece


def test_words_do_not_run_together(demo_tok, gpt2_tok):
    for tok in (demo_tok, gpt2_tok):
        text = "He found a stick and a gun and it all fell."
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = "".join(token_pieces(tok, ids))
        assert joined == text, (tok.convert_ids_to_tokens(ids), joined)
    # a token that starts with a space keeps it when shown alone (the decoder strips it from decode([id]))
    lead = [i for i in range(len(demo_tok)) if demo_tok.convert_ids_to_tokens(i).startswith("▁") and len(demo_tok.convert_ids_to_tokens(i)) > 1]
    assert lead and all(token_pieces(demo_tok, [i])[0].startswith(" ") for i in lead[:50])


def test_newlines_and_partial_characters_are_visible(demo_tok, gpt2_tok):
    ids = demo_tok("a\nb", add_special_tokens=False)["input_ids"]
    assert "\\n" in token_pieces(demo_tok, ids)
    ids = gpt2_tok("It’s 漢\n\\", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(gpt2_tok, ids)
    assert any("\\x" in p for p in pieces)          # '’' is split over two byte-level tokens
    assert "\\\\" in pieces and "\\n" in pieces
    assert from_display("".join(pieces)) == "It’s 漢\n\\" == gpt2_tok.decode(ids)
    assert token_pieces(gpt2_tok, [50256]) == ["<|endoftext|>"]
    assert token_pieces(demo_tok, [1, 0, 2]) == ["<|start_story|>", "<unk>", "<|end_story|>"]


def test_byte_fallback_tokens_are_escapes(byte_fallback_tok):
    tok = byte_fallback_tok
    text = "the cat\n漢."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert "\\n" in pieces                                  # <0x0A> is a whole character: a newline
    assert ["\\xe6", "\\xbc", "\\xa2"] == [p for p in pieces if p.startswith("\\x")]   # 漢 as three bytes
    assert from_display("".join(pieces)) == tok.decode(ids) == text


def test_subject_decode_tokens_uses_the_renderer(demo_tok):
    from reverie.sae_targets.loading import Subject

    ids = demo_tok("The stick and the ball.", add_special_tokens=False)["input_ids"]
    assert Subject.decode_tokens(SimpleNamespace(tokenizer=demo_tok), ids) == token_pieces(demo_tok, ids)


def test_display_convention_round_trips():
    for s in ["plain", "tab\there", "back\\slash \\n literal", "bell\x07 nbsp\xa0 e\u0301", "emoji 🙂", "\x85", "\r\n"]:
        shown = display_text(s)
        assert from_display(shown) == s
        assert "\n" not in shown and "\t" not in shown and "\x07" not in shown
    assert visible("a\nb") == "a\\nb" and visible("a\\nb") == "a\\nb"  # display pieces pass through
    assert truncate_start("0123456789", 5) == "…6789" and truncate_start("abc", 5) == "abc"


def test_explain_prompts_show_pieces_once_escaped(demo_tok):
    from reverie.stages.explain.inputs import Example
    from reverie.stages.explain.prompts import format_marked

    ids = demo_tok("the stick\nand", add_special_tokens=False)["input_ids"]
    pieces = tuple(token_pieces(demo_tok, ids))
    ex = Example(pieces, tuple(float(i) for i in range(len(ids))), "top", float(len(ids) - 1))
    lines = format_marked(ex, ex.max_act).splitlines()[1:-1]
    assert [l.rsplit("\t", 1)[0] for l in lines] == list(pieces)   # no double escaping
    assert ex.text == "the stick\nand"                               # the real text for detection prompts
