"""
Train a model on a prepared dataset. One process:

    python train.py config/legal_small.py

Several processes (DDP), on one machine or many:

    torchrun --standalone --nproc_per_node=8 train.py config/legal_gpt2.py

Settings are the globals below; a config file and --key=value override them.
With no config at all this is a GPU-scale run: GPT-2 124M on the legal corpus.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
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
init_from = "scratch"       # scratch | resume (out_dir/ckpt.pt) | a run's directory: fine-tune its weights
# data
data_dir = "data"
dataset = "legal"           # data_dir/dataset/ from prepare.py; "legal" is prepared on demand
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, summed over all processes
batch_size = 12             # sequences per micro-step per process
block_size = 1024
# model (see model.ModelConfig)
arch = "gpt"                # gpt | conditional | encoder | encdec | lstm; each trains on its own objective
n_layer = 12
n_head = 12
n_kv_head = 0               # 0 = n_head
n_embd = 768
dropout = 0.0
bias = False
pos = "learned"             # learned | sinusoidal | rope | alibi
norm = "layernorm"          # layernorm | rmsnorm
norm_first = True           # pre-norm; False = post-norm
mlp = "gelu"                # gelu | swiglu
mlp_hidden = 0              # 0 = 4 x n_embd (gelu), ~8/3 x n_embd (swiglu)
attention = "sdpa"          # sdpa | linear
n_expert = 0                # > 0: a mixture of experts in every MLP's place (gpt, conditional, encoder, encdec)
expert_top_k = 1
expert_capacity = 1.25
balance_weight = 0.01       # the experts' load-balancing loss, logged as balance_loss
tie_embeddings = True
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
# -----------------------------------------------------------------------------
from configurator import configure, fail  # noqa: E402  (settings above come first, as in nanoGPT)
config = configure(globals())

from model import ModelConfig, build_model, peak_flops  # noqa: E402
from runtime import (append_jsonl, autocast, check_vocab, keep_freed_memory, load_checkpoint,  # noqa: E402
                     pick_device, pick_dtype, save_checkpoint)
from tokenizer import load_tokenizer, tokenizer_fingerprint  # noqa: E402

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
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
master = rank == 0
device_type = device.split(":")[0]
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
         f"number of processes ({world_size})")
grad_accum = gradient_accumulation_steps // world_size
if not 0 < mask_prob < 1 or span_length < 1:
    fail(f"need 0 < mask_prob < 1 and span_length >= 1, got mask_prob={mask_prob}, span_length={span_length}")
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
try:
    with open(os.path.join(data_path, "meta.json")) as f:
        meta = json.load(f)
    tokenizer = load_tokenizer(data_path)
    bins = {split: np.memmap(os.path.join(data_path, f"{split}.bin"), dtype=meta["dtype"], mode="r")
            for split in ("train", "val")}
    # prompt/response data: 1 where a target token counts in the loss (the responses)
    masks = {split: np.memmap(os.path.join(data_path, f"{split}_mask.bin"), dtype=np.uint8, mode="r")
             for split in ("train", "val")} if meta.get("loss_mask") else None
    # conditional: the control label of every token, and the labels' names
    labels = {split: np.memmap(os.path.join(data_path, f"{split}_label.bin"), dtype=np.uint16, mode="r")
              for split in ("train", "val")} if arch == "conditional" and meta.get("labels") else None
    # bits per byte: nats per token * tokens per byte / ln 2, with the val split's own ratio
    val_tokens_per_byte = meta["splits"]["val"]["tokens"] / meta["splits"]["val"]["bytes"]
    data_fingerprint = meta["tokenizer"]["fingerprint"]
except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
    fail(f"cannot read the dataset at {data_path} ({type(e).__name__}: {e}); prepare it again with prepare.py")
if arch == "conditional" and not labels:
    fail(f"arch='conditional' needs a control label per document: prepare {data_path} with --labels=True")
if tokenizer_fingerprint(data_path) != data_fingerprint:
    fail(f"{data_path}: the tokenizer files are not the ones meta.json was written with; prepare it again")
for split, data in bins.items():
    if len(data) <= block_size and not masks:
        fail(f"{data_path}/{split}.bin has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    for name, extra in (("mask", masks), ("label", labels)):
        if extra and len(extra[split]) != len(data):
            fail(f"{data_path}/{split}_{name}.bin does not match {split}.bin ({len(extra[split])} vs {len(data)} "
                 "tokens); prepare it again")
if masks:  # windows start where a document starts
    doc_starts = {split: np.concatenate([[0], np.flatnonzero(data[:-1] == tokenizer.eot_id) + 1])
                  for split, data in bins.items()}

TRAIN_BATCHES, EVAL_BATCHES, DROPOUT = range(3)


def stream_seed(*key):
    """Every random draw is keyed by integers (stream, rank, iteration, micro-step): a resumed
    run draws exactly the batches and dropout masks the uninterrupted run would have.
    (A tuple of ints hashes the same in every process, unlike strings.)"""
    return hash((seed,) + key) & 0x7FFF_FFFF_FFFF_FFFF


def batch_generator(*key):
    return torch.Generator().manual_seed(stream_seed(*key))


def document_window(split, start):
    """block_size+1 tokens from a document's start, and which of them count as targets.

    Only whole documents count: a document cut by the window's end is left to the windows
    that start with it (unless it is the first, longer than a window). Past the end of
    the data is padding, counted nowhere.
    """
    tokens = bins[split][start:start + block_size + 1]
    window = np.full(block_size + 1, tokenizer.pad_id, dtype=np.int64)
    counts = np.zeros(block_size + 1, dtype=bool)
    window[:len(tokens)], counts[:len(tokens)] = tokens, masks[split][start:start + block_size + 1]
    ends = np.flatnonzero(tokens == tokenizer.eot_id)
    if len(ends):
        counts[ends[-1] + 1:] = False
    return window, counts


def read_windows(array, starts, length):
    """(len(starts), length) int64: array[s:s + length] for each start, one read each; 0 past its end."""
    windows = torch.zeros(len(starts), length, dtype=torch.long)
    for row, s in enumerate(starts.tolist()):
        piece = array[s:s + length]
        windows[row, :len(piece)] = torch.from_numpy(piece.astype(np.int64))
    return windows


def random_document_starts(split, generator):
    return doc_starts[split][torch.randint(len(doc_starts[split]), (batch_size,), generator=generator).numpy()]


def next_token_batch(split, generator):
    """gpt, conditional, lstm: inputs and the same tokens one step ahead as targets."""
    data = bins[split]
    if masks:  # prompt/response data: windows of whole documents, loss only on the responses
        starts = random_document_starts(split, generator)
        windows, counts = zip(*(document_window(split, s) for s in starts.tolist()))
        windows = torch.from_numpy(np.stack(windows))
        targets = torch.where(torch.from_numpy(np.stack(counts))[:, 1:], windows[:, 1:], -1)
        batch = {"idx": windows[:, :-1], "targets": targets}
    else:
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        # one read of block_size+1 tokens per row: inputs are its first block_size, targets its last
        windows = read_windows(data, starts, block_size + 1)
        batch = {"idx": windows[:, :-1], "targets": windows[:, 1:]}
    if labels:  # each position carries its document's label (a window may span two documents)
        batch["labels"] = read_windows(labels[split], starts, block_size)
    return batch


def masked_lm_batch(split, generator):
    """encoder: BERT's masked-language modelling. mask_prob of the positions become targets;
    of those, 80% read <|mask|>, 10% a random ordinary token, 10% themselves."""
    data = bins[split]
    starts = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    idx = read_windows(data, starts, block_size)
    chosen = torch.rand(idx.shape, generator=generator) < mask_prob
    how = torch.rand(idx.shape, generator=generator)
    random_ids = ordinary_ids[torch.randint(len(ordinary_ids), idx.shape, generator=generator)]
    targets = torch.where(chosen, idx, -1)
    idx = torch.where(chosen & (how < 0.8), tokenizer.mask_id, idx)
    idx = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, idx)
    return {"idx": idx, "targets": targets}


def span_corruption(tokens, generator):
    """T5's pretraining pair from a run of tokens, with <|mask|> as every sentinel: spans of
    span_length tokens covering about mask_prob of them are cut out of the source, each
    leaving one <|mask|>; the target gives them back in order, each after its <|mask|>."""
    n = len(tokens)
    cut = np.zeros(n, dtype=bool)
    for s in torch.randperm(n, generator=generator)[:n_spans].tolist():
        cut[s:s + span_length] = True  # spans that touch merge into one
    first = cut & ~np.concatenate([[False], cut[:-1]])  # where each cut-out span begins
    source = np.where(first, tokenizer.mask_id, tokens)[~cut | first]
    target = np.insert(tokens[cut], np.flatnonzero(first[cut]), tokenizer.mask_id)
    return source, np.append(target, tokenizer.eot_id)


def prompt_response(split, start):
    """encdec on prompt/response data: the prompt is the source, the response the target."""
    tokens = bins[split][start:start + 2 * block_size + 1].astype(np.int64)
    ends = np.flatnonzero(tokens == tokenizer.eot_id)
    document = tokens[:ends[0] + 1] if len(ends) else tokens
    is_response = masks[split][start:start + len(document)].astype(bool)
    prompt = document[~is_response]
    return (prompt if len(prompt) else np.array([tokenizer.bos_id])), document[is_response]


def seq2seq_batch(split, generator):
    """encdec: (source, target) pairs, padded: src and its src_mask (real tokens), the decoder's
    input (<|bos|> then the target but its last token) and the target."""
    if masks:
        pairs = [prompt_response(split, s) for s in random_document_starts(split, generator).tolist()]
    else:
        starts = torch.randint(len(bins[split]) - block_size + 1, (batch_size,), generator=generator)
        pairs = [span_corruption(window.numpy(), generator) for window in read_windows(bins[split], starts, block_size)]
    src = torch.full((batch_size, block_size), tokenizer.pad_id)
    idx = torch.full((batch_size, target_length), tokenizer.pad_id)
    targets = torch.full((batch_size, target_length), -1)
    for row, (source, target) in enumerate(pairs):
        source, target = torch.from_numpy(source[:block_size]), torch.from_numpy(target[:target_length])
        src[row, :len(source)] = source
        idx[row, 0], idx[row, 1:len(target)] = tokenizer.bos_id, target[:-1]
        targets[row, :len(target)] = target
    return {"src": src, "src_mask": src != tokenizer.pad_id, "idx": idx, "targets": targets}


# what each architecture learns from: its batches
get_batch_of = {"encoder": masked_lm_batch, "encdec": seq2seq_batch}.get(arch, next_token_batch)
# the encoder's random replacements are ordinary tokens, never <|endoftext|> or <|mask|>
ordinary_ids = torch.tensor(sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.special.values())))
# encdec: how many spans are cut from a window, and the longest target they make
n_spans = max(1, round(mask_prob * block_size / span_length))
target_length = block_size if masks else min(block_size, n_spans * (span_length + 1) + 1)


def get_batch(split, generator):
    batch = get_batch_of(split, generator)
    if device_type == "cuda":  # pinned memory lets the copy overlap with compute
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ---- model ------------------------------------------------------------------
os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
iter_num, best_val_loss = 0, float("inf")
checkpoint = None
if init_from == "scratch":
    if os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: continue it with --init_from=resume, or choose another --out_dir")
    # round the vocabulary up to a multiple of 64: friendlier matrix shapes, unused rows are never targets
    model_args = {**config, "vocab_size": 64 * math.ceil(tokenizer.vocab_size / 64),
                  "n_labels": len(meta["labels"]) if labels else 0}
else:  # resume this run, or fine-tune another: its weights, shape and architecture
    init_path = ckpt_path if init_from == "resume" else os.path.join(init_from, "ckpt.pt")
    if init_from != "resume" and not os.path.isdir(init_from):
        fail(f"init_from={init_from!r} is not scratch, resume, or the directory of a run to fine-tune")
    if init_from != "resume" and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: fine-tune into another --out_dir, or continue it with --init_from=resume")
    try:
        checkpoint = load_checkpoint(init_path, device)
    except ValueError as e:
        fail(str(e))
    if checkpoint.get("tokenizer_fingerprint", data_fingerprint) != data_fingerprint:
        fail(f"{init_path} was trained with another tokenizer than the dataset {data_path} has; use a dataset "
             f"prepared with it (prepare.py --tokenizer_from={os.path.dirname(init_path) or '.'})")
    model_args = checkpoint["model_args"]  # the run's shape wins over settings
    if model_args.get("arch", "gpt") != arch:  # but not its objective: the batches above are arch's
        fail(f"{init_path} is a {model_args.get('arch', 'gpt')!r} model, not arch={arch!r}: use "
             f"--arch={model_args.get('arch', 'gpt')}")
    if init_from == "resume":
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        sampler = checkpoint["sampler"]
        if (sampler["seed"], sampler["world_size"], sampler["batch_size"]) != (seed, world_size, batch_size):
            log("warning: seed, process count or batch size differ from the checkpoint's; the batch stream will too")
    else:  # fine-tuning starts its own count, optimizer and schedule, and may change the dropout
        model_args = {**model_args, "dropout": dropout}
        log(f"fine-tuning {init_path} (trained {checkpoint['iter_num']} iterations) on {data_path}")
try:
    model_config = ModelConfig.from_settings(model_args)
    model_args = asdict(model_config)
    check_vocab(model_config.vocab_size, tokenizer, init_path if checkpoint else data_path)
except ValueError as e:
    fail(str(e))
if model_config.block_size < block_size:
    fail(f"block_size={block_size} is longer than the model's context ({model_config.block_size})")
if labels and model_config.n_labels != len(meta["labels"]):
    fail(f"{init_path} knows {model_config.n_labels} labels but {data_path} has {len(meta['labels'])}")
torch.manual_seed(seed)
model = build_model(model_config)
if checkpoint:
    model.load_state_dict(checkpoint["model"])
model.to(device)
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

raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

if master:  # the run directory is usable without data/: tokenizer files travel with it
    for name in meta["tokenizer"]["files"] + ["meta.json"]:
        shutil.copyfile(os.path.join(data_path, name), os.path.join(out_dir, name))
ctx = autocast(device, ptdtype)
predicts_next_token = model_config.arch in ("gpt", "conditional", "lstm")
flops_peak = peak_flops(device_type, ptdtype) * world_size
log_path = os.path.join(out_dir, "log.jsonl")


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split, drawn the same way at every eval, and the
    share of val targets the model's top guess gets right (for the encoder: masked tokens)."""
    model.eval()
    means = []
    hits = torch.zeros(2, device=device)  # right guesses, targets
    for split in ("train", "val"):
        generator = batch_generator(EVAL_BATCHES, split == "val", rank)
        losses = torch.zeros(eval_iters, device=device)
        for k in range(eval_iters):
            batch = get_batch(split, generator)
            with ctx:
                logits, loss = model(**batch)
            losses[k] = loss  # stays on the device: no wait for it batch by batch
            if split == "val":
                counted = batch["targets"] != -1
                hits += torch.stack([((logits.argmax(dim=-1) == batch["targets"]) & counted).sum(), counted.sum()])
        means.append(losses.mean())
    means = torch.stack(means)
    if ddp:
        dist.all_reduce(means)
        dist.all_reduce(hits)
        means /= world_size
    model.train()
    train_loss, val_loss = means.tolist()
    return {"train": train_loss, "val": val_loss, "accuracy": (hits[0] / hits[1]).item()}


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save(iter_num):
    save_checkpoint({
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "tokenizer_fingerprint": data_fingerprint,  # sample.py and resume check the tokenizer is this one
        "sampler": {"seed": seed, "world_size": world_size, "batch_size": batch_size, "block_size": block_size},
    }, ckpt_path)


def evaluate(iter_num, elapsed):
    global best_val_loss
    losses = estimate_loss()
    best_val_loss = min(best_val_loss, losses["val"])
    record = {"iter": iter_num, "loss": losses["train"], "val_loss": losses["val"],
              "val_accuracy": losses["accuracy"], "lr": get_lr(iter_num), "elapsed_s": round(elapsed, 3)}
    line = f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    if predicts_next_token:  # bits per byte: the loss of every val token, so only for next-token models
        record["val_bpb"] = losses["val"] * val_tokens_per_byte / math.log(2)
        line += f", val bpb {record['val_bpb']:.4f}"
    if master:
        log(f"{line}, val accuracy {losses['accuracy']:.3f}")
        append_jsonl(log_path, record)
        if not eval_only:
            save(iter_num)


# ---- the loop ---------------------------------------------------------------
start_iter = iter_num
t_start = t_log = time.time()
tokens_since_log = 0
loss_sum = torch.zeros((), device=device)
balance_sum = torch.zeros((), device=device)
while True:
    elapsed = time.time() - t_start
    out_of_time = max_seconds > 0 and elapsed >= max_seconds
    if ddp and max_seconds > 0:  # everyone stops at the same iteration: rank 0's clock decides
        flag = torch.tensor(float(out_of_time), device=device)
        dist.broadcast(flag, 0)
        out_of_time = bool(flag.item())
    last = iter_num >= max_iters or out_of_time
    if (iter_num % eval_interval == 0 and iter_num > start_iter) or last or eval_only:
        evaluate(iter_num, elapsed)
    if last or eval_only:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for micro_step in range(grad_accum):
        torch.manual_seed(stream_seed(DROPOUT, rank, iter_num, micro_step))
        batch = get_batch("train", batch_generator(TRAIN_BATCHES, rank, iter_num, micro_step))
        # under DDP, average gradients across processes only once, after the last micro-step
        sync = not ddp or micro_step == grad_accum - 1
        with (nullcontext() if sync else model.no_sync()), ctx:
            _, loss = model(**batch)
            loss = loss / grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        if n_expert:
            balance_sum += raw_model.balance_loss().detach() / grad_accum
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    tokens_since_log += tokens_per_iter

    if iter_num % log_interval == 0:
        sums = torch.stack([loss_sum, balance_sum])
        if ddp:
            dist.all_reduce(sums)
            sums /= world_size
        loss_value, balance = (sums / log_interval).tolist()  # .tolist() waits for the device: only here
        dt = time.time() - t_log
        tok_per_s = tokens_since_log / dt
        mfu = raw_model.flops_per_token() * tok_per_s / flops_peak
        record = {"iter": iter_num, "loss": loss_value, "lr": lr, "tok_per_s": round(tok_per_s, 1),
                  "mfu": round(mfu, 4), "elapsed_s": round(time.time() - t_start, 3)}
        line = f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {tok_per_s:,.0f} tok/s, mfu {100 * mfu:.1f}%"
        if n_expert:  # 1.0 = tokens spread evenly over the experts
            record["balance_loss"] = balance
            line += f", balance loss {balance:.3f}"
        if master:
            log(line)
            append_jsonl(log_path, record)
        t_log, tokens_since_log = time.time(), 0
        loss_sum.zero_()
        balance_sum.zero_()

if master:
    log(f"done: {iter_num} iterations in {time.time() - t_start:.1f}s, best val loss {best_val_loss:.4f}, "
        f"checkpoint {ckpt_path}")
if ddp:
    dist.barrier()  # wait for rank 0's last checkpoint: a process group torn down early aborts its peers
    # and no destroy_process_group(): with gloo (torch 2.13) it aborted a rank ("terminate called without
    # an active exception") in 2 of ~20 test runs, none in 15 without it; exiting closes the group
