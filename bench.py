"""
Speed and memory numbers. The last line printed is one JSON object.

Training speed of a model shape: forward + backward + optimizer step on random tokens,
timed after warm-up:

    python bench.py --n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=16
    python bench.py ... --compare     # also the same model in plain fp32 eager mode, and the ratio

The data pipeline:

    python bench.py --what=tokenizers  # every tokenizer kind on the built-in legal corpus
    python bench.py --what=prepare     # prepare.py on a generated corpus of corpus_mb MB
"""

import glob
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

# -----------------------------------------------------------------------------
# model (see model.ModelConfig) and batch
vocab_size = 8192
n_layer = 12
n_head = 12
n_kv_head = 0
n_embd = 768
dropout = 0.0
bias = False
pos = "learned"
norm = "layernorm"
mlp = "gelu"
tie_embeddings = True
batch_size = 12
block_size = 1024
# timing
warmup_iters = 3            # not timed: torch.compile and allocator warm-up happen here
iters = 10                  # timed; the median is reported
# system
device = "auto"
dtype = "auto"
compile = True
fp32_eager = False          # the plain baseline: float32, no compile
compare = False             # run the configured path and the fp32 eager baseline, report both
rounds = 3                  # with compare: the two paths take turns this many times
seed = 1337
# what to measure
what = "train"              # train | tokenizers | prepare
kinds = "bpe,wordpiece,unigram,sentencepiece,byte,char,gpt2"  # tokenizers: which kinds (at vocab_size)
repeats = 3                 # tokenizers: timed encoding passes per kind; the median is reported
corpus_mb = 1000            # prepare: size of the generated corpus
work_dir = ""               # prepare: where the corpus and dataset go ("" = a temporary folder, removed)
# -----------------------------------------------------------------------------
from configurator import configure, fail  # noqa: E402
config = configure(globals())


def median_seconds(fn, times):
    """Median wall time of `times` calls of fn, after one untimed call (caches, thread pools, lazy DFAs)."""
    fn()
    runs = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return sorted(runs)[len(runs) // 2]


def bench_tokenizers():
    """Each kind learns from the same train text prepare.py would use, then encodes the corpus."""
    import prepare
    from tokenizer import train_tokenizer
    paths = prepare.legal_corpus_files()
    sample, val_ids = prepare.tokenizer_sample(paths)
    docs = [("".join(text for text, _ in segments), index in val_ids) for index, (_, segments) in
            enumerate(prepare.corpus_documents(paths, prepare.Progress(0), prepare.new_stats()))]
    val = [text for text, is_val in docs if is_val]
    everything = [text for text, _ in docs]
    mb = sum(len(t.encode()) for t in everything) / 1e6
    rows = {}
    for kind in kinds.split(","):
        try:
            t0 = time.perf_counter()
            tok = train_tokenizer(kind, sample, vocab_size)
            train_s = time.perf_counter() - t0
        except ValueError as e:
            print(f"{kind}: {e}")
            rows[kind] = {"error": str(e)}
            continue
        speeds = {threads: mb / median_seconds(lambda: tok.encode_batch(everything, num_threads=threads), repeats)
                  for threads in (1, 2)}
        val_ids = tok.encode_batch(val)
        row = {
            "vocab_size": tok.vocab_size,
            "train_s": round(train_s, 2),
            "encode_mb_s_1_thread": round(speeds[1], 1),
            "encode_mb_s_2_threads": round(speeds[2], 1),
            "val_bytes_per_token": round(sum(len(t.encode()) for t in val) / sum(map(len, val_ids)), 3),
            # decode(encode(text)) == text; and encode(decode(ids)) == ids, which a kind that
            # normalizes text (wordpiece's spacing) should still keep
            "round_trip": sum(tok.decode(ids) == text for ids, text in zip(val_ids, val)) / len(val),
            "ids_round_trip": sum(tok.encode(tok.decode(ids)) == ids for ids in val_ids) / len(val),
        }
        if kind == "gpt2":  # the same ranks with tiktoken's own GPT-2 pattern, which GPT2_PATTERN speeds up
            from tiktoken_ext.openai_public import r50k_pat_str
            from tokenizer import BPETokenizer
            theirs = BPETokenizer(tok.ranks, r50k_pat_str)
            row["tiktoken_pattern_encode_mb_s_1_thread"] = round(
                mb / median_seconds(lambda: theirs.encode_batch(everything, num_threads=1), repeats), 1)
        print(f"{kind}: {json.dumps(row)}")
        rows[kind] = row
    print(f"corpus: {len(everything)} documents, {mb:.2f} MB; {len(val)} val documents; "
          f"tokenizers learn from {sum(map(len, sample)) / 1e6:.2f} MB of train text; "
          f"encoding speeds are medians of {repeats} passes over the corpus")
    print(json.dumps(rows))


def generate_corpus(folder, megabytes):
    """Made-up legal documents: lines of the built-in corpus drawn at random into new paragraphs,
    so that nothing repeats and deduplication keeps it all. JSONL files of 10,000 documents."""
    import prepare
    lines = sorted({line.strip() for path in prepare.legal_corpus_files()
                    for line in open(path, encoding="utf-8", errors="replace") if len(line.strip()) > 20})
    rng, size, n = random.Random(seed), 0, 0
    while size < megabytes * 1e6:
        with open(os.path.join(folder, f"part{n // 10_000:04d}.jsonl"), "w") as f:
            for _ in range(10_000):
                paragraphs = ["\n".join(rng.choices(lines, k=rng.randint(2, 6))) for _ in range(rng.randint(5, 30))]
                line = json.dumps({"text": "\n\n".join(paragraphs) + "\n"}) + "\n"
                f.write(line)
                size, n = size + len(line), n + 1
                if size >= megabytes * 1e6:
                    break
    return n


def bench_prepare():
    """prepare.py on a generated corpus: wall time, MB/s and peak memory of the whole run."""
    root = work_dir or tempfile.mkdtemp(prefix="nanolex-bench-")
    try:
        corpus = os.path.join(root, "corpus")
        os.makedirs(corpus, exist_ok=True)
        if not glob.glob(os.path.join(corpus, "*.jsonl")):
            t0 = time.time()
            n = generate_corpus(corpus, corpus_mb)
            print(f"generated {n} documents in {time.time() - t0:.0f}s")
        size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(corpus, "*.jsonl")))
        t0 = time.time()
        done = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"),
                               f"--input={corpus}", "--dataset=bench", f"--data_dir={root}", f"--vocab_size={vocab_size}",
                               f"--seed={seed}"], capture_output=True, text=True)
        seconds = time.time() - t0
        if done.returncode:
            sys.stderr.write(done.stderr)
            fail("prepare.py failed")
        print(done.stdout, end="")
        meta = json.load(open(os.path.join(root, "bench", "meta.json")))
        print(json.dumps({
            "input_mb": round(size / 1e6, 1),
            "seconds": round(seconds, 1),
            "mb_per_s": round(size / 1e6 / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10, 1),
            "tokens": sum(s["tokens"] for s in meta["splits"].values()),
            "cpus": os.cpu_count(),
        }))
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)


if what not in ("train", "tokenizers", "prepare"):
    fail(f"what={what!r} is not one of train, tokenizers, prepare")
if what == "tokenizers":
    bench_tokenizers()
    sys.exit(0)
if what == "prepare":
    bench_prepare()
    sys.exit(0)

from model import ModelConfig, build_model, peak_flops  # noqa: E402
from runtime import autocast, keep_freed_memory, pick_device, pick_dtype  # noqa: E402

if iters < 1 or warmup_iters < 0 or rounds < 1:
    fail("iters and rounds must be at least 1, warmup_iters at least 0")
if compare:
    # Each path runs in its own process, so neither's memory peak or compiled code leaks into the
    # other; they take turns for `rounds` rounds so that a noisy neighbour slows both alike.
    args = [f"--{k}={v}" for k, v in config.items() if k not in ("compare", "fp32_eager", "rounds")]
    results = {"default": [], "fp32_eager": []}
    for _ in range(rounds):
        for name, extra in (("default", []), ("fp32_eager", ["--fp32_eager=True"])):
            done = subprocess.run([sys.executable, __file__, *args, *extra], capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                fail(f"the {name} run failed")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {json.dumps(results[name][-1])}")
    speedups = sorted(d["tok_per_s"] / b["tok_per_s"] for d, b in zip(results["default"], results["fp32_eager"]))
    middle = {name: sorted(runs, key=lambda r: r["tok_per_s"])[rounds // 2] for name, runs in results.items()}
    speedup = speedups[rounds // 2]
    print(f"speedup of the default path over fp32 eager, median of {rounds} rounds: {speedup:.2f}x")
    print(json.dumps({**middle["default"], "fp32_eager": middle["fp32_eager"], "speedup": round(speedup, 3),
                      "speedups": [round(s, 3) for s in speedups]}))
    sys.exit(0)

try:
    device = pick_device(device)
    ptdtype = torch.float32 if fp32_eager else pick_dtype(device, dtype)
    model_config = ModelConfig.from_settings(config)
except ValueError as e:
    fail(str(e))
use_compile = compile and not fp32_eager
device_type = device.split(":")[0]
if device_type == "cpu":
    keep_freed_memory()  # as train.py does, for both paths
torch.manual_seed(seed)
model = build_model(model_config).to(device)
optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device_type)
step_model = torch.compile(model) if use_compile else model
ctx = autocast(device, ptdtype)
x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
y = torch.randint(0, vocab_size, (batch_size, block_size), device=device)


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


times = []
for i in range(warmup_iters + iters):
    sync()
    t0 = time.perf_counter()
    with ctx:
        _, loss = step_model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    sync()
    if i >= warmup_iters:
        times.append(time.perf_counter() - t0)

dt = sorted(times)[len(times) // 2]
tok_per_s = batch_size * block_size / dt
if device_type == "cuda":
    peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
else:  # the whole process's peak resident memory (Linux reports KiB)
    peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
print(f"{model.num_params() / 1e6:.2f}M parameters, median of {iters} iterations: {1000 * dt:.1f} ms")
print(json.dumps({
    "tok_per_s": round(tok_per_s, 1),
    "ms_per_iter": round(1000 * dt, 2),
    "mfu": round(model.flops_per_token() * tok_per_s / peak_flops(device_type, ptdtype), 4),
    "peak_mem_mb": round(peak_mem_mb, 1),
    "device": device,
    "dtype": str(ptdtype).removeprefix("torch."),
    "compile": use_compile,
}))
