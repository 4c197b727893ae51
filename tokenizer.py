"""
Tokenizers for nanolex: every kind behind one small interface.

    tok = train_tokenizer("bpe", texts, vocab_size=8192)   # texts: any iterable of str, read once
    ids = tok.encode("The Licensee shall ...")              # list[int]
    tok.decode(ids)                                         # the text back
    tok.save("data/legal")                                  # -> ["tokenizer.json", "tokenizer.bpe"]
    tok = load_tokenizer("data/legal")

The kinds (KINDS):
- bpe: byte-level BPE. The 256 bytes are the base alphabet, so every string round-trips
  exactly. A GPT-4 style regex splits text into chunks (words, numbers of at most two
  digits, punctuation runs, whitespace runs) that merges never cross; rustbpe learns the
  merges, tiktoken encodes and decodes with them (fast, and batched in threads that
  release the GIL; long texts are cut where the pattern cuts anyway).
- gpt2: the pretrained GPT-2 encoding (tiktoken). Its files come from the network the
  first time (tiktoken caches them, see TIKTOKEN_CACHE_DIR); once saved with a dataset it
  needs no network again. <|endoftext|> is GPT-2's own 50256. Offline, training raises a
  ValueError saying so (within GPT2_DOWNLOAD_SECONDS, even on a network that never answers).
- wordpiece: WordPiece, trained and run here in plain Python. Words are runs of letters
  and digits, single punctuation marks, and newlines; merges are chosen by the gain in
  likelihood, not by frequency (see wordpiece_vocabulary); continuation pieces start with
  "##"; encoding is greedy longest-match-first, and a word becomes <|unk|> only if it has
  a character never seen in training in that place (first in a word, or inside one; or too
  rare for a vocab_size smaller than the alphabet). Decoding puts one space between words:
  decode(encode(x)) normalizes whitespace (spaces and tabs are not kept, newlines are).
- unigram, sentencepiece: SentencePiece's Unigram and BPE models, with byte fallback, so
  no text becomes <|unk|>; no normalization and no dummy prefix, so text round-trips
  (except U+2581 "▁", SentencePiece's own space mark, which always comes back as a space).
  A vocab_size too small for the text's characters plus the 256 bytes is a ValueError.
- byte: the 256 byte values; it learns nothing and ignores vocab_size (any positive
  integer is accepted). char: one id per character seen in training (the most frequent
  first, as many as vocab_size allows), <|unk|> for the others. Both are for tiny
  experiments.

What every kind shares:
- Special tokens <|endoftext|> <|pad|> <|mask|> <|bos|>, the chat template's role tokens
  <|system|> <|user|> <|assistant|> (see chat_segments), plus <|unk|> in the kinds
  whose algorithm needs one (wordpiece, char, unigram, sentencepiece). Their ids follow
  the ordinary ones (sentencepiece kinds keep SentencePiece's own unk id) and are written
  in tokenizer.json. vocab_size counts them.
- Text in, text out: encode() treats special-token strings in the text as ordinary text
  unless allow_special=True, so a document cannot smuggle in an end-of-text token.
  Lone surrogates (not valid Unicode) are encoded as U+FFFD, a surrogate pair as its
  character; nothing raises. So the byte-level kinds (bpe, byte, gpt2) give back every str
  without surrogates exactly: decode(encode(x)) == x.
- A learning kind given no text at all (wordpiece, char, unigram, sentencepiece) raises a
  ValueError; a text that supports fewer ids than asked for gives a smaller vocab_size.
- Saved as plain text or the library's own model format, never pickle: tokenizer.json
  (kind, vocab_size, special token ids, data file names, settings) plus a data file.
  Files are written to a temporary name and renamed, so never half-written.
"""

import base64
import collections
import hashlib
import heapq
import importlib
import io
import itertools
import json
import math
import os
import re
import tempfile
from typing import Iterable

# The chat template's role markers (see chat_segments). Tokenizers made before them have only
# the first four special tokens, and load so (saved_specials); they cannot hold a conversation.
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>", "<|bos|>", *ROLE_TOKENS.values())
UNK = "<|unk|>"

# GPT-4's split pattern without its lookahead and possessive quantifiers, and with
# numbers cut into chunks of at most two digits (a small vocabulary should not spend
# merges on every three-digit number). Without those fancy parts the regex runs in the
# regex crate's automaton rather than a backtracker: encoding is ~3x faster (37 vs 12
# MB/s per thread on the legal corpus) for 0.05% more tokens.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+"""
PIECE_CHARS = 1 << 16  # encode_batch cuts longer texts into pieces of about this size


def _cut(text, size):
    r"""Pieces of text of about `size` characters, cut after a newline with a non-space on both sides.

    Both SPLIT_PATTERN and GPT-2's pattern end a chunk at such a newline and never look
    back, so the pieces encode to exactly the ids of the whole text. (GPT-2's \s+(?!\S)
    is why the character before the newline matters: at the end of a piece it would take
    a whole run of whitespace that, in the whole text, leaves its last newline apart.)
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and cut + 1 < len(text) and (text[cut + 1].isspace() or text[cut - 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1 or cut + 1 == len(text):
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def _valid(text):
    """text that UTF-8 can hold: a surrogate pair becomes its character (as UTF-16 would read it)
    and a lone surrogate U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _int_list(ids, vocab_size):
    """ids (a list, tuple, numpy array, any iterable of integers) as a list of Python ints, each a valid id."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(map(int, ids))
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"token id {bad} is not in the vocabulary (ids 0 to {vocab_size - 1})")
    return ids


def _no_text(kind):
    return ValueError(f"the {kind} tokenizer has no text to learn from")


def _package(name):
    """import name, a package requirements.txt pins, when a tokenizer first needs it: a ValueError
    naming the install where it is missing (an environment that did not install requirements.txt)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"the {name} package is not installed: pip install -r requirements.txt") from None


def _write_file(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_file(path, binary=False):
    try:
        with open(path, "rb") if binary else open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"no tokenizer in {os.path.dirname(path) or '.'}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from None


class Tokenizer:
    """What every kind shares: the special tokens, encode/decode around them, the tokenizer.json header.

    A kind implements _encode_ordinary(text) and _decode_ordinary(ids) (or overrides
    encode/decode for speed), train(texts, vocab_size), load(directory, header) and save().
    """

    kind = None
    data_file = None
    fixed_vocab = False  # True: the vocabulary is given (byte, gpt2); train() learns nothing and ignores vocab_size

    def __init__(self, vocab_size, special):
        self.vocab_size = vocab_size
        self.special = dict(special)  # token string -> id
        self.eot_id, self.pad_id, self.mask_id, self.bos_id = (self.special[s] for s in SPECIAL_TOKENS[:4])
        self.role_ids = {role: self.special[s] for role, s in ROLE_TOKENS.items() if s in self.special}
        self.unk_id = self.special.get(UNK)
        self._special_text = {i: s for s, i in self.special.items()}
        self._special_pattern = re.compile("|".join(map(re.escape, self.special)))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        text = _valid(text)
        if not allow_special:
            return self._encode_ordinary(text)
        ids, start = [], 0
        for match in self._special_pattern.finditer(text):
            ids += self._encode_ordinary(text[start:match.start()])
            ids.append(self.special[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_arrays(self, texts):
        """encode_batch in one thread, as numpy arrays: what prepare.py's encoding threads call."""
        import numpy as np
        return [np.array(ids, dtype=np.uint32) for ids in self.encode_batch(texts, num_threads=1)]

    def decode(self, ids) -> str:
        ids = _int_list(ids, self.vocab_size)
        if self._special_text.keys().isdisjoint(ids):  # the common case, without a Python loop
            return self._decode_ordinary(ids)
        out, run = [], []
        for i in ids:
            if i in self._special_text:
                out.append(self._decode_ordinary(run))
                out.append(self._special_text[i])
                run = []
            else:
                run.append(i)
        out.append(self._decode_ordinary(run))
        return "".join(out)

    def _save_header(self, directory, extra, files):
        header = {"kind": self.kind, "vocab_size": self.vocab_size, **extra,
                  "special_tokens": self.special, "files": files}
        _write_file(os.path.join(directory, "tokenizer.json"), json.dumps(header, indent=2) + "\n")
        return ["tokenizer.json", *files]

    def _check_header(self, directory, header):
        if header.get("vocab_size") != self.vocab_size or header.get("special_tokens") != self.special:
            raise ValueError(f"{directory}: tokenizer.json does not match {self.data_file or 'its kind'} "
                             f"(vocab_size {header.get('vocab_size')} vs {self.vocab_size})")
        return self


def _specials_after(n, unk=False, specials=SPECIAL_TOKENS):
    """The special tokens' ids when n ordinary ids come first."""
    names = specials + ((UNK,) if unk else ())
    return {s: n + i for i, s in enumerate(names)}


def saved_specials(header):
    """The special tokens a saved tokenizer has: all of them, or the four of one made before the role tokens."""
    saved = header.get("special_tokens")
    return SPECIAL_TOKENS if isinstance(saved, dict) and ROLE_TOKENS["user"] in saved else SPECIAL_TOKENS[:4]


class BPETokenizer(Tokenizer):
    """Byte-level BPE: merges learned by rustbpe, encoding and decoding by tiktoken."""

    kind = "bpe"
    data_file = "tokenizer.bpe"
    min_vocab_size = 256 + len(SPECIAL_TOKENS)

    def __init__(self, ranks, pattern, specials=SPECIAL_TOKENS):
        special = _specials_after(len(ranks), specials=specials)
        super().__init__(len(ranks) + len(special), special)
        self.ranks, self.pattern = ranks, pattern  # ranks: token bytes -> id
        tiktoken = _package("tiktoken")
        self.enc = tiktoken.Encoding(f"nanolex-{self.kind}", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special, explicit_n_vocab=self.vocab_size)

    @classmethod
    def train(cls, texts, vocab_size):
        bpe = _package("rustbpe").Tokenizer()
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
        return cls(ranks, header["pattern"], saved_specials(header))._check_header(directory, header)

    def save(self, directory):
        lines = (f"{base64.b64encode(t).decode('ascii')} {r}\n"
                 for t, r in sorted(self.ranks.items(), key=lambda item: item[1]))
        _write_file(os.path.join(directory, self.data_file), "".join(lines))
        return self._save_header(directory, {"pattern": self.pattern}, [self.data_file])

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.enc.encode(_valid(text), allowed_special="all")
        return self.enc.encode_ordinary(text)  # tiktoken replaces lone surrogates itself

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
        return [self.enc.encode_to_numpy(_valid(text), disallowed_special=()) for text in texts]

    def decode(self, ids) -> str:
        ids = _int_list(ids, self.vocab_size)
        return self.enc.decode(ids, errors="replace")


GPT2_DOWNLOAD_SECONDS = 120  # tiktoken's download has no time limit of its own; a dead network would hang


def _fetch_gpt2():
    """tiktoken's GPT-2 ranks and pattern: from its cache, else downloaded, within GPT2_DOWNLOAD_SECONDS."""
    import threading
    _package("tiktoken")
    import tiktoken_ext.openai_public as openai_public  # installed with tiktoken
    result = {}

    def fetch():
        try:
            result["gpt2"] = openai_public.gpt2()
        except Exception as e:  # offline: whatever requests, the cache or the hash check raise
            result["error"] = e

    # requests waits forever on a connection that never answers (socket.setdefaulttimeout
    # does not reach it), so the download runs in a daemon thread that may be left behind.
    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(GPT2_DOWNLOAD_SECONDS)
    if "gpt2" in result:
        return result["gpt2"]
    if "error" in result:
        error = result["error"]
        message = (str(error).splitlines() or [""])[0]
        why = type(error).__name__ + (f": {message}" if message and len(message) <= 100 else "")
    else:
        why = f"no answer within {GPT2_DOWNLOAD_SECONDS} s"
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")  # where tiktoken keeps them
    raise ValueError(f"the gpt2 tokenizer's files could not be downloaded ({why}): it needs the network the "
                     f"first time, then works offline from tiktoken's cache {cache} "
                     "(point TIKTOKEN_CACHE_DIR at a folder that holds them)")


# GPT-2's split pattern, as tiktoken writes it (r50k_pat_str) but with its lookahead-free
# alternatives in one group: the regex engine runs that group as one automaton instead of
# trying them one by one in its backtracking VM, which makes encoding 1.6x faster (bench.py
# --what=tokenizers --kinds=gpt2: 16.8 vs 10.2 MB/s per thread on the legal corpus). Same
# chunks, so the same ids: leftmost-first alternation does not care about the grouping, and
# nothing follows the possessive quantifiers tiktoken uses that could backtrack into them
# (tested against tiktoken's own pattern).
GPT2_PATTERN = r"""(?:'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+)|\s+$|\s+(?!\S)|\s"""


class GPT2Tokenizer(BPETokenizer):
    """GPT-2's own byte-level BPE (50,257 ids with <|endoftext|> = 50256), fetched by tiktoken."""

    kind = "gpt2"
    min_vocab_size = 1  # vocab_size is GPT-2's, whatever is asked
    fixed_vocab = True

    @classmethod
    def train(cls, texts, vocab_size):
        return cls(_fetch_gpt2()["mergeable_ranks"], GPT2_PATTERN)


class PieceListTokenizer(Tokenizer):
    """A kind whose vocabulary is a list of strings, an id each, then the specials and <|unk|>.

    Saved as one JSON string a line (JSON, so that a piece may be a newline).
    """

    min_vocab_size = len(SPECIAL_TOKENS) + 2

    def __init__(self, pieces, specials=SPECIAL_TOKENS):
        super().__init__(len(pieces) + len(specials) + 1, _specials_after(len(pieces), True, specials))
        self.pieces = pieces
        self.ids = {p: i for i, p in enumerate(pieces)}

    @classmethod
    def load(cls, directory, header):
        path = os.path.join(directory, cls.data_file)
        try:
            pieces = [json.loads(line) for line in _read_file(path).splitlines()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not one JSON string a line ({e})") from None
        if not pieces or not all(isinstance(p, str) and cls.valid_piece(p) for p in pieces) \
                or len(set(pieces)) != len(pieces):
            raise ValueError(f"{path}: the pieces must be distinct strings, {cls.valid_piece.__doc__}")
        return cls(pieces, saved_specials(header))._check_header(directory, header)

    def save(self, directory):
        _write_file(os.path.join(directory, self.data_file), "".join(json.dumps(p) + "\n" for p in self.pieces))
        return self._save_header(directory, {}, [self.data_file])


# -- WordPiece, in plain Python -------------------------------------------------------------------------------

WORD = re.compile(r"\n|[^\W_]+|[^\w\s]|_")  # a newline, a run of letters/digits, or one other visible character


def wordpiece_vocabulary(word_counts, size):
    """Pieces (alphabet first, then one per merge) learned from {word: count}, at most `size` of them.

    A word starts as its characters, all but the first marked "##". Each step merges the
    adjacent pair that most raises the likelihood of the corpus under a unigram model of
    its symbols: count(ab) * log(count(ab) * N / (count(a) count(b))), N the number of
    characters. The log ratio favours pairs whose parts seldom occur apart; the factor
    count(ab) keeps a pair seen once from winning on that alone. (N is held at its start
    value, so a pair's score changes only when its own counts do.) Pair and symbol
    counts are updated only for the words that hold the merged pair; a heap gives the best
    pair, and every pair whose score changes is pushed again, so an entry that no longer
    matches its pair's score is simply dropped when it comes up.
    """
    words, freqs, symbol_count = [], [], collections.Counter()
    for word, freq in word_counts.items():
        symbols = [word[0]] + ["##" + c for c in word[1:]]
        words.append(symbols)
        freqs.append(freq)
        for s in symbols:
            symbol_count[s] += freq
    pieces = sorted(symbol_count, key=lambda s: (-symbol_count[s], s))[:size]
    known = set(pieces)
    pair_count, pair_words, symbol_pairs = collections.Counter(), collections.defaultdict(set), collections.defaultdict(set)
    for w, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_count[pair] += freqs[w]
            pair_words[pair].add(w)
    for pair in pair_count:
        symbol_pairs[pair[0]].add(pair)
        symbol_pairs[pair[1]].add(pair)

    total = sum(symbol_count.values())

    def score(pair):
        together = pair_count[pair]
        return together * math.log(together * total / (symbol_count[pair[0]] * symbol_count[pair[1]]))

    heap = [(-score(p), p) for p in pair_count]
    heapq.heapify(heap)
    while len(pieces) < size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count[pair] <= 0 or -neg != score(pair):
            continue  # stale: the pair is gone, or its current score was pushed again
        a, b = pair
        merged = a + b[2:]
        if merged not in known:
            known.add(merged)
            pieces.append(merged)
        changed = set()
        for w in pair_words.pop(pair):
            symbols, freq = words[w], freqs[w]
            old = list(zip(symbols, symbols[1:]))
            new_symbols, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    new_symbols.append(merged)
                    symbol_count[a] -= freq
                    symbol_count[b] -= freq
                    symbol_count[merged] += freq
                    i += 2
                else:
                    new_symbols.append(symbols[i])
                    i += 1
            words[w] = new_symbols
            for p in old:
                pair_count[p] -= freq
                changed.add(p)
            for p in zip(new_symbols, new_symbols[1:]):
                if pair_count[p] <= 0:
                    symbol_pairs[p[0]].add(p)
                    symbol_pairs[p[1]].add(p)
                pair_count[p] += freq
                changed.add(p)
            for p in set(old) - set(zip(new_symbols, new_symbols[1:])):
                pair_words[p].discard(w)
            for p in zip(new_symbols, new_symbols[1:]):
                pair_words[p].add(w)
        pair_words.pop(pair, None)
        # the scores that moved: pairs whose count changed, and every pair holding a or b
        for p in changed | symbol_pairs[a] | symbol_pairs[b]:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-score(p), p))
    return pieces


class WordPieceTokenizer(PieceListTokenizer):
    """WordPiece: likelihood-scored merges, "##" continuation pieces, greedy longest match."""

    kind = "wordpiece"
    data_file = "tokenizer.vocab"

    def __init__(self, pieces, specials=SPECIAL_TOKENS):
        super().__init__(pieces, specials)
        self.longest = max((len(p.removeprefix("##")) for p in pieces), default=1)
        self.cache = {}  # word -> ids

    @staticmethod
    def valid_piece(piece):
        """non-empty"""
        return bool(piece.removeprefix("##"))

    @classmethod
    def train(cls, texts, vocab_size):
        counts = collections.Counter()
        for text in texts:
            counts.update(WORD.findall(_valid(text)))
        if not counts:
            raise _no_text(cls.kind)
        return cls(wordpiece_vocabulary(counts, vocab_size - len(SPECIAL_TOKENS) - 1))

    def _encode_ordinary(self, text):
        ids = []
        for word in WORD.findall(text):
            known = self.cache.get(word)
            if known is None:
                if len(self.cache) > 1_000_000:
                    self.cache.clear()
                known = self.cache[word] = self._longest_match_first(word)
            ids += known
        return ids

    def _longest_match_first(self, word):
        ids, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self.longest), start, -1):
                i = self.ids.get(word[start:end] if start == 0 else "##" + word[start:end])
                if i is not None:
                    break
            else:
                return [self.unk_id]  # a character never seen in training
            ids.append(i)
            start = end
        return ids

    def decode(self, ids) -> str:
        words, glue = [], False  # glue: the last word may take a "##" piece
        for i in _int_list(ids, self.vocab_size):
            piece = self._special_text.get(i) or self.pieces[i]
            if piece.startswith("##") and glue:
                words[-1] += piece[2:]
            else:
                words.append(piece)
                glue = piece != "\n" and i not in self._special_text
        out = []
        for word in words:  # one space between words, none around newlines
            if out and word != "\n" and out[-1] != "\n":
                out.append(" ")
            out.append(word)
        return "".join(out)


# -- SentencePiece ---------------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE with byte fallback (unigram: the same, with a Unigram model)."""

    kind = "sentencepiece"
    model_type = "bpe"
    data_file = "tokenizer.model"
    min_vocab_size = 300  # the 256 byte pieces, the specials, and a few characters

    def __init__(self, model, specials=SPECIAL_TOKENS):
        self.model = model  # the serialized ModelProto
        self.sp = _package("sentencepiece").SentencePieceProcessor(model_proto=model)
        n = self.sp.get_piece_size()
        special = _specials_after(n, specials=specials)
        special[UNK] = self.sp.unk_id()
        super().__init__(n + len(specials), special)
        self.newline_id = self.sp.piece_to_id("<0x0A>")  # a byte-fallback piece

    @classmethod
    def train(cls, texts, vocab_size):
        sentencepiece = _package("sentencepiece")
        # SentencePiece learns from lines (newlines come back through byte fallback) and skips
        # lines over max_sentence_length bytes: long ones go in pieces.
        lines = (line[i:i + 1000] for text in texts for line in _valid(text).split("\n")
                 for i in range(0, len(line), 1000) if line.strip())
        first = next(lines, None)
        if first is None:
            raise _no_text(cls.kind)
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], lines), model_writer=model, model_type=cls.model_type,
                vocab_size=vocab_size - len(SPECIAL_TOKENS), byte_fallback=True, hard_vocab_limit=False,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=8192,
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, character_coverage=0.9995,
                input_sentence_size=5_000_000, shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            # e.g. "Vocabulary size is smaller than required_chars. 296 vs 2257." (that count includes the bytes)
            needed = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
            raise ValueError(f"vocab_size {vocab_size} is too small for a {cls.kind} tokenizer of this text: its "
                             f"characters and the 256 bytes need at least {int(needed[1]) + len(SPECIAL_TOKENS)}"
                             if needed else f"sentencepiece could not learn a {cls.kind} tokenizer of vocab_size "
                             f"{vocab_size}: {(str(e).splitlines() or [''])[0][:200]}") from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, directory, header):
        path = os.path.join(directory, cls.data_file)
        model = _read_file(path, binary=True)
        try:
            tok = cls(model, saved_specials(header))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e})") from None
        return tok._check_header(directory, header)

    def save(self, directory):
        _write_file(os.path.join(directory, self.data_file), self.model)
        return self._save_header(directory, {"model_type": self.model_type}, [self.data_file])

    def _encode_ordinary(self, text):
        return self.encode_batch([text], num_threads=1)[0]

    def encode_batch(self, texts, num_threads=8):
        if self.model_type == "unigram":
            return self.sp.encode([_valid(t) for t in texts], num_threads=num_threads)
        # BPE line by line: no piece holds a newline (training saw lines), so the ids are the
        # same, and SentencePiece's BPE is 3-6x faster on lines than on whole documents.
        lines = [_valid(text).split("\n") for text in texts]
        encoded = iter(self.sp.encode([line for text in lines for line in text], num_threads=num_threads))
        out = []
        for text in lines:
            ids = next(encoded)
            for _ in text[1:]:
                ids += [self.newline_id] + next(encoded)
            out.append(ids)
        return out

    def _decode_ordinary(self, ids):
        # "▁" is SentencePiece's space: a space once learned as a piece decodes as " ", a "▁"
        # that came through byte fallback would not; this makes "▁" always a space.
        return self.sp.decode(ids).replace("\u2581", " ")


class UnigramTokenizer(SentencePieceTokenizer):
    kind = "unigram"
    model_type = "unigram"


# -- bytes and characters --------------------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """One id per byte of the UTF-8 text: 256 ids plus the specials."""

    kind = "byte"
    min_vocab_size = 1  # vocab_size is 256 + the specials, whatever is asked
    fixed_vocab = True

    def __init__(self, specials=SPECIAL_TOKENS):
        super().__init__(256 + len(specials), _specials_after(256, specials=specials))

    @classmethod
    def train(cls, texts, vocab_size):
        return cls()

    @classmethod
    def load(cls, directory, header):
        return cls(saved_specials(header))._check_header(directory, header)

    def save(self, directory):
        return self._save_header(directory, {}, [])

    def _encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts):
        import numpy as np
        return [np.frombuffer(_valid(t).encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]

    def _decode_ordinary(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer(PieceListTokenizer):
    """One id per character seen in training, the most frequent first; <|unk|> for the rest."""

    kind = "char"
    data_file = "tokenizer.chars"

    @staticmethod
    def valid_piece(piece):
        """one character each"""
        return len(piece) == 1

    @classmethod
    def train(cls, texts, vocab_size):
        counts = collections.Counter()
        for text in texts:
            counts.update(_valid(text))
        if not counts:
            raise _no_text(cls.kind)
        return cls(sorted(counts, key=lambda c: (-counts[c], c))[:vocab_size - len(SPECIAL_TOKENS) - 1])

    def _encode_ordinary(self, text):
        ids, unk = self.ids, self.unk_id
        return [ids.get(c, unk) for c in text]

    def _decode_ordinary(self, ids):
        return "".join(map(self.pieces.__getitem__, ids))


KINDS = {tok.kind: tok for tok in (BPETokenizer, WordPieceTokenizer, UnigramTokenizer, SentencePieceTokenizer,
                                   ByteTokenizer, CharTokenizer, GPT2Tokenizer)}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn a tokenizer of `kind` with `vocab_size` ids (special tokens included) from texts.

    A small corpus may support fewer ids than asked for: the result's vocab_size says how
    many it really has. byte and gpt2 have a fixed size and ignore vocab_size.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind '{kind}' (known: {', '.join(KINDS)})")
    smallest = KINDS[kind].min_vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not smallest <= vocab_size < 2**31:
        raise ValueError(f"vocab_size must be an integer from {smallest} to 2**31 - 1 for the {kind} "
                         f"tokenizer (special tokens included), got {vocab_size!r}")
    return KINDS[kind].train(texts, vocab_size)


def load_tokenizer(directory, name="tokenizer.json") -> Tokenizer:
    """The tokenizer saved in `directory` (its tokenizer.json and the files that names; name: that
    header under another name, as in a Hugging Face folder, where tokenizer.json is theirs)."""
    path = os.path.join(directory, name)
    try:
        header = json.loads(_read_file(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    kind = header.get("kind") if isinstance(header, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind].load(directory, header)


def tokenizer_files(directory) -> list:
    """The names of the tokenizer's files in `directory`: tokenizer.json and the files it lists."""
    header = json.loads(_read_file(os.path.join(directory, "tokenizer.json")))
    return ["tokenizer.json", *header.get("files", [])]


def tokenizer_fingerprint(directory) -> str:
    """A short hash of the tokenizer files in `directory`: equal fingerprints, equal tokenizers."""
    digest = hashlib.sha256()
    for name in tokenizer_files(directory):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError as e:
            raise ValueError(f"cannot read tokenizer file {path}: {e.strerror or e}") from None
    return digest.hexdigest()[:16]


# -- the chat template -------------------------------------------------------------------------------------------

def token_bytes(tokenizer):
    """What each token spells, for exact bits per byte (train.py, eval.py) and regex constraints
    (engine.py): (the UTF-8 bytes each id adds to a text, None for the special tokens and
    <|unk|>; {first byte: the ids whose bytes begin with it}). A ValueError for wordpiece, whose
    tokens' text depends on their neighbours (the spaces it puts between words)."""
    kind = tokenizer.kind
    if kind in ("bpe", "gpt2"):
        spell = tokenizer.enc.decode_single_token_bytes
    elif kind == "byte":
        def spell(t):
            return bytes([t])
    elif kind == "char":
        def spell(t):
            return tokenizer.pieces[t].encode()
    elif kind in ("sentencepiece", "unigram"):
        sp = tokenizer.sp

        def spell(t):  # a byte-fallback piece is "<0xNN>"; "▁" is SentencePiece's space
            piece = sp.id_to_piece(t)
            return bytes([int(piece[3:5], 16)]) if sp.is_byte(t) else piece.replace("\u2581", " ").encode()
    else:
        raise ValueError(f"regex constraints and exact byte counts need tokens that each spell a fixed text; "
                         f"a {kind} tokenizer's do not")
    special = set(tokenizer.special.values())
    pieces = [None if t in special else spell(t) for t in range(tokenizer.vocab_size)]
    by_first = {}
    for t, piece in enumerate(pieces):
        if piece:
            by_first.setdefault(piece[0], []).append(t)
    return pieces, by_first


class SpecialToken(str):
    """A special token's name among text segments: it stands for its id, not for its text."""


def chat_segments(messages):
    """A conversation in the chat template, as (segment, learned) pairs: a segment is a
    SpecialToken or a message's content (ordinary text: a role token written in it stays text).

    messages: a list of {"role": "system" | "user" | "assistant", "content": str}. Each
    message is its role token, its content and <|endoftext|>:

        <|system|>You answer questions on leases.<|endoftext|><|user|>Who pays the rent?<|endoftext|>
        <|assistant|>The Tenant.<|endoftext|>

    learned: what training counts in the loss, an assistant's content and the <|endoftext|>
    that ends it (prepare.py). To ask for the next turn, generation reads the conversation
    and then <|assistant|> (chat_ids), and the reply ends at the <|endoftext|> the model
    writes. A ValueError names what is wrong with messages.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}}, got {messages!r:.80}")
    segments = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLE_TOKENS:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLE_TOKENS)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}]: content must be a string, got {message.get('content')!r:.80}")
        learned = role == "assistant"
        segments += [(SpecialToken(ROLE_TOKENS[role]), False), (message["content"], learned),
                     (SpecialToken(SPECIAL_TOKENS[0]), learned)]
    return segments


def check_chat(tok):
    if len(tok.role_ids) < len(ROLE_TOKENS):
        raise ValueError("this tokenizer has no role tokens (it was made before the chat template): prepare "
                         "the data again with a new tokenizer to train a run that holds conversations")


def chat_ids(tok, messages):
    """The ids generation reads to write the assistant's next turn: messages in the chat
    template (chat_segments), then <|assistant|>."""
    check_chat(tok)
    ids = []
    for segment, _ in chat_segments(messages):
        ids += [tok.special[segment]] if isinstance(segment, SpecialToken) else tok.encode(segment)
    return ids + [tok.role_ids["assistant"]]
