"""
What train.py, sample.py and bench.py share to run a model: picking the device and
precision, writing and reading checkpoints and run directories, the device's peak
FLOP/s that MFU is measured against, and int8 weights for decoding on a CPU.
"""

import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import CrossAttention, ModelConfig, MoE, build_model, compute_dtype
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
    """'auto' -> bf16 on GPUs with native bf16 (compute capability 8.0 and up: Ampere, Ada, Hopper),
    fp16 with a GradScaler on older ones; bf16 on CPUs with bf16 units; else fp32.
    (torch.cuda.is_bf16_supported() also counts emulation, which V100 and T4 have: slow bf16
    without tensor cores or flash kernels.)"""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
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
    """A trained run from its directory alone: (model in eval mode, tokenizer, checkpoint dict)."""
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

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets: tensor-core bf16 and fp16,
# TF32 (fp32 matmuls with torch.backends.cuda.matmul.allow_tf32, as train.py sets), and plain
# fp32. None: the GPU has no such units. Matched against torch.cuda.get_device_name() in this
# order, so the more specific names come first (L40S before L40 before L4, H100 PCIe/NVL before
# H100, A10G before A10); a GPU not listed gets no MFU rather than a wrong one.
GPU_PEAKS = [  # (name contains, bf16, fp16, tf32, fp32)
    ("GH200", 989e12, 989e12, 495e12, 67e12),
    ("H200", 989e12, 989e12, 495e12, 67e12),
    ("H100 PCIe", 756e12, 756e12, 378e12, 51e12),
    ("H100 NVL", 835e12, 835e12, 418e12, 60e12),
    ("H100", 989e12, 989e12, 495e12, 67e12),  # SXM
    ("A100", 312e12, 312e12, 156e12, 19.5e12),
    ("A10G", None, None, None, None),  # a cloud variant with no published tensor peaks: no MFU
    ("A10", 125e12, 125e12, 62.5e12, 31.2e12),
    ("L40S", 362e12, 362e12, 183e12, 91.6e12),
    ("L40", 181e12, 181e12, 90.5e12, 90.5e12),
    ("L4", 121e12, 121e12, 60e12, 30.3e12),
    ("4090", 165e12, 165e12, 82.6e12, 82.6e12),
    ("3090", 71e12, 71e12, 35.6e12, 35.6e12),
    ("V100", None, 125e12, None, 15.7e12),  # no bf16 units: bf16 is emulated
    ("T4", None, 65e12, None, 8.1e12),
]


def datasheet_peak(name, dtype, tf32):
    """The data-sheet peak FLOP/s of the GPU called name for matmuls in dtype (fp32: TF32's when
    tf32), or None for a GPU not in GPU_PEAKS or without units for that dtype."""
    for key, bf16, fp16, tf32_peak, fp32 in GPU_PEAKS:
        if key in name:
            if dtype == torch.bfloat16:
                return bf16
            if dtype == torch.float16:
                return fp16
            return (tf32_peak or fp32) if tf32 else fp32
    return None


def peak_cache_path():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanolex", "peaks.json")


def machine_key(device_type, dtype):
    """What a measured peak belongs to: the processor, the threads torch uses, torch's version, the dtype."""
    if device_type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        try:
            with open("/proc/cpuinfo") as f:
                where = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
        except OSError:
            where = "cpu"
        where = f"{device_type} {where}, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}"


def measure_matmul_peak(device_type, dtype, seconds=1.5):
    """The best rate (FLOP/s) of square matrix products in dtype on this device, over sizes from
    512 up, each repeated for its share of `seconds`: a short or single run catches the clock
    ramping up or a neighbour's burst and reads low, and a low peak makes MFU read high."""
    sizes = (1024, 2048, 4096, 8192) if device_type == "cuda" else (512, 1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device_type).to(dtype)
        b = torch.randn(n, n, device=device_type).to(dtype)
        a @ b  # warm-up: kernels chosen, threads started
        if device_type == "cuda":
            torch.cuda.synchronize()
        until = time.perf_counter() + seconds / len(sizes)
        while True:
            t0 = time.perf_counter()
            a @ b
            if device_type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            best = max(best, 2 * n ** 3 / elapsed)
            if time.perf_counter() + elapsed > until:  # one more would overrun this size's share
                break
        if 8 * elapsed > seconds / len(sizes):  # the next size's one product (8x the work) would overrun it too
            break
    return best


def read_peaks():
    try:
        with open(peak_cache_path()) as f:
            known = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in known.items() if isinstance(v, (int, float)) and v > 0} if isinstance(known, dict) else {}


def write_peak(key, flops):
    """Set one machine's peak in the cache file; processes started together (torchrun, tests) may
    all write, so each writes a temporary file of its own and renames it. A read-only home: not
    kept, measured again next time."""
    path = peak_cache_path()
    known = {**read_peaks(), key: flops}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


_measured_peaks = {}


def measured_peak(device_type, dtype):
    """This machine's matmul peak for dtype: measured once (measure_matmul_peak), then read from
    ~/.cache/nanolex/peaks.json (XDG_CACHE_HOME is honoured), keyed by machine_key()."""
    key = machine_key(device_type, dtype)
    if key not in _measured_peaks:
        known = read_peaks().get(key)
        if known is None:
            known = measure_matmul_peak(device_type, dtype)
            write_peak(key, known)
        _measured_peaks[key] = float(known)
    return _measured_peaks[key]


def mfu_of(flops_per_s, device_type, dtype):
    """flops_per_s (the model's achieved rate) as a share of peak_flops, or None where there is no
    peak. A measured peak is what the machine does at least: a model that does more (bigger or
    better-shaped matmuls than the measured ones) raises it, here and in the cache, so MFU never
    reads above 1."""
    peak = peak_flops(device_type, dtype)
    if peak is None:
        return None
    if flops_per_s > peak and device_type != "cuda":
        key = machine_key(device_type, dtype)
        _measured_peaks[key] = flops_per_s
        write_peak(key, flops_per_s)
        return 1.0
    return flops_per_s / peak


def peak_flops(device_type, dtype):
    """Peak FLOP/s of the device for dtype, the denominator of MFU, or None where there is no
    honest one. A GPU: its data-sheet figure (TF32's for fp32 when TF32 matmuls are on), None
    for a GPU not in GPU_PEAKS. A CPU or MPS: the measured matmul peak of this machine for dtype
    (measured_peak), so MFU reads as 'share of what this machine's matmul does in that dtype'."""
    if device_type == "cuda":
        return datasheet_peak(torch.cuda.get_device_name(), dtype, torch.backends.cuda.matmul.allow_tf32)
    return measured_peak(device_type, dtype)


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
    matrix). Left in float: the LSTM's recurrent layers (nn.LSTM is not a Linear),
    cross-attention's c_attn, whose weight CrossAttention splits itself, a mixture's experts
    (stacked tensors, not Linear layers) and its routers: a router's output picks experts,
    and rounding that flips a pick changes a token's output far more than rounding elsewhere.
    """
    if kind != "int8":
        raise ValueError(f"quantize={kind!r} is not supported; the one kind is int8")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 weights run on the CPU only, and this model is on {device} (use --device=cpu)")
    backend = int8_backend()
    keep_float = {id(m.c_attn) for m in model.modules() if isinstance(m, CrossAttention)}
    keep_float |= {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and id(child) not in keep_float:
                setattr(parent, name, Int8Linear(child, backend))
    return model
