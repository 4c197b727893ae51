"""
nanolex models: every architecture in one file, built from one set of blocks.

Read the GPT first (arch="gpt", the defaults): token + learned position embeddings ->
n_layer pre-norm blocks of causal self-attention and an MLP -> a final norm -> a head
tied to the token embedding, trained to predict the next token. That path is
ModelConfig (in configurator.py), the small functions, Attention, MLP, Block, Embedding,
Stack, Model and GPT, in that order.

Its switches, each read in one place:
- n_kv_head < n_head   grouped-query attention: groups of heads share keys/values (1 = MQA)
- pos                  learned | sinusoidal (fixed table) | rope (rotates q and k) | alibi
                       (a per-head penalty on distance added to the scores)
- norm, norm_first     layernorm | rmsnorm; pre-norm (GPT-2) or post-norm (the 2017 paper)
- norm_eps             the norms' epsilon; 0 = 1e-5 (layernorm), the dtype's eps (rmsnorm)
- mlp, mlp_hidden      gelu (4x; exact erf) | gelu_tanh (its tanh approximation, OpenAI's GPT-2) |
                       swiglu (gated, ~8/3 x)

The variants come after the core, each built from the same blocks:
- attention="linear"   kernelized linear attention, cost linear in the length
- n_expert > 0         a mixture of experts in the MLP's place
- conditional          the GPT plus a control label's vector at every position
- encoder              the same stack, bidirectional, for masked-language modelling
- encdec               encoder + decoder with cross-attention, one shared embedding (T5-style)
- lstm                 embedding -> LSTM layers -> head (no blocks, no positions)

Any of them but conditional may also carry a classification head (n_classes > 0): a Linear
from one pooled final state of a document (pool: its first token, its last, or the mean of
its tokens) to class logits; train.py --task=classify trains it.

Last, LoRA: low-rank adapters on a trained model's Linear layers, for cheap fine-tuning.

Generation state (keys/values, linear-attention sums, the encoder's output, the LSTM's
h and c) lives in a cache object the caller passes in, never in the layers: a model is
its weights and forward(). The sampling loop is engine.py's.
"""

import fnmatch
import hashlib
import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# the model's settings live in configurator.py, which does not import torch (scripts' --help)
from configurator import OPTIMIZERS, ModelConfig  # noqa: F401  (ModelConfig: for model.ModelConfig)


# ----------------------------------------------------------------------------------
# small functions

def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps or None)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps or 1e-5, bias=config.bias)


def rope_tables(head_size, length, theta):
    """cos and sin of each position times each rotation frequency: two (length, head_size/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, device="cpu").float() / head_size)
    angles = torch.outer(torch.arange(length, device="cpu").float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of each head's channels. x: (B, nh, T, hs); cos and
    sin: (T, hs/2), or (B, T, hs/2) when each row has its own positions."""
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dim() == 3:  # (B, 1, T, hs/2): the same for every head
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def sinusoid_table(length, dim):
    """The fixed positions of 'Attention Is All You Need': sin and cos of position x frequency,
    interleaved, frequencies from 1 down to 1/10000 (rope's, with theta 10000). (length, dim)."""
    cos, sin = rope_tables(dim, length, 10000.0)  # (length, ceil(dim/2)) each
    table = torch.zeros(length, dim, device="cpu")
    table[:, 0::2], table[:, 1::2] = sin, cos[:, :dim // 2]
    return table


def alibi_slopes(n_head):
    """ALiBi's per-head slopes, a geometric sequence from 2^(-8/n_head) down to 2^-8:
    some heads look far back, some only nearby."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)], device="cpu")


def positions(start, T, block_size, pad=None, device=None):
    """The positions of T tokens in columns start..start+T: (T,); with pad (B,), the number
    of padding tokens on the left of each row, each row's own (B, T), counted from its first
    real token (the padding sits at 0)."""
    if start + T > block_size:  # past the positions every kind of attention was trained on
        raise ValueError(f"input of {start + T} tokens is longer than block_size={block_size}")
    pos = torch.arange(start, start + T, device=device)
    return pos if pad is None else (pos[None, :] - pad[:, None]).clamp(min=0)


def window_length(n, block_size, slide):
    """How many of the last of n tokens a causal model reads to predict the next one: all of them
    within its context; past it, the window slides `slide` tokens at a time, so it holds
    block_size - slide + 1 tokens just after a slide and one more at each step until it is full."""
    if n <= block_size:
        return n
    return block_size - slide + 1 + (n - block_size - 1) % slide


def attention_mask(causal, T, start=0, keep=None, slopes=None, device=None):
    """The attn_mask F.scaled_dot_product_attention needs for T queries in columns start..
    over the S = start + T keys so far, or None where none is needed: a fresh causal pass
    says is_causal=True instead (the flash kernels' fast path), and one new token may see
    every key before it.

    keep (B, S) marks real keys (False = padding): a boolean mask (B, 1, T, S), in which a
    padding query sees itself, so that no row is empty (an empty row's softmax is NaN,
    and NaN times a zero weight is still NaN in the next layer). slopes turn on ALiBi: a
    float mask of -slope * distance, -inf where a key may not be seen.
    """
    S = start + T
    if slopes is None and keep is None and not (causal and start > 0 and T > 1):
        return None
    q_pos = torch.arange(start, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    visible = (k_pos <= q_pos) if causal else torch.ones(T, S, dtype=torch.bool, device=device)  # (T, S)
    if keep is not None:
        visible = visible & keep[:, None, None, :] | (k_pos == q_pos)  # (B, 1, T, S)
    if slopes is None:
        return visible
    bias = -slopes.to(device)[:, None, None] * (q_pos - k_pos).abs()  # (nh, T, S)
    return bias.masked_fill(~visible, float("-inf"))


def dropout(x, p, training):
    """F.dropout, not even called where it does nothing (eval mode, or p = 0): a decoded token
    passes through 2 * n_layer + 1 of them."""
    return F.dropout(x, p) if training and p else x


def repeat_kv(x, n_head):
    """(B, nkv, S, hs) -> (B, n_head, S, hs): each key/value head serves its group of query heads."""
    if x.size(1) == n_head:
        return x
    return x.repeat_interleave(n_head // x.size(1), dim=1)


# Up to this context, compiled training on a CPU writes causal attention out (two batched matmuls and
# a softmax that inductor fuses) instead of calling the CPU flash kernel, whose backward pass is
# several times its forward (figures: docs/performance.md). The (T, T) scores it keeps for the
# backward pass grow as T^2, hence the limit. It reads the queries ATTENTION_CHUNK at a time.
WRITTEN_OUT_ATTENTION_MAX_T = 512
ATTENTION_CHUNK = 128


def compiled_cpu_training(q):
    """Whether attention on q (B, nh, T, hs) is traced by torch.compile for a CPU training step
    (gradients on) with a context short enough for causal_attention. Not by torch.export (the ONNX
    export), whose graph must take any length: causal_attention's chunks are a loop over T."""
    return (q.device.type == "cpu" and q.size(-2) <= WRITTEN_OUT_ATTENTION_MAX_T and torch.is_grad_enabled()
            and torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def attention_weights(q, k, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(hs)) over the keys each query may see: q (B, nh, T, hs), k (B, nh, S, hs)
    -> (B, nh, T, S), in float32 (under autocast too, as the flash kernel's softmax). mask: keys to
    see (bool), or alibi's biases (float, -inf where unseen); is_causal: none after the query's own."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif is_causal:
        T = q.size(-2)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.float().softmax(dim=-1)


def causal_attention(q, k, v, chunk=ATTENTION_CHUNK):
    """Causal attention written out: q, k, v (B, nh, T, hs) -> (B, nh, T, hs). The queries go
    `chunk` at a time, each chunk over the keys up to its own last query, so the blocks of
    scores above the diagonal, which the mask would hide whole, are never computed (at T = 256,
    a quarter of the square; at 512, three eighths)."""
    T, out, start = q.size(-2), [], 0
    while start < T:  # comparisons, not range(T): torch.compile keeps one graph for lengths in one band
        end = start + chunk if start + chunk < T else T
        mask = None if start == 0 else attention_mask(True, end - start, start, device=q.device)
        weights = attention_weights(q[:, :, start:end], k[:, :, :end], mask, is_causal=start == 0)
        out.append(weights.to(v.dtype) @ v[:, :, :end])
        start = end
    return torch.cat(out, dim=2)


def compute_dtype(device_type, default):
    """The dtype matmuls (and so attention) compute in: autocast's while it is on, else default."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


class KVCache:
    """A transformer's generation state, kept outside the model: keys and values of every
    layer (or, for linear attention, its running sums), and for encdec the encoder's output
    and the cross-attention keys/values computed from it once. `pos` says how many
    positions are filled. `index`: GPT.decode_step's column, a (1,) tensor, or None.
    """

    def __init__(self, config, batch_size, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_kv_head, config.block_size, hs)
        linear = config.attention == "linear"
        # one tensor per layer, not one for all: a compiled step then writes its column in place
        # instead of copying the whole cache (in-place writes into views of one input are copied)
        self.k = None if linear else [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = None if linear else [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.sums = [None] * config.n_layer   # linear attention: (kv, z) per layer
        self.cross = [None] * config.n_layer  # encdec: cross-attention (k, v) per layer
        self.memory = None                    # encdec: the encoder's output
        self.pad = None                       # (B,): padding tokens on the left of each row, or None
        self.pos = 0
        self.index = None

    def update(self, layer, k, v):
        """Store this step's k, v (B, nkv, T, hs) and return all of them so far (with index set:
        written in place at that column, and the whole buffers returned, all block_size columns)."""
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        T = k.size(2)
        self.k[layer].narrow(2, self.pos, T).copy_(k)
        self.v[layer].narrow(2, self.pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, self.pos + T), self.v[layer].narrow(2, 0, self.pos + T)

    def keep_rows(self, rows):
        """Only these rows (a tensor of indices) from now on: the others have finished."""
        if self.k is not None:
            self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.sums = [None if s is None else (s[0][rows], s[1][rows]) for s in self.sums]
        self.cross = [None if c is None else (c[0][rows], c[1][rows]) for c in self.cross]
        self.memory = None if self.memory is None else self.memory[rows]
        self.pad = None if self.pad is None else self.pad[rows]

    def snapshot(self):
        """What rollback() returns to: the position and linear attention's running sums (each
        pass replaces a layer's sums with new tensors, so keeping the references is a copy)."""
        return self.pos, list(self.sums)

    def rollback(self, pos, snapshot):
        """Forget the tokens from column pos on (speculative decoding's rejected drafts). Keys and
        values past pos are simply overwritten by the next pass; linear attention's sums cannot
        be un-added, so they go back to the snapshot (taken at or before pos) and the tokens
        between the snapshot and pos must be read again. Afterwards self.pos <= pos."""
        if self.pos <= pos:
            return
        if self.k is not None:
            self.pos = pos
        else:
            self.pos, self.sums = snapshot[0], list(snapshot[1])


# ----------------------------------------------------------------------------------
# the blocks

class Attention(nn.Module):
    """Multi-head self-attention: softmax over scaled dot products by F.scaled_dot_product_attention
    (flash kernels on GPU, fused memory-efficient ones on CPU)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        self.kv_size = self.n_kv_head * self.head_size
        # q, k and v from one matrix: one matmul instead of three
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_size, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout  # on the attention weights and on the output

    def project(self, x, rope=None):
        """x (B, T, C) -> q (B, nh, T, hs), k and v (B, nkv, T, hs), rope applied to q and k."""
        heads = split_heads(self.c_attn(x), self.head_size)  # (B, nh + 2 nkv, T, hs)
        q, k, v = heads.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C). mask: attention_mask()'s, or None; is_causal: a fresh causal pass."""
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs): every token so far
        if is_causal and mask is None and not (self.training and self.dropout) and compiled_cpu_training(q):
            y = causal_attention(q, repeat_kv(k, self.n_head), repeat_kv(v, self.n_head))
        else:  # enable_gqa: each key/value head serves its group of query heads without being copied
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return dropout(self.c_proj(merge_heads(y)), self.dropout, self.training)

    def weights(self, x, rope=None, mask=None, is_causal=False):
        """The attention weights forward() would use on x (B, T, C), without dropout: (B, nh, T, T).
        For looking at (plot.py); scaled_dot_product_attention computes them inside and keeps them."""
        q, k, _ = self.project(x, rope)
        return attention_weights(q, repeat_kv(k, self.n_head), mask, is_causal)


def split_heads(x, head_size):
    """(B, T, n * hs) -> (B, n, T, hs): a view, each head's channels apart."""
    return x.unflatten(-1, (-1, head_size)).transpose(1, 2)


def merge_heads(y):
    """(B, nh, T, hs) -> (B, T, nh * hs): each position's heads side by side again."""
    return y.transpose(1, 2).flatten(2)


def mlp_hidden_size(config):
    """The MLP's inner width: swiglu has three matrices instead of two, and 8/3 x keeps the parameter
    count of gelu's 4x."""
    gated = config.mlp == "swiglu"
    return config.mlp_hidden or (64 * math.ceil(8 * config.n_embd / 3 / 64) if gated else 4 * config.n_embd)


def mlp_activation(h, gated, approximate="none"):
    """The MLP's nonlinearity on c_fc's output: gelu (exact, or approximate="tanh" for
    mlp="gelu_tanh"), or swiglu's silu(gate) * up (its two halves)."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate=approximate)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        hidden = mlp_hidden_size(config)
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if self.gated else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        return dropout(self.c_proj(mlp_activation(self.c_fc(x), self.gated, self.approximate)), self.dropout,
                       self.training)


class Block(nn.Module):
    """Self-attention then an MLP, each added to the residual stream; the encdec decoder's
    blocks cross-attend to the encoder's output in between."""

    def __init__(self, config, causal, cross=False):
        super().__init__()
        self.norm_first = config.norm_first
        self.ln_1 = make_norm(config)
        self.attn = LinearAttention(config, causal) if config.attention == "linear" else Attention(config)
        if cross:
            self.ln_x, self.cross_attn = make_norm(config), CrossAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None, layer=0, memory=None, memory_mask=None):
        if self.norm_first:  # pre-norm (GPT-2): the residual stream itself is never normalized
            x = x + self.attn(self.ln_1(x), rope, mask, is_causal, cache, layer)
            if memory is not None:
                x = x + self.cross_attn(self.ln_x(x), memory, memory_mask, cache, layer)
            return x + self.mlp(self.ln_2(x))
        # post-norm, as in 'Attention Is All You Need': normalize after each residual add
        x = self.ln_1(x + self.attn(x, rope, mask, is_causal, cache, layer))
        if memory is not None:
            x = self.ln_x(x + self.cross_attn(x, memory, memory_mask, cache, layer))
        return self.ln_2(x + self.mlp(x))


class Embedding(nn.Module):
    """Token ids -> vectors, plus the absolute positions (learned or sinusoidal) and, for
    the conditional model, the control label's vector at every position."""

    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.register_buffer("sinusoid", sinusoid_table(config.block_size, config.n_embd)
                             if config.pos == "sinusoidal" else None, persistent=False)
        self.wle = nn.Embedding(config.n_labels, config.n_embd) if config.arch == "conditional" else None
        self.dropout = config.dropout

    def forward(self, idx, pos, labels=None):
        """idx (B, T) at positions pos (T,) or (B, T); labels (B,) or (B, T) -> (B, T, C)."""
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        elif self.sinusoid is not None:  # as in the paper: embeddings of std d^-1/2 (see init_weights),
            x = x * math.sqrt(x.size(-1)) + self.sinusoid[pos]  # times sqrt(d), meet a table of ~1
        if self.wle is not None and labels is not None:  # no label: a representation for retrieval
            label = self.wle(labels)
            x = x + (label[:, None, :] if labels.dim() == 1 else label)
        return dropout(x, self.dropout, self.training)


class Stack(nn.Module):
    """n_layer blocks and a final norm: the body of every transformer here. It owns what the
    blocks share: the position tables that act inside attention (rope, alibi) and the mask."""

    grad_checkpoint = False  # training: keep only each block's input; Model.set_training_options sets it

    def __init__(self, config, causal, cross=False):
        super().__init__()
        self.causal, self.linear = causal, config.attention == "linear"
        self.blocks = nn.ModuleList(Block(config, causal, cross) for _ in range(config.n_layer))
        self.ln_f = make_norm(config) if config.norm_first else nn.Identity()  # post-norm blocks end normalized
        rope = config.pos == "rope"
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta) if rope \
            else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("slopes", alibi_slopes(config.n_head) if config.pos == "alibi" else None,
                             persistent=False)

    def forward(self, x, pos, start=0, cache=None, keep=None, memory=None, memory_keep=None):
        """x (B, T, C) in columns start..start+T, at positions pos (see positions()) -> (B, T, C).
        keep (B, S): real keys; memory (B, S, C) and memory_keep (B, S): what cross-attention reads."""
        T = x.size(1)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.rope_cos is not None else None
        if self.linear:  # causal by its running sums (the earlier keys are in them): only this pass's padding
            mask, is_causal = (keep[:, -T:] if keep is not None else None), False
        else:
            mask = attention_mask(self.causal, T, start, keep, self.slopes, x.device)
            # a fresh pass (start 0) is causal; one new token after a cache sees every key. (Not T > 1:
            # a test on the length would be a symbolic bool to torch.export, which SDPA does not take)
            is_causal = mask is None and self.causal and start == 0
            if mask is not None and mask.is_floating_point():  # alibi's biases: cast once, not in every layer
                mask = mask.to(compute_dtype(x.device.type, x.dtype))
        memory_mask = memory_keep[:, None, None, :] if memory_keep is not None else None  # (B, 1, 1, S)
        recompute = self.grad_checkpoint and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            args = (x, rope, mask, is_causal, cache, layer, memory, memory_mask)
            # recomputed in the backward pass, with the same dropout masks (checkpoint restores the RNG)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    def step(self, x, pos, cache):
        """forward() of one new token per row, x (B, 1, C), at column cache.index with every shape
        fixed, whatever the column: attention reads all block_size columns of the cache, masked
        to those filled (and not padding). So a compiled step is compiled once. pos: (1,) or (B, 1)."""
        cols = torch.arange(cache.k[0].size(2), device=x.device)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.rope_cos is not None else None
        visible = cols <= cache.index  # (S,)
        if cache.pad is not None:
            visible = visible & (cols >= cache.pad[:, None])  # (B, S)
        mask = visible.view(-1 if cache.pad is not None else 1, 1, 1, cols.size(0))
        if self.slopes is not None:
            bias = -self.slopes.to(x.device)[:, None, None] * (cache.index - cols).abs()  # (nh, 1, S)
            mask = bias.masked_fill(~mask, float("-inf")).to(compute_dtype(x.device.type, x.dtype))
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, False, cache, layer)
        return self.ln_f(x)


# ----------------------------------------------------------------------------------
# the models

class Model(nn.Module):
    """What every architecture shares: initialization, the output head and loss, parameter
    and FLOP counts, and the optimizer."""

    label_smoothing = 0.0  # of the training loss only; set by set_training_options

    def set_training_options(self, grad_checkpoint=False, label_smoothing=0.0):
        """How training computes, not what the model is (neither is in model_args): grad_checkpoint
        recomputes each block's activations in the backward pass instead of keeping them (the memory
        of one block's, not n_layer's, for a second forward pass); label_smoothing gives that share
        of each target's probability to the whole vocabulary, in training only, so eval losses and
        bits per byte stay the model's own."""
        stacks = [m for m in self.modules() if isinstance(m, Stack)]
        if label_smoothing and self.config.head == "adaptive":
            raise ValueError("label_smoothing is not available with head='adaptive' (its loss takes no smoothing)")
        if grad_checkpoint and not stacks:
            raise ValueError(f"grad_checkpoint recomputes transformer blocks; arch={self.config.arch!r} has none")
        for stack in stacks:
            stack.grad_checkpoint = grad_checkpoint
        self.label_smoothing = label_smoothing

    def init_weights(self):
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down so the residual stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.c_proj")):  # (mlp.c_proj: MoE's stacked experts)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        if self.config.pos == "sinusoidal":  # tokens as loud as the fixed positions (with the sqrt(d) above);
            nn.init.normal_(self.embed.wte.weight, mean=0.0, std=self.config.n_embd ** -0.5)  # at 0.02 they drown

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def make_head(self, wte):
        if self.config.n_classes:  # beside the language-model head, which a classifier leaves unused
            self.classifier = nn.Linear(self.config.n_embd, self.config.n_classes)
        if self.config.head == "adaptive":  # frequent tokens and one row per cluster, then a smaller head each
            self.lm_head = nn.AdaptiveLogSoftmaxWithLoss(self.config.n_embd, self.config.vocab_size,
                                                         self.config.cutoffs(), div_value=4.0)
            return
        self.lm_head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False)
        if self.config.tie_embeddings:
            wte.weight = self.lm_head.weight

    def logits(self, x):
        """Hidden states (..., C) -> logits (..., vocab). The adaptive head gives log-probabilities,
        which are logits too: softmax, temperature, top-k and argmax treat them alike."""
        if self.config.head == "adaptive":
            with torch.autocast(x.device.type, enabled=False):  # torch's adaptive head mixes dtypes under autocast
                return self.lm_head.log_prob(x.reshape(-1, x.size(-1)).float()).view(*x.shape[:-1], -1)
        return self.lm_head(x)

    def head(self, x, targets, every_position=False):
        """Final hidden states (B, T, C) -> logits, and the mean loss if targets are given
        (targets of -1 do not count). Without targets a causal model needs only the last
        position's logits; every_position (the encoder) asks for all of them. The adaptive head
        in training gives the loss alone: it skips the clusters a batch's targets are not in."""
        if targets is None:
            return self.logits(x if every_position else x[:, -1:]), None
        if self.config.head == "adaptive" and self.training:
            counted = targets.reshape(-1) != -1
            with torch.autocast(x.device.type, enabled=False):
                loss = self.lm_head(x.reshape(-1, x.size(-1))[counted].float(), targets.reshape(-1)[counted]).loss
            return None, self.with_balance_loss(loss)
        logits = self.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                               label_smoothing=self.label_smoothing if self.training else 0.0)
        return logits, self.with_balance_loss(loss)

    def classify(self, idx, keep, targets=None):
        """Documents idx (B, T), padded on the right, keep (B, T) True at their tokens -> class logits
        (B, n_classes), and the mean loss if targets (B,) are given. The head reads config.pool of
        the final states; a causal model's states never see the padding after them, and a
        bidirectional one's attention is masked off it."""
        if self.config.arch == "lstm":
            x = self.hidden(idx)
        elif self.config.arch == "encdec":
            x = self.encode(idx, keep)
        else:
            pos = positions(0, idx.size(1), self.config.block_size, device=idx.device)
            x = self.body(self.embed(idx, pos), pos, keep=None if self.causal else keep)  # (B, T, C)
        if self.config.pool == "first":
            pooled = x[:, 0]
        elif self.config.pool == "last":
            pooled = x[torch.arange(x.size(0), device=x.device), keep.sum(1) - 1]
        else:
            pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        logits = self.classifier(pooled)  # (B, n_classes)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing if self.training else 0.0)
        return logits, self.with_balance_loss(loss)

    def with_balance_loss(self, loss):
        if self.config.n_expert and self.training:  # eval losses stay comparable with dense models
            loss = loss + self.config.balance_weight * self.balance_loss()
        return loss

    def balance_loss(self):
        """The experts' load-balancing loss of the last forward, averaged over the MoE layers."""
        losses = [m.balance_loss for m in self.modules() if isinstance(m, MoE)]
        return sum(losses) / len(losses)

    def wpe_of(self):
        """The learned position embedding, or None."""
        return getattr(getattr(self, "embed", None), "wpe", None)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe_of() is not None:
            n -= self.wpe_of().weight.numel()
        return n

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, kind="adamw", momentum=0.95):
        """kind (OPTIMIZERS) with weight decay on matrices (linear layers, embeddings) only: AdamW; SGD
        with Nesterov momentum; Lion (betas are its beta1, beta2); or Muon for the hidden matrices
        (hidden_matrices(), those that train) and AdamW for the rest, stepped as one (Optimizers)."""
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer={kind!r} is not one of {', '.join(OPTIMIZERS)}")
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        hidden = [(p, blocks) for p, blocks in self.hidden_matrices() if p.requires_grad] if kind == "muon" else []
        muon = {id(p) for p, _ in hidden}
        matrix = {id(p) for name, p in named if p.dim() >= 2 and not name.endswith("bias")}  # (MoE's biases are 2-D)
        groups = [{"params": [p for p in params if id(p) in matrix and id(p) not in muon],
                   "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) not in matrix], "weight_decay": 0.0}]
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=True)
        if kind == "lion":
            return Lion(groups, lr=learning_rate, betas=betas)
        # one fused kernel for the whole update on CUDA and CPU; multi-tensor (foreach) elsewhere
        fused = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)
        if not hidden:  # (with LoRA every hidden matrix is frozen: AdamW trains the adapters)
            return adamw
        # one group per way of cutting a matrix into blocks (q/k/v, gate/up, an LSTM's gates, whole)
        cuts = {}
        for p, blocks in hidden:
            cuts.setdefault(tuple(blocks), []).append(p)
        matrices = Muon([{"params": ps, "blocks": list(blocks)} for blocks, ps in cuts.items()], lr=learning_rate,
                        weight_decay=weight_decay, momentum=momentum)
        return Optimizers(matrices, adamw)

    def hidden_matrices(self):
        """[(parameter, its row blocks [(start, end), ...])] for Muon: the weight matrices inside the
        network (every Linear's, the LSTM's, the MoE experts' stacks), not the embeddings and not the
        output heads (nor the embedding tied to one; a classifier's head is one too). A fused matrix
        is cut into the linear maps it holds, each orthogonalized as a matrix of its own: attention's
        q, k, v rows, swiglu's gate and up, an LSTM layer's four gates (input, forget, cell, output)."""
        head = list(self.lm_head.modules()) + [getattr(self, "classifier", None)]  # (an adaptive head: several)
        found = []
        for name, module, parent in linear_layers(self):
            if not any(module is h for h in head):
                blocks = sorted(_row_blocks(name, module, parent).values())
                found.append((module.weight, blocks or [(0, module.out_features)]))
        for m in self.modules():
            if isinstance(m, nn.LSTM):
                gates = [(g * m.hidden_size, (g + 1) * m.hidden_size) for g in range(4)]
                found += [(p, gates) for name, p in m.named_parameters() if name.startswith("weight_")]
            if isinstance(m, MoE):  # (E, rows, cols): each expert's matrix on its own
                half = m.c_fc.size(1) // 2
                found.append((m.c_fc, [(0, half), (half, 2 * half)] if m.gated else [(0, m.c_fc.size(1))]))
                found.append((m.c_proj, [(0, m.c_proj.size(1))]))
        return found

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight a token passes through (forward + backward;
        of an MoE layer only its top-k experts), plus attention's scores and mixing."""
        c = self.config
        n = self.num_params()
        head = getattr(self.lm_head, "weight", None)  # (an adaptive head has several matrices, none tied)
        for m in self.modules():  # lookups, not matmuls: every embedding but the one the head multiplies by
            if isinstance(m, nn.Embedding) and m.weight is not head and m is not self.wpe_of():
                n -= m.weight.numel()
        for m in self.modules():
            if isinstance(m, MoE):
                experts = [p for name, p in m.named_parameters() if name.startswith("c_")]
                n -= (1 - c.expert_top_k / c.n_expert) * sum(p.numel() for p in experts)
        stacks = {"lstm": 0, "encdec": 3}.get(c.arch, 1)  # encdec: encoder, decoder, cross-attention
        return 6 * n + stacks * 12 * c.n_layer * c.n_embd * c.block_size

    def cache_dtype(self, device_type):
        """The cache holds keys/values in the dtype attention computes in, so no step re-casts it."""
        return compute_dtype(device_type, next(self.parameters()).dtype)  # (an int8 head's .weight is computed)


class GPT(Model):
    """The decoder: embedding -> blocks -> head. arch="conditional" and arch="encoder" are this
    class too, since they differ only in the control label the embedding adds (conditional)
    and in what attention may see (the future, for the encoder)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.causal = config.arch != "encoder"
        self.embed = Embedding(config)
        self.body = Stack(config, causal=self.causal)
        self.make_head(self.embed.wte)
        self.init_weights()

    def forward(self, idx, targets=None, cache=None, labels=None, pad=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean loss if targets are given.
        labels (conditional): the control label of each row (B,) or position (B, T).
        pad (B,): rows of different lengths, each after this many padding tokens on its left."""
        if self.config.arch == "conditional" and labels is None:
            raise ValueError("arch='conditional' needs the control labels of its input")
        return self.head(self.hidden(idx, cache, labels, pad), targets, every_position=not self.causal)

    def hidden(self, idx, cache=None, labels=None, pad=None):
        """idx (B, T) -> final hidden states (B, T, C)."""
        start = cache.pos if cache is not None else 0
        if cache is not None and start == 0:
            cache.pad = pad  # the first pass sets the rows' padding for the whole generation
        pad = cache.pad if cache is not None else pad
        pos = positions(start, idx.size(1), self.config.block_size, pad, idx.device)
        x = self.embed(idx, pos, labels)  # (B, T, C)
        keep = None if pad is None else torch.arange(start + idx.size(1), device=idx.device) >= pad[:, None]
        return self.body(x, pos, start, cache, keep)

    def next_logits(self, idx, cache, use_cache, labels=None, pad=None, step=None, slide=0):
        """The logits after idx (B, vocab); labels (conditional): one per row (B,); pad (B,): each
        row's padding on the left. step: decode_step, compiled, for the steps that read one token
        into the cache (the prompt is read by forward()).

        Within block_size the cache holds the whole context. Past it, each row's window slides
        `slide` tokens at a time (window_length()): the window is read again once per slide, and
        the tokens up to the next slide are read into the cache, so a token sees from
        block_size - slide + 1 to block_size tokens before it. slide=1 is the exact sliding
        window (every token sees block_size tokens, and the window is read again for every
        token); 0 = half of block_size. Without the cache the same windows are read whole, so
        the output is the same token for token; and a row's window depends on its own length
        only, so a row in a batch gets what it gets alone."""
        block = self.config.block_size
        slide = min(block, slide or max(1, block // 2))
        lengths = [idx.size(1)] * idx.size(0) if pad is None else [idx.size(1) - p for p in pad.tolist()]
        windows = [window_length(n, block, slide) for n in lengths]
        width = max(windows)
        window = idx[:, -width:]
        if pad is not None:  # each row's own window; what lies before it in this one is padding now
            pad = torch.tensor([width - w for w in windows], device=idx.device)
        moved = any(n > block and (n - block - 1) % slide == 0 for n in lengths)  # a row's window slid now
        if not use_cache:
            logits, _ = self(window, labels=labels, pad=pad)
        elif cache is None or moved or cache.pos + 1 > block:
            cache = KVCache(self.config, idx.size(0), idx.device, self.cache_dtype(idx.device.type))
            logits, _ = self(window, cache=cache, labels=labels, pad=pad)
        elif step is not None:
            if cache.index is None:
                cache.index = torch.zeros(1, dtype=torch.long, device=idx.device)
            cache.index.fill_(cache.pos)  # in place: the step's inputs keep their addresses (CUDA graphs)
            token = idx[:, -1:].clone(memory_format=torch.contiguous_format)  # the same strides every step
            logits = step(token, cache, labels)
            cache.pos += 1
        else:
            logits, _ = self(idx[:, -1:], cache=cache, labels=labels)
        return logits[:, -1], cache

    def decode_step(self, idx, cache, labels=None):
        """The logits (B, 1, vocab) after one new token per row, idx (B, 1), read into the cache at
        column cache.index, with fixed shapes (Stack.step): what torch.compile compiles once
        for generation (engine.Engine(compile=True)). next_logits moves cache.pos."""
        pos = cache.index if cache.pad is None else (cache.index - cache.pad).clamp(min=0)[:, None]
        x = self.embed(idx, pos, labels)
        return self.logits(self.body.step(x, pos, cache))


# ----------------------------------------------------------------------------------
# Linear attention (attention="linear"): the same projections as Attention, but
# softmax(q k^T) v becomes phi(q) (phi(k)^T v) / phi(q) sum(phi(k)) with phi = elu + 1,
# so its cost grows linearly with the length. Causality comes from running sums, which
# are also what it caches instead of keys and values.

def linear_attention(q, k, v, causal, keep=None, state=None, chunk=64):
    """q, k, v: (B, nh, T, hs). Bidirectional: one (hs, hs) summary of all keys and values.
    Causal: the same summary as a running sum, computed chunk by chunk so memory stays
    O(T): inside a chunk of 64 a masked quadratic product, between chunks the carried sums.
    keep (B, T): real keys. state: (kv (B, nh, hs, hs), z (B, nh, hs)) of the tokens before
    these, or None. Sums are kept in fp32: they add up thousands of terms. Returns (y, new state).
    """
    dtype = v.dtype
    with torch.autocast(v.device.type, enabled=False):  # else autocast runs the products below in bf16/fp16
        return linear_attention_fp32(q.float(), k.float(), v.float(), causal, keep, state, chunk, dtype)


def linear_attention_fp32(q, k, v, causal, keep, state, chunk, dtype):
    """linear_attention's work, in fp32 with autocast off; the output cast to dtype."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    if keep is not None:  # padding contributes nothing (filled, not multiplied: it may hold NaN)
        k = k.masked_fill(~keep[:, None, :, None], 0.0)
        v = v.masked_fill(~keep[:, None, :, None], 0.0)
    B, nh, T, hs = q.shape
    if state is None:
        state = (q.new_zeros(B, nh, hs, hs), q.new_zeros(B, nh, hs))
    kv, z = state
    if not causal:
        kv, z = kv + k.transpose(-2, -1) @ v, z + k.sum(dim=2)
        y = (q @ kv) / (q @ z[..., None])
        return y.to(dtype), (kv, z)
    within = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    ys = []
    for s in range(0, T, chunk):
        qc, kc, vc = q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk]  # (B, nh, c, hs)
        n = qc.size(2)
        scores = (qc @ kc.transpose(-2, -1)).masked_fill(~within[:n, :n], 0.0)  # (B, nh, c, c)
        numerator = qc @ kv + scores @ vc
        denominator = qc @ z[..., None] + scores.sum(dim=-1, keepdim=True)
        ys.append(numerator / denominator)
        kv, z = kv + kc.transpose(-2, -1) @ vc, z + kc.sum(dim=2)
    return torch.cat(ys, dim=2).to(dtype), (kv, z)


class LinearAttention(Attention):
    """Attention's weights and projections, mixed by linear_attention. Causal or not is the
    module's own; mask is the padding of this pass's keys (B, T), True = real."""

    def __init__(self, config, causal):
        super().__init__(config)
        self.causal = causal

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None, layer=0):
        q, k, v = self.project(x, rope)
        k, v = repeat_kv(k, self.n_head), repeat_kv(v, self.n_head)
        y, sums = linear_attention(q, k, v, self.causal, mask, cache.sums[layer] if cache is not None else None)
        if cache is not None:
            cache.sums[layer] = sums
        return dropout(self.c_proj(merge_heads(y)), self.dropout, self.training)


# ----------------------------------------------------------------------------------
# Mixture of experts (n_expert > 0): in every block's MLP's place, n_expert MLPs and a
# router that sends each token to its top-k of them (Switch Transformer / GShard).

class MoE(nn.Module):
    """A token's output is its top-k experts' outputs mixed by the router's probabilities
    (renormalized over the k). In training an expert takes at most `capacity` tokens of the
    batch, the earliest first: the others skip it (the residual carries them), which bounds
    the work of an unbalanced router. In eval every token gets its experts (the capacity is
    every token), so an output never depends on the rest of the batch. The balancing loss
    (Switch's: n_expert * sum over experts of the share of tokens sent to it times its mean
    probability; 1 when perfectly even) is left in self.balance_loss.

    Dispatch has static shapes (GShard's): each token is copied into its experts' buffers of
    `capacity` rows, all experts run as one batched matmul per layer of their MLP, and the
    outputs are gathered back. No shape depends on the router's choices, so torch.compile
    keeps one graph and no step waits for the host to count tokens per expert. The experts'
    weights are stacked: c_fc (E, hidden, C), c_proj (E, C, hidden), the MLP's math.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k, self.capacity_factor = config.expert_top_k, config.expert_capacity
        self.gated = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        E, C, hidden = config.n_expert, config.n_embd, mlp_hidden_size(config)
        self.router = nn.Linear(C, E, bias=False)
        self.c_fc = nn.Parameter(torch.randn(E, hidden * (2 if self.gated else 1), C) * 0.02)
        self.c_proj = nn.Parameter(torch.randn(E, C, hidden) * 0.02)
        self.c_fc_bias = nn.Parameter(torch.zeros(E, hidden * (2 if self.gated else 1))) if config.bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(E, C)) if config.bias else None
        self.dropout = config.dropout
        self.balance_loss = torch.zeros(())
        self.register_load_state_dict_pre_hook(stack_expert_weights)

    def experts(self, h):
        """Every expert's MLP on its own buffer: h (E, capacity, C) -> (E, capacity, C)."""
        h = torch.bmm(h, self.c_fc.transpose(1, 2))
        if self.c_fc_bias is not None:
            h = h + self.c_fc_bias[:, None, :].to(h.dtype)
        h = torch.bmm(mlp_activation(h, self.gated, self.approximate), self.c_proj.transpose(1, 2))
        if self.c_proj_bias is not None:
            h = h + self.c_proj_bias[:, None, :].to(h.dtype)
        return dropout(h, self.dropout, self.training)

    def forward(self, x):
        B, T, C = x.size()
        flat = x.reshape(B * T, C)
        N, E, k = flat.size(0), self.c_fc.size(0), self.top_k
        probs = self.router(flat).float().softmax(dim=-1)       # (N, E)
        weights, chosen = probs.topk(k, dim=-1)                 # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        sent = F.one_hot(chosen, E).sum(dim=1)                  # (N, E): 1 where a token goes to an expert
        self.balance_loss = E * (sent.float().mean(dim=0) / k * probs.mean(dim=0)).sum()
        capacity = math.ceil(self.capacity_factor * N * k / E) if self.training else N
        # each (token, choice)'s row in its expert's buffer: the tokens before it sent there, in order
        place = (sent.cumsum(dim=0) - 1).gather(1, chosen)     # (N, k)
        kept = place < capacity
        dump = E * capacity  # one row past the buffers, where the tokens over capacity go and are dropped
        row = torch.where(kept, chosen * capacity + place, dump).flatten()  # (N*k,)
        buffers = flat.new_zeros(dump + 1, C).index_add(0, row, flat.repeat_interleave(k, dim=0))
        out = self.experts(buffers[:dump].view(E, capacity, C)).reshape(dump, C)
        out = torch.cat((out, out.new_zeros(1, C)))[row].view(N, k, C)  # the dump row reads zeros
        return (out * weights[..., None]).sum(dim=1).to(x.dtype).view(B, T, C)


def stack_expert_weights(module, state, prefix, *args):
    """Checkpoints from before the experts were stacked hold one MLP per expert
    (experts.E.c_fc.weight, ...): stack them into MoE's tensors as they are loaded."""
    for name in ("c_fc", "c_proj"):
        for kind, suffix in (("weight", ""), ("bias", "_bias")):
            old = [f"{prefix}experts.{e}.{name}.{kind}" for e in range(module.c_fc.size(0))]
            if all(key in state for key in old):
                state[prefix + name + suffix] = torch.stack([state.pop(key) for key in old])


# ----------------------------------------------------------------------------------
# The encoder-decoder (arch="encdec", T5-style): a bidirectional Stack reads the source,
# a causal Stack writes the target, and each decoder block also attends to the encoder's
# output through CrossAttention. One embedding (and vocabulary) for both sides.

class CrossAttention(Attention):
    """The decoder's queries over the encoder's output (memory); always softmax. Its one
    matrix holds the q rows, applied to x, and the k, v rows, applied to the memory; the
    memory's keys/values are computed once per generation and kept in the cache."""

    def forward(self, x, memory, mask=None, cache=None, layer=0):
        """x (B, T, C), memory (B, S, C), mask (B, 1, 1, S): the memory's real tokens."""
        C = x.size(-1)
        w_q, w_kv = self.c_attn.weight.split([C, 2 * self.kv_size])
        b_q, b_kv = self.c_attn.bias.split([C, 2 * self.kv_size]) if self.c_attn.bias is not None else (None, None)
        q = split_heads(F.linear(x, w_q, b_q), self.head_size)  # (B, nh, T, hs)
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]
        else:  # (B, nkv, S, hs) each
            k, v = split_heads(F.linear(memory, w_kv, b_kv), self.head_size).split(self.n_kv_head, dim=1)
            if cache is not None:
                cache.cross[layer] = (k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return dropout(self.c_proj(merge_heads(y)), self.dropout, self.training)


class EncoderDecoder(Model):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.encoder = Stack(config, causal=False)
        self.decoder = Stack(config, causal=True, cross=True)
        self.make_head(self.embed.wte)
        self.init_weights()

    def encode(self, src, src_mask=None):
        """src (B, S) -> (B, S, C); src_mask (B, S) marks real tokens (False = padding)."""
        pos = positions(0, src.size(1), self.config.block_size, device=src.device)
        return self.encoder(self.embed(src, pos), pos, keep=src_mask)

    def forward(self, src, idx, targets=None, cache=None, src_mask=None):
        """src (B, S) and the decoder's input idx (B, T) -> logits (B, T, vocab), and the loss."""
        start = cache.pos if cache is not None else 0
        if cache is not None and cache.memory is not None:
            memory = cache.memory
        else:
            memory = self.encode(src, src_mask)
            if cache is not None:
                cache.memory = memory
        pos = positions(start, idx.size(1), self.config.block_size, device=idx.device)
        x = self.decoder(self.embed(idx, pos), pos, start, cache, memory=memory, memory_keep=src_mask)
        return self.head(x, targets)

    def hidden(self, idx):
        return self.encode(idx)  # a document's representation is what the encoder makes of it

    def next_logits(self, idx, cache, use_cache, src, src_mask=None):
        """The decoder's next logits (B, vocab) after idx, for the source src. The decoder's
        context is block_size: a longer target is refused rather than windowed, since its
        start (bos) is what the decoder was trained to begin from."""
        if not use_cache:
            logits, _ = self(src, idx, src_mask=src_mask)
        elif cache is None:
            cache = KVCache(self.config, idx.size(0), idx.device, self.cache_dtype(idx.device.type))
            logits, _ = self(src, idx, cache=cache, src_mask=src_mask)
        else:
            logits, _ = self(src, idx[:, -1:], cache=cache, src_mask=src_mask)
        return logits[:, -1], cache


# ----------------------------------------------------------------------------------
# The LSTM (arch="lstm"): no blocks and no positions. Order is in the recurrence, so there
# is no context limit either (block_size is only the training length); its generation
# state is (h, c), not keys and values.

class LSTMCache:
    """An LSTM's generation state: (h, c) of every layer after the tokens read so far."""

    def __init__(self):
        self.hc, self.pos = None, 0

    def keep_rows(self, rows):
        """Only these rows from now on: the others have finished."""
        self.hc = tuple(state[:, rows] for state in self.hc)  # (layers, B, C) each


class LSTM(Model):
    """embedding -> n_layer LSTM layers of n_embd units -> projection to the vocabulary
    (the embedding's own matrix when tied)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = config.dropout  # on the embeddings and the top layer's outputs (nn.LSTM's own between layers)
        self.lstm = nn.LSTM(config.n_embd, config.n_embd, config.n_layer, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.make_head(self.wte)
        self.apply(self._init_weights)  # embedding and head; the LSTM keeps PyTorch's uniform init
        if not config.tie_embeddings:  # PyTorch's N(0, 1): at 0.02 the inputs barely move the gates
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)  # and the LSTM stays at unigram loss

    def hidden(self, idx, cache=None):
        """idx (B, T) -> the top layer's outputs (B, T, C), carrying (h, c) in the cache."""
        y, hc = self.lstm(dropout(self.wte(idx), self.dropout, self.training), cache.hc if cache is not None else None)
        if cache is not None:
            cache.hc, cache.pos = hc, cache.pos + idx.size(1)
        return dropout(y, self.dropout, self.training)

    def forward(self, idx, targets=None, cache=None):
        return self.head(self.hidden(idx, cache), targets)

    def next_logits(self, idx, cache, use_cache):
        """Stateful: after the prompt, each step reads only the new token and the carried
        (h, c). Without the cache, the whole sequence is read again from the start."""
        if not use_cache:
            logits, _ = self(idx)
        elif cache is None:
            cache = LSTMCache()
            logits, _ = self(idx, cache=cache)
        else:
            logits, _ = self(idx[:, -1:], cache=cache)
        return logits[:, -1], cache


# ----------------------------------------------------------------------------------
# Optimizers that torch does not have, and several stepped as one

class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): each weight moves by
    exactly lr times the sign of an interpolation of momentum and gradient (beta1), plus decoupled
    weight decay; the momentum then follows the gradient with beta2. One state tensor per weight
    (AdamW: two). It wants a learning rate 3-10x below AdamW's and a weight decay as much above."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = momentum.lerp(p.grad, 1 - beta1).sign_()  # sign(beta1 m + (1 - beta1) g)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)  # m = beta2 m + (1 - beta2) g


def orthogonalized(update, steps=5, eps=1e-7):
    """update (rows, cols) made roughly semi-orthogonal, U S' V^T where update = U S V^T: Newton-Schulz's
    quintic iteration with Keller Jordan's coefficients, in bf16, as torch's Muon does it (the
    coefficients trade exactness for speed: most of S' lands between 0.6 and 1.2, none above ~1.2,
    and the smallest directions of a square update may stay lower)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.bfloat16()
    tall = x.size(0) > x.size(1)  # iterate on the wide side: the Gram matrix is the small one
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): Nesterov momentum, then each matrix's update orthogonalized, with
    decoupled weight decay; Moonshot's scaling of the step (0.2 sqrt(max(rows, cols)), "Muon is
    Scalable for LLM Training") gives it AdamW's RMS, so one learning rate and weight decay serve
    both. torch.optim.Muon's update, except that a group's "blocks" [(start, end), ...] cut each
    matrix's rows into the linear maps a fused matrix holds (q, k, v), each orthogonalized and
    scaled as a matrix of its own; and a 3-D parameter is a stack of matrices (MoE's experts)."""

    def __init__(self, params, lr=2e-2, weight_decay=0.0, momentum=0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "blocks": None})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                momentum = self.state[p]["momentum_buffer"]
                momentum.lerp_(p.grad, 1 - mu)  # m = mu m + (1 - mu) g
                update = p.grad.lerp(momentum, mu)  # Nesterov: (1 - mu) g + mu m
                p.mul_(1 - lr * group["weight_decay"])
                rows, cols = p.shape[-2:]
                for weight, change in zip(p.view(-1, rows, cols), update.view(-1, rows, cols)):
                    for start, end in group["blocks"] or [(0, rows)]:
                        scale = 0.2 * math.sqrt(max(end - start, cols))
                        weight[start:end].add_(orthogonalized(change[start:end]), alpha=-lr * scale)


class Optimizers:
    """Several optimizers over disjoint parameters, used as one (Muon's matrices, AdamW's rest):
    the param_groups of all (a schedule sets each group's lr), step, zero_grad, and one state_dict."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces an optimizer's groups
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        for optimizer, its_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(its_state)


class Classify(nn.Module):
    """model.classify() as a module's forward(), for train.py to compile and wrap in DDP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, keep, targets=None):
        return self.model.classify(idx, keep, targets)


@contextmanager
def no_init():
    """torch.nn.init's functions do nothing inside: on the meta device they would draw nothing
    anyway, but the first one called imports torch._dynamo (2.5 s of a sample.py start-up)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(config, state=None):
    """The architecture config.arch names, freshly initialized; or, given state (a state_dict),
    with its weights. Then it is built on the meta device, which allocates nothing and skips the
    random init the weights would replace (a start-up cost that grows with the model); the
    tables of positions, which are not in state, are made on the CPU even so."""
    kind = LSTM if config.arch == "lstm" else EncoderDecoder if config.arch == "encdec" else GPT
    if state is None:
        return kind(config)
    with torch.device("meta"), no_init():
        model = kind(config)
    model.load_state_dict(state, assign=True)  # the parameters become state's tensors
    if config.tie_embeddings:  # and the head and the embedding got one each: one matrix again
        (model.wte if config.arch == "lstm" else model.embed.wte).weight = model.lm_head.weight
    return model.float()  # as a model built on the CPU, whatever dtype state was saved in


# ----------------------------------------------------------------------------------
# Fine-tuning a trained model cheaply: low-rank adapters (LoRA), folding them back into the
# weights, a fingerprint that ties an adapter to its base, and the distillation loss.
#
# LoRA (Hu et al. 2021): a frozen Linear W (out, in) gets a trainable low-rank update,
# y = W x + (alpha / r) * B (A x), with A (r, in) random and B (out, r) zero, so training
# starts from exactly the base model. Here an adapter may cover a block of a Linear's rows:
# q, k and v share one fused matrix (Attention.c_attn) and the gated MLP's gate and up share
# c_fc, yet each can be adapted on its own. Names a target may be:
#
# - q, k, v       the query / key / value rows of every attention's c_attn (self- and cross-)
# - gate, up      the gated MLP's halves of c_fc (mlp="swiglu"); for mlp="gelu", up is all of c_fc
# - any Linear    by its name or the end of it (c_proj, mlp.c_proj, attn.c_attn, lm_head, router),
#                 or a glob (*.c_proj)
#
# A head tied to the token embedding (tie_embeddings=True) is refused: its update would
# change the output matrix but not the input one, untying them behind the embedding's back.

ROW_BLOCKS = ("q", "k", "v", "gate", "up")


class LoRALinear(nn.Module):
    """A frozen Linear (`base`: a float Linear, or a quantized one from runtime.quantize) plus
    adapters, each on its own block of output rows [start, end)."""

    def __init__(self, base, blocks, rank, alpha, dropout):
        super().__init__()
        self.base = base
        self.blocks = blocks  # [(start, end), ...] of the output rows, one adapter each
        self.in_features, self.out_features = base.in_features, base.out_features  # (a quantized base has neither)
        self.scale = alpha / rank
        self.dropout = dropout  # on the adapters' input
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, base.in_features)) for _ in blocks)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(end - start, rank)) for start, end in blocks)
        for a in self.lora_A:  # nn.Linear's own init for A; B = 0, so the model starts as the base
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @property
    def bias(self):
        return self.base.bias

    def delta(self):
        """The adapters' whole update to the weight, (out, in): scale * B @ A in each block's rows."""
        rows = []
        for (start, end), a, b in zip(self.blocks, self.lora_A, self.lora_B):
            rows.append(F.pad(self.scale * (b @ a), (0, 0, start, self.out_features - end)))
        return sum(rows)

    @property
    def weight(self):
        """The effective weight, base + update, for code that reads .weight (CrossAttention splits it)."""
        return self.base.weight + self.delta()

    def forward(self, x):
        y = self.base(x)  # (..., out)
        h = dropout(x, self.dropout, self.training)
        for (start, end), a, b in zip(self.blocks, self.lora_A, self.lora_B):
            update = self.scale * F.linear(F.linear(h, a), b)  # (..., end - start)
            y = y + F.pad(update, (start, self.out_features - end)).to(y.dtype)
        return y


def _row_blocks(name, module, parent):
    """{q, k, v, gate, up: (start, end)} that this Linear holds, by what it is to its parent."""
    last = name.rsplit(".", 1)[-1]
    if last == "c_attn" and hasattr(parent, "kv_size"):  # Attention, LinearAttention, CrossAttention
        c, kv = parent.n_head * parent.head_size, parent.kv_size
        return {"q": (0, c), "k": (c, c + kv), "v": (c + kv, c + 2 * kv)}
    if last == "c_fc" and hasattr(parent, "gated"):  # MLP
        if parent.gated:
            half = module.out_features // 2
            return {"gate": (0, half), "up": (half, module.out_features)}
        return {"up": (0, module.out_features)}
    return {}


def _generic(name):
    """A layer name with its block numbers as *, as a user would name all of them at once."""
    return re.sub(r"\.\d+\.", ".*.", name)


def linear_layers(model):
    """[(name, module, parent)] of every Linear a LoRA target can name."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((f"{parent_name}.{child_name}" if parent_name else child_name, child, parent))
    return found


def layer_names(model):
    """The names a target can use, blocks numbered as *: 'body.blocks.*.attn.c_attn (q, k, v)', ..."""
    names = {}
    for name, module, parent in linear_layers(model):
        blocks = _row_blocks(name, module, parent)
        names.setdefault(_generic(name), f" ({', '.join(blocks)})" if blocks else "")
    return ", ".join(name + parts for name, parts in names.items())


def find_targets(model, targets):
    """{layer name: [(start, end), ...]} that the comma-separated targets name. ValueError for a
    target that names no layer (the message lists those there are) or for a tied head."""
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise ValueError("lora_targets is empty: name the layers to adapt, e.g. q,v")
    chosen, matched = {}, set()
    for name, module, parent in linear_layers(model):
        blocks = _row_blocks(name, module, parent)
        for target in wanted:
            if target in ROW_BLOCKS:
                hit = blocks.get(target)
            elif name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target):
                hit = (0, module.out_features)
            else:
                hit = None
            if hit is None:
                continue
            if name == "lm_head" and model.config.tie_embeddings:
                raise ValueError(f"lora_targets={targets!r} names lm_head, which is tied to the token embedding "
                                 "(tie_embeddings=True): an adapter would change one and not the other; leave it out")
            matched.add(target)
            if hit not in chosen.setdefault(name, []):
                chosen[name].append(hit)
    missing = [t for t in wanted if t not in matched]
    if missing:
        raise ValueError(f"lora_targets {', '.join(map(repr, missing))} match no layer of this model; its layers "
                         f"are: {layer_names(model)}")
    return chosen


def add_lora(model, targets, rank, alpha, dropout):
    """Freeze every weight of model and wrap the target Linears in LoRALinear, in place; returns
    the number of trainable (adapter) parameters. ValueError for targets that name no layer and for
    a rank larger than a block it adapts (A and B could not be of lower rank than W)."""
    chosen = find_targets(model, targets)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "classifier", None) is not None:  # a new head has nothing to adapt: it trains whole
        model.classifier.requires_grad_(True)
    for name, blocks in chosen.items():
        module = modules[name]
        smallest = min(min(end - start, module.in_features) for start, end in blocks)
        if rank > smallest:
            raise ValueError(f"lora_rank={rank} is larger than {name} (its smallest side is {smallest}): an "
                             f"adapter of rank {rank} would be no update of lower rank; use lora_rank <= {smallest}")
        parent_name, _, child = name.rpartition(".")
        lora = LoRALinear(module, blocks, rank, alpha, dropout).to(module.weight.device)
        setattr(modules[parent_name] if parent_name else model, child, lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model):
    """The adapters' weights alone (and a classification head's): what a LoRA run's checkpoint keeps as its "model"."""
    return {k: v for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k or k.startswith("classifier.")}


@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter into its layer, in place: each LoRALinear becomes a plain float Linear
    with weight W + scale * B @ A (a quantized base is dequantized first). Returns model."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LoRALinear):
                merged = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.lora_A[0].device)
                merged.weight.copy_(child.base.weight.float() + child.delta())
                if child.bias is not None:
                    merged.bias.copy_(child.bias)
                setattr(parent, name, merged)
    return model


def fingerprint(state):
    """SHA-256 of a state dict's names, shapes, dtypes and bytes, in name order: which base an adapter
    was trained on. The same weights give the same fingerprint wherever and however they were saved."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------
# distillation: a student learns the teacher's whole next-token distribution, not only the data's token

def distillation_kl(student_logits, teacher_logits, targets, vocab_size, temperature):
    """Mean over the counted positions (targets != -1) of KL(teacher || student), each side's
    softmax taken at temperature over the first vocab_size logits (the rows past the tokenizer's
    vocabulary are padding: they never hold a token, so neither side's are counted). Logits
    (B, T, V) or (N, V); targets (B, T) or (N,). fp32 throughout."""
    counted = targets.reshape(-1) != -1
    student = student_logits.reshape(-1, student_logits.size(-1))[counted, :vocab_size].float()
    teacher = teacher_logits.reshape(-1, teacher_logits.size(-1))[counted, :vocab_size].float()
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (N,)
    return kl.mean() if kl.numel() else student.sum() * 0.0
