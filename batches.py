"""
The batches each architecture learns from, read from a dataset that prepare.py wrote
(data/<dataset>/: meta.json, the tokenizer files, train.bin and val.bin, and beside them
the loss masks of prompt/response data or the control labels of labelled data).

    batches = Batches(data_path, arch, block_size, batch_size, mask_prob, span_length)
    batch = batches.get("train", generator)  # the model's keyword arguments, CPU tensors

The objectives, one method each:
- next_token    gpt, conditional, lstm: windows of tokens, targets one step ahead; on
                prompt/response data windows of whole documents, the loss only on responses
- masked_lm     encoder: BERT's masked-language modelling
- seq2seq       encdec: T5's span corruption, or the prompt as source and the response as target
- classified    task="classify", any arch: whole documents and their labels as classes

Every random draw comes from the generator the caller passes, in a fixed order: the same
generator gives the same batch. A dataset that is missing, damaged, or does not fit the
settings raises ValueError with a sentence for the user.
"""

import json
import os

import numpy as np
import torch

from tokenizer import load_tokenizer, tokenizer_fingerprint


class DatasetError(ValueError):
    """What is wrong with a dataset, said for the user."""


def read_bin(path, dtype, tokens, limit):
    """path as a memmap, checked: whole values of dtype, as many as meta.json says, each below limit
    (an id beyond the vocabulary would index past the embedding: a crash on CPU, a device assert on CUDA)."""
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % itemsize:
        raise DatasetError(f"{path} is {size} bytes, not a whole number of {np.dtype(dtype).name} values: it is "
                           "truncated or not from prepare.py; prepare it again")
    if size // itemsize != tokens:
        raise DatasetError(f"{path} holds {size // itemsize} tokens but meta.json says {tokens}: it is truncated or "
                           "from another prepare; prepare it again")
    data = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    chunk = 1 << 26
    for i in range(0, len(data), chunk):  # the whole file, once, a chunk at a time
        top = int(data[i:i + chunk].max())
        if top >= limit:
            raise DatasetError(f"{path} holds the value {top} at or beyond {limit}, the number of ids it may use: it "
                               "was not written with this tokenizer (or is damaged); prepare it again")
    return data


def read_windows(array, starts, length):
    """(len(starts), length) int64: array[s:s + length] for each start, one read each; 0 past its end."""
    windows = torch.zeros(len(starts), length, dtype=torch.long)
    for row, s in enumerate(starts.tolist()):
        piece = array[s:s + length]
        windows[row, :len(piece)] = torch.from_numpy(piece.astype(np.int64))
    return windows


class Batches:
    """A prepared dataset, read and checked once, and the batches of arch's objective from it."""

    def __init__(self, data_path, arch, block_size, batch_size, mask_prob, span_length, task="lm"):
        self.arch, self.block_size, self.batch_size, self.task = arch, block_size, batch_size, task
        self.mask_prob, self.span_length = mask_prob, span_length
        try:
            with open(os.path.join(data_path, "meta.json")) as f:
                self.meta = meta = json.load(f)
            self.tokenizer = tokenizer = load_tokenizer(data_path)
            self.fingerprint = meta["tokenizer"]["fingerprint"]
            if tokenizer_fingerprint(data_path) != self.fingerprint:
                raise DatasetError(f"{data_path}: the tokenizer files are not the ones meta.json was written with; "
                                   "prepare it again")
            if meta["dtype"] not in ("uint16", "uint32"):
                raise DatasetError(f"{data_path}/meta.json: dtype must be uint16 or uint32, got {meta['dtype']!r}; "
                                   "prepare it again")
            counts = {split: meta["splits"][split]["tokens"] for split in ("train", "val")}

            def read(suffix, dtype, limit):  # train{suffix}.bin and val{suffix}.bin
                return {split: read_bin(os.path.join(data_path, f"{split}{suffix}.bin"), dtype, counts[split], limit)
                        for split in counts}
            self.bins = read("", meta["dtype"], tokenizer.vocab_size)
            # prompt/response data: 1 where a target token counts in the loss (the responses)
            self.masks = read("_mask", np.uint8, 2) if meta.get("loss_mask") else None
            # conditional: the control label of every token, and the labels' names
            labelled = (arch == "conditional" or task == "classify") and meta.get("labels")
            self.labels = read("_label", np.uint16, len(meta["labels"])) if labelled else None
        except DatasetError:
            raise
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            raise DatasetError(f"cannot read the dataset at {data_path} ({type(e).__name__}: {e}); prepare it again "
                               "with prepare.py") from e
        if arch == "conditional" and not self.labels:
            raise DatasetError(f"arch='conditional' needs a control label per document: prepare {data_path} with "
                               "--labels=True")
        if task == "classify" and not self.labels:
            raise DatasetError(f"task='classify' needs a label per document: prepare {data_path} with --labels=True")
        self.n_labels = len(meta["labels"]) if self.labels and arch == "conditional" else 0
        self.n_classes = len(meta["labels"]) if self.labels and task == "classify" else 0
        if task == "classify":  # each document ends in its end-of-text; its label is its class
            self.documents = {}
            for split, data in self.bins.items():
                ends = np.flatnonzero(data == tokenizer.eot_id)
                starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
                self.documents[split] = (starts, ends, self.labels[split][starts].astype(np.int64))
                if not len(ends):
                    raise DatasetError(f"{data_path}/{split}.bin holds no whole document to classify")
        for split, data in self.bins.items():
            if len(data) <= block_size and not self.masks and task != "classify":
                raise DatasetError(f"{data_path}/{split}.bin has {len(data)} tokens, fewer than "
                                   f"block_size+1={block_size + 1}")
        if self.masks:  # windows start where a document starts
            self.doc_starts = {split: np.concatenate([[0], np.flatnonzero(data[:-1] == tokenizer.eot_id) + 1])
                               for split, data in self.bins.items()}
        # the encoder's random replacements are ordinary tokens, never <|endoftext|> or <|mask|>
        self.ordinary_ids = torch.tensor(sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.special.values())))
        # encdec: how many spans are cut from a window, and the longest target they make; on prompt/response
        # data, the longest prompt and the longest response in the dataset (a question of 30 tokens and an
        # answer of 5 are not each padded to block_size: the padding would be computed and thrown away)
        self.n_spans = max(1, round(mask_prob * block_size / span_length))
        self.source_length = block_size
        self.target_length = min(block_size, self.n_spans * (span_length + 1) + 1)
        if self.masks and arch == "encdec":
            longest = [self.longest_prompt_and_response(split) for split in self.bins]
            self.source_length, self.target_length = (min(block_size, max(1, *n)) for n in zip(*longest))

    def get(self, split, generator):
        """A batch of split for arch's objective: {argument of the model's forward: tensor}."""
        if self.task == "classify":
            n = len(self.documents[split][0])
            return self.classified(split, torch.randint(n, (self.batch_size,), generator=generator).tolist())
        if self.arch == "encoder":
            return self.masked_lm(split, generator)
        if self.arch == "encdec":
            return self.seq2seq(split, generator)
        return self.next_token(split, generator)

    # ---- next token: gpt, conditional, lstm ------------------------------------------

    def next_token(self, split, generator):
        """Inputs and the same tokens one step ahead as targets."""
        data, block_size = self.bins[split], self.block_size
        if self.masks:  # prompt/response data: windows of whole documents, loss only on the responses
            starts = self.random_document_starts(split, generator)
            windows, counts = zip(*(self.document_window(split, s) for s in starts.tolist()))
            windows = torch.from_numpy(np.stack(windows))
            targets = torch.where(torch.from_numpy(np.stack(counts))[:, 1:], windows[:, 1:], -1)
            batch = {"idx": windows[:, :-1], "targets": targets}
        else:
            starts = torch.randint(len(data) - block_size, (self.batch_size,), generator=generator)
            # one read of block_size+1 tokens per row: inputs are its first block_size, targets its last
            windows = read_windows(data, starts, block_size + 1)
            batch = {"idx": windows[:, :-1], "targets": windows[:, 1:]}
        if self.labels:  # each position carries its document's label (a window may span two documents)
            batch["labels"] = read_windows(self.labels[split], starts, block_size)
        return batch

    def random_document_starts(self, split, generator):
        starts = self.doc_starts[split]
        return starts[torch.randint(len(starts), (self.batch_size,), generator=generator).numpy()]

    def document_window(self, split, start):
        """block_size+1 tokens from a document's start, and which of them count as targets.

        Only whole documents count: a document cut by the window's end is left to the windows
        that start with it (unless it is the first, longer than a window). Past the end of
        the data is padding, counted nowhere.
        """
        length, tokenizer = self.block_size + 1, self.tokenizer
        tokens = self.bins[split][start:start + length]
        window = np.full(length, tokenizer.pad_id, dtype=np.int64)
        counts = np.zeros(length, dtype=bool)
        window[:len(tokens)], counts[:len(tokens)] = tokens, self.masks[split][start:start + length]
        ends = np.flatnonzero(tokens == tokenizer.eot_id)
        if len(ends):
            counts[ends[-1] + 1:] = False
        return window, counts

    # ---- classification: task="classify" --------------------------------------------------

    def classified(self, split, rows, width=None):
        """The documents rows (indices) of split, each read as <|endoftext|>, its first block_size - 2
        tokens, <|endoftext|>, and padded on the right to width (default block_size): idx, keep (its
        tokens, not the padding) and targets (its class)."""
        starts, ends, classes = self.documents[split]
        eot, data = self.tokenizer.eot_id, self.bins[split]
        docs = [data[starts[r]:min(ends[r], starts[r] + self.block_size - 2)].astype(np.int64) for r in rows]
        width = width or self.block_size
        idx = torch.full((len(rows), width), self.tokenizer.pad_id)
        keep = torch.zeros(len(rows), width, dtype=torch.bool)
        for row, doc in enumerate(docs):
            idx[row, :len(doc) + 2] = torch.from_numpy(np.concatenate([[eot], doc, [eot]]))
            keep[row, :len(doc) + 2] = True
        return {"idx": idx, "keep": keep, "targets": torch.from_numpy(classes[list(rows)])}

    # ---- masked-language modelling: encoder --------------------------------------------

    def masked_lm(self, split, generator):
        """BERT's objective: mask_prob of the positions become targets; of those, 80% read
        <|mask|>, 10% a random ordinary token, 10% themselves."""
        data, block_size = self.bins[split], self.block_size
        starts = torch.randint(len(data) - block_size + 1, (self.batch_size,), generator=generator)
        idx = read_windows(data, starts, block_size)
        chosen = torch.rand(idx.shape, generator=generator) < self.mask_prob
        how = torch.rand(idx.shape, generator=generator)
        random_ids = self.ordinary_ids[torch.randint(len(self.ordinary_ids), idx.shape, generator=generator)]
        targets = torch.where(chosen, idx, -1)
        idx = torch.where(chosen & (how < 0.8), self.tokenizer.mask_id, idx)
        idx = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, idx)
        return {"idx": idx, "targets": targets}

    # ---- source and target: encdec -------------------------------------------------------

    def seq2seq(self, split, generator):
        """(source, target) pairs, padded: src and its src_mask (real tokens), the decoder's
        input (<|bos|> then the target but its last token) and the target."""
        source_length, target_length, tokenizer = self.source_length, self.target_length, self.tokenizer
        if self.masks:
            pairs = [self.prompt_response(split, s) for s in self.random_document_starts(split, generator).tolist()]
        else:
            starts = torch.randint(len(self.bins[split]) - source_length + 1, (self.batch_size,), generator=generator)
            pairs = [self.span_corruption(window.numpy(), generator)
                     for window in read_windows(self.bins[split], starts, source_length)]
        src = torch.full((self.batch_size, source_length), tokenizer.pad_id)
        idx = torch.full((self.batch_size, target_length), tokenizer.pad_id)
        targets = torch.full((self.batch_size, target_length), -1)
        for row, (source, target) in enumerate(pairs):
            source, target = torch.from_numpy(source[:source_length]), torch.from_numpy(target[:target_length])
            src[row, :len(source)] = source
            idx[row, 0], idx[row, 1:len(target)] = tokenizer.bos_id, target[:-1]
            targets[row, :len(target)] = target
        return {"src": src, "src_mask": src != tokenizer.pad_id, "idx": idx, "targets": targets}

    def span_corruption(self, tokens, generator):
        """T5's pretraining pair from a run of tokens, with <|mask|> as every sentinel: spans of
        span_length tokens covering about mask_prob of them are cut out of the source, each
        leaving one <|mask|>; the target gives them back in order, each after its <|mask|>."""
        n, mask_id = len(tokens), self.tokenizer.mask_id
        cut = np.zeros(n, dtype=bool)
        for s in torch.randperm(n, generator=generator)[:self.n_spans].tolist():
            cut[s:s + self.span_length] = True  # spans that touch merge into one
        first = cut & ~np.concatenate([[False], cut[:-1]])  # where each cut-out span begins
        source = np.where(first, mask_id, tokens)[~cut | first]
        target = np.insert(tokens[cut], np.flatnonzero(first[cut]), mask_id)
        return source, np.append(target, self.tokenizer.eot_id)

    def longest_prompt_and_response(self, split):
        """The most prompt tokens and the most response tokens (<|endoftext|> included) of a document of split."""
        data, responses = self.bins[split], self.masks[split]
        document = np.concatenate([[0], np.cumsum(data[:-1] == self.tokenizer.eot_id)])  # of every token
        response_tokens = np.bincount(document, weights=responses)
        return int((np.bincount(document) - response_tokens).max()), int(response_tokens.max())

    def prompt_response(self, split, start):
        """On prompt/response data: the prompt is the source, the response the target."""
        tokenizer = self.tokenizer
        tokens = self.bins[split][start:start + 2 * self.block_size + 1].astype(np.int64)
        ends = np.flatnonzero(tokens == tokenizer.eot_id)
        document = tokens[:ends[0] + 1] if len(ends) else tokens
        is_response = self.masks[split][start:start + len(document)].astype(bool)
        prompt = document[~is_response]
        return (prompt if len(prompt) else np.array([tokenizer.bos_id])), document[is_response]
