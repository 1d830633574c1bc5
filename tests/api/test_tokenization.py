"""azu.tokenization: same ids as transformers, chat template, streaming detokenization, no torch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from azu.tokenization import ModelTokenizer, decode_final, load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from azu.cli.demo import save_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64, "eos_token_id": 2}))
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir) -> ModelTokenizer:
    return load_tokenizer(tok_dir)


TEXTS = ["hello", "héllo wörld ✓ 日本語 🙂", "<|user|>x", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, tok_dir, text):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert tok.encode(text) == hf.encode(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(tok, tok_dir):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    assert tok.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                tokenize=False)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert tok.encode_chat(messages) == list(expected)
    assert tok.eos_token_ids == [2]
    assert tok.context_length == 64


def test_stream_decoder_never_splits_a_character(tok):
    text = "aé✓🙂 日本"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids] + [dec.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stream_decoder_random_ids_join_to_full_decode(tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        dec = tok.stream_decoder()
        out = "".join(dec.push(i) for i in ids) + dec.finish()
        assert out == tok.decode(ids)


def test_stream_decoder_cuts_at_stop_string_and_holds_back_prefixes(tok):
    ids = tok.encode("abc STOP def", add_special_tokens=False)
    dec = tok.stream_decoder(stop=["STOP"])
    seen = ""
    for i in ids:
        seen += dec.push(i)
        assert "S" not in seen  # the beginning of a possible stop string is never shown early
    seen += dec.finish()
    assert seen == "abc "
    assert dec.stopped
    assert decode_final(tok, ids, stop=["STOP"]) == "abc "
    # a held-back prefix that turns out not to be a stop string is released at the end
    ids2 = tok.encode("abc ST", add_special_tokens=False)
    dec2 = tok.stream_decoder(stop=["STOP"])
    assert "".join(dec2.push(i) for i in ids2) == "abc "
    assert dec2.finish() == "ST"


def test_template_errors_are_bad_requests(tok):
    from azu.errors import InvalidRequest

    bad = ModelTokenizer(tokenizer=tok.tokenizer,
                         chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        bad.render_chat([{"role": "user", "content": "x"}])
    none = ModelTokenizer(tokenizer=tok.tokenizer)
    with pytest.raises(InvalidRequest, match="no chat template"):
        none.render_chat([{"role": "user", "content": "x"}])


def test_tokenization_does_not_import_torch(tok_dir):
    code = (
        "import sys\n"
        "from azu.tokenization import load_tokenizer\n"
        f"t = load_tokenizer({str(tok_dir)!r})\n"
        "ids = t.encode_chat([{'role': 'user', 'content': 'hi'}])\n"
        "d = t.stream_decoder(); d.push(ids); d.finish()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
