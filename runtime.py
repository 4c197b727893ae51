"""
What train.py, sample.py and bench.py share to run a model: picking the device and
precision, writing and reading checkpoints and run directories (a LoRA run: its base run
with its adapters on), the device's peak FLOP/s that MFU is measured against, and int8
(or nf4) weights, for decoding on a CPU and as QLoRA's frozen base.
"""

import ctypes
import errno
import functools
import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn import functional as F

from finetune import add_lora, fingerprint
from model import CrossAttention, ModelConfig, build_model, compute_dtype
from tokenizer import load_tokenizer, tokenizer_fingerprint


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
    A LoRA run's model is its base run's (read from the directory its checkpoint names, and
    checked by fingerprint) with the run's adapters on it."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
    tokenizer = load_tokenizer(out_dir)
    try:
        config = ModelConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{out_dir}/ckpt.pt has model_args this version cannot build: {e}")
    check_vocab(config.vocab_size, tokenizer, f"{out_dir}/ckpt.pt")
    if ckpt.get("tokenizer_fingerprint", tokenizer_fingerprint(out_dir)) != tokenizer_fingerprint(out_dir):
        raise ValueError(f"{out_dir}: the tokenizer files are not the ones ckpt.pt was trained with")
    lora = ckpt.get("lora")
    weights = load_lora_base(lora, device, out_dir)["model"] if lora else ckpt["model"]
    try:
        model = build_model(config, weights)
    except RuntimeError as e:
        raise ValueError(f"{out_dir}/ckpt.pt weights do not fit its model_args: {str(e).splitlines()[0]}")
    model.to(device)
    if lora:
        attach_lora(model, lora, ckpt["model"], out_dir)
    return model.eval(), tokenizer, ckpt


def load_lora_base(lora, device, where):
    """The checkpoint of the base run a LoRA run's adapters were trained on (lora: the run's
    checkpoint's "lora" entry), refused unless its weights are the ones the adapters were made for."""
    base = os.path.join(lora["base"], "ckpt.pt")
    try:
        ckpt = load_checkpoint(base, device)
    except ValueError as e:
        raise ValueError(f"{where} holds LoRA adapters for the run {lora['base']}, which does not load: {e}")
    if ckpt.get("lora") or fingerprint(ckpt["model"]) != lora["base_fingerprint"]:
        raise ValueError(f"{where} holds LoRA adapters trained on other weights than those now in {base}: the "
                         "adapters fit only the base run they were trained on")
    return ckpt


def attach_lora(model, lora, adapters=None, where=""):
    """Give model (its base weights loaded) the adapters lora's settings describe, in place: freeze
    it, wrap the target layers, quantize the frozen base as lora["base_weights"] says, then load
    adapters (a state dict of the adapters alone) if given. Returns the number of adapter parameters."""
    trainable = add_lora(model, lora["targets"], lora["rank"], lora["alpha"], lora["dropout"])
    if lora["base_weights"] != "float":
        quantize(model, lora["base_weights"], training=True)
    if adapters is not None:
        missing, unexpected = model.load_state_dict(adapters, strict=False)
        missing = [k for k in missing if ".lora_" in k]
        if missing or unexpected:
            raise ValueError(f"{where}: its adapters do not fit its LoRA settings "
                             f"({(missing or unexpected)[0]} {'missing' if missing else 'unexpected'})")
    return trainable


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


# ----------------------------------------------------------------------------------
# int8 and nf4 weights: for decoding on a CPU, and as the frozen base of QLoRA

class DequantizedLinear(torch.autograd.Function):
    """x @ (qweight * scale)^T + bias whose backward keeps the int8 weight, not the float one: a
    frozen quantized base whose float weights were saved for backward would take the memory back."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias):
        ctx.save_for_backward(qweight, scale)
        return F.linear(x, qweight.to(x.dtype) * scale[:, None].to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        return grad @ (qweight.to(grad.dtype) * scale[:, None].to(grad.dtype)), None, None, None


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
            return DequantizedLinear.apply(x.float(), self.qweight, self.scale, self.bias).to(dtype)
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


class NF4Linear(nn.Module):
    """A Linear whose weight is torchao's NF4 (4-bit NormalFloat, QLoRA's: blocks of 64 weights
    share a scale, the scales themselves quantized), multiplied by torchao's linear_nf4, whose
    backward dequantizes again instead of keeping a float copy. No bias (the models here have
    none by default; a bias stays float)."""

    def __init__(self, linear, to_nf4, linear_nf4):
        super().__init__()
        w = linear.weight.detach().float()
        if w.numel() % 64:
            raise ValueError(f"nf4 quantizes blocks of 64 weights; a {tuple(w.shape)} weight has "
                             f"{w.numel()} (use lora_base_weights=int8)")
        # torchao quantizes the blocks' scales in groups of up to 256 that must divide their count
        self.qweight = to_nf4(w, 64, math.gcd(w.numel() // 64, 256))
        self.linear_nf4 = linear_nf4
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    @property
    def weight(self):
        return self.qweight.to(torch.float32)

    def forward(self, x):
        dtype = compute_dtype(x.device.type, x.dtype)
        y = self.linear_nf4(x.float(), self.qweight)
        return (y if self.bias is None else y + self.bias).to(dtype)


TORCHAO = "torchao==0.18.0"


def torchao_nf4():
    """torchao's (to_nf4, linear_nf4), imported only when asked; ValueError naming the package without it."""
    logging.disable(logging.WARNING)  # its notes on kernels for other hardware (CUDA, mxfp8) it does not load
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        raise ValueError(f"nf4 weights need the optional package torchao: pip install {TORCHAO}") from None
    finally:
        logging.disable(logging.NOTSET)
    return to_nf4, linear_nf4


def quantize(model, kind="int8", training=False):
    """Give model's Linear layers int8 (or nf4) weights, in place; returns model. For decoding on
    the CPU, or (training=True, any device) as the frozen base under LoRA adapters: the quantized
    layers have no gradients of their own, only their inputs do.

    Every architecture: a tied head gets its own quantized copy (the embedding keeps the float
    matrix). Left in float: the LSTM's recurrent layers (nn.LSTM is not a Linear) and
    cross-attention's c_attn, whose weight CrossAttention splits itself.
    """
    if kind != "int8" and not (training and kind == "nf4"):  # decoding: int8's kernels are the fast ones
        raise ValueError(f"quantize={kind!r} is not supported; the one kind is int8")
    device = next(model.parameters()).device
    if device.type != "cpu" and not training:
        raise ValueError(f"int8 weights run on the CPU only, and this model is on {device} (use --device=cpu)")
    if kind == "nf4":
        to_nf4, linear_nf4 = torchao_nf4()
        make = lambda linear: NF4Linear(linear, to_nf4, linear_nf4)  # noqa: E731
    else:
        backend = "dequantize" if training else int8_backend()
        make = lambda linear: Int8Linear(linear, backend)  # noqa: E731
    keep_float = {id(m.c_attn) for m in model.modules() if isinstance(m, CrossAttention)}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and id(child) not in keep_float:
                setattr(parent, name, make(child))
    return model


def dequantize(model):
    """Undo quantize(), in place: every int8 or nf4 layer becomes a float Linear of the weight it
    stands for, and a tied head is the embedding's matrix again. Returns model."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, (Int8Linear, NF4Linear)):
                weight = child.weight
                linear = nn.Linear(weight.size(1), weight.size(0), bias=child.bias is not None, device=weight.device)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    if model.config.tie_embeddings:
        model.lm_head.weight = (model.wte if model.config.arch == "lstm" else model.embed.wte).weight
    return model
