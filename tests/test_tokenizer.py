import json
import os
import random

import numpy as np
import pytest

from tokenizer import KINDS, PIECE_CHARS, SPECIAL_TOKENS, load_tokenizer, train_tokenizer

CORPUS = [
    "The Licensee shall indemnify the Licensor against all claims arising from the use of the Software.",
    "This Agreement shall be governed by the laws of the State of New York, without regard to conflicts of law.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "Section 12.3. Termination. Either party may terminate this Agreement upon 30 days' written notice.",
    "Redistributions of source code must retain the above copyright notice, this list of conditions.",
] * 20

UNICODE_TEXTS = [
    "",
    "plain ascii, with punctuation: (a) 1.2.3 -- \"quoted\" & 'single' $100.00",
    "emoji: \U0001f600\U0001f9d1\u200d\u2696\ufe0f \U0001f1ea\U0001f1fa",
    "combining marks: e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Z\u0351\u0328\u033a",
    "NUL and control: a\x00b\x01\x1f\x7f end\x00",
    "CJK: 本契約は日本法に準拠する。 계약서 中华人民共和国合同法",
    "right to left: \u05d7\u05d5\u05d6\u05d4 \u0639\u0642\u062f",
    "line endings:\r\n\r\n\tindented\n    spaces   \n\n\n",
    "§ 1983 ¶ 4 — “smart quotes” … ½ ™ ©",
    "<|endoftext|> looks special but is text",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("bpe", CORPUS, 400)


def test_bpe_is_a_known_kind():
    assert "bpe" in KINDS


def test_vocab_size_counts_the_special_tokens(tok):
    assert tok.kind == "bpe"
    assert tok.vocab_size == 400
    assert len(tok.ranks) + len(SPECIAL_TOKENS) == tok.vocab_size


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_decode_inverts_encode_for_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_are_distinct_and_after_every_ordinary_id(tok):
    ids = [tok.eot_id, tok.pad_id, tok.mask_id]
    assert len(set(ids)) == 3
    assert tok.special == dict(zip(SPECIAL_TOKENS, ids))
    assert all(tok.vocab_size - 3 <= i < tok.vocab_size for i in ids)
    ordinary = [i for text in UNICODE_TEXTS + CORPUS for i in tok.encode(text)]
    assert max(ordinary) < min(ids)


def test_special_token_text_is_ordinary_text_unless_allowed(tok):
    text = "end<|endoftext|><|pad|><|mask|>"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special.values())
    assert tok.encode(text, allow_special=True) == tok.encode("end") + [tok.eot_id, tok.pad_id, tok.mask_id]
    assert tok.decode(plain) == text


def test_encode_batch_gives_the_same_ids_as_encode(tok):
    assert tok.encode_batch(UNICODE_TEXTS) == [tok.encode(t) for t in UNICODE_TEXTS]


def test_encode_batch_cuts_long_texts_without_changing_their_ids(tok):
    rng = random.Random(0)
    alphabet = ["\n"] * 8 + [" ", "\r", "\t", "'", "s", "ll", "a", "Z", "1", "23", ".", "(", "\u00a0", "\u3000",
                              "\u0085", "\x1c", "\u2028", "\u65e5", "\U0001f600", "e\u0301", "<|endoftext|>"]
    long_text = "".join(rng.choice(alphabet) for _ in range(3 * PIECE_CHARS))
    texts = [long_text, "short", long_text[:PIECE_CHARS + 7], ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_accepts_numpy_arrays_and_tuples_and_replaces_invalid_utf8(tok):
    ids = tok.encode("The Licensee shall")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "The Licensee shall"
    assert tok.decode(tuple(ids)) == "The Licensee shall"
    partial_emoji = tok.encode("\U0001f600")[:1]  # the first byte(s) of a 4-byte character
    assert tok.decode(partial_emoji) == "\ufffd"


def test_save_then_load_gives_identical_ids(tok, tmp_path):
    files = tok.save(tmp_path)
    assert files[0] == "tokenizer.json"
    assert sorted(files) == sorted(os.listdir(tmp_path))
    header = json.loads((tmp_path / "tokenizer.json").read_text())
    assert header["kind"] == "bpe" and header["vocab_size"] == 400 and header["files"] == files[1:]
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.special == tok.special
    for text in UNICODE_TEXTS + CORPUS[:6]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_a_small_corpus_gives_fewer_ids_with_specials_right_after_the_merges():
    small = train_tokenizer("bpe", ["aaaa bbbb"], 1000)
    assert small.vocab_size < 1000
    assert small.eot_id == small.vocab_size - 3
    assert small.decode(small.encode("aaaa bbbb cccc")) == "aaaa bbbb cccc"


def test_load_of_a_missing_directory_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", [
    lambda d: (d / "tokenizer.json").write_text("{not json"),
    lambda d: (d / "tokenizer.json").write_text('{"kind": "nonesuch"}'),
    lambda d: (d / "tokenizer.json").write_text('["bpe"]'),
    lambda d: (d / "tokenizer.bpe").unlink(),
    lambda d: (d / "tokenizer.bpe").write_text("not-base64!! 0\n"),
    lambda d: (d / "tokenizer.bpe").write_text("".join((d / "tokenizer.bpe").read_text().splitlines(True)[:-1])),
    lambda d: (d / "tokenizer.bpe").write_bytes(b"\xff\xfe"),
], ids=["bad-json", "unknown-kind", "not-an-object", "missing-ranks", "bad-rank-line", "vocab-mismatch",
        "not-utf8"])
def test_load_of_a_corrupt_tokenizer_raises_value_error(tok, tmp_path, damage):
    tok.save(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path)


def test_unknown_kind_raises_value_error():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("nonesuch", CORPUS, 400)


@pytest.mark.parametrize("vocab_size", [0, 258, 2**40, 300.0, True])
def test_a_vocab_size_too_small_or_unsupported_raises_value_error(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("bpe", CORPUS, vocab_size)
