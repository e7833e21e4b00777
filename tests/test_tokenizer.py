"""SentencePiece tokenizer with LLaMA semantics and training settings."""

from __future__ import annotations

import pytest

from ibllm_lab.tokenizer import Tokenizer, train_tokenizer

CORPUS = [
    "a red circle moves to the left",
    "two blue squares are static at the bottom",
    "Question: how many stars? Answer: three, 3 of 12 or 123",
] * 30


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "world", 300))


def test_llama_special_ids(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, -1)
    assert tokenizer.n_words == 300 == len(tokenizer)


def test_encode_adds_bos_eos_and_decode_is_lossless(tokenizer):
    text = "a red circle moves to the left"
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 2 not in ids[1:-1]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, bos=False, eos=False) == ids[1:-1]
    for odd in ["Ünïcødé → 東京 🚀", "  two  spaces\tand tab", "x=12345"]:
        assert tokenizer.decode(tokenizer.encode(odd, bos=True, eos=False)) == odd


def test_digits_are_split_and_unseen_characters_use_bytes(tokenizer):
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("123", bos=False, eos=False)]
    assert [p.strip("▁") for p in pieces if p.strip("▁")] == ["1", "2", "3"]
    assert tokenizer.unk_id not in tokenizer.encode("東", bos=False, eos=False)


def test_training_is_atomic_and_errors_are_clear(tmp_path):
    path = train_tokenizer(CORPUS, tmp_path / "sub" / "tok", 320)
    assert path == tmp_path / "sub" / "tok.model" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["tok.model"]
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(TypeError):
        Tokenizer(path).encode(["not", "a", "string"], bos=True, eos=False)


def test_unigram_with_soft_vocabulary_limit(tmp_path):
    path = train_tokenizer(CORPUS, tmp_path / "uni", 2000, model_type="unigram")
    tok = Tokenizer(path)
    assert tok.decode(tok.encode(CORPUS[0], bos=True, eos=False)) == CORPUS[0]
