"""
Train a model on a prepared dataset. One process:

    python train.py config/legal_small.py

Several processes (DDP), on one machine or many:

    torchrun --standalone --nproc_per_node=8 train.py config/legal_gpt2.py

Settings are the globals below; a config file and --key=value override them.
With no config at all this is a GPU-scale run: GPT-2 124M, ~0.5M tokens per step. Mind the
data: a 124M model wants on the order of billions of tokens (~2.5B at 20 tokens per
parameter), and the built-in legal corpus is about 1.2M tokens, far too little. Prepare
your own corpus and train on it by name:

    python prepare.py --input=/path/to/your/text/ --dataset=NAME
    python train.py --dataset=NAME

For the built-in corpus on one GPU, use config/legal_gpu.py instead.
"""

import datetime
import glob
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, fields

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 2000        # evaluate and checkpoint every this many iterations
log_interval = 1
eval_iters = 200            # batches per val estimate
eval_only = False           # evaluate once and exit
init_from = "scratch"       # scratch | resume (out_dir's newest readable checkpoint) | a run's directory: fine-tune it
keep_last = 1               # checkpoints kept: ckpt.pt is always the newest; > 1 also keeps the last N as ckpt-ITER.pt
consolidate = ""            # a sharded run's directory (or one ckpt-ITER/ of it): write it as ckpt.pt there; then exit
# seeing the run: log.jsonl always; these show the same numbers elsewhere too
tensorboard = False         # also write TensorBoard event files to out_dir/tensorboard (needs the tensorboard package)
wandb = False               # also log to Weights & Biases (needs wandb; WANDB_MODE=offline works without an account)
wandb_project = "nanolex"
wandb_run_name = ""         # "" = the name of out_dir
report = True               # at the end, report.md and the plots in out_dir (plot.py --report)
# data
data_dir = "data"
dataset = "legal"           # data_dir/dataset/ from prepare.py; "legal": the built-in ~1.2M tokens, prepared on demand
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, summed over all processes
batch_size = 12             # sequences per micro-step per process, block_size tokens each (a model setting)
task = "lm"                 # lm: arch's own objective | classify: each document's label as its class (a dataset
                            # prepared with --labels=True), by a head on the pooled final state (pool); val accuracy
# model: every field of model.ModelConfig but those the dataset decides (vocab_size, n_labels, n_classes)
from configurator import OPTIMIZERS, ModelConfig  # noqa: E402  (torch-free: --help answers before torch is imported)
globals().update({f.name: f.default for f in fields(ModelConfig)
                  if f.name not in ("vocab_size", "n_labels", "n_classes")})
# objectives of the encoder (masked-language modelling) and encdec (span corruption)
mask_prob = 0.15            # share of tokens masked (encoder: 80% <|mask|>, 10% random, 10% kept) or cut out (encdec)
span_length = 3             # encdec: tokens per cut-out span
# optimizer
optimizer = "adamw"         # adamw | sgd | lion | muon (Muon for the hidden matrices, AdamW for the rest)
learning_rate = 6e-4
max_iters = 600000
max_seconds = 0.0           # > 0: the run's wall-time budget (across resumes): warmup and decay follow the share used
weight_decay = 1e-1
beta1 = 0.9                 # AdamW's and Lion's betas
beta2 = 0.95
momentum = 0.95             # sgd, muon: Nesterov momentum
grad_clip = 1.0             # 0 = off
# learning rate schedule: linear warmup over warmup_iters, then lr_schedule down to min_lr at lr_decay_iters
lr_schedule = "cosine"      # cosine | linear | wsd (stable at learning_rate, then a linear decay) | constant
warmup_iters = 2000
lr_decay_iters = 600000
wsd_decay_iters = 0         # wsd: the decay, the last this many iterations up to lr_decay_iters; 0 = a fifth
min_lr = 6e-5
# training options
grad_checkpoint = False     # recompute each block's activations in the backward pass: less memory, more compute
label_smoothing = 0.0       # of the training loss; eval losses (and bits per byte) stay unsmoothed
block_size_schedule = 0     # > 0: training windows grow from block_size_start to block_size over this many iterations
block_size_start = 64       # block_size_schedule: the first window, and the step it grows by
# system
device = "auto"             # auto | cpu | cuda | cuda:N | mps
dtype = "auto"              # auto | float32 | bfloat16 | float16
compile = "auto"            # torch.compile the model: auto (on a GPU; on a CPU in bf16) | True | False
seed = 1337
max_bad_steps = 20          # a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run
ddp_timeout = 600           # seconds a process waits for the others (a dead or hung rank) before it gives up
parallelism = "ddp"         # under torchrun: ddp (each process holds every weight) | fsdp (FSDP2: each holds a shard)
offload = "none"            # fsdp on GPUs: none | params (shards, gradients and optimizer state in CPU memory)
# fine-tuning (init_from=RUN): low-rank adapters (LoRA), on a quantized frozen base (QLoRA); distillation
lora_rank = 0               # > 0: train adapters of this rank on the frozen init_from run instead of its weights
lora_alpha = 16.0           # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0          # dropout on the adapters' input
lora_targets = "q,v"        # layers to adapt: q, k, v, gate, up, or Linear names and globs (model.py: LoRA)
lora_base_weights = "float"  # the frozen base under the adapters: float | int8 | nf4 (QLoRA; nf4 needs torchao)
merge_lora = ""             # a LoRA run's directory: write it, adapters folded into the weights, to out_dir; then exit
teacher = ""                # a run's directory: distill it into this model (the same tokenizer and vocabulary)
distill_weight = 0.5        # loss = (1 - distill_weight) x data loss + distill_weight x T^2 x KL(teacher || student)
distill_temperature = 1.0   # T: both softmaxes of the KL term are taken at it
# -----------------------------------------------------------------------------
from configurator import check_ranges, configure, fail  # noqa: E402  (settings above come first, as in nanoGPT)
defaults = dict(globals())  # report.md lists the settings that differ from these
given = set()  # the settings the config file and command line set: a run fine-tuned from does not override them
config = configure(globals(), given=given)
check_ranges(globals(), {
    "eval_interval": ">= 1", "log_interval": ">= 1", "eval_iters": ">= 1", "keep_last": ">= 1",
    "gradient_accumulation_steps": ">= 1", "batch_size": ">= 1", "block_size": ">= 1", "dropout": "[0, 1)",
    "mask_prob": "(0, 1)", "span_length": ">= 1", "learning_rate": "> 0", "min_lr": ">= 0",
    "max_iters": ">= 0", "max_seconds": ">= 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)",
    "grad_clip": ">= 0", "warmup_iters": ">= 0", "lr_decay_iters": ">= 0", "max_bad_steps": ">= 1",
    "ddp_timeout": "> 0", "momentum": "[0, 1)", "wsd_decay_iters": ">= 0", "label_smoothing": "[0, 1)",
    "block_size_schedule": ">= 0", "block_size_start": ">= 1", "lora_rank": ">= 0", "lora_alpha": "> 0",
    "lora_dropout": "[0, 1)", "distill_weight": "[0, 1]", "distill_temperature": "> 0"})

import torch  # noqa: E402  (after the settings: --help needs no torch)
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

LR_SCHEDULES = ("cosine", "linear", "wsd", "constant")
if lr_schedule == "wsd" and not wsd_decay_iters:
    wsd_decay_iters = max(1, (lr_decay_iters - warmup_iters) // 5)


def check_training_options():
    """The optimizer, the schedules and the options, against each other and the run's length."""
    if optimizer not in OPTIMIZERS:
        fail(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if lr_schedule not in LR_SCHEDULES:
        fail(f"lr_schedule={lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if lr_schedule == "wsd" and not warmup_iters + wsd_decay_iters <= lr_decay_iters <= max_iters:
        fail(f"lr_schedule=wsd does not fit the run: warmup_iters={warmup_iters} + wsd_decay_iters={wsd_decay_iters} "
             f"must fit in lr_decay_iters={lr_decay_iters}, which must be at most max_iters={max_iters}")
    if block_size_schedule > max_iters:
        fail(f"block_size_schedule={block_size_schedule} iterations is longer than the run (max_iters={max_iters}): "
             "the windows would never reach block_size")
    if block_size_schedule and not block_size_start <= block_size:
        fail(f"block_size_start={block_size_start} is longer than block_size={block_size}")
    if block_size_schedule and arch == "encdec":
        fail("block_size_schedule shortens windows of one sequence; arch='encdec' pairs a source with a target")
    if task not in ("lm", "classify"):
        fail(f"task={task!r} is not one of lm, classify")
    if task == "classify" and teacher:
        fail("teacher= distills a language model's next tokens; task='classify' has none to distill")


check_training_options()
if tensorboard:  # the optional sinks' packages, imported only when asked for, before anything is written
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("tensorboard=True needs the tensorboard package: pip install tensorboard==2.21.0")
if wandb:
    try:
        import wandb as wandb_lib
    except ImportError:
        fail("wandb=True needs the wandb package: pip install wandb==0.31.0")

from batches import Batches  # noqa: E402
from tokenizer import token_bytes  # noqa: E402
from model import (Block, Classify, adapter_state, build_model, distillation_kl, fingerprint,  # noqa: E402
                   merge_adapters)
from runtime import (SHARDED_NAME, append_jsonl, attach_lora, autocast, check_vocab, classifier_state,  # noqa: E402
                     dequantize, finish_sharded, from_hf, keep_freed_memory, link_atomically, link_sharded,
                     load_checkpoint, load_lora_base, load_run, load_sharded_state, load_shards, machine, mfu_of,
                     peak_memory_mb, pick_compile, pick_device, pick_dtype, probe_disk, read_sharded, remove_sharded,
                     save_atomically, save_checkpoint, sharded_checkpoints)


# ---- merge_lora=RUN: a job of its own ------------------------------------------
def write_merged_run(run_dir):
    """RUN's adapters folded into its base's weights (a quantized base dequantized), written to out_dir
    as a run of its own: a full checkpoint, the tokenizer files and meta.json, needing neither RUN nor
    its base. Its logits are RUN's to fp32 rounding."""
    try:
        merged, _, ckpt = load_run(run_dir, "cpu")
    except ValueError as e:
        fail(str(e))
    if not ckpt.get("lora"):
        fail(f"merge_lora={run_dir} is not a LoRA run: its checkpoint holds no adapters")
    dest = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(dest):
        fail(f"{dest} exists: merge into another --out_dir")
    dequantize(merge_adapters(merged))
    try:
        with open(os.path.join(run_dir, "meta.json")) as f:
            names = json.load(f)["tokenizer"]["files"] + ["meta.json"]
        contents = {}
        for name in names:
            with open(os.path.join(run_dir, name), "rb") as f:
                contents[name] = f.read()
        os.makedirs(out_dir, exist_ok=True)
        for name, content in contents.items():
            save_atomically(os.path.join(out_dir, name), lambda f: f.write(content))
        save_checkpoint({"model": merged.state_dict(), "model_args": ckpt["model_args"], "config": ckpt["config"],
                         "iter_num": ckpt["iter_num"], "val_loss": ckpt.get("val_loss"),
                         "best_val_loss": ckpt["best_val_loss"], "tokenizer_fingerprint": ckpt["tokenizer_fingerprint"],
                         "merged_from": {"run": os.path.abspath(run_dir), **ckpt["lora"]}}, dest)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        fail(f"cannot merge {run_dir} into {out_dir}: {e}")
    print(f"merged {run_dir} (adapters on {ckpt['lora']['base']}) into {dest}")


if merge_lora:
    write_merged_run(merge_lora)
    sys.exit(0)


# ---- parallelism="fsdp": FSDP2 and its sharded checkpoints (docs/distributed.md) ------------
# Under DDP every process holds all the weights, their gradients and the optimizer's state; FSDP2
# (torch's fully_shard) gives each process 1/world_size of each, gathers a block's weights just
# before the block computes (forward and backward) and reduce-scatters its gradients after. Its
# checkpoints stay sharded: each process writes its own part with torch.distributed.checkpoint
# (DCP), which reshards them on load to any number of processes. runtime.py: the directory layout.

def check_parallelism():
    """parallelism and offload, against each other, the launch, the device and what FSDP here takes."""
    if parallelism not in ("ddp", "fsdp"):
        fail(f"parallelism={parallelism!r} is not one of ddp, fsdp")
    if offload not in ("none", "params"):
        fail(f"offload={offload!r} is not one of none, params")
    if offload != "none" and parallelism != "fsdp":
        fail(f"offload={offload} moves FSDP's shards to the CPU: it needs parallelism=fsdp")
    if parallelism != "fsdp":
        return
    if int(os.environ.get("RANK", -1)) == -1:
        fail("parallelism=fsdp runs under torchrun: torchrun --standalone --nproc_per_node=N train.py ... "
             "(N=1 takes a sharded run on one process)")
    if offload != "none" and not device.startswith("cuda"):
        fail(f"offload={offload} moves shards from GPU memory to the CPU's; this run is on {device}, "
             "which has nothing to offload: use offload=none")
    if ptdtype == torch.float16:
        fail("parallelism=fsdp computes in float32 or bfloat16 (float16 would need a GradScaler over sharded "
             "gradients): use --dtype=bfloat16 or --dtype=float32, or parallelism=ddp")
    if lora_rank:
        fail("lora_rank > 0 trains small adapters on a frozen base; parallelism=fsdp shards whole models: use ddp")
    if optimizer == "muon":
        fail("optimizer=muon orthogonalizes whole matrices and parallelism=fsdp shards them: use adamw, sgd or "
             "lion, or parallelism=ddp")


def shard(model):
    """FSDP2 over model, in place: each transformer block a unit of its own (its weights whole only
    while it computes), then the root for the rest (embeddings, head, final norm). Weights compute
    in the run's dtype; gradients are reduced in fp32."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    policies = {"mp_policy": MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32),
                "offload_policy": CPUOffloadPolicy() if offload == "params" else OffloadPolicy()}
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, **policies)
    fully_shard(model, **policies)


def gradient_sync(sync):
    """The context of one micro-step: gradients are averaged over the processes (DDP's all-reduce,
    FSDP's reduce-scatter) only when sync, in the last micro-step of a step."""
    if parallelism == "fsdp":  # the micro-steps before keep their gradients whole: memory, not traffic
        raw_model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync or not ddp else model.no_sync()


def whole(norm):
    """A gradient norm as a plain tensor on the device: under FSDP, torch's norm of sharded
    gradients is a DTensor (and on the CPU with offload=params)."""
    return norm.full_tensor().to(device) if parallelism == "fsdp" else norm


def save_sharded(state, iter_num, val_loss):
    """save() of an FSDP run, in every process: each writes its shard into ckpt-ITER.tmp/; then the
    first adds train.pt (state: the rest of a checkpoint) and the marker, renames the directory to
    ckpt-ITER, keeps keep_last of them, and links the files of the best into ckpt-best-ITER/."""
    global last_checkpoint
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = os.path.join(out_dir, f"ckpt-{iter_num:08d}")
    try:
        model_state, optimizer_state = get_state_dict(raw_model, optimizer)
        dcp_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=f"{path}.tmp")
        if master:
            save_checkpoint(state, os.path.join(f"{path}.tmp", "train.pt"))
            finish_sharded(f"{path}.tmp", path, world_size)
            for old in [p for p in sharded_checkpoints(out_dir) if p != path][keep_last - 1:]:
                remove_sharded(old)
            if val_loss is not None and val_loss <= best_val_loss:
                link_sharded(path, os.path.join(out_dir, f"ckpt-best-{iter_num:08d}"))
                for old in sharded_checkpoints(out_dir, best=True)[1:]:
                    remove_sharded(old)
    except (OSError, CheckpointException) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).strip().splitlines()[-1][:160]
        fail(f"cannot write the checkpoint of iteration {iter_num} in {out_dir} ({reason}); the checkpoints "
             "already there are as they were: make room, then go on with --init_from=resume")
    last_checkpoint = path


def load_sharded(path, model, optimizer):
    """runtime.load_shards into the sharded model and its optimizer, or one line and exit 2."""
    try:
        load_shards(path, model, optimizer)
    except ValueError as e:
        fail(str(e))


def write_consolidated(path):
    """consolidate=PATH: the newest sharded checkpoint of the run in PATH, or the checkpoint directory
    PATH itself, written as one file: ckpt.pt in its run's directory, laid out as a DDP run's, which
    sample.py, eval.py and export.py read and parallelism=ddp resumes."""
    path = os.path.normpath(path)
    if SHARDED_NAME.fullmatch(os.path.basename(path)) and os.path.isdir(path):
        source, run_dir = path, os.path.dirname(path)
    elif os.path.isdir(path) and sharded_checkpoints(path):
        source, run_dir = sharded_checkpoints(path)[0], path
    else:
        fail(f"consolidate={path} is neither a run with sharded checkpoints (ckpt-ITER/ directories) nor one of them")
    try:
        ckpt = read_sharded(source)
    except ValueError as e:
        fail(str(e))
    dest = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(dest):  # an earlier consolidation is replaced; a newer checkpoint is not
        try:
            there = load_checkpoint(dest)["iter_num"]
        except (ValueError, KeyError):
            there = None
        if there is None:
            fail(f"{dest} exists and does not load: move it away first")
        if there > ckpt["iter_num"]:
            fail(f"{dest} holds iteration {there}, newer than {source}: move it away first")
    try:
        save_checkpoint({**ckpt, "consolidated_from": os.path.abspath(source)}, dest)
    except OSError as e:
        fail(f"cannot write {dest} ({e.strerror or e})")
    print(f"consolidated {source} (iteration {ckpt['iter_num']}) into {dest}")


if consolidate:
    write_consolidated(consolidate)
    sys.exit(0)

# ---- init_from=RUN: the run to fine-tune, and the settings it passes on -------------------
# Its shape always; and, unless the config file or command line set them, the training settings
# that still apply to the same model on the same machine: how its batches are cut, how it computes.
INHERITED = ("arch", "block_size", "batch_size", "gradient_accumulation_steps", "mask_prob", "span_length",
             "dtype", "compile")
checkpoint, inherited = None, {}
if init_from.startswith("hf:"):  # a Hugging Face GPT-2 or Llama folder (runtime.from_hf)
    init_path = init_from
    try:
        checkpoint, _ = from_hf(init_from[3:])
    except ValueError as e:
        fail(str(e))
elif init_from not in ("scratch", "resume"):
    init_path = os.path.join(init_from, "ckpt.pt")
    if not os.path.isdir(init_from):
        fail(f"init_from={init_from!r} is not scratch, resume, the directory of a run to fine-tune, or hf:DIR")
    try:
        checkpoint = load_checkpoint(init_path)
    except ValueError as e:
        fail(str(e))
    if checkpoint.get("lora"):
        fail(f"init_from={init_from} is a LoRA run; fold its adapters in first (python train.py "
             f"--merge_lora={init_from} --out_dir=MERGED) and fine-tune MERGED")
    inherited = {k: v for k, v in checkpoint.get("config", {}).items()
                 if k in INHERITED and k not in given and v != globals()[k]}
    globals().update(inherited)
    config.update(inherited)

# ---- processes and device ---------------------------------------------------
ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world_size = 0, 0, 1
try:
    device = pick_device(device)
    ptdtype = pick_dtype(device, dtype)
    compiled = pick_compile(device, ptdtype, compile)
except ValueError as e:
    fail(str(e))
check_parallelism()
if ddp:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:  # the processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    # a collective that waits longer than ddp_timeout for a dead or hung rank fails instead of hanging
    # (offloaded shards: their gradient norm is reduced on the CPU, which nccl does not do, gloo does)
    backend = "gloo" if not device.startswith("cuda") else "cuda:nccl,cpu:gloo" if offload != "none" else "nccl"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=ddp_timeout))

    def fail(message):  # noqa: F811  configurator's, but with no Python teardown after it: a process group
        # whose peer is gone can abort the process as it is torn down (gloo: "terminate called without
        # an active exception"), after the clear line
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
master = rank == 0
device_type = device.split(":")[0]
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
         f"number of processes ({world_size})")
grad_accum = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if device_type == "cpu":  # FSDP frees each block's gathered weights after use to save memory: there glibc
    keep_freed_memory(2**16 if parallelism == "fsdp" else 2**30)  # hands them back (see docs/distributed.md)


def log(*args):
    if master:
        print(*args, flush=True)


# ---- data -------------------------------------------------------------------
data_path = os.path.join(data_dir, dataset)
if not os.path.isfile(os.path.join(data_path, "meta.json")):
    if dataset != "legal":
        fail(f"no dataset at {data_path}: run python prepare.py --dataset={dataset} --input=YOUR_FILES first")
    if master:  # the built-in corpus needs no network: prepare it rather than fail
        log(f"{data_path} not found: preparing the built-in legal corpus (python prepare.py)")
        done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "prepare.py"),
                               f"--data_dir={data_dir}"])
        if done.returncode:
            fail("preparing the built-in legal corpus failed (see above)")
    if ddp:
        dist.barrier()
try:  # meta.json, the tokenizer and the .bin files, read and checked once
    batches = Batches(data_path, arch, block_size, batch_size, mask_prob, span_length, task)
except ValueError as e:
    fail(str(e))

TRAIN_BATCHES, EVAL_BATCHES, DROPOUT = range(3)  # the streams of random draws


def stream_seed(*key):
    """Every random draw is keyed by integers (stream, iteration, the micro-batch's place in the
    global batch): a resumed run draws exactly the batches and dropout masks the uninterrupted
    run would have, and 1 process or 8 with the same global batch draw the same ones.
    (A tuple of ints hashes the same in every process, unlike strings.)"""
    return hash((seed,) + key) & 0x7FFF_FFFF_FFFF_FFFF


def batch_generator(*key):
    return torch.Generator().manual_seed(stream_seed(*key))


def get_batch(split, generator):
    """batches.py's batch of arch's objective, on the device."""
    batch = batches.get(split, generator)
    if device_type == "cuda":  # pinned memory lets the copy overlap with compute
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ---- model ------------------------------------------------------------------
try:
    os.makedirs(out_dir, exist_ok=True)
except OSError as e:
    fail(f"cannot make out_dir={out_dir}: {e.strerror or e}")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
best_path = os.path.join(out_dir, "ckpt-best.pt")
log_path = os.path.join(out_dir, "log.jsonl")
run_path = os.path.join(out_dir, "run.json")


def kept_checkpoints():
    """The ckpt-ITER.pt files that keep_last keeps, newest first."""
    found = [(int(m.group(1)), path) for path in glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt"))
             if (m := re.fullmatch(r"ckpt-(\d+)\.pt", os.path.basename(path)))]
    return [path for _, path in sorted(found, reverse=True)]


def newest_readable_checkpoint():
    """(path, checkpoint) to resume from: ckpt.pt, else the newest kept one that loads, else the best
    (parallelism=fsdp: the newest complete ckpt-ITER/, else ckpt-best-ITER/; checkpoint without the
    weights and optimizer state, which load_sharded reads). Says what it skipped and why, and which
    one it picked."""
    problems = []
    if parallelism == "fsdp":
        paths, read = sharded_checkpoints(out_dir) + sharded_checkpoints(out_dir, best=True), load_sharded_state
    else:
        paths, read = [ckpt_path] + kept_checkpoints() + [best_path], load_checkpoint
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            found = read(path, device)
        except ValueError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            log(f"warning: {problem}: skipped")
        val = f", val loss {found['val_loss']:.4f}" if found.get("val_loss") is not None else ""
        log(f"resuming from {path} (iteration {found['iter_num']}{val})")
        return path, found
    if problems:
        others = f"; nor does any of the {len(problems) - 1} other checkpoints load" if problems[1:] else ""
        fail(problems[0] + others)
    if parallelism == "fsdp" and os.path.exists(ckpt_path):
        fail(f"{out_dir} holds no sharded checkpoint (ckpt-ITER/) but {ckpt_path}: resume it with parallelism=ddp")
    if parallelism == "ddp" and sharded_checkpoints(out_dir):
        fail(f"{out_dir} holds sharded checkpoints (ckpt-ITER/): resume them with parallelism=fsdp, or make "
             f"ckpt.pt of the newest with --consolidate={out_dir}")
    fail(f"no checkpoint at {ckpt_path} to resume: start the run with --init_from=scratch")


def keep_log_until(last_iter):
    """log.jsonl without the records of iterations after last_iter (a resumed run does them again)
    and without a line cut short by a kill. Returns the last iteration the log had (0 if none)."""
    if not os.path.exists(log_path):
        return 0
    kept, logged = [], 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("iter"), int):
                logged = max(logged, entry["iter"])
                if entry["iter"] <= last_iter:
                    kept.append(json.dumps(entry) + "\n")
    save_atomically(log_path, lambda f: f.write("".join(kept).encode()))
    return logged


def lora_settings():
    """The LoRA settings of this run ({rank, alpha, dropout, targets, base_weights, base, base_fingerprint}),
    or None for a run that trains every weight: a resumed LoRA run's own, whatever the settings say; a
    new one's from the settings, with the directory and fingerprint of the run it adapts."""
    if init_from == "resume":
        return checkpoint.get("lora")
    if not lora_rank:
        return None
    if lora_base_weights not in ("float", "int8", "nf4"):
        fail(f"lora_base_weights={lora_base_weights!r} is not one of float, int8, nf4")
    if init_from == "scratch":
        fail("lora_rank > 0 adapts a trained run: name it with --init_from=RUN")
    return {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_targets,
            "base_weights": lora_base_weights, "base": os.path.abspath(init_from),
            "base_fingerprint": fingerprint(checkpoint["model"])}


iter_num, best_val_loss, bad_steps = 0, float("inf"), 0
seconds_before = 0.0  # the run's seconds before this process: a resumed run's clock goes on from its checkpoint's
setup_seconds = 0.0  # of those and this process's, the first step's and first eval's (torch.compile's work)
sharded_resume = parallelism == "fsdp" and init_from == "resume"  # weights and optimizer state: load_sharded
if init_from == "scratch":
    existing = ([ckpt_path] if os.path.exists(ckpt_path) else []) + sharded_checkpoints(out_dir)
    if existing:
        fail(f"{existing[0]} exists: continue it with --init_from=resume, or choose another --out_dir")
    # round the vocabulary up to a multiple of 64: friendlier matrix shapes, unused rows are never targets
    model_args = {**config, "vocab_size": 64 * math.ceil(batches.tokenizer.vocab_size / 64),
                  "n_labels": batches.n_labels, "n_classes": batches.n_classes}
else:  # resume this run, or fine-tune another: its weights, shape and architecture
    if init_from != "resume" and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: fine-tune into another --out_dir, or continue it with --init_from=resume")
    if init_from == "resume":
        init_path, checkpoint = newest_readable_checkpoint()
        if "optimizer" not in checkpoint and not sharded_resume:
            fail(f"{init_path} has no training state to resume (a merged run?): fine-tune it with "
                 f"--init_from={out_dir} into another --out_dir")
    if checkpoint.get("tokenizer_fingerprint", batches.fingerprint) != batches.fingerprint:
        fail(f"{init_path} was trained with another tokenizer than the dataset {data_path} has; use a dataset "
             f"prepared with it (prepare.py --tokenizer_from={init_from if init_from != 'resume' else out_dir})")
    model_args = checkpoint["model_args"]  # the run's shape wins over settings
    if model_args.get("arch", "gpt") != arch:  # but not its objective: the batches above are arch's
        fail(f"{init_path} is a {model_args.get('arch', 'gpt')!r} model, not arch={arch!r}: use "
             f"--arch={model_args.get('arch', 'gpt')}")
    if init_from == "resume":
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        bad_steps, seconds_before = checkpoint.get("bad_steps", 0), checkpoint.get("seconds", 0.0)
        setup_seconds = checkpoint.get("setup_seconds", 0.0)
        if checkpoint["config"].get("optimizer", "adamw") != optimizer:  # its state would not fit
            fail(f"{init_path} was trained with optimizer={checkpoint['config'].get('optimizer', 'adamw')}, not "
                 f"{optimizer}: resume it with that one")
        sampler = checkpoint["sampler"]
        if any(sampler.get(k) != globals()[k] for k in ("seed", "batch_size", "gradient_accumulation_steps")):
            log("warning: seed, batch size or gradient accumulation differ from the checkpoint's; "
                "the batch stream will too")
    else:  # fine-tuning starts its own count, optimizer and schedule, and may change the dropout
        model_args = {**model_args, "dropout": dropout}
        if task == "classify" and not model_args.get("n_classes"):  # a language model gets a classification head
            model_args = {**model_args, "n_classes": batches.n_classes, "pool": pool}
        log(f"fine-tuning {init_path} (trained {checkpoint['iter_num']} iterations) on {data_path}"
            + "".join(f", {k}={v}" for k, v in inherited.items()) + (" as it was trained" if inherited else ""))
try:
    model_config = ModelConfig.from_settings(model_args)
    model_args = asdict(model_config)
    check_vocab(model_config.vocab_size, batches.tokenizer, init_path if checkpoint else data_path)
except (ValueError, TypeError) as e:
    fail(f"{init_path if checkpoint else 'settings'}: {e}")
if model_config.block_size < block_size:
    fail(f"block_size={block_size} is longer than the model's context ({model_config.block_size})")
if batches.n_labels and model_config.n_labels != batches.n_labels:
    fail(f"{init_path} knows {model_config.n_labels} labels but {data_path} has {batches.n_labels}")
if checkpoint and ((task == "classify") != bool(model_config.n_classes)
                   or model_config.n_classes != batches.n_classes):
    fail(f"{init_path} is a classifier of {model_config.n_classes} classes, and {data_path} has "
         f"{batches.n_classes} with task={task}: a classifier trains with --task=classify on a dataset of its classes"
         if model_config.n_classes else f"{init_path} has no classification head: fine-tune it with --task=classify")
torch.manual_seed(seed)
model = build_model(model_config)
lora = lora_settings()  # a LoRA run's adapters: their settings and the base they belong to; else None
if checkpoint and not sharded_resume:
    try:
        weights = load_lora_base(lora, "cpu", init_path)["model"] if lora and init_from == "resume" \
            else checkpoint["model"]
        if model_config.n_classes:  # the run's own head (a LoRA run keeps it with its adapters), else a new one
            weights = {**classifier_state(model.state_dict()), **weights, **classifier_state(checkpoint["model"])}
        model.load_state_dict(weights)
    except RuntimeError as e:
        fail(f"{init_path}: its weights do not fit its model_args ({str(e).splitlines()[0]})")
    except ValueError as e:
        fail(str(e))
model.to(device)
if lora:
    base_params = sum(p.numel() for p in model.parameters())
    try:
        trainable = attach_lora(model, lora, checkpoint["model"] if init_from == "resume" else None, init_path)
    except ValueError as e:
        fail(str(e))
    log(f"LoRA: {trainable:,} trainable parameters, {100 * trainable / base_params:.2f}% of the base's "
        f"{base_params:,} ({', '.join(f'{k} {v}' for k, v in lora.items() if k != 'base_fingerprint')})")
log(f"model: {model.num_params() / 1e6:.2f}M parameters, {json.dumps(model_args)}")
log(f"device {device}, dtype {str(ptdtype).removeprefix('torch.')}, compile {compiled}, "
    f"{world_size} process(es), {tokens_per_iter:,} tokens per iteration, {parallelism}")
if parallelism == "fsdp" and world_size == 1:
    log("parallelism=fsdp on 1 process: nothing is sharded, but checkpoints are read and written sharded "
        "(a run of several processes goes on here, or this one on several)")

try:
    model.set_training_options(grad_checkpoint, label_smoothing)
except ValueError as e:
    fail(str(e))
if parallelism == "fsdp":  # before the optimizer is made: it steps the shards
    shard(model)
# the setting's name, now the optimizer itself (checkpoints keep the setting in their config)
optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer, momentum)
if sharded_resume:
    load_sharded(init_path, model, optimizer)
elif checkpoint and init_from == "resume":
    try:  # (a Muon run saved before Muon cut fused matrices into blocks holds one group where there are now several)
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        fail(f"{init_path}: its optimizer state does not fit this code's {type(optimizer).__name__} ({e}); "
             f"fine-tune its weights with --init_from={out_dir} into another --out_dir instead")
# fp16 has too little range for small gradients: scale the loss up, unscale before the step
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
if checkpoint and init_from == "resume" and checkpoint.get("scaler") and scaler.is_enabled():
    scaler.load_state_dict(checkpoint["scaler"])  # (a bf16 or fp32 run saved a disabled scaler's {}: start afresh)
checkpoint = None  # free the memory

# ---- teacher=RUN: distillation --------------------------------------------------
teacher_model = None
if teacher:
    try:
        teacher_model, _, teacher_ckpt = load_run(teacher, device)
    except ValueError as e:
        fail(f"teacher={teacher}: {e}")
    if teacher_ckpt.get("tokenizer_fingerprint") != batches.fingerprint:
        fail(f"teacher={teacher} was trained with another tokenizer than the dataset {data_path} has: a teacher "
             "and its student must share one tokenizer")
    if (teacher_model.config.arch, teacher_model.config.vocab_size) != (model_config.arch, model_config.vocab_size):
        fail(f"teacher={teacher} is a {teacher_model.config.arch!r} model of {teacher_model.config.vocab_size} "
             f"vocabulary rows; the student is a {model_config.arch!r} model of {model_config.vocab_size}: "
             "they must match")
    if teacher_model.config.block_size < block_size:
        fail(f"teacher={teacher} reads at most {teacher_model.config.block_size} tokens, less than "
             f"block_size={block_size}")
    teacher_model.requires_grad_(False)  # in eval mode (load_run's), and only ever run under no_grad
    log(f"distilling {teacher} ({teacher_model.num_params() / 1e6:.2f}M parameters): weight {distill_weight}, "
        f"temperature {distill_temperature}")


def distilled(loss, logits, batch):
    """The student's loss (data loss, logits) on batch, mixed with the teacher's: (1 - w) x data loss +
    w x T^2 x KL(teacher || student) at temperature T (T^2 keeps the gradient's scale as T changes)."""
    with torch.no_grad():
        teacher_logits, _ = teacher_model(**batch)
    kl = distillation_kl(logits, teacher_logits, batch["targets"], batches.tokenizer.vocab_size, distill_temperature)
    return (1 - distill_weight) * loss + distill_weight * distill_temperature ** 2 * kl

raw_model = model
if task == "classify":  # forward() is the classification head's
    model = Classify(model)
if compiled:
    model = torch.compile(model)
eval_model = model  # eval reads through the model without DDP: DDP's forward is a collective (it broadcasts
# buffers) that every process must join, and with eval_iters < world size some have no eval batch
if ddp and parallelism == "ddp":  # the buffers are fixed tables (rope, sinusoid, alibi): nothing to broadcast
    # torch 2.13 names this forward_sync_buffers (and deprecates broadcast_buffers); older torch, such
    # as a GPU image's, has only broadcast_buffers
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, **{no_sync: False})

if master:
    ours = {"ckpt.pt", "ckpt-best.pt", "log.jsonl", "meta.json", "run.json", *batches.meta["tokenizer"]["files"]}
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):  # left by a run killed while writing
        name = os.path.basename(tmp).removesuffix(".tmp")
        if name in ours or re.fullmatch(r"ckpt-\d+\.pt", name):
            os.remove(tmp)
        elif os.path.isdir(tmp) and SHARDED_NAME.fullmatch(name.removesuffix(".old")):  # a sharded one
            shutil.rmtree(tmp)
    # a full disk or a read-only out_dir shows now, not at the first checkpoint: room for one more
    # (weights and AdamW's two moments, fp32)
    try:
        saved = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        probe_disk(os.path.join(out_dir, ".probe"), 12 * saved)
    except OSError as e:
        fail(f"cannot write in out_dir={out_dir} ({e.strerror or e}); a checkpoint needs about "
             f"{12 * saved / 1e6:,.0f} MB there")
    logged_until = keep_log_until(iter_num) if init_from == "resume" else 0
    for name in batches.meta["tokenizer"]["files"] + ["meta.json"]:  # the run directory is usable without data/
        with open(os.path.join(data_path, name), "rb") as src:
            content = src.read()
        save_atomically(os.path.join(out_dir, name), lambda f: f.write(content))

# ---- seeing the run: run.json (what report.md needs beyond the log) and the optional sinks ----
tb_writer = wandb_run = None
if master:
    previous = {}
    if init_from == "resume" and os.path.exists(run_path):
        try:
            with open(run_path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    run_info = {
        "started": previous.get("started", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        "changed": {k: v for k, v in config.items() if v != defaults[k]},
        "parameters": raw_model.num_params(), "parameters_with_embeddings": raw_model.num_params(non_embedding=False),
        "model_args": model_args, "tokens_per_iter": tokens_per_iter, "world_size": world_size, "device": device,
        "dtype": str(ptdtype).removeprefix("torch."), "compile": compiled, "machine": machine(device),
        "torch": torch.__version__, "python": platform.python_version(),
        "wandb_id": previous.get("wandb_id") or uuid.uuid4().hex[:8],
    }
    save_atomically(run_path, lambda f: f.write(json.dumps(run_info, indent=2).encode()))
    if tensorboard:
        # purge_step: TensorBoard drops what a killed run logged after the checkpoint this one resumes
        # from, so the resumed curve continues the old one instead of doubling back over it
        tb_writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=iter_num + 1 if iter_num else 0)
    if wandb:
        try:  # the same W&B run after a resume: its id is kept in run.json
            wandb_run = wandb_lib.init(project=wandb_project, id=run_info["wandb_id"], resume="allow", dir=out_dir,
                                       name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)), config=config)
        except Exception as e:  # no login, no network, a bad project name: W&B's own words
            fail(f"wandb.init failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
                 "(WANDB_MODE=offline logs without an account)")
        # W&B's steps only grow: what the run logged before it was killed, W&B has (the resumed run
        # computes the same numbers again), so records go there from the first iteration past it
        wandb_from = max(logged_until + 1, wandb_run.step)


def record(entry):
    """One line of log.jsonl, the source of truth, and its numbers to TensorBoard and W&B when they are on."""
    append_jsonl(log_path, entry)
    group = "eval" if "val_loss" in entry else "train"
    numbers = {f"{group}/{k}": v for k, v in entry.items()
               if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if tb_writer:
        for name, value in numbers.items():
            tb_writer.add_scalar(name, value, entry["iter"])
    if wandb_run and entry["iter"] >= wandb_from:
        wandb_run.log(numbers, step=entry["iter"])


ctx = autocast(device, ptdtype)
predicts_next_token = model_config.arch in ("gpt", "conditional", "lstm") and task == "lm"
target_bytes = None  # bits per byte: the UTF-8 bytes of each id, 0 for special tokens (they are not counted)
if predicts_next_token and batches.tokenizer.kind != "wordpiece":  # a wordpiece's text depends on its neighbours
    target_bytes = torch.tensor([len(piece or b"") for piece in token_bytes(batches.tokenizer)[0]], device=device)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split, the same batches at every eval and for any
    number of processes (they share them out), the share of val targets the model's top
    guess gets right (for the encoder: masked tokens), and (next-token models) val bits per
    byte: the nats of the val targets that are text over their own UTF-8 bytes."""
    eval_model.eval()
    sums = torch.zeros(2, device=device)
    hits = torch.zeros(2, device=device)  # right guesses, targets
    nats_bytes = torch.zeros(2, device=device)  # nats of the val targets that carry bytes, their bytes
    # under FSDP each forward gathers weights from every process: all take the same number of batches
    rounds = -(-eval_iters // world_size) * world_size if parallelism == "fsdp" else eval_iters
    for s, split in enumerate(("train", "val")):
        for k in range(rank, rounds, world_size):
            batch = get_batch(split, batch_generator(EVAL_BATCHES, s, k % eval_iters))
            with ctx:
                logits, loss = eval_model(**batch)
            if k >= eval_iters:  # a batch past eval_iters, taken only to join the others' gathers
                continue
            sums[s] += loss  # stays on the device: no wait for it batch by batch
            if split == "val":
                counted = batch["targets"] != -1
                hits += torch.stack([((logits.argmax(dim=-1) == batch["targets"]) & counted).sum(), counted.sum()])
                if target_bytes is not None:
                    nbytes = torch.where(counted, target_bytes[batch["targets"].clamp(min=0)], 0).flatten().float()
                    # log_softmax, not cross_entropy: tests/inject.py counts the loss's calls to find an iteration
                    nats = -logits.float().log_softmax(dim=-1).gather(-1, batch["targets"].clamp(min=0)[..., None])
                    nats = nats.flatten()
                    nats_bytes += torch.stack([(nats * (nbytes > 0)).sum(), nbytes.sum()])
    if ddp:
        dist.all_reduce(sums)
        dist.all_reduce(hits)
        dist.all_reduce(nats_bytes)
    eval_model.train()
    train_loss, val_loss = (sums / eval_iters).tolist()
    nats, nbytes = nats_bytes.tolist()
    return {"train": train_loss, "val": val_loss, "accuracy": (hits[0] / hits[1]).item(),
            "bpb": nats / nbytes / math.log(2) if nbytes else None}


def get_lr(it, seconds=0.0):
    """lr_schedule's learning rate at iteration it, seconds into the run, after the linear warmup.
    With max_seconds the schedule runs on whichever is further along, the iterations or the share
    of the time budget used (that share of lr_decay_iters), so a run the clock stops has still
    warmed up and decayed in full. The share leaves out setup_seconds: the first step and eval
    of each process are mostly compiling, and counted in they would use up the warmup unseen."""
    if max_seconds > 0:
        share = (seconds - setup_seconds) / max(1e-9, max_seconds - setup_seconds)
        it = max(it, share * lr_decay_iters)
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == "constant":
        return learning_rate
    if it > lr_decay_iters:
        return min_lr
    decay_start = lr_decay_iters - wsd_decay_iters if lr_schedule == "wsd" else warmup_iters
    if it < decay_start:  # wsd's stable part
        return learning_rate
    ratio = (it - decay_start) / max(1, lr_decay_iters - decay_start)
    if lr_schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
    return learning_rate - ratio * (learning_rate - min_lr)  # linear, and wsd's decay


def train_window(it):
    """The training window at iteration it (not model.window_length, which is generation's):
    block_size_schedule's growth from block_size_start to block_size, in steps of
    block_size_start; a function of the iteration alone, so a resumed run trains on the windows
    the uninterrupted one would have."""
    if it >= block_size_schedule:
        return block_size
    grown = block_size_start + (block_size - block_size_start) * it / block_size_schedule
    return int(grown // block_size_start) * block_size_start


last_checkpoint = ckpt_path  # where the newest checkpoint of this process is (FSDP: ckpt-ITER/)


def save(iter_num, val_loss=None):
    """ckpt.pt, written atomically; with keep_last > 1 also under its own name ckpt-ITER.pt (a hard
    link: the same bytes on disk), the oldest beyond keep_last dropped; and ckpt-best.pt when val_loss
    is the best yet. A failed write stops the run and leaves every checkpoint already there as it was.
    Called in every process: only the first writes, but under FSDP each writes its shard (save_sharded)."""
    state = {
        "lora": lora,
        "scaler": scaler.state_dict(),
        "model_args": model_args,
        "iter_num": iter_num,
        "val_loss": val_loss,
        "best_val_loss": best_val_loss,
        "bad_steps": bad_steps,
        "seconds": time.time() - t_start,  # the time budget used (max_seconds), and where its schedule is
        "setup_seconds": setup_seconds,
        "config": config,
        "tokenizer_fingerprint": batches.fingerprint,  # sample.py and resume check the tokenizer is this one
        "sampler": {"seed": seed, "batch_size": batch_size, "block_size": block_size,
                    "gradient_accumulation_steps": gradient_accumulation_steps},
    }
    if parallelism == "fsdp":
        return save_sharded(state, iter_num, val_loss)
    if not master:
        return
    try:
        save_checkpoint({"model": adapter_state(raw_model) if lora else raw_model.state_dict(),
                         "optimizer": optimizer.state_dict(), **state}, ckpt_path)
        if keep_last > 1:
            link_atomically(ckpt_path, os.path.join(out_dir, f"ckpt-{iter_num:08d}.pt"))
            for old in kept_checkpoints()[keep_last:]:
                os.remove(old)
        if val_loss is not None and val_loss <= best_val_loss:
            link_atomically(ckpt_path, best_path)
    except OSError as e:
        fail(f"cannot write the checkpoint of iteration {iter_num} in {out_dir} ({e.strerror or e}); the "
             "checkpoints already there are as they were: make room, then go on with --init_from=resume")


def evaluate(iter_num, elapsed):
    global best_val_loss, setup_seconds, evaluated, clock
    t0 = time.time()
    losses = estimate_loss()
    if not evaluated and iter_num < max_iters:  # the first eval compiles the eval graph: not the schedule's time
        took = torch.tensor(time.time() - t0, dtype=torch.float64)
        if ddp:  # every process leaves out the same seconds, so they keep one learning rate
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
        setup_seconds += took.item()
        clock += took.item()  # and the next step's clock has them: its rate goes on from this step's
    evaluated = True
    best_val_loss = min(best_val_loss, losses["val"])
    entry = {"iter": iter_num, "loss": losses["train"], "val_loss": losses["val"],
             "val_accuracy": losses["accuracy"], "lr": get_lr(iter_num, clock), "elapsed_s": round(elapsed, 3)}
    line = f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    if losses["bpb"] is not None:  # next-token models, whose tokens each spell their own bytes
        entry["val_bpb"] = losses["bpb"]
        line += f", val bpb {entry['val_bpb']:.4f}"
    if master:
        log(f"{line}, val accuracy {losses['accuracy']:.3f}")
        record(entry)
    if not eval_only:
        save(iter_num, losses["val"])


# ---- stopping on request ------------------------------------------------------
stop_signal = None  # SIGTERM (pre-emption) or SIGINT (Ctrl-C): checkpoint at the end of the step, then stop


def on_stop_signal(signum, frame):
    global stop_signal
    name = signal.Signals(signum).name
    if stop_signal is not None:  # asked twice: go now, and leave the checkpoints as they are
        print(f"{name} again: stopping at once, without a checkpoint (the last one is in {out_dir})",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    stop_signal = name
    log(f"{name}: stopping after this step with a checkpoint ({name} again to stop at once)")


signal.signal(signal.SIGTERM, on_stop_signal)
signal.signal(signal.SIGINT, on_stop_signal)


def train_step(iter_num):
    """grad_accum micro-steps, then the optimizer's step. Returns the step's loss, balance loss,
    gradient norm before clipping and fault (device tensors; fault: 2 = the loss, 1 = the gradient
    norm is not finite, 0 = a good step), the run's seconds (the same in every process: the
    schedule follows them) and whether every process stops (a signal, the end of max_seconds). A
    faulty step is skipped on the device (the fused optimizer's found_inf), so a step waits for the
    device only with DDP, where the processes must agree on stopping: one wait per step at most
    (the rest at log_interval)."""
    step_loss = torch.zeros((), device=device)
    step_balance = torch.zeros((), device=device)
    window = train_window(iter_num)
    for micro_step in range(grad_accum):
        place = rank * grad_accum + micro_step  # this micro-batch's place in the global batch
        torch.manual_seed(stream_seed(DROPOUT, iter_num, place))
        batch = get_batch("train", batch_generator(TRAIN_BATCHES, iter_num, place))
        if window < block_size:  # the first columns of the full-length draw
            batch = {k: v[:, :window] if v.dim() == 2 else v for k, v in batch.items()}
        # average gradients across processes only once, after the last micro-step
        with gradient_sync(micro_step == grad_accum - 1), ctx:
            logits, loss = model(**batch)
            if teacher_model is not None:
                loss = distilled(loss, logits, batch)
            loss = loss / grad_accum
        scaler.scale(loss).backward()
        step_loss += loss.detach()
        if n_expert:
            step_balance += raw_model.balance_loss().detach() / grad_accum
    scaler.unscale_(optimizer)  # (fp16 only) the norm and the clip need the true gradients
    if grad_clip > 0:
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    else:
        grad_norm = whole(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    fault = 2 * (~torch.isfinite(step_loss)).float() + (~torch.isfinite(grad_norm)).float()
    stopping, seconds = stop_signal is not None, time.time() - t_start
    if ddp:  # every process skips the same steps, sets the same learning rate and stops at the same step
        host = torch.tensor([stopping, seconds], dtype=torch.float64)
        host = host.pin_memory().to(device, non_blocking=True) if device_type == "cuda" else host  # no wait
        flags = torch.cat((fault[None].double(), host))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        fault = flags[0].float()
        stopping, seconds = flags[1:].tolist()
        stopping = bool(stopping)
    out_of_time = 0 < max_seconds <= seconds
    if optimizer.param_groups[0].get("fused"):  # the kernel leaves weights, moments and step count as they
        optimizer.grad_scale = None  # were where found_inf is 1 (on the weights' device: offload=params, the CPU)
        optimizer.found_inf = (fault > 0).float().to("cpu" if offload == "params" else device)
        optimizer.step()
    elif not fault.item():  # no fused kernel (SGD, Lion, Muon; MPS's foreach): ask the device
        optimizer.step()
    scaler.update()  # (fp16) an overflow, found by unscale_ above, shrinks the loss scale
    optimizer.zero_grad(set_to_none=True)
    return step_loss, step_balance, grad_norm.detach(), fault, seconds, stopping, out_of_time


# ---- the training loop ------------------------------------------------------
start_iter = iter_num
t_begin = t_log = time.time()
t_start = t_begin - seconds_before
clock = seconds_before  # the run's seconds at the last step, agreed by the processes
tokens_since_log = 0
loss_sum = torch.zeros((), device=device)
balance_sum = torch.zeros((), device=device)
norm_sum = torch.zeros((), device=device)
good_steps = torch.zeros((), device=device)
pending = []  # (iteration, lr, elapsed, fault tensor) of the steps whose faults are not read yet
stopping = out_of_time = evaluated = False


def settle_faults():
    """Read the pending steps' faults (one wait for the device), log the skipped steps, count the
    bad steps in a row, and stop the run at max_bad_steps of them."""
    global bad_steps
    if not pending:
        return
    faults = torch.stack([fault for *_, fault in pending]).tolist()
    for (it, lr, elapsed, _), fault in zip(pending, faults):
        if not fault:
            bad_steps = 0
            continue
        what = "loss" if fault >= 2 else "gradient norm"
        bad_steps += 1
        log(f"iter {it}: skipped, the {what} is not finite ({bad_steps} in a row)")
        if master:
            record({"iter": it, "skipped": f"non-finite {what}", "lr": lr, "elapsed_s": elapsed})
        if bad_steps >= max_bad_steps:
            fail(f"{bad_steps} steps in a row had a non-finite {what} (iterations {it - bad_steps + 1}-{it}): "
                 f"stopped with the last good checkpoint in {out_dir} as it was; lower the learning_rate or "
                 "check the data, then go on with --init_from=resume")
    pending.clear()


try:
    while True:
        last = iter_num >= max_iters or out_of_time
        if (iter_num % eval_interval == 0 and iter_num > start_iter and not stopping) or last or eval_only:
            settle_faults()  # the checkpoint counts the bad steps in a row
            evaluate(iter_num, time.time() - t_start)
        if last or eval_only:
            break
        if stopping:  # no eval first: pre-emption gives seconds, not minutes
            save(iter_num)
            log(f"stopped by {stop_signal or 'another process'} at iteration {iter_num}: checkpoint {last_checkpoint}; "
                "go on with --init_from=resume")
            break

        lr = get_lr(iter_num, clock)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_balance, grad_norm, fault, clock_after, stopping, out_of_time = train_step(iter_num)
        if iter_num == start_iter:  # the first step compiles: the schedule's clock starts after it
            setup_seconds += clock_after - clock
        clock = clock_after
        iter_num += 1
        tokens_since_log += tokens_per_iter * train_window(iter_num - 1) // block_size
        pending.append((iter_num, lr, round(time.time() - t_start, 3), fault))
        good = fault == 0  # a skipped step's loss is not in the mean (it is not finite)
        loss_sum += torch.where(good, step_loss, 0.0)
        balance_sum += torch.where(good, step_balance, 0.0)
        norm_sum += torch.where(good, grad_norm, 0.0)
        good_steps += good.float()

        if iter_num % log_interval == 0 or stopping or out_of_time or iter_num >= max_iters:
            settle_faults()
        if iter_num % log_interval == 0:
            sums = torch.stack([loss_sum, balance_sum, norm_sum, good_steps])  # the same norm in every process
            if ddp:
                dist.all_reduce(sums)
            loss_total, balance_total, norm_total, good_total = sums.tolist()  # waits for the device: only here
        if iter_num % log_interval == 0 and good_total:
            loss_value, balance, norm = loss_total / good_total, balance_total / good_total, norm_total / good_total
            dt = time.time() - t_log
            tok_per_s = tokens_since_log / dt
            # MFU per device: of its peak in the dtype in use (None: a GPU without a known peak)
            mfu = mfu_of(raw_model.flops_per_token() * tok_per_s / world_size, device_type, ptdtype)
            entry = {"iter": iter_num, "loss": loss_value, "lr": lr, "grad_norm": round(norm, 4),
                     "tok_per_s": round(tok_per_s, 1), "mfu": None if mfu is None else round(mfu, 4),
                     "peak_mem_mb": round(peak_memory_mb(device), 1), "elapsed_s": round(time.time() - t_start, 3)}
            line = (f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {norm:.3f}, "
                    f"{tok_per_s:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
            if block_size_schedule:  # the window of the last step
                entry["block_size"] = train_window(iter_num - 1)
            if n_expert:  # 1.0 = tokens spread evenly over the experts
                entry["balance_loss"] = balance
                line += f", balance loss {balance:.3f}"
            if master:
                log(line)
                record(entry)
            t_log, tokens_since_log = time.time(), 0
            loss_sum.zero_()
            balance_sum.zero_()
            norm_sum.zero_()
            good_steps.zero_()
except RuntimeError as e:  # with DDP: a collective failed, as another process died or hung past ddp_timeout
    if not (ddp and (isinstance(e, dist.DistError) or re.search(r"gloo|NCCL|[Cc]onnection|[Tt]imed? ?out", str(e)))):
        raise
    reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0][:160]  # gloo: [file:line] what
    fail(f"process {rank} of {world_size} lost the others ({reason}): one died or did not "
         f"answer within ddp_timeout={ddp_timeout}s; go on from the last checkpoint in {out_dir} with "
         "--init_from=resume")

if master:
    log(f"done: {iter_num} iterations in {time.time() - t_begin:.1f}s, best val loss {best_val_loss:.4f}, "
        f"checkpoint {last_checkpoint}")
    if tb_writer:
        tb_writer.close()
    if wandb_run:
        wandb_run.finish()
    if report and not eval_only:  # plot.py is a script of its own: run it, as prepare.py is run above
        done = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py"),
                               "--report", out_dir])
        if done.returncode:
            log(f"warning: the report of {out_dir} failed (see above); the run itself is complete")
if ddp:
    dist.barrier()  # wait for rank 0's last checkpoint: a process group torn down early aborts its peers
    # and no destroy_process_group(): with gloo (torch 2.13) it aborted a rank ("terminate called without
    # an active exception") in 2 of ~20 test runs, none in 15 without it; exiting closes the group
