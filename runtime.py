"""
What train.py, sample.py and bench.py share to run a model: picking the device and
precision, writing and reading checkpoints and run directories (a LoRA run: its base run
with its adapters on), the device's peak FLOP/s that MFU is measured against, int8 (or nf4)
weights, for decoding on a CPU and as QLoRA's frozen base, and the Hugging Face layout both
ways (export.py writes it; hf:DIR runs are read from it).
"""

import ctypes
import errno
import functools
import json
import logging
import math
import os
import re
import resource
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import CrossAttention, ModelConfig, MoE, add_lora, build_model, compute_dtype, fingerprint
from tokenizer import GPT2_PATTERN, BPETokenizer, GPT2Tokenizer, UNK, load_tokenizer, tokenizer_fingerprint


# ----------------------------------------------------------------------------------
# device and precision

def pick_device(name):
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not here is a ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N, mps")
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


def pick_compile(device, dtype, setting):
    """Whether to torch.compile the model for training. 'auto' -> on a GPU; on a CPU only in bf16
    (or fp16), where fusing autocast's casts and the elementwise work around the matmuls pays;
    in fp32 on a CPU it buys little or nothing and costs the compile (docs/performance.md)."""
    if setting not in ("auto", True, False):
        raise ValueError(f"compile={setting!r} is not one of auto, True, False")
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        return True
    return device == "cpu" and dtype != torch.float32


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


def load_checkpoint(path, device="cpu", needs=("model", "model_args")):
    """Read a checkpoint with weights_only=True: tensors and plain data, never arbitrary objects.
    needs: the keys it must have (a sharded checkpoint's train.pt holds no weights)."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on unusual pickles: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or not set(needs) <= ckpt.keys():
        raise ValueError(f"{path} is not a nanolex checkpoint (no {' or '.join(needs)})")
    return ckpt


# A sharded checkpoint (train.py's parallelism="fsdp") is a directory, ckpt-ITER/: each process's
# shard of the weights and optimizer state as torch.distributed.checkpoint (DCP) writes them
# (__RANK_0.distcp, and .metadata, DCP's index of them), train.pt (the rest of what ckpt.pt holds:
# iteration, config, sampler...) and, written last, SHARDS_DONE: every file's name and size. It is
# written as NAME.tmp and renamed whole, so a directory with a checkpoint's name is complete or absent.
SHARDS_DONE = "complete.json"
SHARDED_NAME = re.compile(r"ckpt-(best-)?(\d{8})")  # ckpt-ITER, and ckpt-best-ITER: hard links to the best one's files


def finish_sharded(tmp, path, world_size):
    """The checkpoint written into directory tmp, marked complete and renamed to path (an older
    directory of that name, from a run that went back to an earlier checkpoint, is replaced)."""
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    done = json.dumps({"world_size": world_size, "files": files}).encode()
    save_atomically(os.path.join(tmp, SHARDS_DONE), lambda f: f.write(done))
    if os.path.exists(path):
        remove_sharded(path)
    os.rename(tmp, path)
    _fsync_directory(path)


def remove_sharded(path):
    """Delete a checkpoint directory: renamed out of the way first (NAME.old.tmp, which train.py
    clears at its start), so a kill midway leaves no part of it under a checkpoint's name."""
    trash = f"{path}.old.tmp"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    _fsync_directory(path)
    shutil.rmtree(trash)


def link_sharded(src, dst):
    """dst, a complete checkpoint directory whose files are hard links to src's (copies where the
    filesystem has no hard links), made as dst.tmp and renamed whole."""
    tmp = f"{dst}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, copy_function=os.link)
    except (OSError, shutil.Error):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    if os.path.exists(dst):
        remove_sharded(dst)
    os.rename(tmp, dst)
    _fsync_directory(dst)


def sharded_checkpoints(out_dir, best=False):
    """The sharded checkpoint directories in out_dir (ckpt-ITER, or with best ckpt-best-ITER), newest first."""
    found = [(int(m.group(2)), os.path.join(out_dir, name)) for name in os.listdir(out_dir)
             if (m := SHARDED_NAME.fullmatch(name)) and bool(m.group(1)) == best]
    return [path for _, path in sorted(found, reverse=True)]


def load_sharded_state(path, device="cpu"):
    """train.pt of the sharded checkpoint in directory path, once SHARDS_DONE says the directory is
    whole: every file it lists there, at its size. A ValueError names what is wrong."""
    try:
        with open(os.path.join(path, SHARDS_DONE)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a complete sharded checkpoint (no readable {SHARDS_DONE}: "
                         "its writing never finished)")
    for name, size in files.items():
        where = os.path.join(path, name)
        if not os.path.isfile(where) or os.path.getsize(where) != size:
            what = "missing" if not os.path.isfile(where) else f"{os.path.getsize(where)} bytes, not {size}"
            raise ValueError(f"{path} is not a complete sharded checkpoint: {name} is {what}")
    return load_checkpoint(os.path.join(path, "train.pt"), device, needs=("model_args", "iter_num"))


def read_sharded(path):
    """The sharded checkpoint in directory path as one single-file checkpoint, as train.py's ckpt.pt:
    its weights and optimizer state gathered in this process (DCP without a process group), the
    optimizer's in torch's own layout, so a one-device run can resume it. A ValueError if it is
    incomplete or its shards do not load."""
    state = load_sharded_state(path)
    config = state["config"]
    model = build_model(ModelConfig(**state["model_args"]))
    optimizer = model.configure_optimizer(config["weight_decay"], config["learning_rate"],
                                          (config["beta1"], config["beta2"]), "cpu", config["optimizer"],
                                          config["momentum"])
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        load_shards(path, model, optimizer)
    return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def load_shards(path, model, optimizer):
    """The weights and optimizer state of the sharded checkpoint in directory path, into model and
    optimizer (sharded or whole): DCP reads each process's part, whatever the number of processes
    that wrote it. A ValueError if the shards do not load."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout DCP fills in
    shards = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp_load(shards, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # a shard of another shape, a file that does not parse
        raise ValueError(f"{path}: its shards do not load ({str(e).strip().splitlines()[-1][:160]})")
    set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])


def check_vocab(model_vocab_size, tokenizer, where):
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{where}: the model has a vocabulary of {model_vocab_size} tokens but the "
                         f"tokenizer has {tokenizer.vocab_size}; they do not belong together")


def load_run(out_dir, device="cpu"):
    """A trained run from its directory alone: (model in eval mode, tokenizer, checkpoint dict).
    A LoRA run's model is its base run's (read from the directory its checkpoint names, and
    checked by fingerprint) with the run's adapters on it. out_dir "hf:DIR": a Hugging Face
    GPT-2 or Llama folder instead (see from_hf)."""
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
    lora = ckpt.get("lora")
    weights = {**load_lora_base(lora, device, out_dir)["model"], **classifier_state(ckpt["model"])} if lora \
        else ckpt["model"]
    try:
        model = build_model(config, weights)
    except RuntimeError as e:
        raise ValueError(f"{out_dir}/ckpt.pt weights do not fit its model_args: {str(e).splitlines()[0]}")
    model.to(device)
    if lora:
        attach_lora(model, lora, ckpt["model"], out_dir)
    return model.eval(), tokenizer, ckpt


def classifier_state(state):
    """A state dict's classification head (a LoRA run keeps its own beside the adapters)."""
    return {k: v for k, v in state.items() if k.startswith("classifier.")}


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
    matrix). Left in float: the LSTM's recurrent layers (nn.LSTM is not a Linear),
    cross-attention's c_attn, whose weight CrossAttention splits itself, a mixture's experts
    (stacked tensors, not Linear layers) and its routers: a router's output picks experts,
    and rounding that flips a pick changes a token's output far more than rounding elsewhere.
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
    keep_float |= {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    if training and getattr(model, "classifier", None) is not None:  # trained in full under the adapters
        keep_float.add(id(model.classifier))
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
               (config.n_classes > 0, f"n_classes={config.n_classes} (a classification head)"),
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

