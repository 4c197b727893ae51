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
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 2000        # evaluate and checkpoint every this many iterations
log_interval = 1
eval_iters = 200            # batches per val estimate
eval_only = False           # evaluate once and exit
init_from = "scratch"       # scratch | resume (out_dir's newest readable checkpoint) | a run's directory: fine-tune it
keep_last = 1               # checkpoints kept: ckpt.pt is always the newest; > 1 also keeps the last N as ckpt-ITER.pt
# data
data_dir = "data"
dataset = "legal"           # data_dir/dataset/ from prepare.py; "legal": the built-in ~1.2M tokens, prepared on demand
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, summed over all processes
batch_size = 12             # sequences per micro-step per process, block_size tokens each (a model setting)
# model: every field of model.ModelConfig but the two the dataset decides (vocab_size, n_labels)
from model import ModelConfig  # noqa: E402
globals().update({f.name: f.default for f in fields(ModelConfig) if f.name not in ("vocab_size", "n_labels")})
# objectives of the encoder (masked-language modelling) and encdec (span corruption)
mask_prob = 0.15            # share of tokens masked (encoder: 80% <|mask|>, 10% random, 10% kept) or cut out (encdec)
span_length = 3             # encdec: tokens per cut-out span
# optimizer: AdamW
learning_rate = 6e-4
max_iters = 600000
max_seconds = 0.0           # > 0: stop after this much wall time, then a last eval and checkpoint
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # 0 = off
# learning rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# system
device = "auto"             # auto | cpu | cuda | cuda:N | mps
dtype = "auto"              # auto | float32 | bfloat16 | float16
compile = True              # torch.compile the model
seed = 1337
max_bad_steps = 20          # a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run
ddp_timeout = 600           # seconds a process waits for the others (a dead or hung rank) before it gives up
# fine-tuning (init_from=RUN): low-rank adapters (LoRA), on a quantized frozen base (QLoRA); distillation
lora_rank = 0               # > 0: train adapters of this rank on the frozen init_from run instead of its weights
lora_alpha = 16.0           # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0          # dropout on the adapters' input
lora_targets = "q,v"        # layers to adapt: q, k, v, gate, up, or Linear names and globs (see finetune.py)
lora_base_weights = "float"  # the frozen base under the adapters: float | int8 | nf4 (QLoRA; nf4 needs torchao)
merge_lora = ""             # a LoRA run's directory: write it, adapters folded into the weights, to out_dir; then exit
teacher = ""                # a run's directory: distill it into this model (the same tokenizer and vocabulary)
distill_weight = 0.5        # loss = (1 - distill_weight) x data loss + distill_weight x T^2 x KL(teacher || student)
distill_temperature = 1.0   # T: both softmaxes of the KL term are taken at it
# -----------------------------------------------------------------------------
from configurator import check_ranges, configure, fail  # noqa: E402  (settings above come first, as in nanoGPT)
given = set()  # the settings the config file and command line set: a run fine-tuned from does not override them
config = configure(globals(), given=given)
check_ranges(globals(), {
    "eval_interval": ">= 1", "log_interval": ">= 1", "eval_iters": ">= 1", "keep_last": ">= 1",
    "gradient_accumulation_steps": ">= 1", "batch_size": ">= 1", "block_size": ">= 1", "dropout": "[0, 1)",
    "mask_prob": "(0, 1)", "span_length": ">= 1", "learning_rate": "> 0", "min_lr": ">= 0",
    "max_iters": ">= 0", "max_seconds": ">= 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)",
    "grad_clip": ">= 0", "warmup_iters": ">= 0", "lr_decay_iters": ">= 0", "max_bad_steps": ">= 1",
    "ddp_timeout": "> 0", "lora_rank": ">= 0", "lora_alpha": "> 0", "lora_dropout": "[0, 1)",
    "distill_weight": "[0, 1]", "distill_temperature": "> 0"})

from batches import Batches  # noqa: E402
from engine import token_bytes  # noqa: E402
from model import build_model  # noqa: E402
from finetune import adapter_state, distillation_kl, fingerprint, merge_adapters  # noqa: E402
from runtime import (append_jsonl, attach_lora, autocast, check_vocab, dequantize, keep_freed_memory,  # noqa: E402
                     link_atomically, load_checkpoint, load_lora_base, load_run, peak_flops, pick_device, pick_dtype,
                     probe_disk, save_atomically, save_checkpoint)


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

# ---- init_from=RUN: the run to fine-tune, and the settings it passes on -------------------
# Its shape always; and, unless the config file or command line set them, the training settings
# that still apply to the same model on the same machine: how its batches are cut, how it computes.
INHERITED = ("arch", "block_size", "batch_size", "gradient_accumulation_steps", "mask_prob", "span_length",
             "dtype", "compile")
checkpoint = None
if init_from not in ("scratch", "resume"):
    init_path = os.path.join(init_from, "ckpt.pt")
    if not os.path.isdir(init_from):
        fail(f"init_from={init_from!r} is not scratch, resume, or the directory of a run to fine-tune")
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
except ValueError as e:
    fail(str(e))
if ddp:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:  # the processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    # a collective that waits longer than ddp_timeout for a dead or hung rank fails instead of hanging
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=ddp_timeout))

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
if device_type == "cpu":
    keep_freed_memory()


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
    batches = Batches(data_path, arch, block_size, batch_size, mask_prob, span_length)
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


def kept_checkpoints():
    """The ckpt-ITER.pt files that keep_last keeps, newest first."""
    found = [(int(m.group(1)), path) for path in glob.glob(os.path.join(glob.escape(out_dir), "ckpt-*.pt"))
             if (m := re.fullmatch(r"ckpt-(\d+)\.pt", os.path.basename(path)))]
    return [path for _, path in sorted(found, reverse=True)]


def newest_readable_checkpoint():
    """(path, checkpoint) to resume from: ckpt.pt, else the newest kept one that loads, else the best.
    Says what it skipped and why, and which one it picked."""
    problems = []
    for path in [ckpt_path] + kept_checkpoints() + [best_path]:
        if not os.path.exists(path):
            continue
        try:
            found = load_checkpoint(path, device)
        except ValueError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            log(f"warning: {problem}: skipped")
        val = f", val loss {found['val_loss']:.4f}" if found.get("val_loss") is not None else ""
        log(f"resuming from {path} (iteration {found['iter_num']}{val})")
        return path, found
    if problems:
        fail(problems[0] + (f"; nor does any of the {len(problems) - 1} other checkpoints load" if problems[1:] else ""))
    fail(f"no checkpoint at {ckpt_path} to resume: start the run with --init_from=scratch")


def keep_log_until(last_iter):
    """log.jsonl without the records of iterations after last_iter (a resumed run does them again)
    and without a line cut short by a kill."""
    if not os.path.exists(log_path):
        return
    kept = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iter"), int) and record["iter"] <= last_iter:
                kept.append(json.dumps(record) + "\n")
    save_atomically(log_path, lambda f: f.write("".join(kept).encode()))


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
if init_from == "scratch":
    if os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: continue it with --init_from=resume, or choose another --out_dir")
    # round the vocabulary up to a multiple of 64: friendlier matrix shapes, unused rows are never targets
    model_args = {**config, "vocab_size": 64 * math.ceil(batches.tokenizer.vocab_size / 64),
                  "n_labels": batches.n_labels}
else:  # resume this run, or fine-tune another: its weights, shape and architecture
    if init_from != "resume" and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: fine-tune into another --out_dir, or continue it with --init_from=resume")
    if init_from == "resume":
        init_path, checkpoint = newest_readable_checkpoint()
        if "optimizer" not in checkpoint:
            fail(f"{init_path} has no training state to resume (a merged run?): fine-tune it with "
                 f"--init_from={out_dir} into another --out_dir")
    if checkpoint.get("tokenizer_fingerprint", batches.fingerprint) != batches.fingerprint:
        fail(f"{init_path} was trained with another tokenizer than the dataset {data_path} has; use a dataset "
             f"prepared with it (prepare.py --tokenizer_from={os.path.dirname(init_path) or '.'})")
    model_args = checkpoint["model_args"]  # the run's shape wins over settings
    if model_args.get("arch", "gpt") != arch:  # but not its objective: the batches above are arch's
        fail(f"{init_path} is a {model_args.get('arch', 'gpt')!r} model, not arch={arch!r}: use "
             f"--arch={model_args.get('arch', 'gpt')}")
    if init_from == "resume":
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        bad_steps = checkpoint.get("bad_steps", 0)
        sampler = checkpoint["sampler"]
        if any(sampler.get(k) != globals()[k] for k in ("seed", "batch_size", "gradient_accumulation_steps")):
            log("warning: seed, batch size or gradient accumulation differ from the checkpoint's; "
                "the batch stream will too")
    else:  # fine-tuning starts its own count, optimizer and schedule, and may change the dropout
        model_args = {**model_args, "dropout": dropout}
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
torch.manual_seed(seed)
model = build_model(model_config)
lora = lora_settings()  # a LoRA run's adapters: their settings and the base they belong to; else None
if checkpoint:
    try:
        model.load_state_dict(load_lora_base(lora, "cpu", init_path)["model"] if lora and init_from == "resume"
                              else checkpoint["model"])
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
log(f"device {device}, dtype {str(ptdtype).removeprefix('torch.')}, compile {compile}, "
    f"{world_size} process(es), {tokens_per_iter:,} tokens per iteration")

optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint and init_from == "resume":
    optimizer.load_state_dict(checkpoint["optimizer"])
# fp16 has too little range for small gradients: scale the loss up, unscale before the step
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
if checkpoint and init_from == "resume" and "scaler" in checkpoint:
    scaler.load_state_dict(checkpoint["scaler"])
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
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

if master:
    ours = {"ckpt.pt", "ckpt-best.pt", "log.jsonl", "meta.json", *batches.meta["tokenizer"]["files"]}
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):  # left by a run killed while writing
        name = os.path.basename(tmp).removesuffix(".tmp")
        if name in ours or re.fullmatch(r"ckpt-\d+\.pt", name):
            os.remove(tmp)
    # a full disk or a read-only out_dir shows now, not at the first checkpoint: room for one more
    # (weights and AdamW's two moments, fp32)
    try:
        saved = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        probe_disk(os.path.join(out_dir, ".probe"), 12 * saved)
    except OSError as e:
        fail(f"cannot write in out_dir={out_dir} ({e.strerror or e}); a checkpoint needs about "
             f"{12 * saved / 1e6:,.0f} MB there")
    if init_from == "resume":
        keep_log_until(iter_num)
    for name in batches.meta["tokenizer"]["files"] + ["meta.json"]:  # the run directory is usable without data/
        with open(os.path.join(data_path, name), "rb") as src:
            content = src.read()
        save_atomically(os.path.join(out_dir, name), lambda f: f.write(content))
ctx = autocast(device, ptdtype)
predicts_next_token = model_config.arch in ("gpt", "conditional", "lstm")
flops_peak = peak_flops(device_type, ptdtype) * world_size
target_bytes = None  # bits per byte: the UTF-8 bytes of each id, 0 for special tokens (they are not counted)
if predicts_next_token and batches.tokenizer.kind != "wordpiece":  # a wordpiece's text depends on its neighbours
    target_bytes = torch.tensor([len(piece or b"") for piece in token_bytes(batches.tokenizer)[0]], device=device)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split, the same batches at every eval and for any
    number of processes (they share them out), the share of val targets the model's top
    guess gets right (for the encoder: masked tokens), and (next-token models) val bits per
    byte: the nats of the val targets that are text over their own UTF-8 bytes."""
    model.eval()
    sums = torch.zeros(2, device=device)
    hits = torch.zeros(2, device=device)  # right guesses, targets
    nats_bytes = torch.zeros(2, device=device)  # nats of the val targets that carry bytes, their bytes
    for s, split in enumerate(("train", "val")):
        for k in range(rank, eval_iters, world_size):
            batch = get_batch(split, batch_generator(EVAL_BATCHES, s, k))
            with ctx:
                logits, loss = model(**batch)
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
    model.train()
    train_loss, val_loss = (sums / eval_iters).tolist()
    nats, nbytes = nats_bytes.tolist()
    return {"train": train_loss, "val": val_loss, "accuracy": (hits[0] / hits[1]).item(),
            "bpb": nats / nbytes / math.log(2) if nbytes else None}


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save(iter_num, val_loss=None):
    """ckpt.pt, written atomically; with keep_last > 1 also under its own name ckpt-ITER.pt (a hard
    link: the same bytes on disk), the oldest beyond keep_last dropped; and ckpt-best.pt when val_loss
    is the best yet. A failed write stops the run and leaves every checkpoint already there as it was."""
    try:
        save_checkpoint({
            "model": adapter_state(raw_model) if lora else raw_model.state_dict(),
            "lora": lora,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "model_args": model_args,
            "iter_num": iter_num,
            "val_loss": val_loss,
            "best_val_loss": best_val_loss,
            "bad_steps": bad_steps,
            "config": config,
            "tokenizer_fingerprint": batches.fingerprint,  # sample.py and resume check the tokenizer is this one
            "sampler": {"seed": seed, "batch_size": batch_size, "block_size": block_size,
                        "gradient_accumulation_steps": gradient_accumulation_steps},
        }, ckpt_path)
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
    global best_val_loss
    losses = estimate_loss()
    best_val_loss = min(best_val_loss, losses["val"])
    record = {"iter": iter_num, "loss": losses["train"], "val_loss": losses["val"],
              "val_accuracy": losses["accuracy"], "lr": get_lr(iter_num), "elapsed_s": round(elapsed, 3)}
    line = f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    if losses["bpb"] is not None:  # next-token models, whose tokens each spell their own bytes
        record["val_bpb"] = losses["bpb"]
        line += f", val bpb {record['val_bpb']:.4f}"
    if master:
        log(f"{line}, val accuracy {losses['accuracy']:.3f}")
        append_jsonl(log_path, record)
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


def train_step(iter_num, deadline):
    """grad_accum micro-steps, then the optimizer's step. Returns the step's loss and balance loss
    (device tensors) and what every process has to agree on: were the loss and gradient norm
    finite, and does anyone stop (a signal, max_seconds' deadline) -- one look at the device per step."""
    step_loss = torch.zeros((), device=device)
    step_balance = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        place = rank * grad_accum + micro_step  # this micro-batch's place in the global batch
        torch.manual_seed(stream_seed(DROPOUT, iter_num, place))
        batch = get_batch("train", batch_generator(TRAIN_BATCHES, iter_num, place))
        # under DDP, average gradients across processes only once, after the last micro-step
        sync = not ddp or micro_step == grad_accum - 1
        with (nullcontext() if sync else model.no_sync()), ctx:
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    out_of_time = time.time() >= deadline
    flags = torch.stack([~torch.isfinite(step_loss), ~torch.isfinite(grad_norm),
                         torch.tensor(stop_signal is not None, device=device),
                         torch.tensor(out_of_time, device=device)]).float()
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, bad_norm, stopping, out_of_time = (bool(flag) for flag in flags.tolist())
    if bad_loss or bad_norm:
        scaler.update()  # (fp16) an overflow shrinks the loss scale
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    fault = "loss" if bad_loss else "gradient norm" if bad_norm else None
    return step_loss, step_balance, fault, stopping, out_of_time


# ---- the training loop ------------------------------------------------------
start_iter = iter_num
t_start = t_log = time.time()
deadline = t_start + max_seconds if max_seconds > 0 else math.inf
tokens_since_log = steps_since_log = 0
loss_sum = torch.zeros((), device=device)
balance_sum = torch.zeros((), device=device)
stopping = out_of_time = False
try:
    while True:
        last = iter_num >= max_iters or out_of_time
        if (iter_num % eval_interval == 0 and iter_num > start_iter and not stopping) or last or eval_only:
            evaluate(iter_num, time.time() - t_start)
        if last or eval_only:
            break
        if stopping:  # no eval first: pre-emption gives seconds, not minutes
            if master:
                save(iter_num)
            log(f"stopped by {stop_signal or 'another process'} at iteration {iter_num}: checkpoint {ckpt_path}; "
                "go on with --init_from=resume")
            break

        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_balance, fault, stopping, out_of_time = train_step(iter_num, deadline)
        iter_num += 1
        tokens_since_log += tokens_per_iter
        if fault:  # skipped: no update, and the schedule moves on
            bad_steps += 1
            log(f"iter {iter_num}: skipped, the {fault} is not finite ({bad_steps} in a row)")
            if master:
                append_jsonl(log_path, {"iter": iter_num, "skipped": f"non-finite {fault}", "lr": lr,
                                        "elapsed_s": round(time.time() - t_start, 3)})
            if bad_steps >= max_bad_steps:
                fail(f"{bad_steps} steps in a row had a non-finite {fault} (iterations {iter_num - bad_steps + 1}-"
                     f"{iter_num}): stopped with the last good checkpoint in {out_dir} as it was; lower the "
                     "learning_rate or check the data, then go on with --init_from=resume")
        else:
            bad_steps = 0
            loss_sum += step_loss
            balance_sum += step_balance
            steps_since_log += 1

        if iter_num % log_interval == 0 and steps_since_log:
            sums = torch.stack([loss_sum, balance_sum])
            if ddp:
                dist.all_reduce(sums)
                sums /= world_size
            loss_value, balance = (sums / steps_since_log).tolist()  # .tolist() waits for the device: only here
            dt = time.time() - t_log
            tok_per_s = tokens_since_log / dt
            mfu = raw_model.flops_per_token() * tok_per_s / flops_peak
            record = {"iter": iter_num, "loss": loss_value, "lr": lr, "tok_per_s": round(tok_per_s, 1),
                      "mfu": round(mfu, 4), "elapsed_s": round(time.time() - t_start, 3)}
            line = (f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {tok_per_s:,.0f} tok/s, "
                    f"mfu {100 * mfu:.1f}%")
            if n_expert:  # 1.0 = tokens spread evenly over the experts
                record["balance_loss"] = balance
                line += f", balance loss {balance:.3f}"
            if master:
                log(line)
                append_jsonl(log_path, record)
            t_log, tokens_since_log, steps_since_log = time.time(), 0, 0
            loss_sum.zero_()
            balance_sum.zero_()
except RuntimeError as e:  # with DDP: a collective failed, as another process died or hung past ddp_timeout
    if not (ddp and (isinstance(e, dist.DistError) or re.search(r"gloo|NCCL|[Cc]onnection|[Tt]imed? ?out", str(e)))):
        raise
    reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0][:160]  # gloo: [file:line] what
    fail(f"process {rank} of {world_size} lost the others ({reason}): one died or did not "
         f"answer within ddp_timeout={ddp_timeout}s; go on from the last checkpoint in {out_dir} with --init_from=resume")

if master:
    log(f"done: {iter_num} iterations in {time.time() - t_start:.1f}s, best val loss {best_val_loss:.4f}, "
        f"checkpoint {ckpt_path}")
if ddp:
    dist.barrier()  # wait for rank 0's last checkpoint: a process group torn down early aborts its peers
    # and no destroy_process_group(): with gloo (torch 2.13) it aborted a rank ("terminate called without
    # an active exception") in 2 of ~20 test runs, none in 15 without it; exiting closes the group
