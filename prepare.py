"""
Raw text -> documents -> tokens -> data/<dataset>/{train.bin, val.bin, meta.json, tokenizer files}.

    python prepare.py                                           # the built-in legal corpus -> data/legal/
    python prepare.py --input=contracts/,cases.jsonl --dataset=contracts
    python prepare.py --input='court/**/*.parquet' --text_column=opinion --tokenizer=unigram
    python prepare.py --input=qa.jsonl --dataset=qa             # prompt/response pairs -> also *_mask.bin
    python prepare.py --input=chats.jsonl --dataset=chats --tokenizer_from=out-legal-small   # conversations
    python prepare.py --input=contracts/ --labels=True          # a control label per document -> also *_label.bin
    python prepare.py --labels=True                             # the built-in classification example -> data/licenses/

Inputs: files, folders (recursive) and globs of .txt and .md (a file is a document),
.jsonl (a line is a document: its "text" or "content" field, a "prompt" and a
"response", or a conversation: "messages", a list of {"role", "content"}), .csv (a row; the column --text_column=), .parquet, .arrow and .feather
(a row; these need pyarrow), any of them compressed as .gz or .zst (zstandard), and a
Hugging Face dataset with --hf_dataset= (needs `datasets` and the network). In a
folder, binary files and unknown formats are skipped and counted. With no input, the
built-in corpus: the license texts in /usr/share/common-licenses and the
/usr/share/doc/*/copyright files every Debian/Ubuntu machine ships, a file a document.

The corpus is streamed, never held in memory, in two passes over the input:
1. the tokenizer learns from the first tokenizer_train_bytes of train text;
2. every document is encoded (threads) and appended to train.bin or val.bin, each
   followed by the end-of-text token.
Paragraphs repeated anywhere are dropped (first kept), so val never shares a paragraph
with train; a prompt/response pair is dropped when the same pair came before. Val is
whole documents: when the first pass saw the whole corpus, exactly val_fraction of them
chosen with the seed; for larger corpora each document independently with that
probability. --val_input= gives the val documents instead.

Prompt/response documents and conversations also get a loss mask, {split}_mask.bin
(uint8, 1 = this token is a target the loss counts): their prompt tokens are 0; the
response and its end-of-text are 1, as is all plain text. A conversation is written in
the chat template (tokenizer.chat_segments: role tokens, each message ending in an
end-of-text), with 1 only on the assistants' messages and the end-of-text of each.

With --labels=True every document also gets a label (a control label for
arch="conditional", a class for train.py --task=classify): the "label" field of its record
in .jsonl, .csv, .parquet and .arrow (a number is taken as text), else the name of the
folder that holds its file (the dataset's name for --hf_dataset=). {split}_label.bin
(uint16) holds for every token the id of its document's label, the document's end-of-text
included; meta.json's "labels" lists the names, index = id, in the order first seen. At
most 65535 labels.

--labels=True with no input is the built-in classification example (dataset "licenses"
unless --dataset= names another): every paragraph of a machine-readable (DEP-5)
/usr/share/doc/*/copyright file that has a License field with a text under it becomes a
document, that text, labelled with the family of the field's short name (LICENSE_FAMILIES;
a name joining licenses of different families, "GPL-1+ or Artistic", is left out). Val is
whole packages, val_fraction of them, so no package is on both sides.

The token files are raw uint16 (uint32 for vocabularies over 65536), read with
np.memmap(path, dtype, mode="r"). Everything is written to a temporary folder and moved
into place only when all of it is done, so a failed run leaves an existing dataset as it was.
"""

import codecs
import concurrent.futures
import contextlib
import glob
import gzip
import io
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zlib

import numpy as np

# -----------------------------------------------------------------------------
# input
input = ""           # files, folders, globs (comma-separated); "" = the built-in legal corpus
val_input = ""       # files/folders/globs to use as the val split instead of holding out documents
hf_dataset = ""      # a Hugging Face dataset name, streamed (needs the `datasets` package and the network)
hf_split = "train"
text_column = "text" # the field holding the text in .jsonl/.csv/.parquet/.arrow rows ("content" also works)
dedup = True         # drop paragraphs (whitespace-normalized) already seen in an earlier document
# output
dataset = "legal"    # writes data_dir/dataset/
data_dir = "data"
labels = False       # True: a label per document (conditional, task=classify): its record's "label", else its folder's
                     # name; with no input, the built-in license-family example (dataset "licenses")
# tokenizer
tokenizer = "bpe"    # bpe | wordpiece | unigram | sentencepiece | byte | char | gpt2
vocab_size = 4096    # special tokens included
tokenizer_train_bytes = 20_000_000  # learn the tokenizer from about this much train text
tokenizer_from = ""  # a dataset or run directory (or hf:DIR) whose tokenizer to use instead (data to fine-tune it)
# split
val_fraction = 0.05  # fraction of documents (whole documents) held out for val
seed = 1337
# speed
num_workers = 0      # encoding threads (tiktoken releases the GIL; faster than processes); 0 = os.cpu_count()
# -----------------------------------------------------------------------------

from configurator import configure, fail
from tokenizer import (SPECIAL_TOKENS, SpecialToken, chat_segments, load_tokenizer, tokenizer_files,
                       tokenizer_fingerprint, train_tokenizer)

LEGAL_CORPUS = ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright")
FORMATS = (".txt", ".md", ".jsonl", ".csv", ".parquet", ".arrow", ".feather")
COMPRESSED = (".gz", ".zst")
PARAGRAPH_BREAK = re.compile(r"(\n(?:[^\S\n]*\n)+)")  # one or more blank lines, kept by split()
SURROGATE = re.compile("[\ud800-\udfff]")
READ_CHARS = 1 << 20  # a .txt file is read (and deduplicated, and encoded) in segments of about this size
MAX_LABELS = 65535   # {split}_label.bin holds uint16 ids
LICENSE_FAMILIES = ("GPL", "LGPL", "BSD", "MIT/Expat", "Apache", "MPL", "public domain", "other")
# a License short name's start, lowercased -> its family (the first that matches; else "other")
FAMILY_NAMES = (("LGPL", r"lgpl"), ("GPL", r"a?gpl\b"), ("BSD", r"0?bsd\b"), ("MIT/Expat", r"(mit|expat|x11)\b"),
                ("Apache", r"apache\b"), ("MPL", r"mpl\b"), ("public domain", r"(public[-_ ]?domain|pd|cc0)\b"))
DEP5_FORMAT = re.compile(r"Format:[^\n]*(copyright-format|dep5)", re.IGNORECASE)

# Bytes that are not UTF-8 become U+FFFD, as with errors="replace", and are counted.
_replaced_bytes = 0


def _count_and_replace(err):
    global _replaced_bytes
    _replaced_bytes += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("nanolex_count_replace", _count_and_replace)


def new_stats():
    return {"files": 0, "binary": 0, "unknown": {}, "empty": 0, "replaced_bytes": 0, "replaced_files": 0,
            "paragraphs": 0, "repeats": 0, "repeated_pairs": 0}


class Progress:
    """One line on stderr: input megabytes read (finished files plus the position in the open
    one) of the total, MB/s, ETA and tokens written."""

    def __init__(self, total):
        self.total, self.done, self.file, self.tokens = total, 0, None, 0
        self.start = self.shown = time.time()

    def opened(self, raw):
        self.file = raw

    def closed(self, size):
        self.done, self.file = self.done + size, None

    def show(self, tokens, final=False):
        self.tokens += tokens
        if not final and time.time() - self.shown < 0.5:
            return
        self.shown = time.time()
        done = self.total if final else self.done + (self.file.tell() if self.file and not self.file.closed else 0)
        speed = done / 1e6 / max(time.time() - self.start, 1e-9)
        line = f"\rencoding: read {done / 1e6:,.1f}"
        if self.total:
            eta = (self.total - done) / 1e6 / speed if speed else 0
            line += f"/{self.total / 1e6:,.1f} MB ({100 * done / self.total:.0f}%), {speed:.1f} MB/s, ETA {eta:.0f}s"
        else:
            line += f" MB, {speed:.1f} MB/s"
        print(line + f", {self.tokens:,} tokens", end="\n" if final else "", file=sys.stderr, flush=True)


# -- reading: every format becomes documents, a document being a sequence of (text, counts_in_loss) --------

def format_of(path):
    """(format extension, compression extension or '') from a name like cases.jsonl.gz."""
    name = path.lower()
    for comp in COMPRESSED:
        if name.endswith(comp):
            return os.path.splitext(name[:-len(comp)])[1], comp
    return os.path.splitext(name)[1], ""


def open_binary(path, progress):
    """The file's bytes, decompressed; progress follows the position in the file on disk."""
    raw = open(path, "rb")
    progress.opened(raw)
    comp = format_of(path)[1]
    if comp == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            fail(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def read_error(e):
    """Is e a failure to read or decompress a file (rather than a bug)?"""
    return isinstance(e, (OSError, EOFError, zlib.error)) or type(e).__name__ == "ZstdError"


def looks_binary(path):
    """NUL bytes in the first 8 KB (after decompression) mean this is not text."""
    try:
        with open_binary(path, Progress(0)) as f:
            return b"\x00" in f.read(8192)
    except Exception as e:
        if read_error(e):
            return False  # reading it for real says what is wrong
        raise


@contextlib.contextmanager
def reading(path, progress, stats, text=True):
    """The file as a text stream (or None, for pyarrow to open); a failure to read it is a user error.

    Bytes that are not UTF-8 are replaced by U+FFFD and counted.
    """
    before = _replaced_bytes
    stats["files"] += 1
    try:
        if not text:
            yield None
        else:
            with io.TextIOWrapper(open_binary(path, progress), encoding="utf-8",
                                  errors="nanolex_count_replace", newline="") as f:
                yield f
    except Exception as e:
        if not read_error(e):
            raise
        fail(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    finally:
        progress.closed(os.path.getsize(path) if os.path.isfile(path) else 0)
    if _replaced_bytes > before:
        stats["replaced_bytes"] += _replaced_bytes - before
        stats["replaced_files"] += 1


def paragraph_cut(text):
    """Where to cut text so that both sides end/start at a paragraph: just after a blank line
    that a non-space character follows (tokenizers split there anyway); -1 if nowhere."""
    cut = text.rfind("\n\n")
    while cut != -1 and (cut + 2 >= len(text) or text[cut + 2].isspace()):
        cut = text.rfind("\n\n", 0, cut)
    return cut + 2 if cut != -1 else -1


def text_document(path, progress, stats):
    """A .txt/.md file is one document, read in segments of about READ_CHARS cut between paragraphs."""
    with reading(path, progress, stats) as f:
        rest = ""
        while chunk := f.read(READ_CHARS):
            text = rest + chunk
            cut = paragraph_cut(text)
            if cut == -1 and len(text) < 8 * READ_CHARS:  # no paragraph break yet: read on
                rest = text
                continue
            cut = len(text) if cut == -1 else cut
            yield text[:cut], True
            rest = text[cut:]
        if rest:
            yield rest, True


def record_label(record, where):
    """The record's "label" field as text; None when labels are off or it has none (its folder names it then)."""
    value = record.get("label") if labels else None
    if value is not None and not isinstance(value, (str, int, float)):
        fail(f'{where}: the "label" field must be a string or a number, got {type(value).__name__} '
             f"{str(value)[:60]}")
    return str(value) if value not in (None, "") else None


def record_document(record, where):
    """A row of .jsonl/.csv/.parquet/.arrow or of a Hugging Face dataset as (label or None, segments);
    a null text is empty."""
    if isinstance(record, dict):
        label = record_label(record, where)
        for field in (text_column, "content"):
            if field in record:
                value = record[field]
                if isinstance(value, str):
                    return label, [(value, True)]
                if value is None:
                    return label, []
                break
        else:
            prompt, response = record.get("prompt"), record.get("response")
            if isinstance(prompt, str) and isinstance(response, str):
                return label, [(prompt, False), (response, True)]
            if "messages" in record:
                try:
                    return label, chat_segments(record["messages"])
                except ValueError as e:
                    fail(f"{where}: {e}")
    fields = f'"{text_column}" or "content"' if text_column != "content" else '"content"'
    fail(f'{where}: expected a JSON object with a string field {fields}, string fields "prompt" and "response", '
         'or "messages"')


def jsonl_documents(path, progress, stats):
    with reading(path, progress, stats) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not valid JSON ({e.msg})")
            yield record_document(record, f"{path}:{n}")


def check_columns(path, columns):
    if not {text_column, "content", "messages"} & set(columns) and not {"prompt", "response"} <= set(columns):
        fail(f"{path}: no column {text_column!r} (columns: {', '.join(map(str, columns)) or 'none'}); "
             "name the text column with --text_column=")


def csv_documents(path, progress, stats):
    import csv
    csv.field_size_limit(2**31 - 1)  # a legal document is longer than csv's default 128 KB
    with reading(path, progress, stats) as f:
        rows = csv.reader(f)
        try:
            header = next(rows, None)
            if header is None:
                return
            check_columns(path, header)
            for n, row in enumerate(rows, 2):
                yield record_document(dict(zip(header, row)), f"{path}:{n}")
        except csv.Error as e:
            fail(f"{path}:{rows.line_num}: not valid CSV ({e})")


def arrow_documents(path, progress, stats):
    """Rows of a .parquet, .arrow or .feather file, a batch at a time (Arrow files are memory-mapped)."""
    kind = format_of(path)[0]
    try:
        import pyarrow as pa
        import pyarrow.feather
        import pyarrow.parquet
    except ImportError:
        fail(f"{path}: reading {kind} files needs the pyarrow package (pip install pyarrow)")
    stats["files"] += 1
    try:
        if kind == ".parquet":
            parquet = pyarrow.parquet.ParquetFile(path)
            columns = parquet.schema_arrow.names
        else:
            try:  # the Arrow IPC file format, which .feather (v2) is too
                table = pyarrow.feather.read_table(path, memory_map=True)
            except pa.ArrowInvalid:  # the IPC stream format, which Hugging Face's .arrow files are
                table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
            columns = table.column_names
        check_columns(path, columns)
        keep = [c for c in (text_column, "content", "prompt", "response", "messages", "label") if c in columns]
        batches = (parquet.iter_batches(batch_size=1024, columns=keep) if kind == ".parquet"
                   else table.select(keep).to_batches(max_chunksize=1024))
        n = 0
        for batch in batches:
            for record in batch.to_pylist():
                n += 1
                yield record_document(record, f"{path}:row {n}")
    except (OSError, pa.ArrowException) as e:
        fail(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    finally:
        progress.closed(os.path.getsize(path) if os.path.isfile(path) else 0)


READERS = {".txt": lambda *a: [(None, text_document(*a))], ".md": lambda *a: [(None, text_document(*a))],
           ".jsonl": jsonl_documents, ".csv": csv_documents,
           ".parquet": arrow_documents, ".arrow": arrow_documents, ".feather": arrow_documents}


def input_files(spec, stats):
    """The files named by a comma-separated list of files, folders and globs, each real file once."""
    files = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                fail(f"no files match {item}")
            files += [p for p in matches if os.path.isfile(p) and format_of(p)[0] in FORMATS]
            continue
        if not os.path.exists(item) and not os.path.islink(item):
            fail(f"input not found: {item}")
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                for name in sorted(names):
                    path = os.path.join(root, name)
                    ext = format_of(name)[0]
                    if ext not in FORMATS:
                        stats["unknown"][ext or "(none)"] = stats["unknown"].get(ext or "(none)", 0) + 1
                    elif ext in (".txt", ".md", ".jsonl", ".csv") and looks_binary(path):
                        stats["binary"] += 1
                    else:
                        files.append(path)
        elif format_of(item)[0] in FORMATS:
            files.append(item)
        else:
            fail(f"{item}: not a supported format ({', '.join(FORMATS)}, optionally .gz or .zst)")
    return each_file_once(files)


def each_file_once(paths):
    """Paths in order, without a second name (a link, say) for a file already there."""
    seen, unique = set(), []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def legal_corpus_files():
    paths = sorted(p for pattern in LEGAL_CORPUS for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        fail("the built-in legal corpus needs /usr/share/common-licenses or /usr/share/doc/*/copyright "
             "(Debian/Ubuntu); give your own text with --input=...")
    return each_file_once(paths)


def file_documents(paths, progress, stats):
    """(label, document) for every document in the files: a record's own label, else its file's folder name."""
    for path in paths:
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))  # abspath: "a.txt" is in a folder too
        # the built-in corpus's copyright files have no extension: they are text
        for label, doc in READERS.get(format_of(path)[0], READERS[".txt"])(path, progress, stats):
            yield label or folder, doc


def license_family(name):
    """A DEP-5 License short name (its field's first line) -> its family in LICENSE_FAMILIES, or None
    for a name that joins licenses of different families ("GPL-1+ or Artistic"). An exception
    ("GPL-2+ with OpenSSL exception") keeps the family; CC0 is a public-domain dedication."""
    families = set()
    for part in re.split(r"\s+(?:or|and)\s+|\s*,\s*", name.strip(), flags=re.IGNORECASE):
        part = re.sub(r"\s+with\s.*", "", part, flags=re.IGNORECASE).strip().lower()
        if not part:
            continue
        families.add(next((family for family, pattern in FAMILY_NAMES if re.match(pattern, part)), "other"))
    return families.pop() if len(families) == 1 else None


def dep5_paragraphs(text):
    """(License short name, license text) of each paragraph of a DEP-5 copyright file whose License
    field has text under it; nothing for a file that is not DEP-5 (no Format: line naming it).
    The text is the field's continuation lines unfolded: the leading space gone, " ." a blank line."""
    if not DEP5_FORMAT.match(text.lstrip()):
        return
    for paragraph in re.split(r"\n[^\S\n]*\n", text):
        lines, name, body = paragraph.splitlines(), None, []
        for line in lines:
            if name is not None and line[:1] in (" ", "\t"):
                body.append("" if line.strip() == "." else line[1:].rstrip())
            elif name is not None:
                break  # the next field
            elif line.lower().startswith("license:"):
                name = line[len("license:"):].strip()
        body = "\n".join(body).strip()
        if name and body:
            yield name, body


def license_documents(paths, progress, stats):
    """The built-in classification example: ((family, package), document) for each License
    paragraph (dep5_paragraphs) of the copyright files among paths; the package is the file's folder."""
    for path in paths:
        if os.path.basename(path) != "copyright":
            continue
        with reading(path, progress, stats) as f:
            text = f.read()
        package = os.path.basename(os.path.dirname(os.path.abspath(path)))
        for name, body in dep5_paragraphs(text):
            family = license_family(name)
            if family is None:
                stats["mixed_licenses"] = stats.get("mixed_licenses", 0) + 1
                continue
            yield (family, package), [(body, True)]


def license_example():
    """Is this run the built-in classification example (--labels=True, no input)?"""
    return labels and not input and not hf_dataset


def hf_documents():
    """(label, document) for each row of a Hugging Face dataset, streamed; unlabelled rows get the dataset's name."""
    try:
        import datasets
    except ImportError:
        fail(f"--hf_dataset={hf_dataset} needs the datasets package (pip install datasets)")
    try:
        rows = datasets.load_dataset(hf_dataset, split=hf_split, streaming=True)
        for n, record in enumerate(rows, 1):
            label, doc = record_document(record, f"{hf_dataset}:row {n}")
            yield label or hf_dataset, doc
    except Exception as e:  # offline, no such dataset, no such split: whatever the library raises
        message = (str(e).splitlines() or [""])[0][:200]
        fail(f"cannot load the Hugging Face dataset {hf_dataset!r} (split {hf_split!r}): it needs the network "
             f"the first time ({type(e).__name__}: {message})")


def deduplicated(docs, seen, stats, drop_repeats):
    """(label, document) pairs with each document as an iterator of non-empty (text, counts_in_loss)
    segments, without the paragraphs, prompt/response pairs or conversations seen before; a
    document with nothing left is dropped.

    `seen` holds hashes of whitespace-normalized paragraphs and of pairs (Python's hash:
    stable within this one process, which is all the two passes need). Deduplication
    happens as segments are read: read each document whole before taking the next.
    """
    for label, doc in docs:
        if not drop_repeats:
            segments = iter(doc)
        elif isinstance(doc, list) and not all(loss for _, loss in doc):  # a prompt/response pair, a conversation
            key = hash(tuple(doc))
            if key in seen:
                stats["repeated_pairs"] += 1
                continue
            seen.add(key)
            segments = iter(doc)
        else:
            segments = ((dedup_paragraphs(text, seen, stats), loss) for text, loss in doc)
        segments = ((text, loss) for text, loss in segments if text)
        held = []
        for segment in segments:  # look ahead to the first segment with more than whitespace
            held.append(segment)
            if segment[0].strip():
                break
        else:
            stats["empty"] += 1
            continue
        yield label, itertools.chain(held, segments)


def dedup_paragraphs(text, seen, stats):
    """text without the paragraphs (text between blank lines) whose whitespace-normalized text came before."""
    pieces = PARAGRAPH_BREAK.split(text)  # paragraph, break, paragraph, ..., paragraph
    keys = [hash(key) if (key := " ".join(p.split())) else None for p in pieces[0::2]]
    new = [k for k in keys if k is not None]
    if seen.isdisjoint(new) and len(set(new)) == len(new):  # the common case: nothing repeats
        seen.update(new)
        stats["paragraphs"] += len(new)
        return text
    parts = []
    for paragraph, brk, key in zip(pieces[0::2], pieces[1::2] + [""], keys):
        if key is not None:
            if key in seen:
                stats["repeats"] += 1
                continue
            seen.add(key)
            stats["paragraphs"] += 1
        parts.append(paragraph + brk)
    return "".join(parts)


# -- writing: documents -> tokens (+ loss mask, labels) in a .bin file -------------------------------------

class SplitWriter:
    """Appends documents to {name}.bin (and {name}_mask.bin, {name}_label.bin), encoding them in
    batches on a thread pool.

    While one batch is being encoded the next one is read, so reading, deduplication and
    encoding overlap. The loss mask file is started only when the first prompt/response
    document comes, with ones for every token written before it. The label file is there
    from the start when `label_ids` (label -> id, shared by the splits) is given.
    """

    def __init__(self, folder, name, tok, dtype, pool, workers, progress, label_ids):
        self.folder, self.name, self.tok, self.dtype, self.pool, self.workers = folder, name, tok, dtype, pool, workers
        self.progress, self.batch_chars, self.label_ids = progress, workers * 2**21, label_ids
        self.file = open(os.path.join(folder, f"{name}.bin"), "wb")
        self.labels = open(os.path.join(folder, f"{name}_label.bin"), "wb") if label_ids is not None else None
        self.mask = None
        self.pending, self.pending_chars, self.masked, self.encoding = [], 0, False, None
        self.tokens = self.bytes = self.documents = 0

    def add(self, segments, label):
        label_id = self.label_id(label) if self.labels is not None else 0
        text = None
        for text, loss in segments:
            self.masked |= not loss
            if isinstance(text, SpecialToken):  # a conversation's role token or end-of-text: an id
                if text not in self.tok.special:
                    fail(f"the tokenizer has no {text} token: a conversation needs a tokenizer made with the "
                         "chat template's role tokens (one prepared without --tokenizer_from, or from such a run)")
                self.pending.append((self.tok.special[text], loss, label_id))
                continue
            try:
                self.bytes += len(text.encode())
            except UnicodeEncodeError:  # lone surrogates, from JSON escapes say: as U+FFFD
                text = SURROGATE.sub("\ufffd", text)
                self.bytes += len(text.encode())
            self.pending.append((text, loss, label_id))
            self.pending_chars += len(text)
            if self.pending_chars >= self.batch_chars:
                self.flush()
        if not (isinstance(text, SpecialToken) and text == SPECIAL_TOKENS[0]):  # end of document: its end-of-text is learnt, under its label
            self.pending.append((self.tok.eot_id, True, label_id))  # (a conversation ends in its own)
        self.documents += 1

    def label_id(self, label):
        """0, 1, 2, ... in the order labels are first seen, in either split."""
        if label not in self.label_ids:
            if len(self.label_ids) == MAX_LABELS:
                fail(f"more than {MAX_LABELS} distinct labels (the next is {label[:60]!r}): label ids are stored "
                     "as uint16; use fewer labels, or --labels=False")
            self.label_ids[label] = len(self.label_ids)
        return self.label_ids[label]

    def flush(self):
        """Start encoding the pending batch; write the one before it, whose encoding had time to finish."""
        texts = [text for text, _, _ in self.pending if isinstance(text, str)]
        step = -(-len(texts) // self.workers) or 1
        jobs = [self.pool.submit(self.tok.encode_arrays, texts[i:i + step]) for i in range(0, len(texts), step)]
        if self.encoding:
            self.write(*self.encoding)
        self.encoding = (self.pending, jobs)
        self.pending, self.pending_chars = [], 0

    def write(self, segments, jobs):
        encoded = itertools.chain.from_iterable(job.result() for job in jobs)
        ids = [next(encoded) if isinstance(text, str) else np.array([text], dtype=np.uint32) for text, _, _ in segments]
        if not ids:
            return
        lengths = [len(piece) for piece in ids]
        ids = np.concatenate(ids).astype(self.dtype)
        ids.tofile(self.file)
        if self.masked:
            if self.mask is None:
                self.mask = open(os.path.join(self.folder, f"{self.name}_mask.bin"), "wb")
                ones(self.mask, self.tokens)
            np.repeat(np.array([loss for _, loss, _ in segments], dtype=np.uint8), lengths).tofile(self.mask)
        if self.labels is not None:
            np.repeat(np.array([label for _, _, label in segments], dtype=np.uint16), lengths).tofile(self.labels)
        self.tokens += len(ids)
        self.progress.show(len(ids))

    def close(self, masked):
        """Write the rest; `masked` asks for a mask file even if no document here needed one."""
        self.flush()
        self.write(*self.encoding)
        self.file.close()
        if masked and self.mask is None:
            with open(os.path.join(self.folder, f"{self.name}_mask.bin"), "wb") as f:
                ones(f, self.tokens)
        elif self.mask is not None:
            self.mask.close()
        if self.labels is not None:
            self.labels.close()
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


def ones(f, n, block=1 << 24):
    while n > 0:
        np.ones(min(n, block), dtype=np.uint8).tofile(f)
        n -= block


# -- the two passes ----------------------------------------------------------------------------------------

def corpus_documents(paths, progress, stats):
    """The training input as a stream of deduplicated documents; each pass calls this anew."""
    docs = license_documents(paths, progress, stats) if license_example() else file_documents(paths, progress, stats)
    if hf_dataset:
        docs = itertools.chain(docs, hf_documents())
    return deduplicated(docs, set(), stats, dedup)


def held_out(index):
    """For a corpus larger than the first pass: each document is val with probability val_fraction.
    (A tuple of ints hashes the same in every process, unlike a string.)"""
    return hash((seed, index)) % 1_000_003 < val_fraction * 1_000_003


def split_unit(index, label):
    """What val holds out whole: a document (its index), or in the license example its package."""
    return label[1] if license_example() else index


def tokenizer_sample(paths):
    """Pass 1: the first tokenizer_train_bytes of train text, and the val documents' indices if
    this pass saw the whole corpus (None if not)."""
    texts, size, complete = [], 0, True
    docs = corpus_documents(paths, Progress(0), new_stats())
    for index, (label, segments) in enumerate(docs):
        for text, _ in segments:
            if isinstance(text, SpecialToken):  # a role token: not text to learn a tokenizer from
                continue
            texts.append((split_unit(index, label), text))
            size += len(text)
            if size >= tokenizer_train_bytes:
                break
        if size >= tokenizer_train_bytes:
            complete = next(docs, None) is None
            break
    if not texts:
        fail(f"no text in the input: {input or hf_dataset or 'built-in legal corpus'}")
    if val_input:
        return [text for _, text in texts], set()
    if not complete:
        return [text for unit, text in texts if not held_out_unit(unit)], None
    units = list(dict.fromkeys(unit for unit, _ in texts)) if license_example() else range(texts[-1][0] + 1)
    n = len(units)
    if n < 2:
        what = "packages with License paragraphs" if license_example() else "documents"
        fail(f"need at least 2 {what} to hold out a val split, got {n}: "
             "give more documents, or the val documents with --val_input=...")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val = set(random.Random(seed).sample(units, n_val))
    return [text for unit, text in texts if unit not in val], val


def held_out_unit(unit):
    return held_out(zlib.crc32(unit.encode()) if isinstance(unit, str) else unit)


def main():
    start = time.time()
    if not 0 < val_fraction < 1 and not val_input:
        fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer_train_bytes <= 0 or num_workers < 0:
        fail("tokenizer_train_bytes must be positive and num_workers at least 0")
    workers = num_workers or os.cpu_count()

    # the files and the output folder, checked before any long work
    stats = new_stats()
    paths = input_files(input, stats) if input else [] if hf_dataset else legal_corpus_files()
    val_paths = input_files(val_input, stats) if val_input else []
    if not paths and not hf_dataset:
        fail(f"no text in the input: {input}")
    out_dir = os.path.join(data_dir, dataset)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
    except OSError as e:
        fail(f"cannot write to {out_dir}: {e.strerror or e}")
    try:
        prepare_into(tmp, out_dir, paths, val_paths, stats, workers, start)
    except OSError as e:  # a full disk, say: the old dataset, if any, is still whole
        fail(f"cannot write to {out_dir}: {e.strerror or e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_into(tmp, out_dir, paths, val_paths, stats, workers, start):
    # pass 1: the tokenizer, from train text only
    t0 = time.time()
    sample, val_ids = tokenizer_sample(paths)
    try:
        if tokenizer_from.startswith("hf:"):  # a Hugging Face model's, as train.py --init_from=hf:DIR maps it
            from runtime import hf_tokenizer
            tok = hf_tokenizer(tokenizer_from[3:])
        else:
            tok = load_tokenizer(tokenizer_from) if tokenizer_from else train_tokenizer(tokenizer, sample, vocab_size)
    except ValueError as e:
        fail(str(e))
    sample_mb = sum(map(len, sample)) / 1e6
    del sample
    if tokenizer_from:
        print(f"the {tok.kind} tokenizer of {tokenizer_from}: vocab_size {tok.vocab_size}")
    elif tok.fixed_vocab:
        print(f"{tokenizer} tokenizer ready in {time.time() - t0:.2f}s: vocab_size {tok.vocab_size}")
    else:
        print(f"trained {tokenizer} tokenizer on {sample_mb:.1f} MB in {time.time() - t0:.2f}s: vocab_size "
              f"{tok.vocab_size}" + (f" (asked for {vocab_size}: the text supports no more)"
                                     if tok.vocab_size < vocab_size else ""))
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    if tokenizer_from and not tokenizer_from.startswith("hf:"):  # the very files: the fingerprint the run checks
        files = tokenizer_files(tokenizer_from)
        for name in files:
            shutil.copyfile(os.path.join(tokenizer_from, name), os.path.join(tmp, name))
    else:
        files = tok.save(tmp)
    tok = load_tokenizer(tmp)  # encode with what was saved, as every later script will

    # pass 2: every document, encoded, to train.bin or val.bin
    t0 = time.time()
    total = sum(os.path.getsize(p) for p in paths + val_paths) if not hf_dataset else 0
    progress = Progress(total)
    pool = concurrent.futures.ThreadPoolExecutor(workers)  # tokenizers release the GIL: threads are enough
    # the license example's classes are all there, in their order, whichever it finds
    label_ids = ({name: i for i, name in enumerate(LICENSE_FAMILIES)} if license_example() else {}) if labels else None
    writers = {name: SplitWriter(tmp, name, tok, dtype, pool, workers, progress, label_ids)
               for name in ("train", "val")}
    val_packages = set()
    for index, (label, segments) in enumerate(corpus_documents(paths, progress, stats)):
        unit = split_unit(index, label)
        if val_input:
            split = "train"
        else:
            split = "val" if (unit in val_ids if val_ids is not None else held_out_unit(unit)) else "train"
        if license_example():
            label = label[0]
            if split == "val":
                val_packages.add(unit)
        writers[split].add(segments, label)
    if val_input:
        for label, segments in deduplicated(file_documents(val_paths, progress, stats), None, stats, False):
            writers["val"].add(segments, label)
    masked = any(w.mask is not None or w.masked for w in writers.values())
    splits = {name: w.close(masked) for name, w in writers.items()}
    pool.shutdown()
    progress.show(0, final=True)
    for name, split in splits.items():
        if not split["documents"]:
            fail(f"the {name} split has no documents: "
                 + ("no text in the val input" if name == "val" and val_input else
                    "raise val_fraction or give the val documents with --val_input=..."))
    mb = sum(s["bytes"] for s in splits.values()) / 1e6
    speed = mb / max(time.time() - t0, 1e-9)

    skipped = sum(stats["unknown"].values()) + stats["binary"]
    print(f"read {stats['files']} files; skipped {skipped} files ({stats['binary']} binary"
          + "".join(f", {n} {ext}" for ext, n in sorted(stats["unknown"].items())) + f"); "
          f"{stats['empty']} documents dropped as empty or wholly repeated")
    if dedup:
        print(f"paragraphs: {stats['paragraphs']} kept, {stats['repeats']} repeats dropped"
              + (f"; {stats['repeated_pairs']} repeated prompt/response pairs or conversations dropped"
                 if stats["repeated_pairs"] else ""))
    if stats.get("mixed_licenses"):
        print(f"{stats['mixed_licenses']} License paragraphs left out: their names join licenses of different families")
    if stats["replaced_bytes"]:
        print(f"warning: {stats['replaced_bytes']} bytes that are not UTF-8 in {stats['replaced_files']} "
              f"files were replaced by U+FFFD")
    for name, split in splits.items():
        print(f"{name}: {split['documents']} documents, {split['bytes'] / 1e6:.2f} MB -> {split['tokens']:,} tokens")
    print(f"encoded {mb:.2f} MB at {speed:.1f} MB/s with {workers} threads"
          + (", with a loss mask (prompt/response documents, conversations)" if masked else "")
          + (f", {len(label_ids)} labels" if labels else ""))

    meta = {
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"kind": tok.kind, "files": files, "fingerprint": tokenizer_fingerprint(tmp)},
        "special_tokens": tok.special,
        "eot_id": tok.eot_id, "pad_id": tok.pad_id, "mask_id": tok.mask_id,
        "bos_id": tok.special.get("<|bos|>"), "unk_id": tok.special.get("<|unk|>"),
        "loss_mask": masked,
        "labels": list(label_ids) if labels else None,
        "splits": splits,
        "source": ",".join(filter(None, [input, hf_dataset])) or "built-in legal corpus",
    }
    if license_example():
        meta["source"] = "built-in license classification example: DEP-5 License paragraphs -> license family"
        meta["val_packages"] = sorted(val_packages)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    optional = {"train_mask.bin": masked, "val_mask.bin": masked, "train_label.bin": labels, "val_label.bin": labels}
    names = [*files, "train.bin", "val.bin", "meta.json", *(name for name, written in optional.items() if written)]
    for name in names:
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    for stale in (name for name, written in optional.items() if not written):  # from an earlier dataset of this name
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    print(f"wrote {out_dir}/ in {time.time() - start:.1f}s")


if __name__ == "__main__":
    given = set()
    configure(globals(), given=given)
    if license_example() and "dataset" not in given:  # not over the built-in corpus the language models train on
        dataset = "licenses"
    main()
