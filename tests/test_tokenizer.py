import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import (KINDS, PIECE_CHARS, SPECIAL_TOKENS, UNK, WordPieceTokenizer, load_tokenizer, train_tokenizer,
                       wordpiece_vocabulary)

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


# vocab sizes that train in a blink on CORPUS; byte and gpt2 ignore theirs
VOCAB = {"bpe": 400, "wordpiece": 300, "unigram": 400, "sentencepiece": 400, "byte": 1000, "char": 100, "gpt2": 1000}
EXACT = ["bpe", "byte", "unigram", "sentencepiece", "gpt2"]  # decode(encode(x)) == x
NEEDS_UNK = {"wordpiece", "char", "unigram", "sentencepiece"}
_trained = {}


def trained(kind):
    if kind == "gpt2" and not os.environ.get("NANOLEX_TEST_NETWORK"):
        pytest.skip("gpt2 needs the network the first time; set NANOLEX_TEST_NETWORK=1 to test it")
    if kind not in _trained:
        try:
            _trained[kind] = train_tokenizer(kind, iter(CORPUS), VOCAB[kind])  # any iterable, read once
        except ValueError as e:
            _trained[kind] = e
    if isinstance(_trained[kind], ValueError):
        pytest.skip(f"{kind}: {_trained[kind]}")  # gpt2 offline
    return _trained[kind]


@pytest.fixture(scope="module")
def tok():
    return trained("bpe")


def test_every_kind_is_known():
    assert set(KINDS) == {"bpe", "wordpiece", "unigram", "sentencepiece", "byte", "char", "gpt2"}


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_have_distinct_ids_and_ordinary_text_never_gets_them(kind):
    t = trained(kind)
    names = SPECIAL_TOKENS + ((UNK,) if kind in NEEDS_UNK else ())
    assert set(t.special) == set(names)
    assert len(set(t.special.values())) == len(names) and max(t.special.values()) < t.vocab_size
    assert (t.eot_id, t.pad_id, t.mask_id, t.bos_id) == tuple(t.special[s] for s in SPECIAL_TOKENS)
    assert t.unk_id == t.special.get(UNK)
    ordinary = {i for text in UNICODE_TEXTS + CORPUS for i in t.encode(text)}
    assert not ordinary & {t.eot_id, t.pad_id, t.mask_id, t.bos_id}
    assert max(ordinary) < t.vocab_size


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_text_is_ordinary_text_unless_allowed(kind):
    t = trained(kind)
    text = "The Licensee<|endoftext|><|bos|>"
    assert t.encode(text, allow_special=True) == t.encode("The Licensee") + [t.eot_id, t.bos_id]
    assert not set(t.encode(text)) & {t.eot_id, t.bos_id}
    between = " " if kind == "wordpiece" else ""  # wordpiece puts a space between words
    assert t.decode([t.eot_id, t.mask_id]) == f"<|endoftext|>{between}<|mask|>"


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_identical_ids(kind, tmp_path):
    t = trained(kind)
    files = t.save(tmp_path)
    assert files[0] == "tokenizer.json" and sorted(files) == sorted(os.listdir(tmp_path))
    header = json.loads((tmp_path / "tokenizer.json").read_text())
    assert header["kind"] == kind and header["vocab_size"] == t.vocab_size and header["files"] == files[1:]
    assert header["special_tokens"] == t.special
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(t) and loaded.vocab_size == t.vocab_size and loaded.special == t.special
    for text in UNICODE_TEXTS + CORPUS[:6]:
        assert loaded.encode(text) == t.encode(text)
        assert loaded.encode(text, allow_special=True) == t.encode(text, allow_special=True)
        assert loaded.decode(t.encode(text)) == t.decode(t.encode(text))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_and_arrays_give_the_same_ids_as_encode(kind):
    t = trained(kind)
    texts = UNICODE_TEXTS + CORPUS[:6]
    assert t.encode_batch(texts, num_threads=2) == [t.encode(x) for x in texts]
    assert [a.tolist() for a in t.encode_arrays(texts)] == [t.encode(x) for x in texts]


@pytest.mark.parametrize("kind", EXACT)
@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_decode_inverts_encode_for_any_text(kind, text):
    t = trained(kind)
    assert t.decode(t.encode(text)) == text


@pytest.mark.parametrize("kind", ["bpe", "byte", "unigram", "sentencepiece"])
@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\u2581")))
def test_byte_level_kinds_round_trip_any_string(kind, text):
    t = trained(kind)
    assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode(text, allow_special=True)) == text


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20, deadline=None)
@given(text=st.text(st.sampled_from(["\udc00", "\udfff", "a", " ", "\n", "\U0001f600"]), min_size=1))
def test_lone_surrogates_never_raise_and_come_back_as_replacement_characters(kind, text):
    t = trained(kind)
    ids = t.encode(text)
    assert t.encode_batch([text]) == [ids]
    if kind in EXACT:
        assert t.decode(ids) == text.replace("\udc00", "\ufffd").replace("\udfff", "\ufffd")


def test_decode_accepts_numpy_arrays_and_tuples_and_replaces_invalid_utf8(tok):
    ids = tok.encode("The Licensee shall")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "The Licensee shall"
    assert tok.decode(tuple(ids)) == "The Licensee shall"
    partial_emoji = tok.encode("\U0001f600")[:1]  # the first byte(s) of a 4-byte character
    assert tok.decode(partial_emoji) == "\ufffd"


def test_encode_batch_cuts_long_texts_without_changing_their_ids(tok):
    rng = random.Random(0)
    alphabet = ["\n"] * 8 + [" ", "\r", "\t", "'", "s", "ll", "a", "Z", "1", "23", ".", "(", "\u00a0", "\u3000",
                              "\u0085", "\x1c", "\u2028", "\u65e5", "\U0001f600", "e\u0301", "<|endoftext|>"]
    long_text = "".join(rng.choice(alphabet) for _ in range(3 * PIECE_CHARS))
    texts = [long_text, "short", long_text[:PIECE_CHARS + 7], ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_a_small_corpus_gives_fewer_ids_with_specials_right_after_the_merges():
    small = train_tokenizer("bpe", ["aaaa bbbb"], 1000)
    assert small.vocab_size < 1000
    assert small.eot_id == small.vocab_size - len(SPECIAL_TOKENS)
    assert small.decode(small.encode("aaaa bbbb cccc")) == "aaaa bbbb cccc"


def test_byte_and_char_have_their_natural_sizes():
    assert trained("byte").vocab_size == 256 + len(SPECIAL_TOKENS)
    char = trained("char")
    assert char.vocab_size == len(set("".join(CORPUS))) + len(SPECIAL_TOKENS) + 1
    assert char.encode(" ") == [0]  # the most frequent character first
    assert char.encode("Zé") == [char.unk_id, char.unk_id]  # never seen


# -- WordPiece ---------------------------------------------------------------------------------------------------

def test_wordpiece_merges_by_likelihood_not_frequency():
    # each (a, ##?) pair occurs 30 times but a is everywhere; (x, ##y) occurs 20 times and x, y never apart
    counts = {"a" + c: 30 for c in "bcdefghijklmnopqrstu"} | {"xy": 20}
    pieces = wordpiece_vocabulary(counts, 24)
    assert sorted(pieces[:23]) == sorted(["a", "x", "##y"] + ["##" + c for c in "bcdefghijklmnopqrstu"])
    assert pieces[23] == "xy"
    assert wordpiece_vocabulary({"ab": 1000, "xy": 1}, 5)[4] == "ab"  # a pair seen once does not win on rarity


def test_wordpiece_encodes_greedily_with_the_longest_piece_first():
    tok = WordPieceTokenizer(["u", "n", "un", "##n", "##b", "##e", "##l", "##i", "##v", "##a", "##believ",
                              "##able", "##ab", "##le"])
    ids = tok.encode("unbelievable")
    assert [tok.pieces[i] for i in ids] == ["un", "##believ", "##able"]


def test_wordpiece_gives_unk_only_for_a_word_with_an_unseen_character():
    tok = trained("wordpiece")
    ids = tok.encode("Licensee Lic\u00e9nsee shall")  # no é in the corpus
    assert ids.count(tok.unk_id) == 1
    assert tok.decode(ids) == "Licensee <|unk|> shall"
    pieces = [tok.pieces[i] for i in tok.encode("indemnify")]
    assert not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])


def test_wordpiece_decode_keeps_words_and_newlines_but_not_spacing():
    tok = train_tokenizer("wordpiece", CORPUS + ["(a)\n\n"], 300)
    assert tok.decode(tok.encode("The  Licensee\tshall,\n\nindemnify (the) Licensor.")) == \
        "The Licensee shall ,\n\nindemnify ( the ) Licensor ."


# -- errors ------------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "sentencepiece", "char"])
@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_a_damaged_data_file_of_any_kind_raises_value_error(kind, damage, tmp_path):
    files = trained(kind).save(tmp_path)
    data = tmp_path / files[1]
    if damage == "missing":
        data.unlink()
    elif damage == "garbage":
        data.write_bytes(b"\x00\xffgarbage\n")
    else:
        data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path)


def test_unknown_kind_raises_value_error():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("nonesuch", CORPUS, 400)


@pytest.mark.parametrize("kind, vocab_size", [("bpe", 0), ("bpe", 259), ("bpe", 2**40), ("bpe", 300.0),
                                              ("bpe", True), ("char", 5), ("wordpiece", -1), ("byte", "big")])
def test_a_vocab_size_too_small_or_unsupported_raises_value_error(kind, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(kind, CORPUS, vocab_size)


def test_gpt2_offline_says_so_in_one_line(tmp_path):
    # no network: a proxy that refuses connections, and an empty tiktoken cache
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    code = ("from tokenizer import train_tokenizer\n"
            "try:\n    train_tokenizer('gpt2', [], 50260)\nexcept ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 1, done.stdout + done.stderr
    assert "gpt2" in lines[0] and "network" in lines[0] and "TIKTOKEN_CACHE_DIR" in lines[0]
