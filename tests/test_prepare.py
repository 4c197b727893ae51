import json
import os
import random

import numpy as np
import pytest

from conftest import assert_clear_error, run_script
from prepare import dedup_paragraphs, legal_corpus_documents, new_stats, split_documents
from tokenizer import load_tokenizer

WORDS = ("licensee licensor agreement party warranty liability damages notice termination breach "
         "indemnify govern jurisdiction court clause section software copyright license consent").split()


def prepare(cwd, *args):
    return run_script("prepare.py", *args, cwd=cwd, timeout=60)


def document(i, paragraphs=3):
    """A document of unique paragraphs (every one names its document and its number)."""
    rng = random.Random(i)
    return "\n\n".join(f"Section {i}.{j}. " + " ".join(rng.choice(WORDS) for _ in range(40)) + "."
                       for j in range(paragraphs)) + "\n"


def write_corpus(root):
    """Six .txt documents, a .jsonl of four, a file to skip and a link to read once; returns the documents."""
    docs = [document(i) for i in range(10)]
    (root / "a").mkdir(parents=True)
    for i in range(6):
        (root / "a" / f"doc{i}.txt").write_text(docs[i], encoding="utf-8")
    (root / "a" / "same-as-doc0.txt").symlink_to(root / "a" / "doc0.txt")
    (root / "b").mkdir()
    lines = [json.dumps({"text": docs[6]}), "", json.dumps({"content": docs[7]}),
             json.dumps({"text": docs[8], "content": "ignored"}), json.dumps({"text": docs[9], "id": 9})]
    (root / "b" / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes.md").write_text("# not a text input\n")
    return docs


def segments(path, eot_id):
    """The documents in a .bin file: the token runs each ended by end-of-text."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    ends = np.flatnonzero(tokens == eot_id)
    assert len(tokens) and tokens[-1] == eot_id
    return [tokens[a + 1:b] for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One good run on the small corpus; the error tests check it is left untouched."""
    root = tmp_path_factory.mktemp("prepared")
    docs = write_corpus(root / "corpus")
    result = prepare(root, f"--input={root / 'corpus'}", "--dataset=tiny", f"--data_dir={root / 'data'}",
                     "--vocab_size=350", "--val_fraction=0.2")
    assert result.returncode == 0, result.stderr
    out = root / "data" / "tiny"
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    return root, out, docs, result, snapshot


def test_prepare_writes_token_files_meta_and_tokenizer(prepared):
    root, out, docs, result, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert meta["source"] == str(root / "corpus")
    assert meta["tokenizer"]["kind"] == "bpe"
    assert sorted(os.listdir(out)) == sorted(["train.bin", "val.bin", "meta.json", *meta["tokenizer"]["files"]])
    tok = load_tokenizer(out)
    assert meta["vocab_size"] == tok.vocab_size <= 350
    assert (meta["eot_id"], meta["pad_id"], meta["mask_id"]) == (tok.eot_id, tok.pad_id, tok.mask_id)
    for split in ("train", "val"):
        tokens = np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r")
        assert len(tokens) == meta["splits"][split]["tokens"] == os.path.getsize(out / f"{split}.bin") // 2
        assert tokens.max() < meta["vocab_size"]
    assert "MB/s" in result.stderr  # the progress display


def test_documents_are_read_once_from_txt_and_jsonl_and_other_files_are_skipped(prepared):
    _, out, docs, result, _ = prepared
    splits = json.loads((out / "meta.json").read_text())["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(docs)
    assert splits["val"]["documents"] == 2
    assert "1 skipped" in result.stdout


def test_each_document_is_followed_by_one_end_of_text_token(prepared):
    _, out, _, _, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert (tokens == meta["eot_id"]).sum() == meta["splits"][split]["documents"]
        assert tokens[-1] == meta["eot_id"]


def test_val_split_holds_whole_documents(prepared):
    _, out, docs, _, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    decoded = {split: [tok.decode(s) for s in segments(out / f"{split}.bin", tok.eot_id)] for split in ("train", "val")}
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    assert not set(decoded["train"]) & set(decoded["val"])
    for split in ("train", "val"):
        assert meta["splits"][split]["bytes"] == sum(len(d.encode()) for d in decoded[split])


def test_val_input_gives_the_val_split_and_the_tokenizer_never_sees_it(tmp_path):
    (tmp_path / "train").mkdir()
    docs = [document(i) for i in range(3)]
    for i, doc in enumerate(docs):
        (tmp_path / "train" / f"{i}.txt").write_text(doc)
    val_doc = "zyxwvutsrq " * 200  # would be one token if the tokenizer had learnt from val
    (tmp_path / "val.txt").write_text(val_doc)
    result = prepare(tmp_path, "--input=train", "--val_input=val.txt", "--vocab_size=400")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "legal"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 3 and meta["splits"]["val"]["documents"] == 1
    tok = load_tokenizer(out)
    assert [tok.decode(s) for s in segments(out / "val.bin", tok.eot_id)] == [val_doc]
    assert sorted(tok.decode(s) for s in segments(out / "train.bin", tok.eot_id)) == sorted(docs)
    assert len(tok.encode("zyxwvutsrq")) > 3


def test_repeated_paragraphs_are_kept_once_across_the_corpus(tmp_path):
    shared = "Permission is hereby granted, free of charge, to any person obtaining a copy."
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"{document(i, 2)}\n{shared}\n\nEnd of document {i}.\n")
    result = prepare(tmp_path, "--input=.", "--vocab_size=300")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "legal"
    tok = load_tokenizer(out)
    text = "".join(tok.decode(np.fromfile(out / f"{s}.bin", dtype=np.uint16)) for s in ("train", "val"))
    assert text.count(shared) == 1
    assert "3 repeats dropped" in result.stdout


def test_dedup_compares_paragraphs_with_whitespace_normalized_and_keeps_the_first():
    docs = ["Alpha  beta.\n\nGamma.\n", "alpha beta.\n\n\n  Alpha\tbeta. \n\nDelta.", "Gamma.", "Epsilon\n\n"]
    out, kept, dropped = dedup_paragraphs(docs)
    assert out == ["Alpha  beta.\n\nGamma.\n", "alpha beta.\n\n\nDelta.", "Epsilon\n\n"]
    assert (kept, dropped) == (5, 2)


def test_dedup_leaves_documents_without_repeats_byte_for_byte():
    docs = ["  indented\r\n\r\nsecond\n\n\n\nthird  \n", "\n\nleading blank lines", "Unique \x00 text"]
    assert dedup_paragraphs(docs) == (docs, 5, 0)


def test_split_is_by_whole_document_and_reproducible_with_the_seed():
    docs = [f"doc {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1, 1337)
    assert len(val) == 4 and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, 1337) == (train, val)
    assert split_documents(docs, 0.1, 7)[1] != val
    assert [len(s) for s in split_documents(docs[:2], 0.01, 1)] == [1, 1]
    assert [len(s) for s in split_documents(docs[:2], 0.99, 1)] == [1, 1]


def test_bytes_that_are_not_utf8_are_replaced_and_reported(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(document(i))
    (tmp_path / "latin1.txt").write_bytes("Clause 7: the d\xe9biteur shall pay \xa3100.\n".encode("latin-1"))
    result = prepare(tmp_path, "--input=.", "--vocab_size=300", "--val_fraction=0.5")
    assert result.returncode == 0, result.stderr
    assert "2 bytes that are not UTF-8 in 1 files" in result.stdout
    out = tmp_path / "data" / "legal"
    tok = load_tokenizer(out)
    text = "".join(tok.decode(np.fromfile(out / f"{s}.bin", dtype=np.uint16)) for s in ("train", "val"))
    assert "the d\ufffdbiteur shall pay \ufffd100." in text


@pytest.mark.skipif(not os.path.isdir("/usr/share/common-licenses"), reason="no Debian license texts here")
def test_the_built_in_legal_corpus_is_read_and_deduplicated(tmp_path):
    stats = new_stats()
    docs = legal_corpus_documents(stats)
    assert stats["files"] == len(docs) > 10
    assert any("GNU GENERAL PUBLIC LICENSE" in d for d in docs)
    deduped, kept, dropped = dedup_paragraphs(docs)
    assert 0 < len(deduped) <= len(docs) and dropped > 0
    result = prepare(tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "data" / "legal" / "meta.json").read_text())
    assert meta["source"] == "built-in legal corpus" and meta["vocab_size"] == 8192
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["tokens"] > 100_000


def test_the_same_input_and_seed_give_the_same_files(prepared):
    root, out, _, _, snapshot = prepared
    result = prepare(root, f"--input={root / 'corpus'}", "--dataset=again", f"--data_dir={root / 'data'}",
                     "--vocab_size=350", "--val_fraction=0.2")
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in (root / "data" / "again").iterdir()} == snapshot


# -- user errors: one line, exit code 2, and an existing dataset left as it was ------------------------------

def fails_cleanly(prepared, *args):
    root, out, _, _, snapshot = prepared
    result = prepare(root, "--dataset=tiny", f"--data_dir={root / 'data'}", "--vocab_size=350", *args)
    assert_clear_error(result)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot  # nothing changed, nothing left behind
    return result.stderr.strip()


def test_an_input_that_does_not_exist_is_an_error(prepared):
    assert "input not found: nowhere" in fails_cleanly(prepared, "--input=nowhere")


def test_an_empty_folder_is_an_error(prepared, tmp_path):
    assert "no text" in fails_cleanly(prepared, f"--input={tmp_path}")


def test_input_of_only_empty_files_is_an_error(prepared, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no text" in fails_cleanly(prepared, f"--input={tmp_path}")


def test_a_file_that_is_not_txt_or_jsonl_is_an_error(prepared, tmp_path):
    (tmp_path / "contract.pdf").write_bytes(b"%PDF-1.4")
    assert "not a .txt or .jsonl file" in fails_cleanly(prepared, f"--input={tmp_path / 'contract.pdf'}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_a_file_without_read_permission_is_an_error(prepared, tmp_path):
    (tmp_path / "ok.txt").write_text(document(1))
    (tmp_path / "secret.txt").write_text(document(2))
    (tmp_path / "secret.txt").chmod(0)
    assert "cannot read" in fails_cleanly(prepared, f"--input={tmp_path}")


def test_a_file_that_cannot_be_opened_is_an_error(prepared, tmp_path):
    (tmp_path / "ok.txt").write_text(document(1))
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")  # opening it fails, even for root
    assert f"cannot read {tmp_path / 'loop.txt'}" in fails_cleanly(prepared, f"--input={tmp_path}")


@pytest.mark.parametrize("line, message", [
    ('{"text": "unterminated', "not valid JSON"),
    ('{"body": "no text field"}', 'string field "text" or "content"'),
    ('{"text": null}', 'string field "text" or "content"'),
    ('["a list"]', 'string field "text" or "content"'),
])
def test_a_bad_jsonl_line_is_an_error_naming_file_and_line(prepared, tmp_path, line, message):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": document(1)}) + "\n\n" + line + "\n")
    error = fails_cleanly(prepared, f"--input={path}")
    assert f"{path}:3:" in error and message in error


def test_too_few_documents_to_split_is_an_error(prepared, tmp_path):
    (tmp_path / "only.txt").write_text(document(1))
    assert "need at least 2 documents" in fails_cleanly(prepared, f"--input={tmp_path}")


def test_an_output_folder_that_cannot_be_made_is_an_error(prepared, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    assert "cannot write to" in fails_cleanly(prepared, f"--input={prepared[0] / 'corpus'}",
                                              f"--data_dir={tmp_path / 'a-file'}")


@pytest.mark.parametrize("setting, message", [
    ("--vocab_size=100", "vocab_size must be"),
    ("--vocab_size=1099511627776", "vocab_size must be"),
    ("--vocab_size=lots", "vocab_size must be int"),
    ("--tokenizer=nonesuch", "unknown tokenizer kind 'nonesuch'"),
    ("--val_fraction=1.5", "val_fraction must be between 0 and 1"),
    ("--vocab_sise=300", "did you mean 'vocab_size'"),
])
def test_a_bad_setting_is_an_error(prepared, setting, message):
    root = prepared[0]
    assert message in fails_cleanly(prepared, f"--input={root / 'corpus'}", setting)

