"""
Raw text -> documents -> tokens -> data/<dataset>/{train.bin, val.bin, meta.json, tokenizer files}.

    python prepare.py                                  # the built-in legal corpus -> data/legal/
    python prepare.py --input=contracts/,cases.jsonl --dataset=contracts

The built-in corpus needs no network: the license texts in /usr/share/common-licenses
and the /usr/share/doc/*/copyright files every Debian/Ubuntu machine ships, one file a
document. Paragraphs repeated anywhere in the input are dropped (first one kept), so
a held-out val never shares a paragraph with train. Val is whole held-out documents,
chosen with the seed, or the documents of --val_input, taken as they are. The tokenizer
learns from train only. Every
document is followed by the end-of-text token; the .bin files are raw uint16 (uint32
for vocabularies over 65536) arrays, read with np.memmap(path, dtype, mode="r").
Outputs are written to a temporary folder and moved into place only when all of them
are done, so a failed run leaves an existing dataset as it was.
"""

import codecs
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

import numpy as np

# -----------------------------------------------------------------------------
# input
input = ""           # files or folders (comma-separated) of .txt and .jsonl; "" = the built-in legal corpus
val_input = ""       # files/folders to use as the val split instead of holding out documents
dedup = True         # drop paragraphs (whitespace-normalized) already seen in an earlier document
# output
dataset = "legal"    # writes data_dir/dataset/
data_dir = "data"
# tokenizer
tokenizer = "bpe"
vocab_size = 8192    # special tokens included
tokenizer_train_bytes = 50_000_000  # learn the tokenizer from about this much train text
# split
val_fraction = 0.05  # fraction of documents (whole documents) held out for val
seed = 1337
# speed
num_workers = 0      # encoding threads (tiktoken releases the GIL; faster than processes); 0 = os.cpu_count()
# -----------------------------------------------------------------------------

from configurator import configure, fail
from tokenizer import load_tokenizer, train_tokenizer

LEGAL_CORPUS = ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright")
TEXT_EXTENSIONS = (".txt", ".jsonl")
PARAGRAPH_BREAK = re.compile(r"(\n(?:[^\S\n]*\n)+)")  # one or more blank lines, kept by split()

# Bytes that are not UTF-8 become U+FFFD, as with errors="replace", and are counted.
_replaced_bytes = 0


def _count_and_replace(err):
    global _replaced_bytes
    _replaced_bytes += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("nanolex_count_replace", _count_and_replace)


def new_stats():
    return {"files": 0, "skipped": 0, "empty": 0, "replaced_bytes": 0, "replaced_files": 0}


def read_text(path, stats):
    """A file's text; a file that cannot be read is a user error."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    before = _replaced_bytes
    text = data.decode("utf-8", errors="nanolex_count_replace")
    stats["files"] += 1
    if _replaced_bytes > before:
        stats["replaced_bytes"] += _replaced_bytes - before
        stats["replaced_files"] += 1
    return text


def jsonl_documents(path, text):
    """One document per line: the line's "text" field, or else its "content" field."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{n}: not valid JSON ({e.msg})")
        doc = record.get("text", record.get("content")) if isinstance(record, dict) else None
        if not isinstance(doc, str):
            fail(f"{path}:{n}: expected a JSON object with a string field \"text\" or \"content\"")
        yield doc


def input_files(spec, stats):
    """The .txt/.jsonl files named by a comma-separated list of files and folders, each real file once."""
    files = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if not os.path.exists(item):
            fail(f"input not found: {item}")
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                for name in sorted(names):
                    if name.lower().endswith(TEXT_EXTENSIONS):
                        files.append(os.path.join(root, name))
                    else:
                        stats["skipped"] += 1
        elif item.lower().endswith(TEXT_EXTENSIONS):
            files.append(item)
        else:
            fail(f"{item}: not a .txt or .jsonl file")
    seen, unique = set(), []
    for path in files:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def read_documents(paths, stats):
    """Documents from .txt files (one per file) and .jsonl files (one per line), blank ones dropped."""
    docs = []
    for path in paths:
        text = read_text(path, stats)
        for doc in jsonl_documents(path, text) if path.lower().endswith(".jsonl") else [text]:
            if doc.strip():
                docs.append(doc)
            else:
                stats["empty"] += 1
    return docs


def legal_corpus_documents(stats):
    """The built-in legal corpus: license and copyright texts, one file a document, each real file once."""
    paths = sorted(p for pattern in LEGAL_CORPUS for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        fail("the built-in legal corpus needs /usr/share/common-licenses or /usr/share/doc/*/copyright "
             "(Debian/Ubuntu); give your own text with --input=...")
    seen, docs = set(), []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            docs.extend(read_documents([path], stats))
    return docs


def dedup_paragraphs(docs):
    """Drop every paragraph (text between blank lines) whose whitespace-normalized text came before.

    Returns (documents, paragraphs kept, paragraphs dropped). A document with nothing
    dropped is returned unchanged; one with nothing left is dropped.
    """
    seen, out, kept, dropped = set(), [], 0, 0
    for doc in docs:
        pieces = PARAGRAPH_BREAK.split(doc)  # paragraph, break, paragraph, ..., paragraph
        parts = []
        for paragraph, brk in zip(pieces[0::2], pieces[1::2] + [""]):
            key = " ".join(paragraph.split())
            if key:
                digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
                if digest in seen:
                    dropped += 1
                    continue
                seen.add(digest)
                kept += 1
            parts.append(paragraph + brk)
        doc = "".join(parts)
        if doc.strip():
            out.append(doc)
    return out, kept, dropped


def split_documents(docs, val_fraction, seed):
    """(train, val): whole documents, at least one in each, val chosen at random with the seed."""
    if len(docs) < 2:
        fail(f"need at least 2 documents to hold out a val split, got {len(docs)}: "
             "give more documents, or the val documents with --val_input=...")
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    val_ids = set(random.Random(seed).sample(range(len(docs)), n_val))
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def first_bytes(docs, max_bytes):
    """Documents from the start until about max_bytes of text."""
    left = max_bytes
    for doc in docs:
        if left <= 0:
            return
        yield doc
        left -= len(doc.encode())


def chunks(docs, max_bytes):
    """Runs of consecutive documents of about max_bytes of text each, with their size: (docs, bytes)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.encode())
        if size >= max_bytes:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def encode_split(tok, name, docs, total, path, dtype, workers):
    """Write the tokens of docs (total bytes of text), each followed by end-of-text, to path;
    return the token count."""
    tokens, done, start = 0, 0, time.time()
    with open(path, "wb") as f:
        # ~4 MB of text per thread: enough to keep the threads busy, little enough to show progress
        for chunk, size in chunks(docs, workers * 2**22):
            batch = tok.encode_batch(chunk, num_threads=workers)
            ids = np.concatenate([np.array(b + [tok.eot_id], dtype=dtype) for b in batch])
            ids.tofile(f)
            tokens, done = tokens + len(ids), done + size
            seconds = time.time() - start
            print(f"\rencoding {name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, "
                  f"{done / 1e6 / max(seconds, 1e-9):.1f} MB/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return tokens


def main():
    start = time.time()
    if not 0 < val_fraction < 1 and not val_input:
        fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer_train_bytes <= 0 or num_workers < 0:
        fail("tokenizer_train_bytes must be positive and num_workers at least 0")
    workers = num_workers or os.cpu_count()

    # documents
    stats = new_stats()
    docs = read_documents(input_files(input, stats), stats) if input else legal_corpus_documents(stats)
    if not docs:
        fail(f"no text in the input: {input or 'built-in legal corpus'}")
    read_docs = len(docs)
    if dedup:
        docs, kept, dropped = dedup_paragraphs(docs)
    if val_input:
        train_docs = docs
        val_docs = read_documents(input_files(val_input, stats), stats)
        if not val_docs:
            fail(f"no text in the val input: {val_input}")
    else:
        train_docs, val_docs = split_documents(docs, val_fraction, seed)
    split_docs = {"train": train_docs, "val": val_docs}
    split_bytes = {name: sum(len(d.encode()) for d in texts) for name, texts in split_docs.items()}
    mb = sum(split_bytes.values()) / 1e6
    print(f"read {stats['files']} files ({stats['skipped']} skipped: not .txt/.jsonl), "
          f"{stats['empty']} empty documents dropped")
    if dedup:
        print(f"paragraphs: {kept} kept, {dropped} repeats dropped; "
              f"{read_docs - len(docs)} of {read_docs} documents had nothing new and were dropped")
    print(f"{len(train_docs)} train + {len(val_docs)} val documents, {mb:.2f} MB of text")
    if stats["replaced_bytes"]:
        print(f"warning: {stats['replaced_bytes']} bytes that are not UTF-8 in {stats['replaced_files']} "
              f"files were replaced by U+FFFD")

    # tokenizer, from train only
    t0 = time.time()
    try:
        tok = train_tokenizer(tokenizer, first_bytes(train_docs, tokenizer_train_bytes), vocab_size)
    except ValueError as e:
        fail(str(e))
    print(f"trained {tokenizer} tokenizer in {time.time() - t0:.2f}s: vocab_size {tok.vocab_size}"
          + (f" (asked for {vocab_size}: the text supports no more merges)" if tok.vocab_size < vocab_size else ""))
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32

    # tokens and files, into a temporary folder first
    out_dir = os.path.join(data_dir, dataset)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
    except OSError as e:
        fail(f"cannot write to {out_dir}: {e.strerror or e}")
    try:
        files = tok.save(tmp)
        tok = load_tokenizer(tmp)  # encode with what was saved, as every later script will
        splits, t0 = {}, time.time()
        for name, texts in split_docs.items():
            nbytes = split_bytes[name]
            tokens = encode_split(tok, name, texts, nbytes, os.path.join(tmp, f"{name}.bin"), dtype, workers)
            splits[name] = {"tokens": tokens, "bytes": nbytes, "documents": len(texts)}
            print(f"{name}: {len(texts)} documents, {nbytes / 1e6:.2f} MB -> {tokens:,} tokens")
        speed = mb / max(time.time() - t0, 1e-9)
        print(f"encoded {mb:.2f} MB at {speed:.1f} MB/s with {workers} threads ({speed / workers:.1f} MB/s per thread)")
        meta = {
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "tokenizer": {"kind": tok.kind, "files": files},
            "eot_id": tok.eot_id, "pad_id": tok.pad_id, "mask_id": tok.mask_id,
            "splits": splits,
            "source": input or "built-in legal corpus",
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        for name in [*files, "train.bin", "val.bin", "meta.json"]:
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        for name in [*files, "train.bin", "val.bin", "meta.json"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    except OSError as e:  # a full disk, say: the old dataset, if any, is still whole
        fail(f"cannot write to {out_dir}: {e.strerror or e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out_dir}/ in {time.time() - start:.1f}s")


if __name__ == "__main__":
    configure(globals())
    main()
