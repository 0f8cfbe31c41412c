import glob
import os

import mistral_common
import pytest

from engine.output import IncrementalDetokenizer
from engine.tokenizer import MistralCommonTokenizer, load_tokenizer

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
SPM = os.path.join(DATA, "mistral_instruct_tokenizer_240323.model.v3")
TEKKEN = max(glob.glob(os.path.join(DATA, "tekken*.json")))


@pytest.fixture(scope="module", params=[SPM, TEKKEN], ids=["sentencepiece", "tekken"])
def tok(request):
    return load_tokenizer(request.param)


def test_load_picks_mistral_common(tok):
    assert isinstance(tok, MistralCommonTokenizer)
    assert tok.vocab_size >= 32768 and tok.eos_token_id is not None


def test_roundtrip_and_chat(tok):
    text = "Grüße aus Levante — 東京 🚀 done."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert chat[0] == tok.bos_token_id and len(chat) > 3


def test_incremental_detokenizer_equals_full_decode(tok):
    text = "Paris is the capital of France. Ünïcödé 東京 🚀🚀 and  double  spaces\nnew line."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.feed([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_unknown_special_token_is_none(tok):
    assert tok.special_token_id("[DEFINITELY_NOT_A_TOKEN]") is None
    assert tok.marker_ids("<think>") == tok.encode("<think>", add_special_tokens=False)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
