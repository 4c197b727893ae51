"""
nanolex models: every architecture in one file, built from one set of blocks.

The decoder (arch="gpt") is a GPT with a few switches, each read in exactly one place:
- positions:   pos="learned" (GPT-2 table) or "rope" (rotary, applied to q and k)
- norm:        norm="layernorm" or "rmsnorm", pre-norm residual blocks
- MLP:         mlp="gelu" (4x, GPT-2) or "swiglu" (gated, ~8/3 x so the size matches)
- attention:   n_kv_head < n_head shares keys/values between heads (GQA; 1 = MQA);
               computed by F.scaled_dot_product_attention (flash kernels where available)
- embeddings:  tie_embeddings shares the input table with the output head
- dropout, bias
Generation keeps its keys and values in a KVCache object passed in by the caller,
never in the layers, so a model is just weights and one forward().
"""

import math
import time
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class ModelConfig:
    arch: str = "gpt"
    vocab_size: int = 8192
    block_size: int = 1024     # longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0         # 0 = n_head (plain multi-head attention)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False         # bias in Linear and LayerNorm layers
    pos: str = "learned"       # learned | rope
    norm: str = "layernorm"    # layernorm | rmsnorm
    mlp: str = "gelu"          # gelu | swiglu
    tie_embeddings: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        choices = {"arch": ("gpt",), "pos": ("learned", "rope"),
                   "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_settings(cls, settings):
        """The model's fields picked out of a script's settings (or a checkpoint's model_args)."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


# ----------------------------------------------------------------------------------
# small functions

def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_size, length, theta):
    """cos and sin of each position times each rotation frequency: two (length, head_size/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2).float() / head_size)
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of each head's channels. x: (B, T, nh, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens generated so far.

    Lives outside the model: generate() makes one, forward() writes into it, and
    `pos` says how many positions are filled.
    """

    def __init__(self, config, batch_size, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        """Store this step's k, v (B, nkv, T, hs) and return all of them so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------
# blocks

class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        kv_size = self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_size, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.size()
        kv_size = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_size, kv_size], dim=2)
        q = q.view(B, T, self.n_head, self.head_size)
        k = k.view(B, T, self.n_kv_head, self.head_size)
        v = v.view(B, T, self.n_kv_head, self.head_size)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        mask, is_causal = None, T > 1
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs), S = tokens so far
            if T > 1 and cache.pos > 0:  # several new tokens after a filled cache: explicit mask
                S = k.size(2)
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
                is_causal = False
        if self.n_kv_head != self.n_head:  # each group of heads reads the same keys/values
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        # flash attention on GPU, fused memory-efficient kernels on CPU
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        # swiglu has three matrices instead of two: 8/3 x keeps the parameter count of 4x
        hidden = 4 * config.n_embd if not self.gated else 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if self.gated else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = make_norm(config), Attention(config)
        self.ln_2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------
# the decoder

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.wte.weight = self.lm_head.weight
        if config.pos == "rope":
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down so the residual stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean loss if targets are given.

        Without targets only the last position's logits are computed (all generation needs).
        Targets of -1 are ignored in the loss.
        """
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T]) if self.wpe is None else None
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (linear layers, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # one fused kernel for the whole update on CUDA and CPU; multi-tensor (foreach) elsewhere
        kind = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **kind)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores."""
        c = self.config
        attention = 12 * c.n_layer * c.n_embd * c.block_size
        return 6 * self.num_params() + attention

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                 use_cache=True, generator=None, vocab_limit=None):
        """Continue idx (B, T) by max_new_tokens. temperature 0 = greedy. Ids from vocab_limit
        up (the rows padding the vocabulary past the tokenizer's) are never picked.

        The cache holds the whole context; once the sequence outgrows block_size the
        window slides and the cache is rebuilt from the window, so the output is the same
        token for token as without a cache.
        """
        cache = None
        # the cache holds keys/values in the dtype attention computes in, so no step re-casts it
        device_type = idx.device.type
        cache_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                       else self.lm_head.weight.dtype)
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size:]
            if not use_cache:
                logits, _ = self(window)
            elif cache is None or cache.pos + 1 > self.config.block_size:
                cache = KVCache(self.config, idx.size(0), idx.device, cache_dtype)
                logits, _ = self(window, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            next_id = sample_next(logits[:, -1, :vocab_limit].float(), temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


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
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the first token always
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ----------------------------------------------------------------------------------
# speed accounting

PEAK_FLOPS = {  # dense bf16 tensor-core peaks, from the vendors' data sheets
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12,
    "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}
_measured_peaks = {}


def peak_flops(device_type, dtype):
    """Peak FLOP/s of the device for dtype, the denominator of MFU.

    A known GPU's data-sheet figure; elsewhere (CPU, MPS, unknown GPU) the rate of a
    large matrix product measured once on this machine, so MFU reads as 'share of
    what this machine's matmul can do'.
    """
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 15
    key = (device_type, dtype)
    if key not in _measured_peaks:
        n = 1024
        a = torch.randn(n, n, device=device_type, dtype=dtype)
        b = torch.randn(n, n, device=device_type, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - t0)
        _measured_peaks[key] = 2 * n ** 3 / best
    return _measured_peaks[key]
