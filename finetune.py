"""
Fine-tuning a trained model cheaply: low-rank adapters (LoRA), folding them back into the
weights, a fingerprint that ties an adapter to its base, and the distillation loss.

LoRA (Hu et al. 2021): a frozen Linear W (out, in) gets a trainable low-rank update,
y = W x + (alpha / r) * B (A x), with A (r, in) random and B (out, r) zero, so training
starts from exactly the base model. Here an adapter may cover a block of a Linear's rows:
q, k and v share one fused matrix (Attention.c_attn) and the gated MLP's gate and up share
c_fc, yet each can be adapted on its own. Names a target may be:

- q, k, v       the query / key / value rows of every attention's c_attn (self- and cross-)
- gate, up      the gated MLP's halves of c_fc (mlp="swiglu"); for mlp="gelu", up is all of c_fc
- any Linear    by its name or the end of it (c_proj, mlp.c_proj, attn.c_attn, lm_head, router),
                or a glob (*.c_proj)

A head tied to the token embedding (tie_embeddings=True) is refused: its update would
change the output matrix but not the input one, untying them behind the embedding's back.
"""

import fnmatch
import hashlib
import math
import re

import torch
import torch.nn as nn
from torch.nn import functional as F

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
        self.dropout = nn.Dropout(dropout)
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
        h = self.dropout(x)
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
    """The adapters' weights alone: what a LoRA run's checkpoint keeps as its "model"."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


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
