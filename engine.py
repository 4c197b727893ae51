"""
Generation over a trained run, for every architecture that writes text (gpt, conditional,
lstm, encdec; softmax and linear attention), and embeddings and scores of texts. sample.py
is the command line over it; in a notebook:

    from engine import Engine
    engine = Engine.load("out-legal-small")
    engine.generate("The Licensee shall", max_new_tokens=100, temperature=0.7).text
    engine.generate(["The Licensor", "IN NO EVENT"], temperature=0)   # a batch: a list of Completions
    for piece in engine.stream("The Licensee shall", max_new_tokens=50):
        print(piece, end="", flush=True)
    engine.embed(["one text", "another"])      # (2, n_embd) vectors, for retrieval
    engine.score("The Licensee shall pay.")    # log-likelihood and bits per byte
    engine.chat([{"role": "user", "content": "Who repairs the roof?"}]).text   # a run trained on conversations
    Engine.load("out-legal-small", draft_out_dir="out-draft")   # speculative decoding (see speculative_decode)

A library: importing it runs nothing. The decoding options, the same for every call:

    max_new_tokens      at most this many new tokens
    temperature         0 = greedy
    top_k, top_p, min_p sample among the k likeliest / the nucleus of mass p / the tokens at
                        least min_p times as likely as the likeliest (0, 1.0, 0 = off)
    repetition_penalty  CTRL's: the logit of a token already in the prompt or the output is
                        divided by it (multiplied, when negative); 1.0 = off
    frequency_penalty   OpenAI's: subtracted from a token's logit once per time it was
    presence_penalty    generated / once if it was generated at all; 0 = off
    stop                strings that end the output; it never contains one, nor ends in
                        the start of one
    ignore_eos          go on past <|endoftext|> (by default it ends the output)
    seed                row i of a batch samples with seed + i; None = not reproducible
    num_beams           beam search over this many hypotheses instead of sampling; 1 = off.
                        Deterministic: it refuses temperature, top_k, top_p and min_p, and
                        applies the penalties to the beams' scores (see beam_search)
    length_penalty      beam search: a finished hypothesis scores its summed log-probability
                        over length ** length_penalty; 1.0 = the mean per token
    no_repeat_ngram_size  beam search: no n-gram of this size twice in prompt + output; 0 = off
    choices             a list of strings: the output is the one the model finds likeliest
                        after the prompt, with no decoding (see choice_log_likelihoods)
    regex               a pattern the output must match: only tokens that keep the text a
                        possible start of a full match are allowed (see RegexMask); None = off
    draft_tokens        with a draft run (Engine.load(draft_out_dir=)): the tokens it proposes
                        per round of speculative decoding (see speculative_decode)
    slide               once a transformer's context is full, its window moves this many tokens
                        at a time and is read again once per move (GPT.next_logits); 1 = every
                        token sees a full window (read again for every token); 0 = half the context

Each prompt becomes a Completion: its text, its new token ids, finish_reason ("stop": an
end-of-text or a stop string; "length": max_new_tokens) and the token counts (with choices:
each choice's log-likelihood too).

Prompts of different lengths share one batch: they are padded on the left, each row keeps
its own positions, and padding is never attended to (the LSTM reads each prompt alone and
then steps the rows together). A row that finishes leaves the batch and costs no more
compute. Each row's output is the same as its prompt's alone.
"""

import functools
import glob
import json
import math
import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from model import KVCache, LSTMCache
from tokenizer import ROLE_TOKENS, chat_ids, token_bytes


@dataclass
class Completion:
    text: str                # the new text: no end-of-text token, no stop string
    ids: list                # the new token ids (an end-of-text token that ended it is not among them)
    finish_reason: str       # "stop" (end-of-text or a stop string) | "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int   # tokens generated, with the end-of-text token that ended it
    choice_scores: list = None  # choices=: each choice's log-likelihood (nats), in their order
    draft_acceptance: float = None  # speculative decoding: the share of the draft's tokens the model kept


# On a CPU with dtype "auto" (bf16 where it has bf16 units), a decoding loop of fewer rows than this
# runs in float32: the products of so few rows are bound by reading the weights, and oneDNN's bf16
# kernels for them are slower than float32's (figures: docs/generation.md)
FP32_DECODE_ROWS = 8

DEFAULTS = dict(max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                frequency_penalty=0.0, presence_penalty=0.0, stop=(), ignore_eos=False, seed=None,
                num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, choices=None, regex=None, draft_tokens=4,
                slide=0)


def check_options(options):
    """The options with the defaults filled in; a ValueError names the first one that is wrong."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    o = {**DEFAULTS, **options}
    if isinstance(o["stop"], str):
        o["stop"] = [o["stop"]]
    if not all(isinstance(s, str) and s for s in o["stop"]):
        raise ValueError(f"stop must be a list of non-empty strings, got {o['stop']!r}")
    rules = {"max_new_tokens": (0, math.inf), "temperature": (0, math.inf), "top_k": (0, math.inf),
             "top_p": (0, 1), "min_p": (0, 1), "repetition_penalty": (0, math.inf),
             "frequency_penalty": (0, math.inf), "presence_penalty": (0, math.inf)}
    for name, (low, high) in rules.items():
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}")
    if o["top_p"] == 0 or o["repetition_penalty"] == 0:
        raise ValueError("top_p and repetition_penalty must be above 0")
    check_beam_options(o, options)
    check_constraint_options(o)
    return o


def check_beam_options(o, given):
    """check_options' part for beam search. given: the options as passed, so that a sampling
    setting left at its default is no contradiction."""
    for name, low in (("num_beams", 1), ("no_repeat_ngram_size", 0), ("draft_tokens", 1), ("slide", 0)):
        if isinstance(o[name], bool) or not isinstance(o[name], int) or o[name] < low:
            raise ValueError(f"{name} must be an integer from {low} up, got {o[name]!r}")
    penalty = o["length_penalty"]
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
        raise ValueError(f"length_penalty must be a finite number, got {penalty!r}")
    if o["num_beams"] == 1:
        if penalty != 1.0 or o["no_repeat_ngram_size"]:
            raise ValueError("length_penalty and no_repeat_ngram_size are beam search's: set num_beams > 1")
        return
    off = {"temperature": 0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    sampling = [name for name, value in off.items() if given.get(name, value) != value]
    if sampling:
        raise ValueError(f"num_beams > 1 is a deterministic search, but {', '.join(sampling)} would sample: "
                         "leave them out (or at temperature=0, top_k=0, top_p=1, min_p=0)")


def check_constraint_options(o):
    """check_options' part for choices= and regex=."""
    choices, pattern = o["choices"], o["regex"]
    if o["num_beams"] > 1 and (choices is not None or pattern is not None):
        raise ValueError("choices and regex do not go with beam search (num_beams > 1)")
    if choices is not None and (not isinstance(choices, (list, tuple)) or not choices
                                or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"choices must be a list of non-empty strings, got {choices!r}")
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {pattern!r}")
    import regex
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"regex={pattern!r} does not compile: {e}") from None
    if choices is not None:
        raise ValueError("choices and regex do not go together: choices already fixes the whole answer")
    if o["ignore_eos"]:
        raise ValueError("regex ends the output at end-of-text once the text matches: leave ignore_eos off")


def probabilities(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution sampling draws from (B, vocab): logits (B, vocab) over temperature (> 0),
    restricted to the top_k likeliest / the nucleus of mass top_p / the tokens at least min_p
    times as likely as the likeliest (unnormalized after min_p: draw() does not mind)."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p > top_p  # the mass before each token; keep the first token always
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    probs = logits.softmax(dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, min_p=0.0):
    """Pick one token per row of logits (B, vocab): greedy, or sampled with top-k / nucleus / min-p.
    generator: one torch.Generator for all rows, or a list of one per row."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    ids = None
    if 0 < top_k < logits.size(-1):  # the same law drawn among the top_k alone: fewer values to go through
        logits, ids = torch.topk(logits, top_k)  # (B, top_k) each
    probs = probabilities(logits, temperature, 0, top_p, min_p)
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):  # each row its own stream: a row draws the same alone or in a batch
        picked = torch.cat([draw(probs[i:i + 1], g) for i, g in enumerate(generator)])
    else:
        picked = draw(probs, generator)
    return picked if ids is None else ids.gather(1, picked)


def draw(probs, generator=None):
    """One token per row of probs (B, vocab), each with its probability (the rows need not sum
    to 1): one uniform number per row, found in the running sum of the row (the inverse of its
    distribution function). The same law as torch.multinomial, which draws a random number per
    entry of the vocabulary: on a CPU that cost more than a layer of a small model."""
    cdf = probs.double().cumsum(dim=-1)  # (B, vocab); float64: no token's share lost to rounding
    total = cdf[:, -1:]
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device=probs.device)
    u = torch.minimum(u * total, total * (1 - 1e-12))  # strictly below the total, whatever the rounding
    # the first token whose running sum passes u: never one of probability 0 (its sum equals the one before)
    return torch.searchsorted(cdf, u, right=True)


def penalize(logits, seen, counts, o):
    """The repetition, frequency and presence penalties on logits (B, V). seen (B, V): tokens in
    the prompt or the output; counts (B, V): how often each was generated."""
    if o["repetition_penalty"] != 1.0:
        penalized = torch.where(logits > 0, logits / o["repetition_penalty"], logits * o["repetition_penalty"])
        logits = torch.where(seen, penalized, logits)
    if o["frequency_penalty"] or o["presence_penalty"]:
        logits = logits - o["frequency_penalty"] * counts - o["presence_penalty"] * (counts > 0).float()
    return logits


class Penalties:
    """What the penalties need to know of each row of a batch (the tokens of its prompt and output;
    how often each was generated) and applying them. With the penalties off it tracks nothing,
    so the decoding loop pays nothing for them."""

    def __init__(self, prompts, vocab, options, device):
        self.options, self.seen, self.counts = options, None, None
        if options["repetition_penalty"] != 1.0:
            self.seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
            for i, prompt in enumerate(prompts):
                self.seen[i, [t for t in prompt if t < vocab]] = True
        if options["frequency_penalty"] or options["presence_penalty"]:
            self.counts = torch.zeros(len(prompts), vocab, device=device)

    def __call__(self, logits):
        return penalize(logits, self.seen, self.counts, self.options)

    def add(self, tokens):
        """One new token per row (b,)."""
        if self.seen is None and self.counts is None:
            return
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def keep_rows(self, rows):
        """From now on these rows (indices, repeats allowed), in this order."""
        self.seen = None if self.seen is None else self.seen[rows]
        self.counts = None if self.counts is None else self.counts[rows]


class Row:
    """One prompt's output as it is made: ids, and text decoded a few tokens at a time (never the
    whole output again per token), held back while it could end in half a character or in the
    start of a stop string."""

    def __init__(self, tokenizer, prompt, stop):
        self.tokenizer, self.stop, self.prompt = tokenizer, stop, prompt
        self.context = list(prompt[-4:])  # the prompt's last tokens: a new piece may join its last word
        self.start = self.offset = len(self.context)  # decode from start; text before offset is out
        self.ids, self.text, self.sent = [], "", 0
        self.finish_reason, self.generated = None, 0
        self.scores = None  # choices=: each choice's log-likelihood
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens proposed, and kept

    def add(self, token):
        """Take one new token; returns the text that is now certain (maybe "")."""
        self.ids.append(token)
        self.context.append(token)
        if self.tokenizer is None:
            return ""
        before = self.tokenizer.decode(self.context[self.start:self.offset])
        after = self.tokenizer.decode(self.context[self.start:])
        if after.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
            return ""
        self.text += after[len(before):]
        self.start, self.offset = self.offset, len(self.context)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
        return self.release()

    def release(self, final=False):
        """The text not yet sent that no stop string can still claim."""
        hold = 0 if final or self.finish_reason else max(
            (n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        piece = self.text[self.sent:len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def cancel(self):
        """Stop the row from outside the decoding loop (a client that left): decode() drops it
        from the batch at its next step, and nothing more is made for it."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def finish(self, reason):
        """End the row; the text it held back for a stop string that never came is released."""
        if self.finish_reason is None:
            self.finish_reason = reason
        if self.tokenizer is not None and self.offset < len(self.context):  # a last half character
            self.text += self.tokenizer.decode(self.context[self.start:])[
                len(self.tokenizer.decode(self.context[self.start:self.offset])):]
        return self.release(final=True)


def batch_of(model, prompts, pad_id=0, bos_id=0):
    """The model's inputs for prompts of any lengths (lists of token ids): (idx (B, T), inputs).
    Decoders: padded on the left, so every row's last token sits in the last column, with
    inputs["pad"] (B,) when the lengths differ. encdec: the prompts are the sources, padded on
    the right (src, src_mask), and the decoder begins at <|bos|> in every row."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    if model.config.arch == "encdec":
        src = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            src[i, :len(p)] = torch.tensor(p, device=device)
        idx = torch.full((len(prompts), 1), bos_id, dtype=torch.long, device=device)
        return idx, {"src": src, "src_mask": torch.arange(longest, device=device) < lengths[:, None]}
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):] = torch.tensor(p, device=device)
    if model.config.arch == "lstm" or not bool((lengths != longest).any()):
        return idx, {}  # the LSTM reads each prompt alone (see read_prompts_alone)
    return idx, {"pad": longest - lengths}


def read_prompts_alone(model, prompts, device):
    """An LSTM's state after each prompt read alone (padding would flow through its recurrence),
    stacked into one batch: (LSTMCache, the logits after each prompt (B, V))."""
    states, logits = [], []
    for p in prompts:
        cache = LSTMCache()
        out, _ = model(torch.tensor([p], device=device), cache=cache)
        states.append(cache.hc)
        logits.append(out[:, -1])
    cache = LSTMCache()
    cache.hc = tuple(torch.cat(parts, dim=1) for parts in zip(*states))  # (layers, B, C) each
    return cache, torch.cat(logits)


def windowing(model, options):
    """next_logits' window setting for the models that slide a window (not the LSTM, which has no
    context limit, nor encdec, whose decoder refuses to outgrow its context)."""
    return {} if model.config.arch in ("lstm", "encdec") else {"slide": options["slide"]}


# The decoding loops run in inference_mode, not only no_grad: autograd keeps no version counters or
# views for any of their operations (a generator function gets the mode back at each resume)
@torch.inference_mode()
def decode(model, idx, inputs, rows, generators, options, use_cache=True, vocab_limit=None, eot=None, step=None):
    """The decoding loop, a generator: yields (row, text piece) as text is made, and finishes the
    rows (Row objects, one per row of idx). idx, inputs: from batch_of(); generators: one per row
    (or None); eot: the token that ends a row, or None; step: a compiled GPT.decode_step."""
    o = options
    B, device = idx.size(0), idx.device
    vocab = vocab_limit or model.config.vocab_size
    max_new = o["max_new_tokens"]
    if model.config.arch == "encdec":
        max_new = min(max_new, model.config.block_size - idx.size(1))  # the decoder's context is not windowed
    penalties = Penalties([row.prompt for row in rows], vocab, o, device)
    active = list(range(B))  # the rows still in the batch, by their place in idx
    state = first = None
    spelling = RegexMask(o["regex"], rows[0].tokenizer, eot, o["temperature"] == 0) if o["regex"] else None
    if model.config.arch == "lstm" and len({len(row.prompt) for row in rows}) > 1:
        if not use_cache:
            raise ValueError("an LSTM batches prompts of different lengths only with use_cache=True")
        state, first = read_prompts_alone(model, [row.prompt for row in rows], device)
    for n in range(max_new):
        if first is not None:
            logits, first = first, None
        else:
            logits, state = model.next_logits(idx, state, use_cache, **inputs, **({"step": step} if step else {}),
                                              **windowing(model, o))
        logits = penalties(logits[:, :vocab].float())
        if spelling is not None:
            logits = spelling(logits, [rows[i] for i in active])
        token = sample_next(logits, o["temperature"], o["top_k"], o["top_p"], [generators[i] for i in active],
                            o["min_p"])  # (b, 1)
        idx = torch.cat((idx, token), dim=1)
        penalties.add(token[:, 0])
        done = []
        for place, (i, t) in enumerate(zip(active, token[:, 0].tolist())):
            row = rows[i]
            row.generated += 1
            piece = row.finish("stop") if t == eot else row.add(t)
            if row.finish_reason is None and n == max_new - 1:
                piece += row.finish("length")
            if piece:
                yield i, piece
            if row.finish_reason is not None:
                done.append(place)
        if done:  # finished rows leave the batch
            keep = torch.tensor([p for p in range(len(active)) if p not in done], dtype=torch.long, device=device)
            active = [active[p] for p in keep.tolist()]
            if not active:
                return
            idx = idx[keep]
            penalties.keep_rows(keep)
            inputs = {k: v[keep] for k, v in inputs.items()}
            if state is not None:
                state.keep_rows(keep)
    for i in active:  # max_new_tokens was 0
        piece = rows[i].finish("length")
        if piece:
            yield i, piece


@torch.inference_mode()
def speculative_decode(model, draft, idx, inputs, draft_inputs, row, generator, options, vocab_limit=None, eot=None):
    """decode() for one prompt (idx (1, T)) with a smaller draft model's help: a generator of the
    row's text pieces (speculative decoding, Leviathan et al. 2023; Chen et al. 2023). Each round
    the draft proposes draft_tokens tokens one by one, and the model reads them all in one pass.
    It keeps draft token i with probability min(1, p_i / q_i), where p and q are the model's and
    the draft's distributions after the same temperature, top_k, top_p and min_p (probabilities());
    at the first it rejects it draws from max(0, p - q) renormalized instead, and when it keeps
    them all it draws one more token from its own next distribution. So every token comes from
    the model's distribution exactly, whatever the draft. Greedy: the drafts are kept while each
    is the model's argmax, and the model's argmax follows, which is plain greedy decoding's output.

    Each model's KVCache holds a prefix of the sequence, and its next pass reads the rest with the
    new drafts. After a round both keep only what was accepted (KVCache.rollback: the position
    goes back; linear attention's sums go back to the round's start and the accepted tokens are
    read again in the next pass). Once the sequence fills either model's context the model
    decodes alone, each step from its window, as decode() does. The stops are decode()'s: tokens
    accepted after an end-of-text, a stop string or max_new_tokens are dropped.
    inputs, draft_inputs: the labels of a conditional model, or {}."""
    o, device = options, idx.device
    vocab = vocab_limit or model.config.vocab_size
    greedy, max_new = o["temperature"] == 0, o["max_new_tokens"]
    block = min(model.config.block_size, draft.config.block_size)
    seq = idx[0].tolist()
    cache, draft_cache = (KVCache(m.config, 1, device, m.cache_dtype(device.type)) for m in (model, draft))

    def read(m, cache, extra, more):
        """m's logits (n, vocab) after each token of seq[cache.pos:] + more."""
        new = torch.tensor([seq[cache.pos:] + more], device=device)
        return m.logits(m.hidden(new, cache, **extra))[0, :, :vocab].float()

    def dist(logits):  # normalized: min_p leaves probabilities() unnormalized, and p / q needs them whole
        probs = probabilities(logits, o["temperature"], o["top_k"], o["top_p"], o["min_p"])
        return probs / probs.sum(dim=-1, keepdim=True)

    def pick(probs):
        return int(draw(probs[None], generator))

    while row.generated < max_new:
        n = len(seq)
        if n > block:  # past the context: the model alone, on its sliding window
            logits, _ = model.next_logits(torch.tensor([seq], device=device), None, True, **inputs,
                                          **windowing(model, o))
            new = sample_next(logits[:, :vocab].float(), o["temperature"], o["top_k"], o["top_p"], generator,
                              o["min_p"])[0].tolist()
        else:
            k = min(o["draft_tokens"], block - n, max_new - row.generated - 1)
            saved, draft_saved = cache.snapshot(), draft_cache.snapshot()
            drafted, q = [], []  # q: the draft's distribution at each of its tokens (sampling)
            for _ in range(k):
                logits = read(draft, draft_cache, draft_inputs, drafted[-1:])[-1:]  # (1, V)
                if greedy:
                    drafted.append(int(logits.argmax()))
                else:
                    q.append(dist(logits)[0])
                    drafted.append(pick(q[-1]))
            logits = read(model, cache, inputs, drafted)[-(k + 1):]  # (k + 1, V): after seq, after each draft
            j = 0  # drafts accepted
            if greedy:
                best = logits.argmax(dim=-1).tolist()
                while j < k and drafted[j] == best[j]:
                    j += 1
                new = drafted[:j] + [best[j]]
            else:
                p = dist(logits)
                while j < k and float(torch.rand(1, generator=generator)) * q[j][drafted[j]] < p[j, drafted[j]]:
                    j += 1
                residual = (p[j] - q[j]).clamp(min=0) if j < k else p[k]
                new = drafted[:j] + [pick(residual if residual.sum() > 0 else p[j])]
            cache.rollback(n + j, saved)
            draft_cache.rollback(n + j, draft_saved)
            row.drafted, row.accepted = row.drafted + k, row.accepted + j
        for t in new:
            seq.append(t)
            row.generated += 1
            piece = row.finish("stop") if t == eot else row.add(t)
            if row.finish_reason is None and row.generated == max_new:
                piece += row.finish("length")
            if piece:
                yield piece
            if row.finish_reason is not None:
                return
    piece = row.finish("length")  # max_new_tokens was 0
    if piece:
        yield piece


def run_to_end(steps):
    for _ in steps:
        pass


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, generator=None,
             vocab_limit=None, step=None, **inputs):
    """Continue the rows of idx (B, T), all of one length, by max_new_tokens each, with no stop:
    idx with the new tokens after it (B, T + max_new_tokens). temperature 0 = greedy; ids from
    vocab_limit up (the rows padding the vocabulary past the tokenizer's) are never picked.
    inputs: what the architecture reads besides idx (labels=, src=, src_mask=). With use_cache
    each step reads only the new token and the state of the steps before; without, the whole
    sequence again. The output is the same. step: a compiled GPT.decode_step (see Engine)."""
    rows = [Row(None, prompt, ()) for prompt in idx.tolist()]
    options = check_options({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                             "top_p": top_p})
    run_to_end(decode(model, idx, inputs, rows, [generator] * idx.size(0), options, use_cache, vocab_limit, None,
                      step))
    new = torch.tensor([row.ids for row in rows], dtype=idx.dtype, device=idx.device).view(idx.size(0), -1)
    return torch.cat((idx, new), dim=1)


def repeated_ngrams(idx, n, vocab):
    """(B, vocab): True for each token that would end an n-gram its row of idx (B, T) already holds."""
    banned = torch.zeros(idx.size(0), vocab, dtype=torch.bool, device=idx.device)
    for row, seq in enumerate(idx.tolist()):
        prefix = seq[len(seq) - n + 1:]  # the n - 1 tokens the next n-gram starts with
        ends = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]
        banned[row, [t for t in ends if t < vocab]] = True
    return banned


@torch.inference_mode()
def beam_search(model, idx, inputs, options, use_cache=True, vocab_limit=None, eot=None):
    """Beam search over one prompt: idx (1, T) and inputs from batch_of(); options from
    check_options() (num_beams, length_penalty, no_repeat_ngram_size, max_new_tokens and the
    penalties). Returns the best hypothesis: (its score, its new token ids, whether it ended
    with eot, which is not among the ids).

    The num_beams open hypotheses are the rows of one batch. Each step extends every one by
    every token below vocab_limit and keeps the num_beams likeliest extensions; the cache
    (KVCache or LSTMCache) follows, each kept row taking its parent's state (keep_rows with
    repeated rows). A hypothesis's log-probability is the sum of its tokens' log_softmax, taken
    after the repetition/frequency/presence penalties when they are set; a token that would
    make an n-gram (n = no_repeat_ngram_size) appear twice in the prompt and the output gets
    -inf (for encdec: in the decoder's tokens, <|bos|> and the output). An extension by eot
    that ranks among the num_beams best is finished, and scores

        its log-probability / length ** length_penalty

    where length counts its new tokens, eot included: 0 = the plain sum, which favours short
    outputs; 1 = the mean per token; more favours longer ones. The open hypotheses at
    max_new_tokens are scored the same way and compete with the finished ones.

    Early stop: a log-probability only falls as its hypothesis grows, so an open one can still
    reach at most its sum now over max_new_tokens ** length_penalty (length_penalty > 0) or
    over (its length + 1) ** length_penalty (otherwise). Once none can beat the best finished
    hypothesis the search ends: the result is what going on to max_new_tokens would give.
    """
    o, beams, penalty = options, options["num_beams"], options["length_penalty"]
    vocab = vocab_limit or model.config.vocab_size
    max_new = o["max_new_tokens"]
    if model.config.arch == "encdec":
        max_new = min(max_new, model.config.block_size - idx.size(1))  # the decoder's context is not windowed
    T, device = idx.size(1), idx.device
    prompt = (inputs["src"] if model.config.arch == "encdec" else idx)[0].tolist()
    penalties = Penalties([prompt], vocab, o, device)
    scores = torch.zeros(1, device=device)  # (n,) the open hypotheses' log-probabilities
    best = state = None  # best: the best finished hypothesis so far
    for step in range(max_new):
        n = idx.size(0)
        logits, state = model.next_logits(idx, state, use_cache, **{k: v.expand(n, *v.shape[1:])
                                                                     for k, v in inputs.items()}, **windowing(model, o))
        logp = F.log_softmax(penalties(logits[:, :vocab].float()), dim=-1)  # (n, V)
        if o["no_repeat_ngram_size"]:
            logp = logp.masked_fill(repeated_ngrams(idx, o["no_repeat_ngram_size"], vocab), -math.inf)
        total = (scores[:, None] + logp).view(-1)  # (n * V,) every hypothesis extended by every token
        top = torch.topk(total, min(2 * beams, total.numel()))  # at most one eot per parent among them
        kept = []
        for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            if s == -math.inf or len(kept) == beams:
                break
            if i % vocab != eot:
                kept.append(i)
            elif rank < beams and (best is None or s / (step + 1) ** penalty > best[0]):
                best = (s / (step + 1) ** penalty, idx[i // vocab, T:].tolist(), True)
        if not kept:  # every extension is banned: the open hypotheses end where they are
            break
        kept = torch.tensor(kept, device=device)
        parents, tokens = kept // vocab, kept % vocab
        idx = torch.cat((idx[parents], tokens[:, None]), dim=1)
        scores = total[kept]
        penalties.keep_rows(parents)
        penalties.add(tokens)
        if state is not None:
            state.keep_rows(parents)
        if best is not None:
            reach = max_new ** penalty if penalty > 0 else (step + 2) ** penalty
            if max(scores.tolist()) / reach <= best[0]:
                return best
    length = idx.size(1) - T
    if length:
        final = (scores / length ** penalty).tolist()
        i = max(range(len(final)), key=final.__getitem__)
        if best is None or final[i] > best[0]:
            best = (final[i], idx[i, T:].tolist(), False)
    return best or (0.0, [], False)


@torch.no_grad()
def embed_documents(model, documents, batch_size=32):
    """Mean-pooled final hidden states, one vector per document (N, C), for retrieval.

    documents: lists of token ids. A document longer than the context is read in
    consecutive windows of block_size (the full ones batch_size at a time), and every
    token's state counts once.
    """
    block_size = model.config.block_size
    device = next(model.parameters()).device
    vectors = []
    for ids in documents:
        ids = torch.tensor(ids or [0], dtype=torch.long, device=device)
        n_full = len(ids) // block_size
        windows = list(ids[:n_full * block_size].view(n_full, block_size).split(batch_size))  # (b, block_size) each
        if len(ids) % block_size:
            windows.append(ids[n_full * block_size:][None, :])  # the rest, (1, T)
        total = sum(model.hidden(w).float().sum(dim=(0, 1)) for w in windows)
        vectors.append(total / len(ids))
    return torch.stack(vectors)


def read_documents(spec):
    """(name, text, label) of each document spec names: a .jsonl file, one a line in its "text"
    field (label: its "label", if any), or files, folders and globs, comma-separated, a document
    each (label: the folder it is in). Read as UTF-8, bad bytes replaced; ValueError if unreadable."""
    if spec.endswith(".jsonl"):
        try:
            with open(spec, encoding="utf-8", errors="replace") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read {spec}: {e.strerror}")
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec} is not JSON Lines ({e})")
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise ValueError(f"{spec}: every line must be an object with a \"text\" string")
        return [(f"{spec}:{i + 1}", r["text"], str(r.get("label", ""))) for i, r in enumerate(rows)]
    paths, seen = [], set()
    for part in spec.split(","):
        found = glob.glob(os.path.join(part, "**", "*"), recursive=True) if os.path.isdir(part) else glob.glob(part)
        for path in sorted(found):
            if os.path.isfile(path) and os.path.realpath(path) not in seen:  # a link to a file already read
                seen.add(os.path.realpath(path))
                paths.append(path)
    if not paths:
        raise ValueError("names no files")
    out = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append((path, f.read(), os.path.basename(os.path.dirname(os.path.abspath(path)))))
    return out


def rank_by_cosine(query, vectors):
    """Indices of vectors (N, C) from the most to the least similar to query (C,), and the similarities."""
    similarity = F.cosine_similarity(vectors, query[None, :], dim=-1)
    order = torch.argsort(similarity, descending=True)
    return order, similarity[order]


# ----------------------------------------------------------------------------------
# Constrained generation: choices= (the likeliest of a few given answers) and regex= (only
# text that can still become a match of a pattern).

@torch.no_grad()
def choice_log_likelihoods(model, prompt, choices, vocab, label=None, bos_id=0):
    """The log-likelihood (nats) of each choice right after prompt (lists of token ids): the sum
    of its tokens' log-probabilities over the first vocab ids, as generation draws them. The
    sum, not the mean per token: the plain likelihood of the whole answer, so of two choices
    the model finds as likely per token, the shorter wins. One forward pass for all choices:
    decoders read prompt + choice, the rows padded on the right (a causal model never looks
    right); encdec reads the prompt as its source and each choice after <|bos|>, teacher-forced.
    label (conditional): the control label, a 0-d tensor."""
    device = next(model.parameters()).device
    encdec = model.config.arch == "encdec"
    given = [bos_id] if encdec else list(prompt)  # what each row reads before its choice
    rows = [given + c for c in choices]
    T = max(map(len, rows)) - 1
    if model.config.arch != "lstm" and T > model.config.block_size:
        raise ValueError(f"the prompt and its longest choice need a context of {T} tokens, longer than the "
                         f"model's {model.config.block_size}: shorten them")
    idx = torch.zeros(len(rows), T, dtype=torch.long, device=device)  # (n, T)
    targets = torch.full_like(idx, -1)  # each row's choice, where the model predicts it
    for i, r in enumerate(rows):
        idx[i, :len(r) - 1] = torch.tensor(r[:-1])
        targets[i, len(given) - 1:len(r) - 1] = torch.tensor(r[len(given):])
    if encdec:
        logits, _ = model(torch.tensor([prompt], device=device).expand(len(rows), -1), idx, targets)
    elif label is not None:
        logits, _ = model(idx, targets, labels=label.expand(len(rows)))
    else:
        logits, _ = model(idx, targets)
    logp = F.log_softmax(logits[..., :vocab].float(), dim=-1)  # (n, T, vocab)
    picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets >= 0, picked, 0.0).sum(dim=1).tolist()


@functools.lru_cache(maxsize=4)  # reading the vocabulary costs more than decoding a short constrained answer
class RegexMask:
    """regex=: the tokens that keep each row's new text a possible start of a full match of the
    pattern (the regex module's partial matching) stay; the others get -inf before sampling,
    so top_k, top_p and min_p choose among the allowed tokens.

    When it ends: end-of-text is allowed once the text is a full match, and ends the output
    ("stop"); when no token can continue the text (the pattern is complete, like a date, or no
    token spells what must come next) end-of-text is all that is left. When max_new_tokens runs
    out first ("length") the text is the start of a match. A token that stops inside a
    character (a byte of "§") is allowed only when a character written in the pattern can
    complete it; any other character must come whole in one token.

    Greedy decoding tries tokens from the likeliest down until one fits. Sampling needs every
    token that fits: the tokens are grouped by their first byte, a group is skipped when its
    first byte cannot follow, and the allowed set is kept per text for rows that reach it again.
    """

    def __init__(self, pattern, tokenizer, eot, greedy):
        import regex
        self.pattern, self.eot, self.greedy = regex.compile(pattern), eot, greedy
        self.pieces, self.by_first = token_bytes(tokenizer)
        self.written = [c.encode() for c in set(pattern) if ord(c) > 127]  # may complete a split character
        self.allowed_after = {}  # (text, tail) -> the ids allowed after it
        self.read = {}  # Row -> (its ids read, text, tail): the whole characters, then a split one's bytes

    def __call__(self, logits, rows):
        """logits (b, V) of rows (a Row each) with the tokens that do not fit at -inf."""
        keep = torch.zeros(logits.shape, dtype=torch.bool)
        for r, row in enumerate(rows):
            text, tail = self.state(row)
            keep[r, self.likeliest(logits[r], text, tail) if self.greedy else self.allowed(text, tail)] = True
        return logits.masked_fill(~keep.to(logits.device), -math.inf)

    def state(self, row):
        """The row's text so far: (its whole characters, the bytes of a split last one)."""
        n, text, tail = self.read.get(row, (0, "", b""))
        for t in row.ids[n:]:
            text, tail = spell_after(text, tail + self.pieces[t])
        self.read[row] = (len(row.ids), text, tail)
        return text, tail

    def could_match(self, text):
        return self.pattern.fullmatch(text, partial=True) is not None

    def fits(self, text, tail, t):
        """Whether token t may come after text and tail."""
        if t == self.eot:
            return not tail and self.pattern.fullmatch(text) is not None
        if self.pieces[t] is None:
            return False
        spelled = spell_after(text, tail + self.pieces[t])
        if spelled is None:
            return False
        text, tail = spelled
        if tail:
            return any(c.startswith(tail) and self.could_match(text + c.decode()) for c in self.written)
        return self.could_match(text)

    def likeliest(self, logits, text, tail):
        """Greedy: the likeliest token that fits, found among the 64 likeliest one by one first."""
        for t in torch.topk(logits, min(64, logits.numel())).indices.tolist():
            if self.fits(text, tail, t):
                return t
        allowed = self.allowed(text, tail)
        return allowed[int(logits[allowed].argmax())]

    def allowed(self, text, tail):
        """Every token that fits after text and tail; end-of-text alone when none does."""
        if (text, tail) not in self.allowed_after:
            ids = [t for first, group in self.by_first.items() if self.may_begin(text, tail, first)
                   for t in group if self.fits(text, tail, t)]
            if self.fits(text, tail, self.eot):
                ids.append(self.eot)
            self.allowed_after[text, tail] = ids or [self.eot]
        return self.allowed_after[text, tail]

    def may_begin(self, text, tail, first):
        """Whether a token beginning with the byte first may fit: the whole characters so far could match."""
        if not tail and first >= 0x80:  # it begins a character still to come (a lead byte of UTF-8), or none
            return 0xC2 <= first <= 0xF4
        spelled = spell_after(text, tail + bytes([first]))
        return spelled is not None and (spelled[0] == text or self.could_match(spelled[0]))


def spell_after(text, data):
    """text followed by the bytes data: (text and data's whole characters, the bytes of a last
    character split off at the end), or None when data is not UTF-8."""
    try:
        return text + data.decode(), b""
    except UnicodeDecodeError as e:
        if e.end < len(data) or e.reason != "unexpected end of data":
            return None
        return text + data[:e.start].decode(), data[e.start:]


class Engine:
    """A trained run loaded once, ready to generate, embed and score texts."""

    def __init__(self, model, tokenizer, device="cpu", dtype=torch.float32, labels=(), draft=None, compile=False,
                 auto_dtype=False):
        """draft: an Engine of a smaller run with the same tokenizer, for speculative decoding
        (Engine.load checks the tokenizer; here it is the caller's word). compile: decode each
        new token with GPT.decode_step compiled by torch.compile (gpt and conditional runs with
        softmax attention): compiled on the first call (seconds to a minute), then once more
        if the batch shrinks (rows that finish leave it), never per token. On CUDA its mode is
        "reduce-overhead": CUDA graphs replay the whole step. auto_dtype: dtype was picked for the
        machine (Engine.load's dtype "auto"), so autocast() may pick float32 for a few rows instead."""
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.auto_dtype = auto_dtype
        self.labels = list(labels)  # conditional: the names of the control labels
        self.draft = draft
        self.step = None
        if compile:
            if model.config.arch not in ("gpt", "conditional") or model.config.attention != "sdpa":
                raise ValueError(f"compile supports gpt and conditional runs with softmax attention; this run is "
                                 f"{model.config.arch!r} with {model.config.attention!r} attention")
            self.step = torch.compile(model.decode_step, mode="reduce-overhead" if device == "cuda" else None)
        if draft is not None:
            for name, arch in (("the run", model.config.arch), ("the draft run", draft.model.config.arch)):
                if arch not in ("gpt", "conditional"):
                    raise ValueError(f"speculative decoding supports gpt and conditional runs; {name} is {arch!r}")
            if draft.model.config.arch == "conditional" and draft.labels != self.labels:
                raise ValueError(f"the draft run's labels ({', '.join(draft.labels)}) are not the run's "
                                 f"({', '.join(self.labels)})")

    @classmethod
    def load(cls, out_dir, device="auto", dtype="auto", quantize="", draft_out_dir="", compile=False):
        """The run in out_dir (weights, settings, tokenizer), on device ("auto": CUDA, then MPS, then CPU).
        quantize="int8": int8 weights for decoding on the CPU (runtime.quantize), computed in float32
        (bf16 autocast around the int8 products only slows them). draft_out_dir: a smaller run
        with the same tokenizer files, loaded alike, that drafts tokens for speculative decoding."""
        import json
        import os

        from runtime import load_run, pick_device, pick_dtype
        from runtime import quantize as to_int8
        from tokenizer import tokenizer_fingerprint
        draft = None
        if draft_out_dir:
            if tokenizer_fingerprint(draft_out_dir) != tokenizer_fingerprint(out_dir):
                raise ValueError(f"the draft run {draft_out_dir} has another tokenizer than {out_dir}: "
                                 "a draft must be trained on the same tokenizer files")
            draft = cls.load(draft_out_dir, device, dtype, quantize)
        device = pick_device(device)
        model, tokenizer, _ = load_run(out_dir, device)
        if quantize:
            if dtype not in ("auto", "float32"):
                raise ValueError(f"quantize={quantize!r} computes in float32, not dtype={dtype}")
            model, dtype = to_int8(model, quantize), "float32"
        labels = ()
        if model.config.arch == "conditional":
            with open(os.path.join(out_dir, "meta.json")) as f:
                labels = json.load(f)["labels"]
        return cls(model, tokenizer, device, pick_dtype(device, dtype), labels, draft, compile, dtype == "auto")

    def decode_dtype(self, rows=0):
        """The dtype the model's passes compute in. rows: the batch of a decoding loop; with dtype
        "auto" on a CPU, fewer than FP32_DECODE_ROWS rows decode in float32, as a product of so few
        rows runs faster there in float32 than in bf16 (bench.py --what=decode)."""
        fp32 = self.auto_dtype and self.device == "cpu" and 0 < rows < FP32_DECODE_ROWS
        return torch.float32 if fp32 else self.dtype

    def autocast(self, rows=0):
        """The precision of the model's passes: decode_dtype(rows)'s."""
        from runtime import autocast
        return autocast(self.device, self.decode_dtype(rows))

    def prompt_ids(self, prompt):
        """A prompt's ids. A prompt is a text, whose special tokens (<|endoftext|>, <|mask|>) are
        meant as such, or a list of token ids (say chat_prompt's). The empty text begins a new document."""
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(t, int) and 0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise ValueError(f"a prompt of token ids must be a non-empty list of ids from 0 to "
                                 f"{self.tokenizer.vocab_size - 1}, got {prompt!r:.80}")
            ids = prompt
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allow_special=True) if prompt else [self.tokenizer.eot_id]
        else:
            raise ValueError(f"a prompt is a text or a list of token ids, got {prompt!r:.80}")
        if self.model.config.arch != "lstm" and len(ids) > self.model.config.block_size:
            raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                             f"{self.model.config.block_size}: shorten it")
        return ids

    def batch(self, prompts, condition=None):
        """The prompts' ids and the model's inputs for them in one batch: (ids, idx, inputs) (see batch_of)."""
        if self.model.config.arch not in ("gpt", "conditional", "lstm", "encdec"):
            raise ValueError(f"a {self.model.config.arch!r} run does not generate text (it fills masks and embeds)")
        ids = [self.prompt_ids(p) for p in prompts]
        idx, inputs = batch_of(self.model, ids, self.tokenizer.pad_id, self.tokenizer.bos_id)
        if self.model.config.arch == "conditional":
            if condition not in self.labels:
                raise ValueError(f"condition={condition!r} is not one of this run's labels: {', '.join(self.labels)}")
            inputs["labels"] = torch.full((len(ids),), self.labels.index(condition), device=idx.device)
        return ids, idx, inputs

    def steps(self, prompts, condition=None, use_cache=True, **options):
        """decode() over texts: (rows, the generator of (row, piece))."""
        o = check_options(options)
        ids, idx, inputs = self.batch(prompts, condition)
        generators = [None if o["seed"] is None else torch.Generator(device=idx.device).manual_seed(o["seed"] + i)
                      for i in range(len(ids))]
        rows = [Row(self.tokenizer, p, o["stop"]) for p in ids]
        eot = None if o["ignore_eos"] else self.tokenizer.eot_id
        if o["choices"] is not None:
            return rows, self.chosen(rows, o["choices"], inputs.get("labels"))
        if self.draft is not None:
            refused = [name for name in ("repetition_penalty", "frequency_penalty", "presence_penalty", "regex")
                       if o[name] != DEFAULTS[name]] + ([] if use_cache else ["use_cache=False"])
            if refused:
                raise ValueError(f"speculative decoding (a draft run) does not support {', '.join(refused)}: "
                                 "leave it out, or the draft")
            return rows, self.speculate(idx, inputs, rows, generators, o, eot)
        return rows, decode(self.model, idx, inputs, rows, generators, o, use_cache, self.tokenizer.vocab_size, eot,
                            self.step)

    @property
    def has_chat(self):
        """Whether the run's tokenizer has the chat template's role tokens (tokenizer.chat_segments)."""
        return len(self.tokenizer.role_ids) == len(ROLE_TOKENS)

    def chat_prompt(self, messages):
        """The prompt (token ids) that asks for the assistant's next turn after messages, a list
        of {"role": "system" | "user" | "assistant", "content": str}, in the chat template
        (tokenizer.chat_ids): pass it to generate() or stream(). A ValueError says what is wrong
        with messages, or that the run's tokenizer has no role tokens."""
        return chat_ids(self.tokenizer, messages)

    def chat(self, messages, **kwargs):
        """The assistant's next turn after messages, as a Completion (its text ends where the model
        ends the turn, at an end-of-text); kwargs: generate()'s."""
        return self.generate([self.chat_prompt(messages)], **kwargs)[0]

    def generate(self, prompt, condition=None, use_cache=True, **options):
        """A Completion of prompt (a text), or a list of them for a list of prompts (texts or
        token-id lists), in one batch (with num_beams > 1: see beam_completions)."""
        if check_options(options)["num_beams"] > 1:
            return self.beam_completions(prompt, condition, use_cache, **options)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows, steps = self.steps(prompts, condition, use_cache, **options)
        with self.autocast(len(prompts)):
            run_to_end(steps)
        done = [Completion(r.text, r.ids, r.finish_reason, len(r.prompt), r.generated, r.scores,
                           r.accepted / r.drafted if r.drafted else None) for r in rows]
        return done[0] if isinstance(prompt, str) else done

    def stream(self, prompt, condition=None, use_cache=True, **options):
        """The new text of one prompt, piece by piece as it is made; the pieces join to generate()'s text."""
        if check_options(options)["num_beams"] > 1:
            raise ValueError("beam search (num_beams > 1) knows its text only at the end: it does not stream")
        _, steps = self.steps([prompt], condition, use_cache, **options)
        with self.autocast(1):
            for _, piece in steps:
                yield piece

    def beam_completions(self, prompt, condition=None, use_cache=True, **options):
        """generate() with num_beams > 1: beam_search() over each prompt in turn (its beams are the
        rows of one batch), and the best hypothesis as its Completion: finish_reason "stop" when it
        ended with end-of-text, "length" otherwise; its text is cut before the first stop string
        (the stop strings do not steer the search)."""
        o = check_options(options)
        if self.draft is not None:
            raise ValueError("speculative decoding (a draft run) does not support beam search (num_beams > 1)")
        eot = None if o["ignore_eos"] else self.tokenizer.eot_id
        done = []
        for text in [prompt] if isinstance(prompt, str) else prompt:
            ids, idx, inputs = self.batch([text], condition)
            with self.autocast(o["num_beams"]):
                _, new, ended = beam_search(self.model, idx, inputs, o, use_cache, self.tokenizer.vocab_size, eot)
            row = Row(self.tokenizer, ids[0], o["stop"])
            for t in new:
                row.generated += 1
                row.add(t)
                if row.finish_reason:  # a stop string: the text ends before it
                    break
            else:
                row.generated += ended  # the end-of-text token
                row.finish("stop" if ended else "length")
            done.append(Completion(row.text, row.ids, row.finish_reason, len(row.prompt), row.generated))
        return done[0] if isinstance(prompt, str) else done

    def speculate(self, idx, inputs, rows, generators, o, eot):
        """What steps() runs with a draft instead of decode(): speculative_decode() over each
        prompt in turn (one at a time: no batch), yielding (row, piece)."""
        lengths = [len(row.prompt) for row in rows]
        for i, row in enumerate(rows):
            one = idx[i:i + 1, idx.size(1) - lengths[i]:]  # the prompt without the batch's padding
            labels = {"labels": inputs["labels"][i:i + 1]} if "labels" in inputs else {}
            draft_labels = labels if self.draft.model.config.arch == "conditional" else {}
            for piece in speculative_decode(self.model, self.draft.model, one, labels, draft_labels, row,
                                            generators[i], o, self.tokenizer.vocab_size, eot):
                yield i, piece

    def chosen(self, rows, choices, labels=None):
        """What steps() runs for choices= instead of decode(): each row's output is its likeliest
        choice (see choice_log_likelihoods), told whole, with finish_reason "stop"."""
        ids = [self.tokenizer.encode(c) for c in choices]
        if not all(ids):  # a likelihood of 1: it would always win
            raise ValueError(f"choice {choices[ids.index([])]!r} encodes to no tokens with this tokenizer")
        for i, row in enumerate(rows):
            label = None if labels is None else labels[i]
            row.scores = choice_log_likelihoods(self.model, row.prompt, ids, self.tokenizer.vocab_size, label,
                                                self.tokenizer.bos_id)
            best = max(range(len(choices)), key=row.scores.__getitem__)
            row.ids, row.text, row.generated = ids[best], choices[best], len(ids[best])
            yield i, row.finish("stop")

    @torch.no_grad()
    def fill(self, prompt, top_k=5):
        """An encoder's fill-mask: for each <|mask|> in prompt (a text or token ids), the top_k
        likeliest fillers, never a special token, with their probabilities; and the text with each
        mask filled by its likeliest filler. {"masks": [[{"text", "probability"}, ...], ...], "text"}."""
        if self.model.config.arch != "encoder":
            raise ValueError(f"fill-mask needs an encoder run; this run is a {self.model.config.arch!r} run")
        ids = self.prompt_ids(prompt)
        tok = self.tokenizer
        where = [i for i, t in enumerate(ids) if t == tok.mask_id]
        if not where:
            raise ValueError("put <|mask|> where a word is missing")
        with self.autocast():
            logits, _ = self.model(torch.tensor([ids], device=self.device))
        logits = logits[0, where, :tok.vocab_size].float()  # (masks, vocab): an encoder predicts every position
        logits[:, list(tok.special.values())] = -math.inf  # a filler is a piece of text, never a marker
        best = logits.softmax(dim=-1).topk(min(top_k, logits.size(-1)))
        masks = [[{"text": tok.decode([t]), "probability": p} for p, t in zip(values, indices)]
                 for values, indices in zip(best.values.tolist(), best.indices.tolist())]
        likeliest = dict(zip(where, best.indices[:, 0].tolist()))
        return {"masks": masks, "text": tok.decode([likeliest.get(i, t) for i, t in enumerate(ids)])}

    @torch.no_grad()
    def embed(self, texts):
        """One vector per text (N, n_embd): the mean of the model's final hidden states."""
        with self.autocast():
            return embed_documents(self.model, [self.tokenizer.encode(t) for t in texts])

    @torch.no_grad()
    def score(self, text):
        """How likely the model finds text, as a new document: {"log_likelihood" (nats), "tokens",
        "bits_per_byte"}. A text longer than the context is read in windows that overlap by half,
        each token scored once, with at least half a context before it."""
        if self.model.config.arch not in ("gpt", "conditional", "lstm"):
            raise ValueError(f"score needs a next-token model, not a {self.model.config.arch!r} run")
        if self.model.config.arch == "conditional":
            raise ValueError("score of a conditional run needs its label: not supported")
        ids = [self.tokenizer.eot_id] + self.tokenizer.encode(text)
        block = self.model.config.block_size
        total, scored = 0.0, 1  # ids[0], the document's start, is given, not scored
        with self.autocast():
            while scored < len(ids):
                begin = max(0, min(scored - block // 2, len(ids) - 1 - block))
                window = torch.tensor([ids[begin:begin + block + 1]], device=self.device)
                targets = window[:, 1:].clone()
                targets[:, :scored - begin - 1] = -1  # already scored in the window before
                logits, _ = self.model(window[:, :-1], targets)
                logp = F.log_softmax(logits[0].float(), dim=-1)
                counted = targets[0] != -1
                total += logp[counted].gather(1, targets[0][counted][:, None]).sum().item()
                scored = begin + window.size(1)
        nbytes = len(text.encode("utf-8"))
        return {"log_likelihood": total, "tokens": len(ids) - 1,
                "bits_per_byte": -total / math.log(2) / nbytes if nbytes else float("nan")}
