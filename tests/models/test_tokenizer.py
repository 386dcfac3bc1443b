"""Tokenizer, chat template and the incremental stream decoder on the real reference tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferos_cli.errors import ModelError
from inferos_cli.models.info import inspect_folder
from inferos_cli.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def oga_tok(oga_dir: Path) -> Tokenizer:
    return Tokenizer.from_model(inspect_folder(oga_dir.parent))


@pytest.fixture(scope="module")
def stories_tok(stories_src: Path) -> Tokenizer:
    return Tokenizer.from_file(stories_src / "tokenizer.json", bos_token_id=1, eos_token_ids=[2], add_bos=True)


def test_stories_encode_adds_bos_and_round_trips(stories_tok: Tokenizer) -> None:
    ids = stories_tok.encode("Once upon a time")
    assert ids[0] == 1
    assert stories_tok.decode(ids) == "Once upon a time"
    assert stories_tok.encode("Once upon a time", add_bos=False) == ids[1:]


def test_oga_has_no_bos_and_round_trips(oga_tok: Tokenizer) -> None:
    text = "Héllo wörld, 2+2=4 🙂"
    ids = oga_tok.encode(text)
    assert ids[0] != oga_tok.bos_token_id
    assert oga_tok.decode(ids) == text


@pytest.mark.parametrize("text", ["Héllo wörld 🙂 ok\nnew line", "日本語のテキスト and emoji 🎉🎉"])
def test_stream_decoder_equals_full_decode(oga_tok: Tokenizer, text: str) -> None:
    ids = oga_tok.encode(text)
    stream = oga_tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_keeps_leading_space_after_prompt(stories_tok: Tokenizer) -> None:
    prompt = stories_tok.encode("Once upon a")
    cont = stories_tok.encode("Once upon a time there", add_bos=False)[3:]
    stream = stories_tok.stream(prompt)
    assert "".join(stream.push(i) for i in cont) == " time there"


def test_chat_template_renders_smollm_chatml(oga_tok: Tokenizer) -> None:
    text = oga_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system" in text  # the template's default system prompt
    ids = oga_tok.encode(text, add_bos=False)
    assert oga_tok.token_to_id("<|im_start|>") in ids


def test_no_template_is_a_clear_error(stories_tok: Tokenizer) -> None:
    assert not stories_tok.has_chat_template
    with pytest.raises(ModelError, match="no chat template"):
        stories_tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot read tokenizer"):
        Tokenizer.from_file(bad)
