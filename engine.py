"""
Generation over a trained model, for every architecture that writes text (gpt, conditional,
lstm, encdec) and for retrieval: the sampling loop, the choice of each next token, and
document embeddings. sample.py is the command line over it. A library: importing it runs nothing.

Each model's next_logits(idx, cache, use_cache, **inputs) gives the logits after idx and
the generation state to pass back in (a KVCache, an LSTMCache, or None without a cache),
so the loop here is the same for every architecture.
"""

import torch
from torch.nn import functional as F


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row of logits (B, vocab): greedy, or sampled with top-k / nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
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
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             use_cache=True, generator=None, vocab_limit=None, **inputs):
    """Continue idx (B, T) by max_new_tokens. temperature 0 = greedy. Ids from vocab_limit
    up (the rows padding the vocabulary past the tokenizer's) are never picked.
    inputs: what the architecture reads besides idx (labels=, src=, src_mask=).
    With use_cache each step reads only the new token and the state of the steps before
    (until the context is full: then the sliding window is read again); without, each step
    reads the whole sequence again. The output is the same."""
    state = None
    for _ in range(max_new_tokens):
        logits, state = model.next_logits(idx, state, use_cache, **inputs)
        next_id = sample_next(logits[:, :vocab_limit].float(), temperature, top_k, top_p, generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


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


def rank_by_cosine(query, vectors):
    """Indices of vectors (N, C) from the most to the least similar to query (C,), and the similarities."""
    similarity = F.cosine_similarity(vectors, query[None, :], dim=-1)
    order = torch.argsort(similarity, descending=True)
    return order, similarity[order]
