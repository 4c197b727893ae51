"""
Quality numbers for trained runs on any text: exact bits per byte, perplexity and next-token
accuracy for the language models, masked-token accuracy for the encoder, teacher-forced
loss for the encoder-decoder, BLEU, ROUGE, distinct-n and exact match of generated
answers, and legal retrieval and cloze. Prints one table, and writes each run's numbers
into RUN/eval.json.

    python eval.py --out_dir=out-legal-small                         # the val split of the run's own dataset
    python eval.py --out_dir=out-legal-small --dataset=contracts --split=val
    python eval.py --out_dir=out-a,out-b --input=contracts/,notes.txt  # one comparison table of two runs
    python eval.py --out_dir=out-qa --task_file=qa.jsonl --max_new_tokens=64   # generation metrics
    python eval.py --out_dir=out-legal-small --retrieval_queries=200 --cloze_items=200   # legal tasks

The text: --dataset= (a prepared dataset in the run's tokenizer; its loss mask and labels
count), or --input= (files, folders and globs: .txt and .md files are a document each;
a .jsonl line is a document, {"text": ...} or {"prompt": ..., "response": ...}, whose
prompt is context and not scored). Other formats: prepare them with prepare.py
--tokenizer_from=RUN and pass --dataset=. With neither, the split of the dataset the run
was trained on.

Language models (gpt, conditional, lstm) read the whole text once, in windows of the
context that move on by `stride` tokens; each target token is scored once, with at least
block_size - stride tokens before it (an LSTM carries its state through the whole text
instead). A token is scored when the loss mask counts it and it is not a special token;
bits per byte divide its nats by the UTF-8 bytes of exactly the scored tokens. The
encoder's masking is drawn once from `seed`. The encoder-decoder needs prompt/response
text. --task_file= (a .jsonl of {"prompt": ..., "response": a string or a list of
strings}) generates an answer to each prompt (greedy unless the decoding settings say
otherwise) and scores them against the responses. docs/eval.md defines every number.

Legal tasks, built from the text's own documents (by default the val split, which the run
never trained on): --retrieval_queries= holds out paragraphs and finds each one's document by
the run's embeddings and by BM25 (recall@1/@10); --cloze_items= masks uses of legal terms
(Licensee, Software, the text's own "defined" terms) and asks the run to rank the right one
among --cloze_choices terms (accuracy).

A classification run (train.py --task=classify) is evaluated on a labelled dataset (prepared
with --labels=True; by default its own, val split): accuracy, macro-F1 and the confusion
matrix, beside always answering the train split's most common class; --tfidf_baseline=True
adds TF-IDF + logistic regression (scikit-learn) fit on the train split, on the same input.

eval.json holds one entry per text (the dataset and split, the --input, or the task
file); evaluating the same text again replaces its entry and keeps the others.
"""

import datetime
import glob
import importlib
import json
import math
import os
import re
import time

import numpy as np

# -----------------------------------------------------------------------------
out_dir = "out"             # a run's directory (or hf:DIR), or several, comma-separated, for one comparison table
# the text
input = ""                  # files, folders, globs (comma-separated) of .txt, .md or .jsonl to evaluate on
dataset = ""                # a prepared dataset in data_dir; "" (and no input): the one the run was trained on
data_dir = "data"
split = "val"               # the dataset's split: val | train
condition = ""              # conditional runs with --input (or an unlabelled dataset): the label the text is under
max_tokens = 0              # only the first this many tokens of the text; 0 = all of it
stride = 0                  # tokens a window moves on by (each scored once); 0 = half the context
batch_size = 8              # windows (or generation prompts) per forward pass
mask_prob = 0.15            # encoder: share of the scored tokens masked, drawn once from seed
seed = 1337
# generation tasks
task_file = ""              # a .jsonl of {"prompt": ..., "response": ...}: generate an answer to each and score it
max_new_tokens = 128
temperature = 0.0           # 0 = greedy
top_k = 0                   # 0 = off
top_p = 1.0                 # 1.0 = off
repetition_penalty = 1.0    # 1.0 = off
num_beams = 1               # > 1: beam search
no_repeat_ngram_size = 0    # beam search: no n-gram of this size twice; 0 = off
stop = ""                   # a string that ends an answer, or several as a JSON list
# legal tasks on the text's own documents
retrieval_queries = 0       # > 0: hold out up to this many paragraphs, find each one's document (recall@1/@10) by
                            # the run's embeddings and by BM25
retrieval_among = "text"    # the documents searched: text (the text's own) | dataset (both splits of the dataset)
cloze_items = 0             # > 0: this many fill-in items (a legal term masked) from the text
cloze_choices = 4           # candidates per cloze item: its own term and others the text uses
# classification runs (train.py --task=classify), on a labelled dataset
tfidf_baseline = False      # also TF-IDF + logistic regression (scikit-learn), fit on the dataset's train split
# system
device = "auto"
dtype = "float32"           # float32: the numbers do not depend on the machine's bf16 units; auto = train.py's choice
# -----------------------------------------------------------------------------

from configurator import check_ranges, configure, fail  # noqa: E402

SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")  # what a folder given to --input contributes
LN2 = math.log(2)


# ----------------------------------------------------------------------------------
# the text: token ids, which of them the loss counts, and their labels

def input_paths(spec):
    """The files --input names, in order: files as given, folders searched for .txt/.md/.jsonl, globs."""
    paths = []
    for part in filter(None, spec.split(",")):
        if os.path.isdir(part):
            found = [p for p in glob.glob(os.path.join(glob.escape(part), "**", "*"), recursive=True)
                     if p.lower().endswith(TEXT_SUFFIXES)]
        elif os.path.isfile(part):
            found = [part]
        else:
            found = glob.glob(part, recursive=True)
            if not found:
                fail(f"--input: {part} is not a file, a folder, or a pattern that names any")
        paths += sorted(p for p in found if os.path.isfile(p) and p not in paths)
    return paths


def read_utf8(path, what=""):
    """A file's text; one error line if it cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read {what}{path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        fail(f"{what}{path} is not UTF-8 text (byte {e.start})")


def json_lines(path, content):
    """(line number, value) of each line of a .jsonl file's content that is not blank."""
    for n, line in enumerate(content.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n} is not JSON ({e})")


def read_documents(path):
    """A file's documents, each a list of (text, scored) segments: a .jsonl line is a document
    ({"text"} or {"content"}: all scored; {"prompt", "response"}: the response scored); any
    other file is one document of UTF-8 text (other formats: prepare.py --tokenizer_from=RUN)."""
    content = read_utf8(path)
    if not path.lower().endswith(".jsonl"):
        return [[(content, True)]]
    documents = []
    for n, row in json_lines(path, content):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            documents.append([(row["prompt"], False), (row["response"], True)])
        elif isinstance(row, dict) and isinstance(row.get("text", row.get("content")), str):
            documents.append([(row.get("text", row.get("content")), True)])
        else:
            fail(f'{path}:{n}: a line must be an object with a "text" string, or a "prompt" and a "response" string')
    return documents


def encode_documents(tokenizer, documents):
    """(ids, counted) of documents as prepare.py lays them out: each document's tokens and then
    <|endoftext|>, all after one <|endoftext|> that the first document is read after.
    counted (bool, one per id): the loss counts it as a target (not a prompt's tokens)."""
    ids, counted = [tokenizer.eot_id], [False]
    for segments in documents:
        for text, scored in segments:
            piece = tokenizer.encode(text)
            ids += piece
            counted += [scored] * len(piece)
        ids.append(tokenizer.eot_id)
        counted.append(True)
    return np.array(ids, dtype=np.int64), np.array(counted, dtype=bool)


def dataset_text(data_path, which, fingerprint, out_dir):
    """(ids, counted, labels) of a prepared dataset's split, after one <|endoftext|> that its first
    document is read after, as training reads it. labels: (the label id of each id, the labels'
    names), or None for a dataset without labels."""
    from batches import Batches, read_bin
    try:
        data = Batches(data_path, "gpt", 1, 1, 0.5, 1)  # reads meta.json and the splits, and checks them
    except ValueError as e:
        fail(str(e))
    if data.fingerprint != fingerprint:
        fail(f"{data_path} is in the ids of another tokenizer than the run {out_dir}'s: prepare the text with "
             f"prepare.py --tokenizer_from={out_dir}")
    tokens = data.bins[which]
    counted = data.masks[which].astype(bool) if data.masks else np.ones(len(tokens), dtype=bool)
    ids = np.concatenate([[data.tokenizer.eot_id], tokens]).astype(np.int64)
    labels = None
    if data.meta.get("labels"):
        names = data.meta["labels"]
        try:
            per_token = read_bin(os.path.join(data_path, f"{which}_label.bin"), np.uint16, len(tokens), len(names))
        except (OSError, ValueError) as e:
            fail(f"cannot read the labels of {data_path}: {e}")
        labels = (np.concatenate([per_token[:1], per_token]).astype(np.int64), names)
    return ids, np.concatenate([[False], counted]), labels


def token_lengths(tokenizer):
    """(bytes, characters): two int arrays (vocab_size,) of what each id adds to a text: its UTF-8
    bytes, and the characters that begin in them (bytes that are not UTF-8 continuation bytes),
    so that the ids of a text add up to its bytes and its characters exactly. 0 for the special
    tokens and <|unk|>. None for wordpiece, whose tokens' text depends on their neighbours (the
    spaces it puts between words)."""
    from tokenizer import token_bytes
    if tokenizer.kind == "wordpiece":
        return None
    pieces, _ = token_bytes(tokenizer)
    nbytes = np.array([len(p or b"") for p in pieces], dtype=np.int64)
    nchars = np.array([sum(b & 0xC0 != 0x80 for b in p or b"") for p in pieces], dtype=np.int64)
    return nbytes, nchars


def ordinary_ids(tokenizer):
    """bool (vocab_size,): True for the ids that are text, False for the special tokens (and <|unk|>)."""
    ordinary = np.ones(tokenizer.vocab_size, dtype=bool)
    ordinary[list(tokenizer.special.values())] = False
    return ordinary


# ----------------------------------------------------------------------------------
# language modelling: gpt, conditional, lstm

def windows(n, context, stride):
    """The windows a text of n ids (n - 1 targets) is read in: (end, first), the window's inputs
    being ids[end - L:end] (L = min(context, n - 1)) and its scored targets ids[first + 1:end + 1].
    Each target is scored once: the first window scores all of its own, each next one the
    `stride` (or fewer, at the end) after them."""
    length = min(context, n - 1)
    plan, end = [(length, 0)], length
    while end < n - 1:
        first, end = end, min(end + stride, n - 1)
        plan.append((end, first))
    return plan, length


def next_token_scores(model, ids, labels, stride, batch_size, ctx):
    """(nats, top1, top5), one per id (NaN / False at index 0, which nothing predicts): the
    negative log-probability of each id given the ones before it, and whether it was the
    model's first / among its first five guesses. labels (conditional): a label id per id."""
    import torch
    from torch.nn import functional as F

    from model import LSTMCache
    n, device = len(ids), next(model.parameters()).device
    nats, top1, top5 = np.full(n, np.nan), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    ids_t = torch.from_numpy(ids).to(device)
    labels_t = None if labels is None else torch.from_numpy(labels).to(device)

    def score(hidden, spans):
        """Fill in the targets of spans [(first, end)], ids[first:end] each, from the hidden states
        (B, P, C) that predict ids[end - P:end]: of each row the last end - first count."""
        ends = torch.tensor([end for _, end in spans], device=device)
        target = ids_t[ends[:, None] - hidden.size(1) + torch.arange(hidden.size(1), device=device)]  # (B, P)
        logits = model.logits(hidden).float()  # (B, P, V)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        best = torch.topk(logits, min(5, logits.size(-1))).indices == target[..., None]  # (B, P, 5)
        found = [x.cpu().numpy() for x in (loss, best[..., 0], best.any(dim=-1))]
        for row, (first, end) in enumerate(spans):
            for array, values in zip((nats, top1, top5), found):
                array[first:end] = values[row, len(values[row]) - (end - first):]

    with torch.no_grad(), ctx:
        if model.config.arch == "lstm":  # no context limit: the state carries through the whole text
            cache, step = LSTMCache(), model.config.block_size
            for start in range(0, n - 1, step):
                end = min(start + step, n - 1)
                score(model.hidden(ids_t[None, start:end], cache), [(start + 1, end + 1)])
            return nats, top1, top5
        plan, length = windows(n, model.config.block_size, stride)
        for i in range(0, len(plan), batch_size):
            batch = plan[i:i + batch_size]
            starts = torch.tensor([end - length for end, _ in batch], device=device)
            where = starts[:, None] + torch.arange(length, device=device)  # (B, L)
            extra = {} if labels_t is None else {"labels": labels_t[where]}
            hidden = model.hidden(ids_t[where], **extra)  # (B, L, C)
            longest = max(end - first for end, first in batch)
            score(hidden[:, length - longest:], [(first + 1, end + 1) for end, first in batch])
    return nats, top1, top5


def language_model_numbers(nats, top1, top5, ids, counted, ordinary, lengths):
    """The numbers of a pass over ids (next_token_scores' arrays). A target is scored when the
    loss mask counts it and it is an ordinary token; the others carry no bytes and count
    nowhere. lengths: token_lengths(), or None (no bits per byte)."""
    scored = counted.copy()
    scored[0] = False  # the first id is context only
    scored &= ordinary[ids]
    n = int(scored.sum())
    total = float(nats[scored].sum())
    out = {"tokens": n, "nats": total, "loss": total / n, "perplexity": math.exp(total / n),
           "bytes": None, "characters": None, "bits_per_byte": None, "bits_per_character": None,
           "top1_accuracy": float(top1[scored].mean()), "top5_accuracy": float(top5[scored].mean())}
    if lengths is not None:
        nbytes, nchars = (int(table[ids[scored]].sum()) for table in lengths)
        out.update(bytes=nbytes, characters=nchars, bits_per_byte=total / LN2 / nbytes,
                   bits_per_character=total / LN2 / nchars)
    return out


# ----------------------------------------------------------------------------------
# the encoder (masked LM) and the encoder-decoder (teacher forcing)

def masked_lm_numbers(model, ids, scorable, mask_id, share, seed, batch_size, ctx):
    """Masked-token accuracy and pseudo-perplexity. The text is read in consecutive windows of
    the context; a share of the scorable ids, drawn once from seed, all become <|mask|> at
    once, and each is predicted from the rest of its window. None when no id was drawn."""
    import torch
    from torch.nn import functional as F
    device, block, n = next(model.parameters()).device, model.config.block_size, len(ids)
    chosen = scorable & (torch.rand(n, generator=torch.Generator().manual_seed(seed)).numpy() < share)
    if not chosen.any():
        return None
    masked = np.where(chosen, mask_id, ids)
    full = list(range(0, n - block + 1, block))  # windows of the whole context, then what is left
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[len(full) * block]] if n % block else []
    nats, top1, top5 = [], [], []
    with torch.no_grad(), ctx:
        for starts in groups:
            where = np.array(starts)[:, None] + np.arange(min(block, n - starts[0]))  # (B, T)
            logits, _ = model(torch.from_numpy(masked[where]).to(device))
            pick = torch.from_numpy(chosen[where]).to(device)
            part, target = logits[pick].float(), torch.from_numpy(ids[where]).to(device)[pick]  # (m, V), (m,)
            nats.append(F.cross_entropy(part, target, reduction="none").double())
            best = torch.topk(part, min(5, part.size(-1))).indices
            top1.append(best[:, 0] == target)
            top5.append((best == target[:, None]).any(dim=1))
    nats = torch.cat(nats)
    return {"masked_tokens": len(nats), "masked_accuracy": torch.cat(top1).float().mean().item(),
            "masked_top5_accuracy": torch.cat(top5).float().mean().item(),
            "masked_loss": nats.mean().item(), "pseudo_perplexity": math.exp(nats.mean().item())}


def response_pairs(ids, counted, eot_id):
    """(prompt, response) id arrays of the documents with both, as train.py's encdec reads them:
    the prompt's ids are the source, the response's and its <|endoftext|> the target."""
    pairs = []
    ends = np.flatnonzero(ids == eot_id)
    for start, end in zip(ends[:-1] + 1, ends[1:] + 1):
        document, answer = ids[start:end], counted[start:end]
        if answer.any() and not answer.all():
            pairs.append((document[~answer], document[answer]))
    return pairs


def seq2seq_numbers(model, pairs, tokenizer, batch_size, ctx):
    """Teacher-forced loss and token accuracy of the responses, each read after its prompt
    (source and target each cut to the context, as in training)."""
    import torch
    from torch.nn import functional as F
    device, block = next(model.parameters()).device, model.config.block_size
    nats, hits = [], []
    with torch.no_grad(), ctx:
        for i in range(0, len(pairs), batch_size):
            group = [(p[:block], r[:block]) for p, r in pairs[i:i + batch_size]]
            src = torch.full((len(group), max(len(p) for p, _ in group)), tokenizer.pad_id)
            idx = torch.full((len(group), max(len(r) for _, r in group)), tokenizer.pad_id)
            targets = torch.full_like(idx, -1)
            for row, (prompt, response) in enumerate(group):
                src[row, :len(prompt)] = torch.from_numpy(prompt)
                idx[row, 0], idx[row, 1:len(response)] = tokenizer.bos_id, torch.from_numpy(response[:-1])
                targets[row, :len(response)] = torch.from_numpy(response)
            src, idx, targets = src.to(device), idx.to(device), targets.to(device)
            logits, _ = model(src, idx, targets, src_mask=src != tokenizer.pad_id)
            counted = targets >= 0
            nats.append(F.cross_entropy(logits[counted].float(), targets[counted], reduction="none"))
            hits.append(logits[counted].argmax(dim=-1) == targets[counted])
    nats = torch.cat(nats).double()
    return {"responses": len(pairs), "response_tokens": len(nats), "response_loss": nats.mean().item(),
            "response_perplexity": math.exp(nats.mean().item()),
            "response_accuracy": torch.cat(hits).float().mean().item()}


# ----------------------------------------------------------------------------------
# generation tasks: BLEU (sacrebleu), ROUGE (rouge-score), distinct-n, exact match

def read_tasks(path):
    """[(prompt, [reference, ...])] from a .jsonl of {"prompt": str, "response": str or a list of str}."""
    tasks = []
    for n, row in json_lines(path, read_utf8(path, "--task_file=")):
        response = row.get("response") if isinstance(row, dict) else None
        references = [response] if isinstance(response, str) else response
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]
                and isinstance(references, list) and references and all(isinstance(r, str) for r in references)):
            fail(f'{path}:{n}: a task is an object with a "prompt" string and a "response" (a string, or a list '
                 'of the strings that are right)')
        tasks.append((row["prompt"], references))
    if not tasks:
        fail(f"--task_file={path} holds no tasks")
    return tasks


WORD = re.compile(r"[^\W_]+|[§¶]")


class LegalWords:
    """The words ROUGE and distinct-n count: the text lowercased, cut into runs of letters and
    digits of any script, and § and ¶ each a word of their own; other marks are left out.
    (rouge-score's own tokenizer keeps only a-z and 0-9, so "§", "Straße" and "ö" would vanish.)"""

    def tokenize(self, text):
        return WORD.findall(text.lower())


def corpus_bleu(outputs, references):
    """sacrebleu's corpus BLEU (0-100) and its signature. references: per output, a list of its
    references. sacrebleu wants reference *streams* (stream j holds the j-th reference of every
    output), so the lists are transposed; a missing j-th reference is None."""
    from sacrebleu.metrics import BLEU
    most = max(map(len, references))
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(most)]
    bleu = BLEU()
    return bleu.corpus_score(outputs, streams).score, str(bleu.get_signature())


def rouge(outputs, references):
    """rouge-score's ROUGE-1, -2, -L and -Lsum F1 (0-100), the mean over outputs, with LegalWords;
    against several references an output takes its best one."""
    from rouge_score import rouge_scorer
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), tokenizer=LegalWords())
    scores = [scorer.score_multi(refs, output) for output, refs in zip(outputs, references)]
    return {kind: 100 * sum(s[kind].fmeasure for s in scores) / len(scores) for kind in kinds}


def distinct_n(outputs, n):
    """Corpus-level distinct-n: the distinct n-grams over all outputs / all the n-grams in them
    (n-grams of LegalWords, within one output); None when the outputs hold no n-gram."""
    grams = [tuple(words[i:i + n]) for words in map(LegalWords().tokenize, outputs) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def exact_match(outputs, references):
    """The share of outputs that equal one of their references, both stripped of surrounding whitespace."""
    return sum(o.strip() in {r.strip() for r in refs} for o, refs in zip(outputs, references)) / len(outputs)


def generation_numbers(engine, tasks, options, label, batch_size):
    """Generate an answer to each task's prompt (batch_size prompts at a time) and score them."""
    outputs, new_tokens = [], 0
    started = time.perf_counter()
    for i in range(0, len(tasks), batch_size):
        done = engine.generate([prompt for prompt, _ in tasks[i:i + batch_size]], label, **options)
        outputs += [c.text for c in done]
        new_tokens += sum(c.completion_tokens for c in done)
    seconds = time.perf_counter() - started
    references = [refs for _, refs in tasks]
    bleu, signature = corpus_bleu(outputs, references)
    return {"tasks": len(tasks), "bleu": bleu, **rouge(outputs, references),
            "distinct_1": distinct_n(outputs, 1), "distinct_2": distinct_n(outputs, 2),
            "exact_match": exact_match(outputs, references),
            "mean_output_tokens": sum(len(engine.tokenizer.encode(o)) for o in outputs) / len(tasks),
            "mean_output_words": sum(len(o.split()) for o in outputs) / len(tasks),
            "tokens_per_second": new_tokens / seconds, "bleu_signature": signature}


# ----------------------------------------------------------------------------------
# legal tasks built from the text's own documents: retrieval and cloze

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
QUERY_MIN_WORDS = 8  # a shorter paragraph (a heading, a name) says too little to be found by
# terms a legal text defines and refers back to; cloze masks one and asks for it among others the text uses
LEGAL_TERMS = ("Agreement", "Author", "Contribution", "Contributor", "Copyright Holder", "Covered Code",
               "Derivative Works", "Covered Software", "Larger Work", "Library", "License", "Licensed Material",
               "Licensee", "Licensor", "Modifications", "Object Code", "Original Code", "Package", "Program",
               "Software", "Source Code", "Standard Version", "Work", "You")
DEFINED = re.compile(r'["“]([A-Z][\w-]*(?: [A-Z][\w-]*){0,2})["”]')  # "Licensed Work": a term the text defines
CLOZE_MIN_CONTEXT = 40  # characters of text before a masked term, at least


def document_texts(tokenizer, ids):
    """The text of each document in ids (they end at <|endoftext|>), leaving out empty ones."""
    bounds = [-1, *np.flatnonzero(ids == tokenizer.eot_id), len(ids)]
    texts = [tokenizer.decode(ids[a + 1:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
    return [t for t in texts if t.strip()]


def held_out_paragraphs(documents, n, seed):
    """Up to n paragraphs (of QUERY_MIN_WORDS words or more) taken out of the documents, drawn from
    seed, no more than half of any document's paragraphs: ([(paragraph, its document's index)],
    the documents without them)."""
    import random
    rng, words = random.Random(seed), LegalWords()
    split = [[p for p in PARAGRAPH_BREAK.split(text) if p.strip()] for text in documents]
    candidates = []
    for d, paragraphs in enumerate(split):
        long_enough = [i for i, p in enumerate(paragraphs) if len(words.tokenize(p)) >= QUERY_MIN_WORDS]
        rng.shuffle(long_enough)
        candidates += [(d, i) for i in long_enough[:len(paragraphs) // 2]]
    held = set(rng.sample(candidates, min(n, len(candidates))))
    queries = [(split[d][i], d) for d, i in sorted(held)]
    rest = ["\n\n".join(p for i, p in enumerate(paragraphs) if (d, i) not in held)
            for d, paragraphs in enumerate(split)]
    return queries, rest


def bm25_scores(queries, documents, k1=1.5, b=0.75):
    """(queries, documents) Okapi BM25 score of each query against each document, over LegalWords."""
    from collections import Counter, defaultdict
    words = LegalWords()
    postings = defaultdict(list)  # word -> [(document, how often it is there)]
    lengths = np.zeros(len(documents))
    for j, text in enumerate(documents):
        counts = Counter(words.tokenize(text))
        lengths[j] = sum(counts.values())
        for word, tf in counts.items():
            postings[word].append((j, tf))
    norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1))
    scores = np.zeros((len(queries), len(documents)))
    for q, text in enumerate(queries):
        for word in set(words.tokenize(text)) & postings.keys():
            j, tf = np.array(postings[word]).T
            idf = math.log(1 + (len(documents) - len(j) + 0.5) / (len(j) + 0.5))
            scores[q, j] += idf * tf * (k1 + 1) / (tf + norm[j])
    return scores


def recall(ranks, k):
    return float(np.mean(np.array(ranks) <= k))


def retrieval_numbers(engine, documents, others, n, seed):
    """Hold out up to n paragraphs of the documents and find each one's document among the documents
    (without the held-out paragraphs) and the others: recall@1/@10 and mean reciprocal rank by cosine
    of the run's mean-pooled states (Engine.embed), and by BM25. A document that scores the same as
    the right one counts as ranked before it."""
    from engine import rank_by_cosine
    queries, rest = held_out_paragraphs(documents, n, seed)
    if not queries:
        return None
    pool = rest + others
    vectors = engine.embed(pool)
    ranks = {"embedding": [], "bm25": []}
    for vector, (_, d) in zip(engine.embed([q for q, _ in queries]), queries):
        order, _ = rank_by_cosine(vector, vectors)
        ranks["embedding"].append(order.tolist().index(d) + 1)
    for row, (_, d) in zip(bm25_scores([q for q, _ in queries], pool), queries):
        ranks["bm25"].append(int((row >= row[d]).sum()))
    numbers = {"queries": len(queries), "documents": len(pool)}
    for way, found in ranks.items():
        numbers |= {f"{way}_recall_at_1": recall(found, 1), f"{way}_recall_at_10": recall(found, 10),
                    f"{way}_mrr": float(np.mean(1 / np.array(found)))}
    return numbers


def term_uses(terms):
    """A pattern of the terms' uses: whole words, not in quotes (their definition), the longest term
    that fits ("Licensed Work", not "Work")."""
    return re.compile(r'(?<![\w"“])(' + "|".join(map(re.escape, sorted(terms, key=len, reverse=True))) +
                      r')(?![\w"”])')


def cloze_terms(text):
    """{term: its uses in the text} of the terms cloze draws from that the text uses: LEGAL_TERMS
    and the ones it defines in quotes."""
    from collections import Counter
    return Counter(m.group(1) for m in term_uses(set(LEGAL_TERMS) | set(DEFINED.findall(text))).finditer(text))


def draw_cloze_items(documents, n, choices, seed):
    """n fill-in items [(text before, the term, text after, [choices])], drawn from seed: each masks a
    use of a term (cloze_terms) and offers it among choices - 1 others the text uses. Terms take
    turns, so that the few most frequent do not make up all the items."""
    import random
    rng = random.Random(seed)
    terms = sorted(cloze_terms("\n".join(documents)))
    if len(terms) < choices:
        fail(f"cloze needs {choices} legal terms to choose among and the text uses {len(terms)}: give more "
             "text or lower --cloze_choices")
    pattern = term_uses(terms)
    uses = {t: [] for t in terms}
    for d, text in enumerate(documents):
        for m in pattern.finditer(text):
            if m.start() >= CLOZE_MIN_CONTEXT:
                uses[m.group(1)].append((d, m.start(), m.end()))
    for found in uses.values():
        rng.shuffle(found)
    queue = [u for turn in zip(*(found + [None] * n for found in uses.values())) for u in turn if u][:n]
    items = []
    for d, start, end in queue:
        term = documents[d][start:end]
        offered = [term] + rng.sample([t for t in terms if t != term], choices - 1)
        rng.shuffle(offered)
        items.append((documents[d][:start], term, documents[d][end:], offered))
    return items, terms


def choice_scores(engine, before, after, offered):
    """How likely the run finds each offered term between before and after (nats, one per term):
    a decoder's log-likelihood of the term after the text before it (choice_log_likelihoods);
    an encoder's, of the term's tokens masked all at once between both sides."""
    import torch

    from engine import choice_log_likelihoods
    tok, model, block = engine.tokenizer, engine.model, engine.model.config.block_size
    space = " " if before.endswith(" ") else ""  # with the space before it, as the term is spelt in running text
    options = [tok.encode(space + t) for t in offered]
    left = [tok.eot_id] + tok.encode(before[:-1] if space else before)
    longest = max(map(len, options))
    if model.config.arch != "encoder":
        label = None if model.config.arch != "conditional" else \
            torch.tensor(engine.labels.index(condition), device=engine.device)
        with engine.autocast():
            return choice_log_likelihoods(model, left[max(0, len(left) - block + longest):], options, tok.vocab_size,
                                          label, tok.bos_id)
    right = tok.encode(after) + [tok.eot_id]
    keep_right = min(len(right), (block - longest) // 2)
    left = left[max(0, len(left) - block + longest + keep_right):]
    scores = []
    with torch.no_grad(), engine.autocast():
        for option in options:
            ids = torch.tensor([left + [tok.mask_id] * len(option) + right[:keep_right]], device=engine.device)
            logits, _ = model(ids)
            logp = torch.log_softmax(logits[0, len(left):len(left) + len(option), :tok.vocab_size].float(), dim=-1)
            scores.append(logp.gather(1, torch.tensor(option, device=engine.device)[:, None]).sum().item())
    return scores


def cloze_numbers(engine, documents, n, choices, seed):
    """Accuracy on n fill-in items (draw_cloze_items): right when the item's own term scores above every
    other choice; against chance and against always choosing the term the text uses most."""
    items, terms = draw_cloze_items(documents, n, choices, seed)
    if not items:
        return None
    uses = cloze_terms("\n".join(documents))
    right = frequent = 0
    for before, term, after, offered in items:
        scores = dict(zip(offered, choice_scores(engine, before, after, offered)))
        right += all(scores[term] > s for t, s in scores.items() if t != term)
        frequent += all(uses[term] > uses[t] for t in offered if t != term)
    return {"items": len(items), "choices": choices, "terms": len(terms), "accuracy": right / len(items),
            "chance": 1 / choices, "most_used_term_accuracy": frequent / len(items)}


# ----------------------------------------------------------------------------------
# classification: a classifier run's classes of a labelled dataset's documents

def classification_metrics(truth, predicted, n):
    """Accuracy, macro-F1 and the confusion matrix (n x n, rows: the true class, columns: the
    predicted one) of class ids. Macro-F1 is the mean F1 = 2 TP / (2 TP + FP + FN) over the
    classes that occur as truth or as prediction (a class that does neither has no F1)."""
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    tp, fp, fn = np.diag(confusion), confusion.sum(0) - np.diag(confusion), confusion.sum(1) - np.diag(confusion)
    present = confusion.sum(0) + confusion.sum(1) > 0
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return {"accuracy": float(tp.sum() / len(truth)), "macro_f1": float(f1[present].mean()),
            "confusion": confusion.tolist()}


def labelled_documents(run_dir, engine, config, fingerprint):
    """(what the text is, the dataset's Batches, {split: class ids in the run's classes, -1 for a class the
    run does not know}, the run's class names). A class of the evaluated split that the run does not
    know is an error."""
    from batches import Batches
    path = dataset_path(config)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        fail(f"no dataset at {path}: give --dataset= (prepared with prepare.py --labels=True "
             f"--tokenizer_from={run_dir})")
    try:
        # documents cut as in training: to the block_size it trained with
        block = config.get("block_size") or engine.model.config.block_size
        data = Batches(path, engine.model.config.arch, block, 1, 0.5, 1, "classify")
        with open(os.path.join(run_dir, "meta.json")) as f:
            known = json.load(f)["labels"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"{path}: {e}" if isinstance(e, ValueError) else f"{run_dir}/meta.json has no class names ({e})")
    if data.fingerprint != fingerprint:
        fail(f"{path} is in the ids of another tokenizer than the run {run_dir}'s: prepare it with "
             f"prepare.py --labels=True --tokenizer_from={run_dir}")
    names = data.meta["labels"]
    unknown = [names[i] for i in np.unique(data.documents[split][2]) if names[i] not in known]
    if unknown:
        fail(f"the {split} split of {path} has labels the run {run_dir} was not trained on: "
             f"{', '.join(unknown[:5])} (it knows {', '.join(known)})")
    to_run = np.array([known.index(name) if name in known else -1 for name in names])
    classes = {s: to_run[data.documents[s][2]] for s in SPLITS}
    return f"dataset {path}, {split}", data, classes, known


def classify_documents(engine, data, rows):
    """The run's class for each document (rows) of the evaluated split, batch_size at a time."""
    import torch
    starts, ends, _ = data.documents[split]
    lengths = np.minimum(ends - starts, data.block_size - 2) + 2
    predicted = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        inputs = data.classified(split, batch, width=int(lengths[batch].max()))
        with torch.no_grad(), engine.autocast():
            logits, _ = engine.model.classify(inputs["idx"].to(engine.device), inputs["keep"].to(engine.device))
        predicted.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(predicted)


def document_text(data, which, row):
    """A document's text as the classifier reads it: its first block_size - 2 tokens."""
    start, end = data.documents[which][0][row], data.documents[which][1][row]
    return data.tokenizer.decode(data.bins[which][start:min(end, start + data.block_size - 2)].tolist())


def tfidf_predictions(data, classes, rows):
    """TF-IDF (words and word pairs, sublinear tf) + logistic regression, scikit-learn's defaults
    otherwise, fit on the train split's documents of the run's classes; its class for each row."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        fail("--tfidf_baseline needs scikit-learn: pip install scikit-learn==1.9.1")
    train = np.flatnonzero(classes["train"] >= 0)
    if len(np.unique(classes["train"][train])) < 2:
        fail("--tfidf_baseline needs documents of at least two of the run's classes in the train split")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([document_text(data, "train", r) for r in train])
    fitted = LogisticRegression(max_iter=2000).fit(features, classes["train"][train])
    return fitted.predict(vectorizer.transform([document_text(data, split, r) for r in rows]))


def classification_numbers(run_dir, engine, config, fingerprint):
    """(what the text is, {number: value}) of a classification run: accuracy, macro-F1 and the
    confusion matrix, the majority class's accuracy, and the TF-IDF baseline's when asked for."""
    name, data, classes, known = labelled_documents(run_dir, engine, config, fingerprint)
    rows = np.arange(len(classes[split]))
    truth, n = classes[split], len(known)
    counts = np.bincount(classes["train"][classes["train"] >= 0], minlength=n)
    majority = int(counts.argmax())
    numbers = {"examples": len(rows), "classes": known, **classification_metrics(truth, classify_documents(
        engine, data, rows), n), "majority_class": known[majority],
        "majority_accuracy": float((truth == majority).mean())}
    if tfidf_baseline:
        numbers |= {f"tfidf_{k}": v for k, v in classification_metrics(truth, tfidf_predictions(
            data, classes, rows), n).items()}
    return name, numbers


def confusion_table(title, names, matrix):
    """The confusion matrix as text: a row per true class, a column per predicted class."""
    rows = [["true \\ predicted", *names]] + [[name, *map(str, row)] for name, row in zip(names, matrix)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(names) + 1)]
    return f"confusion matrix of {title}:\n" + "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows)


# ----------------------------------------------------------------------------------
# one run: load it, evaluate, report

def load(run_dir):
    """(Engine, the run's training settings, its tokenizer's fingerprint). run_dir: a run's directory,
    or hf:DIR, a Hugging Face folder (its tokenizer's fingerprint is the one from_hf gives it)."""
    from engine import Engine
    from runtime import load_run, pick_device, pick_dtype
    from tokenizer import tokenizer_fingerprint
    try:
        where = pick_device(device)
        model, tokenizer, ckpt = load_run(run_dir, where)
        labels = []
        if model.config.arch == "conditional":
            with open(os.path.join(run_dir, "meta.json")) as f:
                labels = json.load(f)["labels"]
        engine = Engine(model, tokenizer, where, pick_dtype(where, dtype), labels)
        # load_run checked a run's tokenizer files against the fingerprint in ckpt.pt (when it has one)
        return engine, ckpt.get("config", {}), ckpt.get("tokenizer_fingerprint") or tokenizer_fingerprint(run_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{run_dir}: {e}")


def dataset_path(config):
    """The prepared dataset the text comes from: --dataset, else the run's own."""
    return os.path.join(data_dir, dataset) if dataset else \
        os.path.join(config.get("data_dir", "data"), config.get("dataset", "legal"))


def the_text(run_dir, engine, config, fingerprint):
    """(what the text is, ids, counted, labels as dataset_text gives them) for this run."""
    if input:
        documents = [d for path in input_paths(input) for d in read_documents(path)]
        ids, counted = encode_documents(engine.tokenizer, documents)
        name, labels = f"input {input}", None
    else:
        path = dataset_path(config)
        if not os.path.isfile(os.path.join(path, "meta.json")):
            fail(f"no dataset at {path}: give --dataset= (prepared with prepare.py --tokenizer_from={run_dir}) "
                 "or --input=")
        ids, counted, labels = dataset_text(path, split, fingerprint, run_dir)
        name = f"dataset {path}, {split}"
    if max_tokens:
        ids, counted = ids[:max_tokens + 1], counted[:max_tokens + 1]
        labels = None if labels is None else (labels[0][:max_tokens + 1], labels[1])
    if not (counted & ordinary_ids(engine.tokenizer)[ids])[1:].any():
        fail(f"no text to evaluate in the {name}: it is empty, or prompts only")
    return name, ids, counted, labels


def run_labels(engine, n, labels, run_dir):
    """A conditional run's label id for each of the n ids: --condition everywhere, else the dataset's
    labels, matched to the run's by name."""
    known = engine.labels
    if condition:
        if condition not in known:
            fail(f"--condition={condition!r} is not one of the run's labels: {', '.join(known)}")
        return np.full(n, known.index(condition))
    if labels is None:
        fail(f"{run_dir} is a conditional run: give --condition= (one of {', '.join(known)}) or a dataset "
             "prepared with --labels=True")
    per_token, names = labels
    used = [names[i] for i in np.unique(per_token)]
    unknown = [name for name in used if name not in known]
    if unknown:
        fail(f"the text has labels the run {run_dir} does not know: {', '.join(unknown[:5])} "
             f"(it knows {', '.join(known)})")
    return np.array([known.index(name) if name in known else -1 for name in names])[per_token]


def evaluate_text(run_dir, engine, name, ids, counted, labels):
    """This run's numbers on the text (the_text's): {number: value}."""
    model, tokenizer, arch = engine.model, engine.tokenizer, engine.model.config.arch
    ordinary = ordinary_ids(tokenizer)
    if arch == "encoder":
        numbers = masked_lm_numbers(model, ids, counted & ordinary[ids], tokenizer.mask_id, mask_prob, seed,
                                    batch_size, engine.autocast())
        if numbers is None:
            fail(f"no token of the {name} was masked: give more text or raise --mask_prob")
        return numbers
    if arch == "encdec":
        pairs = response_pairs(ids, counted, tokenizer.eot_id)
        if not pairs:
            fail(f"an encoder-decoder run is evaluated on prompt/response documents, and the {name} has none: "
                 "give a .jsonl of prompts and responses, or a dataset prepared from one")
        return seq2seq_numbers(model, pairs, tokenizer, batch_size, engine.autocast())
    per_token = run_labels(engine, len(ids), labels, run_dir) if arch == "conditional" else None
    step = stride or max(1, model.config.block_size // 2)
    scores = next_token_scores(model, ids, per_token, step, batch_size, engine.autocast())
    numbers = language_model_numbers(*scores, ids, counted, ordinary, token_lengths(tokenizer))
    if arch == "lstm":
        return {**numbers, "context": "all before (LSTM)", "stride": None}
    return {**numbers, "context": model.config.block_size, "stride": step}


def legal_task_numbers(run_dir, engine, config, fingerprint, name, ids):
    """{"retrieval, TEXT": numbers, "cloze, TEXT": numbers} of the tasks asked for, on the text's documents."""
    documents = document_texts(engine.tokenizer, ids)
    found = {}
    if retrieval_queries:
        others = []
        if retrieval_among == "dataset":
            other = SPLITS[1 - SPLITS.index(split)]
            other_ids = dataset_text(dataset_path(config), other, fingerprint, run_dir)[0]
            others = document_texts(engine.tokenizer, other_ids)
        numbers = retrieval_numbers(engine, documents, others, retrieval_queries, seed)
        if numbers is None:
            fail(f"retrieval needs documents of at least two paragraphs ({QUERY_MIN_WORDS} words or more, blank "
                 f"lines between them), and the {name} has none")
        found[f"retrieval, {name}"] = numbers
    if cloze_items:
        numbers = cloze_numbers(engine, documents, cloze_items, cloze_choices, seed)
        if numbers is None:
            fail(f"cloze found no use of a legal term ({CLOZE_MIN_CONTEXT} characters or more into a document) "
                 f"in the {name}")
        found[f"cloze, {name}"] = numbers
    return found


def decoding_options():
    """The generation settings for engine.generate, checked by engine.check_options."""
    from engine import check_options
    stops = [stop] if stop else []
    if stop.startswith("["):
        try:
            stops = json.loads(stop)
        except json.JSONDecodeError as e:
            fail(f"--stop={stop!r} starts like a JSON list but is not one ({e})")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, num_beams=num_beams,
                   no_repeat_ngram_size=no_repeat_ngram_size, stop=stops, seed=seed)
    try:
        check_options(options)
    except ValueError as e:
        fail(str(e))
    return options


def show(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(columns, results):
    """One row per number, one column per run."""
    rows = [["", *columns]]
    names = []
    for numbers in results:
        names += [k for k in numbers if k not in names]
    rows += [[name, *(show(numbers.get(name)) for numbers in results)] for name in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows)


def results_path(run_dir):
    """Where a run's numbers are kept: its eval.json (of hf:DIR, in DIR)."""
    return os.path.join(run_dir[3:] if run_dir.startswith("hf:") else run_dir, "eval.json")


def previous_results(run_dir):
    """The run's eval.json as it is ({} when there is none); unreadable, it is an error, not overwritten."""
    path = results_path(run_dir)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path} is not readable JSON ({e}): move it away, and eval.py writes a new one")
    if not isinstance(results, dict):
        fail(f"{path} is not a JSON object: move it away, and eval.py writes a new one")
    return results


def main():
    from runtime import save_atomically
    check_ranges(globals(), {"max_tokens": ">= 0", "stride": ">= 0", "batch_size": ">= 1",
                             "mask_prob": "(0, 1)", "max_new_tokens": ">= 0", "retrieval_queries": ">= 0",
                             "cloze_items": ">= 0", "cloze_choices": ">= 2"})
    if split not in SPLITS:
        fail(f"--split={split!r} is not one of {', '.join(SPLITS)}")
    if retrieval_among not in ("text", "dataset"):
        fail(f"--retrieval_among={retrieval_among!r} is not one of text, dataset")
    if retrieval_queries and retrieval_among == "dataset" and input:
        fail("--retrieval_among=dataset searches a prepared dataset's two splits: give --dataset= (or neither), "
             "not --input")
    if (retrieval_queries or cloze_items) and task_file and not (input or dataset):
        fail("retrieval and cloze are built from a text's documents: with --task_file, name the text with "
             "--input= or --dataset=")
    if input and dataset:
        fail("--input and --dataset both name the text: give one")
    run_dirs = [d for d in out_dir.split(",") if d]
    if not run_dirs:
        fail("--out_dir names no run")
    options = decoding_options() if task_file else None
    tasks = read_tasks(task_file) if task_file else None
    if task_file:  # the scores' packages, checked before any answer is generated
        for module, package in (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score")):
            try:
                importlib.import_module(module)
            except ImportError:
                fail(f"--task_file's scores need the {package} package: pip install -r requirements.txt")
    runs = []
    for run_dir in run_dirs:  # every run and its eval.json checked before any evaluation
        engine, config, fingerprint = load(run_dir)
        arch, block = engine.model.config.arch, engine.model.config.block_size
        if stride > block:
            fail(f"--stride={stride} is larger than the context of {run_dir} ({block} tokens)")
        if task_file and arch == "encoder":
            fail(f"{run_dir} is an encoder run: it fills in masks and does not write answers for --task_file")
        if cloze_items and arch == "conditional" and condition not in engine.labels:
            fail(f"{run_dir} is a conditional run: cloze needs --condition=, one of {', '.join(engine.labels)}")
        if task_file and arch == "conditional" and condition not in engine.labels:
            fail(f"{run_dir} is a conditional run: --task_file needs --condition=, one of {', '.join(engine.labels)}")
        if engine.model.config.n_classes and (input or task_file or retrieval_queries or cloze_items):
            fail(f"{run_dir} is a classification run: it is evaluated on a dataset prepared with --labels=True "
                 "(--dataset=, or its own), with no --input, --task_file, retrieval or cloze")
        if tfidf_baseline and not engine.model.config.n_classes:
            fail(f"--tfidf_baseline is compared with a classification run (train.py --task=classify); {run_dir} "
                 "is not one")
        runs.append((run_dir, engine, config, fingerprint, previous_results(run_dir)))
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    shown, signature, confusions = [], None, []
    for run_dir, engine, config, fingerprint, results in runs:
        numbers = {}
        if engine.model.config.n_classes:
            name, found = classification_numbers(run_dir, engine, config, fingerprint)
            results[name] = {"arch": engine.model.config.arch, **found, "evaluated": when}
            numbers = {"text": name, **{k: v for k, v in found.items() if not isinstance(v, list)}}
            confusions += [confusion_table(title, found["classes"], found[key]) for key, title in
                           (("confusion", run_dir), ("tfidf_confusion", "the TF-IDF baseline")) if key in found]
        elif input or dataset or not task_file:
            name, ids, counted, labels = the_text(run_dir, engine, config, fingerprint)
            found = evaluate_text(run_dir, engine, name, ids, counted, labels)
            results[name] = {"arch": engine.model.config.arch, **found, "evaluated": when}
            numbers = {"text": name, **found}
            for task, found in legal_task_numbers(run_dir, engine, config, fingerprint, name, ids).items():
                results[task] = {**found, "evaluated": when}
                kind = task.split(",")[0]
                numbers |= {f"{kind}_{key}": value for key, value in found.items()}
        if task_file:
            try:
                found = generation_numbers(engine, tasks, options, condition or None, batch_size)
            except ValueError as e:  # a prompt longer than the context
                fail(f"{task_file}: {e}")
            results[f"task {task_file}"] = {**found, "decoding": options, "evaluated": when}
            signature = found.pop("bleu_signature")
            numbers = {**numbers, "task": task_file, **found}
        shown.append(numbers)
    print(table(run_dirs, shown))
    if signature:
        print(f"BLEU signature (sacrebleu): {signature}")
    for confusion in confusions:
        print(confusion)
    for run_dir, _, _, _, results in runs:
        text = json.dumps(results, indent=2) + "\n"
        save_atomically(results_path(run_dir), lambda f: f.write(text.encode()))
    print(f"wrote {', '.join(map(results_path, run_dirs))}")


if __name__ == "__main__":
    configure(globals())
    main()
