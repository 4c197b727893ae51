"""
What train.py, sample.py and bench.py share to run a model: picking the device and
precision, writing and reading checkpoints and run directories, the device's peak
FLOP/s that MFU is measured against, int8 weights for decoding on a CPU, and the Hugging
Face layout both ways (export.py writes it; hf:DIR runs are read from it).
"""

import ctypes
import errno
import functools
import json
import os
import resource
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import CrossAttention, ModelConfig, build_model, compute_dtype
from tokenizer import GPT2_PATTERN, BPETokenizer, GPT2Tokenizer, UNK, load_tokenizer, tokenizer_fingerprint


# ----------------------------------------------------------------------------------
# device and precision

def pick_device(name):
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not here is a ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but this machine has no CUDA device (try --device=cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name} but MPS is not available here (try --device=cpu)")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return name


def cpu_has_bf16_units():
    """True on x86 CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(device, name):
    """'auto' -> bf16 on CUDA that has it, else fp16; bf16 on CPUs with bf16 units; else fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_has_bf16_units():
        return torch.bfloat16
    return torch.float32


def autocast(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def keep_freed_memory(threshold=2**30):
    """Ask glibc to keep freed memory (blocks under threshold bytes) for reuse instead of handing
    big blocks back to the OS. Returns glibc, or None where there is none.

    By default every block over a few MB (activations, gradients, logits) is unmapped
    when freed and page-faulted back in, zeroed, on the next step: at the legal_small
    shape on CPU that was ~1.1M page faults per 10 steps and 25-35% of the step time.
    Costs some resident memory (peak RSS +7% bf16, up to +60% fp32). No-op without glibc.
    A small threshold does the opposite: bench.py uses 64 KiB to make resident memory follow
    what is allocated.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, threshold)  # blocks under the threshold come from the heap...
    libc.mallopt(M_TRIM_THRESHOLD, threshold)  # ...and the heap keeps up to that much free
    return libc


# ----------------------------------------------------------------------------------
# checkpoints

def save_atomically(path, write):
    """Write a file atomically: write(f) into a temporary file, fsync, then rename over path.

    A crash at any moment leaves either the previous file or the new one, whole.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(path)


def _fsync_directory(path):
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make a rename durable
    finally:
        os.close(dir_fd)


def link_atomically(src, dst):
    """dst becomes another name for src's file: a hard link (no second copy on disk), or a copy
    where the filesystem has no hard links. Either way dst is whole or as it was before."""
    tmp = f"{dst}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as source:
            save_atomically(dst, lambda f: shutil.copyfileobj(source, f))
        return
    os.replace(tmp, dst)
    _fsync_directory(dst)


def probe_disk(path, nbytes):
    """Reserve nbytes at path, then delete it: a read-only or full disk fails here, with an OSError."""
    try:
        with open(path, "wb") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, max(nbytes, 1))
            elif shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        if os.path.exists(path):
            os.remove(path)


def save_checkpoint(obj, path):
    save_atomically(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint with weights_only=True: tensors and plain data, never arbitrary objects."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on unusual pickles: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ValueError(f"{path} is not a nanolex checkpoint (no model weights or model_args)")
    return ckpt


def check_vocab(model_vocab_size, tokenizer, where):
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{where}: the model has a vocabulary of {model_vocab_size} tokens but the "
                         f"tokenizer has {tokenizer.vocab_size}; they do not belong together")


def load_run(out_dir, device="cpu"):
    """A trained run from its directory alone: (model in eval mode, tokenizer, checkpoint dict).
    out_dir "hf:DIR": a Hugging Face GPT-2 or Llama folder instead (see from_hf)."""
    if str(out_dir).startswith("hf:"):
        ckpt, tokenizer = from_hf(str(out_dir)[3:])
        return build_model(ModelConfig(**ckpt["model_args"]), ckpt["model"]).to(device).eval(), tokenizer, ckpt
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
    tokenizer = load_tokenizer(out_dir)
    try:
        config = ModelConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{out_dir}/ckpt.pt has model_args this version cannot build: {e}")
    check_vocab(config.vocab_size, tokenizer, f"{out_dir}/ckpt.pt")
    if ckpt.get("tokenizer_fingerprint", tokenizer_fingerprint(out_dir)) != tokenizer_fingerprint(out_dir):
        raise ValueError(f"{out_dir}: the tokenizer files are not the ones ckpt.pt was trained with")
    try:
        model = build_model(config, ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{out_dir}/ckpt.pt weights do not fit its model_args: {str(e).splitlines()[0]}")
    return model.to(device).eval(), tokenizer, ckpt


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------
# device accounting

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


def peak_memory_mb(device):
    """Peak memory so far: on CUDA what torch allocated on the device, elsewhere the whole
    process's peak resident memory (RSS; Linux reports it in KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def machine(device):
    """The CPU's model name and core count (and the GPU's name on CUDA), in words."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        cpu = "unknown CPU"
    gpu = f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


# ----------------------------------------------------------------------------------
# int8 weights for decoding on a CPU

class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output row (symmetric: the row's largest
    magnitude becomes 127). Its product runs on PyTorch's int8 x int8 kernels of dynamic
    quantization (each input is quantized on the fly, per tensor), the fastest of its int8
    products on a CPU one token at a time, where int8_backend() found them working; otherwise
    it multiplies by the weight dequantized to float."""

    def __init__(self, linear, backend):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.packed = None
        if backend == "dynamic":
            with warnings.catch_warnings():  # PyTorch calls its quantized tensors deprecated:
                warnings.simplefilter("ignore")  # int8_backend() checks they still work
                qw = torch.quantize_per_channel(self.weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    @property
    def weight(self):
        """The float weight the int8 one stands for, for code that reads .weight (dequantized at each read)."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        dtype = compute_dtype(x.device.type, x.dtype)  # what a float Linear would return, under autocast too
        if self.packed is None:
            return F.linear(x.float(), self.weight, self.bias).to(dtype)
        # reduce_range: 7-bit inputs, so no int16 sum of two products saturates in the non-VNNI kernels
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, reduce_range=True).to(dtype)


@functools.cache
def int8_backend():
    """'dynamic' where PyTorch's int8 kernels (torch.ops.quantized) run on this CPU and agree with
    the dequantized product on a test input, else 'dequantize' (slower, but right everywhere)."""
    g = torch.Generator().manual_seed(0)  # not the global one: asking must not change anyone's samples
    linear = nn.utils.skip_init(nn.Linear, 64, 48)
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        linear.weight.copy_(torch.randn(48, 64, generator=g))
        linear.bias.copy_(torch.randn(48, generator=g))
        try:
            layer = Int8Linear(linear, "dynamic")
            got = layer(x)
        except Exception:  # no such op or no engine for it in this build: whatever the cause, the fallback is right
            return "dequantize"
        want = F.linear(x, layer.weight, layer.bias)
    # quantizing the input costs about 1% here; a kernel that computes something else is off by ~100%
    return "dynamic" if (got - want).norm() <= 0.05 * want.norm() else "dequantize"


def quantize(model, kind="int8"):
    """Give model's Linear layers int8 weights, in place, for decoding on the CPU; returns model.
    Inference only: the int8 layers have no gradients.

    Every architecture: a tied head gets its own int8 copy (the embedding keeps the float
    matrix). Left in float: the LSTM's recurrent layers (nn.LSTM is not a Linear) and
    cross-attention's c_attn, whose weight CrossAttention splits itself.
    """
    if kind != "int8":
        raise ValueError(f"quantize={kind!r} is not supported; the one kind is int8")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 weights run on the CPU only, and this model is on {device} (use --device=cpu)")
    backend = int8_backend()
    keep_float = {id(m.c_attn) for m in model.modules() if isinstance(m, CrossAttention)}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and id(child) not in keep_float:
                setattr(parent, name, Int8Linear(child, backend))
    return model


# ----------------------------------------------------------------------------------
# The Hugging Face layout, both ways: a nanolex GPT <-> a transformers GPT-2 or Llama folder.
#
#     folder = to_hf(model, tokenizer)          # {file name: bytes}: config.json, model.safetensors, tokenizer.json ...
#     ckpt, tokenizer = from_hf("path/to/dir")  # a checkpoint dict as train.py and runtime.load_run read them
#
# Which layout a run takes is decided by its switches (layout()): learned positions +
# layernorm + gelu is GPT-2 (GPT2LMHeadModel; its Conv1D layers hold the matrices
# transposed, and it always has biases: a run without them exports zeros); rope + rmsnorm +
# swiglu is Llama (LlamaForCausalLM, grouped-query attention included). Our one c_attn
# matrix is Llama's q_proj, k_proj and v_proj stacked, our c_fc its gate_proj and up_proj.
# Our rope rotates the two halves of each head, as Hugging Face's Llama does, so no rows are
# permuted. What the numbers depend on is written out in config.json: the norms' epsilon
# (PyTorch's RMSNorm uses the dtype's eps, 1.19e-7 in fp32, not Llama's usual 1e-6) and
# the GELU (exact erf: "gelu"; "gelu_new" is the tanh approximation).
#
# Tokenizers: bpe and gpt2 become a byte-level BPE tokenizer.json. tiktoken merges the
# adjacent pair whose concatenation has the lowest rank; Hugging Face's BPE merges the pair
# listed first. Listing every split of every token into two tokens, ordered by the rank of
# the whole, makes the two the same, and ignore_merges=True is tiktoken's whole-chunk
# lookup. sentencepiece and unigram go through their SentencePiece model: its pieces, ids and
# scores (BPE: merges listed the same way), byte fallback, spaces as "▁" (sentencepiece_json).
# Our own tokenizer files go along under nanolex_tokenizer.json (Hugging Face
# owns tokenizer.json there), so an import of an export gets back the very tokenizer.
#
# Needs safetensors; transformers itself is never imported (the tests use it to check).

OUR_TOKENIZER = "nanolex_tokenizer.json"  # our tokenizer.json, renamed in an exported folder


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError("the Hugging Face layout needs safetensors: pip install safetensors==0.8.0") from None
    return safetensors.torch


# ----------------------------------------------------------------------------------
# which layout, and the weights' names in it

def layout(config):
    """'gpt2' or 'llama': the Hugging Face architecture that computes what config does, or a
    ValueError naming the switch that neither can express."""
    refused = [(config.arch != "gpt", f"arch={config.arch}"),
               (config.n_expert > 0, f"n_expert={config.n_expert} (mixture of experts)"),
               (config.attention != "sdpa", f"attention={config.attention}"),
               (config.pos in ("alibi", "sinusoidal"), f"pos={config.pos}"),
               (not config.norm_first, "norm_first=False (post-norm)")]
    for refuse, switch in refused:
        if refuse:
            raise ValueError(f"a run with {switch} cannot be exported: neither GPT-2 nor Llama has it")
    shape = (config.pos, config.norm, config.mlp)
    if shape in (("learned", "layernorm", "gelu"), ("learned", "layernorm", "gelu_tanh")):
        if config.n_kv_head != config.n_head:
            raise ValueError(f"a run with n_kv_head={config.n_kv_head} (grouped-query attention) and learned "
                             "positions cannot be exported: GPT-2 has no grouped-query attention")
        return "gpt2"
    if shape == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    raise ValueError(f"a run with pos={config.pos}, norm={config.norm}, mlp={config.mlp} cannot be exported: GPT-2 "
                     "is learned, layernorm, gelu and Llama is rope, rmsnorm, swiglu")


def weight_names(config, kind):
    """[(our name, [its Hugging Face names], transposed)]: several names split our tensor along
    its first dimension into theirs (split_sizes says where); transposed: GPT-2's Conv1D."""
    names = []
    if kind == "gpt2":
        names.append(("embed.wte.weight", ["transformer.wte.weight"], False))
        names.append(("embed.wpe.weight", ["transformer.wpe.weight"], False))
        for i in range(config.n_layer):
            ours, theirs = f"body.blocks.{i}.", f"transformer.h.{i}."
            for a, b, t in [("ln_1", "ln_1", False), ("attn.c_attn", "attn.c_attn", True),
                            ("attn.c_proj", "attn.c_proj", True), ("ln_2", "ln_2", False),
                            ("mlp.c_fc", "mlp.c_fc", True), ("mlp.c_proj", "mlp.c_proj", True)]:
                names.append((ours + a + ".weight", [theirs + b + ".weight"], t))
                names.append((ours + a + ".bias", [theirs + b + ".bias"], False))
        names += [("body.ln_f.weight", ["transformer.ln_f.weight"], False),
                  ("body.ln_f.bias", ["transformer.ln_f.bias"], False)]
    else:
        names.append(("embed.wte.weight", ["model.embed_tokens.weight"], False))
        for i in range(config.n_layer):
            ours, theirs = f"body.blocks.{i}.", f"model.layers.{i}."
            names += [(ours + "ln_1.weight", [theirs + "input_layernorm.weight"], False),
                      (ours + "ln_2.weight", [theirs + "post_attention_layernorm.weight"], False)]
            for end in ("weight", "bias") if config.bias else ("weight",):
                names += [(ours + "attn.c_attn." + end, [theirs + f"self_attn.{p}_proj.{end}" for p in "qkv"], False),
                          (ours + "attn.c_proj." + end, [theirs + f"self_attn.o_proj.{end}"], False),
                          (ours + "mlp.c_fc." + end, [theirs + f"mlp.{p}_proj.{end}" for p in ("gate", "up")], False),
                          (ours + "mlp.c_proj." + end, [theirs + f"mlp.down_proj.{end}"], False)]
        names.append(("body.ln_f.weight", ["model.norm.weight"], False))
    if not config.tie_embeddings:
        names.append(("lm_head.weight", ["lm_head.weight"], False))
    return names


def split_sizes(config, name, total):
    """How our tensor `name` of first dimension total splits into its Hugging Face parts."""
    if ".attn.c_attn." in name:
        kv = config.n_kv_head * (config.n_embd // config.n_head)
        return [config.n_embd, kv, kv]
    return [total // 2, total // 2]  # swiglu's c_fc: gate, then up (MLP.forward's chunk order)


# ----------------------------------------------------------------------------------
# out: a run -> the files of a Hugging Face folder

def hf_config(model, kind, tok):
    config = model.config
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id}
    hidden = model.body.blocks[0].mlp.c_proj.in_features
    if kind == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": hidden,
                "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": config.norm_eps or 1e-5, "resid_pdrop": config.dropout,
                "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "scale_attn_weights": True,
                "tie_word_embeddings": config.tie_embeddings, "dtype": "float32", **ids}
    head_dim = config.n_embd // config.n_head
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "max_position_embeddings": config.block_size, "hidden_size": config.n_embd,
            "intermediate_size": hidden, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head, "head_dim": head_dim,
            "hidden_act": "silu", "rms_norm_eps": config.norm_eps or torch.finfo(torch.float32).eps,
            "rope_theta": config.rope_theta,  # transformers 4's key, and 5's:
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "attention_bias": config.bias, "mlp_bias": config.bias, "attention_dropout": config.dropout,
            "tie_word_embeddings": config.tie_embeddings, "dtype": "float32", **ids}


def build_model_meta(config):
    with torch.device("meta"):
        return build_model(config)


def to_hf_weights(state, config, kind):
    """Our state_dict -> {Hugging Face name: tensor}, each its own contiguous fp32 copy."""
    out = {}
    for ours, theirs, transposed in weight_names(config, kind):
        if ours not in state:  # GPT-2 has biases where our run has none: zeros compute the same
            out[theirs[0]] = torch.zeros(state[ours.replace(".bias", ".weight")].shape[:1])
            continue
        w = state[ours].detach().float().cpu()
        parts = w.split(split_sizes(config, ours, w.size(0))) if len(theirs) > 1 else [w]
        for name, part in zip(theirs, parts):
            out[name] = (part.t() if transposed else part).contiguous().clone()
    return out


def byte_chars():
    """GPT-2's printable stand-in character for each byte, as Hugging Face's ByteLevel writes tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def special_tokens_json(tok):
    """Our special tokens as tokenizer.json's added tokens (not <|unk|>: an id of the model's own vocabulary)."""
    return [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for s, i in sorted(tok.special.items(), key=lambda item: item[1]) if s != UNK]


def sentencepiece_json(tok):
    """tokenizer.json for a sentencepiece (BPE) or unigram tokenizer: the pieces of its SentencePiece
    model with their ids and scores, byte fallback, spaces as "▁" and no other normalizing (our
    models are trained with the identity rule and no dummy prefix)."""
    sp = tok.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if tok.kind == "unigram":
        model = {"type": "Unigram", "unk_id": sp.unk_id(), "byte_fallback": True,
                 "vocab": [[p, sp.get_score(i)] for i, p in enumerate(pieces)]}
    else:  # SentencePiece's BPE merges the pair whose whole has the best score, the lowest id: as with tiktoken
        ids = {p: i for i, p in enumerate(pieces) if not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i))}
        merges = sorted((i, j, p[:j], p[j:]) for p, i in ids.items() for j in range(1, len(p))
                        if p[:j] in ids and p[j:] in ids)
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [[a, b] for _, _, a, b in merges]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special_tokens_json(tok),
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": model}


def tokenizer_json(tok):
    """Hugging Face's tokenizer.json for a bpe, gpt2, sentencepiece or unigram tokenizer (see above)."""
    if tok.kind in ("sentencepiece", "unigram"):
        return sentencepiece_json(tok)
    if tok.kind not in ("bpe", "gpt2"):
        raise ValueError(f"the {tok.kind} tokenizer cannot be exported to Hugging Face's tokenizer.json "
                         "(bpe, gpt2, sentencepiece and unigram can): train the run on one of those to export it")
    chars = byte_chars()

    def text(token):
        return "".join(chars[b] for b in token)

    merges = sorted((rank, i, text(token[:i]), text(token[i:])) for token, rank in tok.ranks.items()
                    for i in range(1, len(token)) if token[:i] in tok.ranks and token[i:] in tok.ranks)
    if tok.pattern == GPT2_PATTERN:  # Hugging Face's own GPT-2 split, the same chunks
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special_tokens_json(tok),
            "normalizer": None,
            "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text(t): r for t, r in sorted(tok.ranks.items(), key=lambda item: item[1])},
                      "merges": [[a, b] for _, _, a, b in merges]}}


def to_hf(model, tok):
    """{file name: bytes} of the Hugging Face folder for model (a GPT whose switches fit GPT-2 or
    Llama) and its tokenizer, our tokenizer's own files included (see OUR_TOKENIZER)."""
    config = model.config
    kind = layout(config)
    hf_tok = tokenizer_json(tok)  # before the weights: a tokenizer that cannot go refuses the whole export
    weights = to_hf_weights(model.state_dict(), config, kind)
    files = {"config.json": hf_config(model, kind, tok),
             "generation_config.json": {"bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id,
                                        "pad_token_id": tok.pad_id},
             "tokenizer.json": hf_tok,
             "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                                       "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                                       "mask_token": "<|mask|>", "model_max_length": config.block_size,
                                       "clean_up_tokenization_spaces": False}}
    # tokenizer.json on one line: indenting GPT-2's (50,000 tokens, 100,000 merges) takes seconds
    files = {name: (json.dumps(value, indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)
                    + "\n").encode() for name, value in files.items()}
    files["model.safetensors"] = safetensors_torch().save(weights, metadata={"format": "pt"})
    with tempfile.TemporaryDirectory() as tmp:
        for name in tok.save(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                files[OUR_TOKENIZER if name == "tokenizer.json" else name] = f.read()
    return files


# ----------------------------------------------------------------------------------
# in: a Hugging Face folder -> a checkpoint and a tokenizer

def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def model_args_from(hf, path):
    """Our ModelConfig's fields from a GPT-2 or Llama config.json; anything that would compute
    something else is refused by name."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        mlp = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
        if mlp is None:
            raise ValueError(f"{path}: activation_function={act!r} cannot be imported (gelu, gelu_new can)")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(key):
                raise ValueError(f"{path}: {key}=true cannot be imported")
        if not hf.get("scale_attn_weights", True):
            raise ValueError(f"{path}: scale_attn_weights=false cannot be imported")
        n_embd = hf.get("n_embd", 768)
        return dict(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                    n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd, bias=True,
                    pos="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=mlp,
                    mlp_hidden=hf.get("n_inner") or 4 * n_embd, tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act={hf['hidden_act']!r} cannot be imported (silu can)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} cannot be imported "
                             "(plain rope can)")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ValueError(f"{path}: attention_bias and mlp_bias differ; nanolex has one bias switch for both")
        n_embd, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        if hf.get("head_dim", n_embd // n_head) * n_head != n_embd:
            raise ValueError(f"{path}: head_dim={hf['head_dim']} times {n_head} heads is not hidden_size={n_embd}")
        return dict(vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048),
                    n_layer=hf.get("num_hidden_layers", 32), n_head=n_head,
                    n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                    bias=hf.get("attention_bias", False), pos="rope", norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", mlp_hidden=hf.get("intermediate_size", 11008),
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                    tie_embeddings=hf.get("tie_word_embeddings", False))
    names = ", ".join(hf.get("architectures") or []) or kind
    raise ValueError(f"{path}: the architecture {names!r} (model_type {kind!r}) cannot be imported; "
                     "GPT2LMHeadModel and LlamaForCausalLM can")


def read_weights(directory):
    """{name: tensor} from model.safetensors, or from the shards model.safetensors.index.json lists."""
    st = safetensors_torch()
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(_read_json(index, "the weights are missing")["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    weights = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ValueError(f"{directory} has no {name}: the weights are missing")
        try:
            weights.update(st.load_file(path))
        except Exception as e:  # safetensors' own errors for a truncated or foreign file
            raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    return weights


def from_hf_weights(weights, config, kind, where):
    """{Hugging Face name: tensor} -> our state_dict, each tensor checked against config's shapes."""
    expected = build_model_meta(config).state_dict()
    if kind == "gpt2" and not any(k.startswith("transformer.") for k in weights):  # saved from GPT2Model
        weights = {"transformer." + k: v for k, v in weights.items()}
    state = {}
    for ours, theirs, transposed in weight_names(config, kind):
        parts = []
        for name in theirs:
            if name not in weights:
                raise ValueError(f"{where}: the weight {name} is missing")
            parts.append(weights[name].t() if transposed else weights[name])
        try:
            w = torch.cat(parts) if len(parts) > 1 else parts[0]
        except RuntimeError:
            w = None
        if w is None or w.shape != expected[ours].shape:
            shapes = " + ".join(str(tuple(weights[n].shape)) for n in theirs)
            raise ValueError(f"{where}: {', '.join(theirs)} has shape {shapes}, but config.json makes "
                             f"{tuple(expected[ours].shape)}{' (transposed)' if transposed else ''}")
        state[ours] = w.float().contiguous()
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.wte.weight"]
    return state


def tokenizer_from_json(directory):
    """Our tokenizer for a Hugging Face byte-level BPE tokenizer.json: its vocabulary as tiktoken
    ranks (ids unchanged), its split pattern; GPT-2's own vocabulary and split -> the gpt2 kind."""
    path = os.path.join(directory, "tokenizer.json")
    spec = _read_json(path, "there is no tokenizer to import")
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    why = "not a BPE model" if model.get("type") != "BPE" else "it normalizes text" if spec.get("normalizer") \
        else "byte fallback" if model.get("byte_fallback") \
        else "word prefixes or suffixes" if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
        else None
    byte_level = {"type": "ByteLevel", "use_regex": False}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        pattern = GPT2_PATTERN
    elif len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in (steps[0].get("pattern") or {}) \
            and steps[0].get("behavior") == "Isolated" and all(steps[1].get(k) == v for k, v in byte_level.items()):
        pattern = steps[0]["pattern"]["Regex"]
    else:
        pattern, why = None, why or "its pre-tokenizer is not a byte-level split"
    if why:
        raise ValueError(f"{path} cannot be imported ({why}): nanolex reads byte-level BPE tokenizers")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    unbyte = {c: b for b, c in byte_chars().items()}
    try:
        ranks = {bytes(unbyte[c] for c in piece): i for piece, i in model["vocab"].items() if piece not in added}
    except KeyError:
        raise ValueError(f"{path} cannot be imported: its vocabulary has pieces that are not byte-level") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path} cannot be imported: its ordinary tokens must have ids 0..n-1 (the special ones "
                         "after them) and include all 256 bytes")
    kind = GPT2Tokenizer if len(ranks) == 50256 and pattern == GPT2_PATTERN else BPETokenizer
    tok = kind(ranks, pattern)
    for content, i in added.items():
        if tok.special.get(content) != i:
            raise ValueError(f"{path} cannot be imported: its special token {content!r} has id {i}, where nanolex's "
                             f"special tokens are {', '.join(tok.special)} from id {len(ranks)} on")
    return tok


def hf_tokenizer(directory):
    """Our tokenizer of a Hugging Face folder: the very one, in a folder export.py wrote; else
    converted from its tokenizer.json."""
    if not os.path.isdir(directory):
        raise ValueError(f"hf:{directory} is not a directory")
    if os.path.exists(os.path.join(directory, OUR_TOKENIZER)):
        return load_tokenizer(directory, OUR_TOKENIZER)
    return tokenizer_from_json(directory)


def from_hf(directory):
    """(checkpoint dict, tokenizer) for a local Hugging Face folder of a GPT-2 or Llama causal LM.

    The checkpoint has what train.py's init_from and runtime.load_run read: model (our
    state_dict), model_args, iter_num 0 and the tokenizer's fingerprint (that of its files
    as tokenizer.save writes them). The tokenizer is ours from an exported folder, else
    converted from tokenizer.json. A tokenizer with more ids than the model has rows (GPT-2's
    50,257 plus our special tokens) gets new rows, the mean of the others, up to a multiple of 64.
    """
    if not os.path.isdir(directory):
        raise ValueError(f"hf:{directory} is not a directory")
    config_path = os.path.join(directory, "config.json")
    hf = _read_json(config_path, "it is not a Hugging Face model folder")
    args = model_args_from(hf, config_path)
    tok = hf_tokenizer(directory)
    try:
        config = ModelConfig(**args)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    state = from_hf_weights(read_weights(directory), config, layout(config), directory)
    if tok.vocab_size > config.vocab_size:
        rows = 64 * -(-tok.vocab_size // 64)
        for name in ("embed.wte.weight", "lm_head.weight"):
            w = state[name]
            state[name] = torch.cat([w, w.mean(dim=0, keepdim=True).expand(rows - w.size(0), -1)])
        if config.tie_embeddings:
            state["lm_head.weight"] = state["embed.wte.weight"]
        args["vocab_size"] = rows
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        fingerprint = tokenizer_fingerprint(tmp)
    ckpt = {"model": state, "model_args": args, "iter_num": 0, "config": {"init_from": f"hf:{directory}"},
            "tokenizer_fingerprint": fingerprint}
    return ckpt, tok


def is_hf(path):
    return isinstance(path, str) and path.startswith("hf:")
