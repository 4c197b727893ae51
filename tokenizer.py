"""
Tokenizers for nanolex: every kind behind one small interface.

    tok = train_tokenizer("bpe", texts, vocab_size=8192)
    ids = tok.encode("The Licensee shall ...")        # list[int]
    tok.decode(ids)                                   # the same text back
    tok.save("data/legal")                            # -> ["tokenizer.json", "tokenizer.bpe"]
    tok = load_tokenizer("data/legal")

Design choices:
- One interface, many kinds: KINDS maps a kind name to its class; each class has
  train(texts, vocab_size) and load(directory, header). Callers only ever use
  train_tokenizer() and load_tokenizer(), so a new kind is one class and one entry.
- Three special tokens, <|endoftext|> <|pad|> <|mask|>, in every kind, with the ids
  right after the ordinary ones. vocab_size counts them.
- Text in, text out: encode() treats special-token strings in the text as ordinary text
  unless allow_special=True, so a document cannot smuggle in an end-of-text token.
- bpe: byte-level BPE. The 256 bytes are the base alphabet, so every string round-trips
  exactly. A GPT-4 style regex splits text into chunks (words, numbers of at most
  two digits, punctuation runs, whitespace runs) that merges never cross; rustbpe learns
  the merges, tiktoken encodes and decodes with them (fast, and batched in threads
  that release the GIL; long texts are cut where the pattern cuts anyway, so that a
  single big document is spread over the threads too).
- Saved as plain text, never pickle: tokenizer.json (kind, vocab_size, pattern, special
  token ids, data file names) plus the data file, for bpe one "base64(token) rank" line
  per token. Files are written to a temporary name and renamed, so never half-written.
"""

import base64
import hashlib
import json
import os
from typing import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>")

# GPT-4's split pattern without its lookahead and possessive quantifiers, and with
# numbers cut into chunks of at most two digits (a small vocabulary should not spend
# merges on every three-digit number). Without those fancy parts the regex runs in the
# regex crate's automaton rather than a backtracker: encoding is ~3x faster (37 vs 12
# MB/s per thread on the legal corpus) for 0.05% more tokens.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+"""
PIECE_CHARS = 1 << 16  # encode_batch cuts longer texts into pieces of about this size


def _cut(text, size):
    """Pieces of text of about `size` characters, cut after a newline that a non-space follows.

    No chunk of SPLIT_PATTERN holds a newline followed by a non-space character, so the
    pieces encode to exactly the ids of the whole text.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1 or cut + 1 == len(text):
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def _write_file(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"no tokenizer in {os.path.dirname(path) or '.'}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from None


class Tokenizer:
    """What every kind shares: the special tokens and the tokenizer.json header."""

    kind = None

    def __init__(self, vocab_size, special):
        self.vocab_size = vocab_size
        self.special = dict(special)  # token string -> id
        self.eot_id, self.pad_id, self.mask_id = (self.special[s] for s in SPECIAL_TOKENS)

    def encode_arrays(self, texts):
        """encode_batch in one thread, as numpy arrays: what prepare.py's encoding threads call."""
        import numpy as np
        return [np.array(ids, dtype=np.uint32) for ids in self.encode_batch(texts, num_threads=1)]

    def _save_header(self, directory, extra, files):
        header = {"kind": self.kind, "vocab_size": self.vocab_size, **extra,
                  "special_tokens": self.special, "files": files}
        _write_file(os.path.join(directory, "tokenizer.json"), json.dumps(header, indent=2) + "\n")
        return ["tokenizer.json", *files]


class BPETokenizer(Tokenizer):
    """Byte-level BPE: merges learned by rustbpe, encoding and decoding by tiktoken."""

    kind = "bpe"
    data_file = "tokenizer.bpe"

    def __init__(self, ranks, pattern):
        special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        super().__init__(len(ranks) + len(special), special)
        self.ranks, self.pattern = ranks, pattern  # ranks: token bytes -> id
        import tiktoken
        self.enc = tiktoken.Encoding("nanolex-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special, explicit_n_vocab=self.vocab_size)

    @classmethod
    def train(cls, texts, vocab_size):
        import rustbpe
        bpe = rustbpe.Tokenizer()
        # rustbpe's vocab_size counts the 256 byte tokens plus the merges, not our specials.
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        return cls(dict(bpe.get_mergeable_ranks()), SPLIT_PATTERN)

    @classmethod
    def load(cls, directory, header):
        path = os.path.join(directory, cls.data_file)
        ranks = {}
        for n, line in enumerate(_read_file(path).splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:60]!r}") from None
        if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError(f"{path}: the ranks must be 0..n-1 and include all 256 single bytes")
        if not isinstance(header.get("pattern"), str):
            raise ValueError(f"{directory}: tokenizer.json has no split pattern")
        tok = cls(ranks, header["pattern"])
        if header.get("vocab_size") != tok.vocab_size or header.get("special_tokens") != tok.special:
            raise ValueError(f"{directory}: tokenizer.json does not match {cls.data_file} "
                             f"(vocab_size {header.get('vocab_size')} vs {tok.vocab_size})")
        return tok

    def save(self, directory):
        lines = (f"{base64.b64encode(t).decode('ascii')} {r}\n"
                 for t, r in sorted(self.ranks.items(), key=lambda item: item[1]))
        _write_file(os.path.join(directory, self.data_file), "".join(lines))
        return self._save_header(directory, {"pattern": self.pattern}, [self.data_file])

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        # Long texts go in pieces, so that one big document still keeps every thread busy.
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for piece in _cut(text, PIECE_CHARS):
                pieces.append(piece)
                owners.append(i)
        batch = self.enc.encode_ordinary_batch(pieces, num_threads=num_threads)
        if len(pieces) == len(texts):
            return batch
        out = [[] for _ in texts]
        for i, ids in zip(owners, batch):
            out[i] += ids
        return out

    def encode_arrays(self, texts):
        # numpy straight from tiktoken's buffer: no Python int per token (1.2-1.5x faster)
        return [self.enc.encode_to_numpy(text, disallowed_special=()) for text in texts]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.enc.decode(ids, errors="replace")


KINDS = {"bpe": BPETokenizer}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn a tokenizer of `kind` with `vocab_size` ids (special tokens included) from texts.

    A small corpus may support fewer merges than asked for: the result's vocab_size says
    how many ids it really has.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind '{kind}' (known: {', '.join(KINDS)})")
    smallest = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not smallest <= vocab_size < 2**31:
        raise ValueError(f"vocab_size must be an integer from {smallest} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens) to 2**31 - 1, got {vocab_size!r}")
    return KINDS[kind].train(texts, vocab_size)


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer saved in `directory` (its tokenizer.json and the files that names)."""
    path = os.path.join(directory, "tokenizer.json")
    try:
        header = json.loads(_read_file(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    kind = header.get("kind") if isinstance(header, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind].load(directory, header)


def tokenizer_fingerprint(directory) -> str:
    """A short hash of the tokenizer files in `directory`: equal fingerprints, equal tokenizers."""
    header = json.loads(_read_file(os.path.join(directory, "tokenizer.json")))
    digest = hashlib.sha256()
    for name in ["tokenizer.json", *header.get("files", [])]:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError as e:
            raise ValueError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
    return digest.hexdigest()[:16]
