"""
Speed and memory numbers. The last line printed is one JSON object.

Training speed of a model shape: train.py itself (a process of its own) for warmup_iters +
iters steps on the built-in corpus (train_dataset), each step's time read from its log.jsonl,
the median of the steps after the warm-up: batches from the memmap, gradient accumulation,
clipping, the optimizer step, as a run pays them. The model settings are model.ModelConfig's
fields, so every architecture and variant is timed the same way (--help lists them):

    python bench.py --n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=16
    python bench.py ... --compare     # also the same model in plain fp32 eager mode, and the ratio
    python bench.py ... --arch=encdec  # or lstm, encoder; conditional on labels (--train_dataset=licenses)
    python bench.py ... --n_expert=4   # a mixture of experts; likewise --attention=linear, --pos=rope ...

The data pipeline:

    python bench.py --what=tokenizers  # every tokenizer kind on the built-in legal corpus
    python bench.py --what=prepare     # prepare.py on a generated corpus of corpus_mb MB

Softmax against linear attention, one causal self-attention layer at each of `lengths`:
time of forward + backward and of forward alone, and peak memory; where linear wins:

    python bench.py --what=attention --lengths=256,1024,4096

The LSTM-vs-Transformer study: train.py on each of `configs` (one tokenizer, one token
budget), then parameters, val perplexity, bits per byte and per character, training time,
generation latency and training memory of each, as a table; with --readme=PATH also
written into that file between the lines <!-- study:begin --> and <!-- study:end -->:

    python bench.py --what=study --readme=docs/study.md

The optimizers on the same run: train.py once per optimizer (budget, then optimizer_config),
each one's loss against wall time in one plot and a table (into --readme between the lines
<!-- optimizers:begin --> and <!-- optimizers:end -->):

    python bench.py --what=optimizers --plot_file=docs/optimizers.png --readme=docs/training-options.md

How fast a trained run writes: time to the first token and new tokens/s, with and
without the cache, at each batch size, in fp32 and (where the device has the units) bf16:

    python bench.py --what=decode --out_dir=out-legal-small

How many clients a server keeps up with: serve.py on the run (a process of its own, on a free
loopback port), each client sending /generate requests back to back for serve_seconds; total
new tokens/s and p50/p95 latency at each number of clients, and the same against one-at-a-time
serving (the server with --max_batch_size=1):

    python bench.py --what=serve --out_dir=out-legal-small

This project against nanoGPT on this machine, side by side (a checkout of karpathy/nanoGPT):
training tokens/s at one shape (train.py's own logs, ours and theirs, taking turns `rounds`
times), 1,000 new tokens from a 256-token model (whole process, start-up included), and the
time to quality: config/legal_small.py with --max_seconds of each of `quality_seconds`
against nanoGPT's CPU recipe from its README on the same documents, both scored by exact
val bits per byte:

    python bench.py --what=nanogpt --nanogpt_dir=../nanoGPT

One check of the GPU paths, under 8 minutes on one GPU (bench_gpu): the GPU-marked tests, GPT-2
small's shape trained by train.py in bf16 + compile (tokens/s, MFU against the data sheet
and against the measured matmul peak), train.py under torchrun with DDP on every GPU here, and
decoding with and without CUDA graphs; one JSON summary last:

    python bench.py --what=gpu
"""

import glob
import json
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields

from configurator import ModelConfig  # torch-free: --help answers before torch is imported

# -----------------------------------------------------------------------------
# model: every field of model.ModelConfig, at its default; those set are given to train.py. In train
# mode vocab_size (and n_labels, n_classes) come from the dataset, as train.py decides: setting them fails
globals().update({f.name: f.default for f in fields(ModelConfig)})
# train: train.py's steps on a prepared dataset, timed by train.py's own log
train_dataset = "legal"     # data_dir/train_dataset; "legal": the built-in corpus, prepared here when missing
                            # (arch=conditional needs labels: python prepare.py --labels=True makes "licenses")
batch_size = 12             # sequences per micro-step, each block_size long
gradient_accumulation_steps = 1  # micro-steps per timed step
optimizer = "adamw"         # adamw | sgd | lion | muon
grad_checkpoint = False     # recompute each block's activations in the backward pass
warmup_iters = 3            # steps not timed: torch.compile and allocator warm-up happen here
iters = 10                  # steps timed; the median step is reported
# system
device = "auto"
dtype = "auto"
compile = "auto"            # train mode: torch.compile as train.py does: auto | True | False
fp32_eager = False          # the plain baseline: float32, no compile
compare = False             # run the configured path and the fp32 eager baseline, report both
rounds = 3                  # with compare: the two paths take turns this many times
seed = 1337
# what to measure
what = "train"              # train | tokenizers | prepare | attention | study | decode | serve | gpu | optimizers | nanogpt
kinds = "bpe,wordpiece,unigram,sentencepiece,byte,char,gpt2"  # tokenizers: which kinds (at vocab_size)
repeats = 3                 # tokenizers, attention, study: timed repeats after a warm-up; the median is reported
corpus_mb = 1000            # prepare: size of the generated corpus
work_dir = ""               # prepare: the corpus and dataset; study, train: the runs ("" = a temporary folder, removed)
# attention: one causal self-attention layer (model.Attention), sdpa and linear, at each length
lengths = "64,128,256,512,1024,2048,4096,8192"
attention_batch = 2
attention_heads = 4
attention_embd = 256
sdpa_max_length = 8192      # longer lengths measure linear attention only (softmax's time grows as length^2)
# study: train.py on each config, on one dataset, then measure the runs
budget = "config/compare_budget.py"  # the settings every config shares, given to train.py before it
configs = "config/compare_lstm.py,config/compare_transformer.py,config/compare_modern.py"
data_dir = "data"
dataset = "legal_bpe2000"   # prepared here on demand (bpe, vocabulary 2000) when it is missing
train_overrides = ""        # more --key=value for every train.py run, e.g. "--max_iters=20 --eval_iters=5"
gen_prompt_tokens = 64      # generation latency: prompt (the start of the val split), then
gen_new_tokens = 64         # this many new tokens, greedy, with the model's cache
gen_batch_sizes = "1,32"
readme = ""                 # study: a file to write the table into, between its study markers ("" = none)
# decode: how fast a trained run writes, from a prompt until its context is full
out_dir = ""                # decode: the run
decode_prompt_tokens = 32
decode_batch_sizes = "1,16"  # the cache's speed at each; without the cache, batch 1 only
decode_compile = True       # decode: also time the compiled decoding step (gpt, conditional; softmax attention)
draft_out_dir = ""          # decode: also time speculative decoding with this draft run, at batch 1
# serve: serve.py on the run out_dir under closed-loop clients
serve_clients = "1,4,16"    # clients at once, each sending its next request when its last one is answered
serve_seconds = 15.0        # how long each number of clients sends
serve_new_tokens = 64       # each request: max_new_tokens, sampled (temperature 0.8, top_k 200), ignore_eos
# optimizers: train.py with budget, then optimizer_config, once per optimizer (train_overrides too)
optimizers = "adamw:2e-3,sgd:0.3,lion:3e-4,muon:2e-3"  # name:learning_rate (min_lr: a tenth of it)
optimizer_config = "config/compare_modern.py"
plot_file = ""              # optimizers: the loss-versus-time plot (.png); "" = none
# nanogpt: this project against nanoGPT (a checkout of github.com/karpathy/nanoGPT) on this machine
nanogpt_dir = ""            # nanogpt: the checkout
nanogpt_parts = "speed,sample,quality"  # nanogpt: which comparisons
quality_seconds = "100,300"  # nanogpt quality: config/legal_small.py's time budgets
speed_iters = 30            # nanogpt speed: training steps per run (the first 10 are not timed)
recipe_overrides = ""       # nanogpt quality: more --key=value for nanoGPT's recipe (a shorter trial: "--max_iters=100")
# -----------------------------------------------------------------------------
from configurator import configure, fail  # noqa: E402
given = set()  # the settings the command line (or a config file) set
config = configure(globals(), given=given)

import torch  # noqa: E402  (after the settings: --help needs no torch)

from runtime import machine, pick_compile  # noqa: E402


def script(name):
    """The path of one of the project's scripts, beside this one."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, times, warmup=1):
    """Median wall time of `times` calls of fn, after `warmup` untimed ones (caches, thread pools,
    lazy DFAs, torch.compile). fn must finish its work before it returns (see sync)."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median_high(runs)


def device_and_dtype():
    """The device and dtype these settings pick, as train.py would (fp32_eager: float32).
    A device that is not here is a ValueError."""
    from runtime import pick_device, pick_dtype
    where = pick_device(device)
    return where, torch.float32 if fp32_eager else pick_dtype(where, dtype)


def bench_tokenizers():
    """Each kind learns from the same train text prepare.py would use, then encodes the corpus."""
    if repeats < 1:
        fail("repeats must be at least 1")
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
        done = subprocess.run([sys.executable, script("prepare.py"), f"--input={corpus}", "--dataset=bench",
                               f"--data_dir={root}", f"--vocab_size={vocab_size}", f"--seed={seed}"],
                              capture_output=True, text=True)
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


# ---- attention: softmax against linear -----------------------------------------------

def positive_ints(name, value):
    """A comma-separated setting of positive whole numbers, or a clear error."""
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        fail(f"{name}={value!r} must be positive whole numbers separated by commas, e.g. --{name}=256,1024")
    return numbers


def resident_growth_mb(fn):
    """How much fn() raises this process's resident memory at its peak (MiB), or None where
    it cannot be read (it needs Linux's /proc and glibc's malloc).

    torch's CPU tensors come from malloc, and only the kernel sees all of it. malloc is
    first told to hand every block of 64 KiB or more back to the kernel when it is freed,
    and what it holds free is given back (malloc_trim): resident memory then follows what
    is allocated, and its peak (VmHWM, reset to the current size just before) is the
    largest moment of fn(). Run this after the timed calls: it makes allocation slower."""
    def resident(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    from runtime import keep_freed_memory
    libc = keep_freed_memory(threshold=2**16)
    if libc is None:
        return None
    try:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        return None
    before = resident("VmRSS")
    fn()
    return resident("VmHWM") - before


def in_fresh_process(fn, *args):
    """fn(*args), a JSON-able dict, computed in a forked child of this process, which has
    imported torch but computed nothing: every measurement starts from the same state
    (no heap, caches or thread pools left by the one before), and one that runs out of
    memory ends only itself: it gives {"error": ...}. A bug in fn raises here too."""
    sys.stdout.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it reports and exits, whatever happens
        os.close(read)
        code = 0
        try:
            result = fn(*args)
        except BaseException as e:
            if isinstance(e, RuntimeError) and "allocate" in str(e):  # torch's CPU allocator failing
                result = {"error": "out of memory"}
            else:
                traceback.print_exc()
                result, code = None, 1
        if result is not None:
            with os.fdopen(write, "w") as f:
                json.dump(result, f)
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if text:
        return json.loads(text)
    if os.WIFSIGNALED(status):  # the kernel's OOM killer, say
        return {"error": f"killed by signal {os.WTERMSIG(status)}"}
    raise RuntimeError(f"measuring {args[:2]} failed in its process (traceback above)")


def attention_run(kind, length, where, ptdtype):
    """One causal self-attention layer (model.Attention) of this kind at this length: median
    time of forward + backward and of forward alone, and the peak memory forward +
    backward add to what the weights and the input take (on CUDA the allocator's peak,
    on CPU the resident memory's: see resident_growth_mb). It counts what is saved for
    backward, the gradients, and the temporaries (softmax's scores where a kernel makes
    them) at their largest moment."""
    from model import Attention, LinearAttention
    from runtime import autocast
    torch.manual_seed(seed)
    config = ModelConfig(n_embd=attention_embd, n_head=attention_heads, block_size=length, attention=kind)
    layer = (LinearAttention(config, causal=True) if kind == "linear" else Attention(config)).to(where)
    x = torch.randn(attention_batch, length, attention_embd, device=where, requires_grad=True)  # (B, T, C)
    ctx = autocast(where, ptdtype)

    def forward_backward():
        with ctx:
            y = layer(x, is_causal=True)  # the kernels' fast causal path
        y.float().sum().backward()
        sync(where)

    def forward():
        with torch.no_grad(), ctx:
            layer(x, is_causal=True)
        sync(where)

    fwd_bwd = median_seconds(forward_backward, repeats)
    fwd = median_seconds(forward, repeats)
    # peak memory in one more forward + backward, after the warm-up (lazy initialization is not counted)
    if where.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resident_growth_mb(forward_backward) if where == "cpu" else None
    return {"fwd_bwd_ms": round(1000 * fwd_bwd, 2), "fwd_ms": round(1000 * fwd, 2),
            "peak_mb": None if peak is None else round(peak, 1)}


def linear_wins_from(rows, key, measured):
    """The shortest length from which linear attention's key is below softmax's at that and
    every longer length where both were measured; None if there is none."""
    start = None
    for length in reversed([n for n in measured if key in rows["sdpa"][n] and key in rows["linear"][n]]):
        if rows["linear"][length][key] is None or rows["linear"][length][key] >= rows["sdpa"][length][key]:
            break
        start = length
    return start


def bench_attention():
    measured = sorted(set(positive_ints("lengths", lengths)))
    if min(attention_batch, attention_heads, attention_embd, repeats, sdpa_max_length) < 1:
        fail("attention_batch, attention_heads, attention_embd, repeats and sdpa_max_length must be at least 1")
    try:
        where, ptdtype = device_and_dtype()
        ModelConfig(n_embd=attention_embd, n_head=attention_heads)
    except ValueError as e:
        fail(str(e).replace("n_head=", "attention_heads=").replace("n_embd=", "attention_embd="))
    # a fresh process per measurement on CPU (see in_fresh_process); CUDA's allocator keeps its own peak
    measure = attention_run if where != "cpu" else lambda *args: in_fresh_process(attention_run, *args)
    rows = {"sdpa": {}, "linear": {}}
    print(f"one causal self-attention layer: batch {attention_batch}, {attention_heads} heads, n_embd "
          f"{attention_embd}, {str(ptdtype).removeprefix('torch.')} on {where}; medians of {repeats} after a warm-up")
    print(f"{'length':>7} | {'fwd+bwd ms sdpa':>15} {'linear':>9} | {'fwd ms sdpa':>11} {'linear':>9} | "
          f"{'peak MB sdpa':>12} {'linear':>9}")

    def cell(row, key):
        if "error" in row or "skipped" in row:
            return row.get("error", "-")
        return "n/a" if row[key] is None else f"{row[key]:.1f}"

    for length in measured:
        for kind, by_length in rows.items():
            if kind == "sdpa" and length > sdpa_max_length:
                by_length[length] = {"skipped": f"longer than sdpa_max_length={sdpa_max_length}"}
            else:
                by_length[length] = measure(kind, length, where, ptdtype)
        sdpa, linear = rows["sdpa"][length], rows["linear"][length]
        print(f"{length:>7} | {cell(sdpa, 'fwd_bwd_ms'):>15} {cell(linear, 'fwd_bwd_ms'):>9} | "
              f"{cell(sdpa, 'fwd_ms'):>11} {cell(linear, 'fwd_ms'):>9} | "
              f"{cell(sdpa, 'peak_mb'):>12} {cell(linear, 'peak_mb'):>9}", flush=True)
    wins = {"fwd_bwd": linear_wins_from(rows, "fwd_bwd_ms", measured),
            "fwd": linear_wins_from(rows, "fwd_ms", measured),
            "memory": linear_wins_from(rows, "peak_mb", measured)}
    for key, what_wins in (("fwd_bwd", "is faster forward + backward"), ("fwd", "is faster forward only"),
                           ("memory", "takes less memory")):
        where_from = ("none in range" if wins[key] is None else f"from length {wins[key]} on"
                      + (", the shortest measured" if wins[key] == measured[0] else ""))
        print(f"linear attention {what_wins}: {where_from}")
    print(json.dumps({"lengths": measured, **{kind: {str(n): row for n, row in by_length.items()}
                                              for kind, by_length in rows.items()},
                      "linear_wins_from": wins, "batch": attention_batch, "n_head": attention_heads,
                      "n_embd": attention_embd, "device": where, "dtype": str(ptdtype).removeprefix("torch.")}))


# ---- study: the LSTM-vs-Transformer study ---------------------------------------------

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
# what makes the token budget (the same tokens in the same order): the runs should agree on all of
# it. The learning rate is each model's own: the LSTM's recipe needs a higher one.
BUDGET = ("dataset", "block_size", "batch_size", "gradient_accumulation_steps", "max_iters", "seed")


def read_readme(begin=BEGIN, end=END):
    """readme's text, line endings as they are; it must hold both markers once, in order, or neither."""
    try:
        with open(readme, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read readme={readme} ({getattr(e, 'strerror', None) or e})")
    if (text.count(begin), text.count(end)) not in ((0, 0), (1, 1)) or text.find(begin) > text.find(end):
        fail(f"{readme} must have the lines {begin} and {end} once each and in that order, or neither "
             "(then a section holding them is added at its end)")
    return text


def with_table(text, table, begin=BEGIN, end=END, title="LSTM vs Transformer"):
    """text with table between the markers (or, without markers, a new last section, titled title,
    that holds them); everything outside the markers stays byte for byte."""
    if begin not in text:
        return (text + ("\n" if text and not text.endswith("\n") else "")
                + f"\n## {title}\n\n{begin}\n{table}{end}\n")
    return text[:text.index(begin) + len(begin)] + "\n" + table + text[text.index(end):]


def prepare_study_dataset():
    path = os.path.join(data_dir, dataset)
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    if dataset != "legal_bpe2000":
        fail(f"no dataset at {path}: prepare it with prepare.py, or leave --dataset=legal_bpe2000 to have it made here")
    print(f"{path} not found: preparing the built-in legal corpus with BPE at vocabulary 2000", flush=True)
    done = subprocess.run([sys.executable, script("prepare.py"), "--tokenizer=bpe", "--vocab_size=2000",
                           f"--dataset={dataset}", f"--data_dir={data_dir}"])
    if done.returncode:
        fail(f"preparing {path} failed (see above)")
    return path


def train_run(config_path, out_dir, overrides):
    """train.py on one config, as a user runs it, its output passed through. Returns its wall
    seconds and its peak resident memory in MiB: os.wait4 gives the usage of that child
    alone (RUSAGE_CHILDREN would be the largest of all children so far)."""
    args = [script("train.py"), *([budget] if budget else []), config_path, f"--out_dir={out_dir}",
            f"--data_dir={data_dir}", f"--dataset={dataset}", f"--device={device}", f"--dtype={dtype}", *overrides]
    print(f"$ python {shlex.join(args)}", flush=True)
    t0 = time.time()
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in child.stdout:
        print(line, end="", flush=True)
    child.stdout.close()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        fail(f"train.py {config_path} failed (exit code {code}; its output is above)")
    return time.time() - t0, usage.ru_maxrss / 1024  # Linux reports KiB


def split_documents(data_path, split="val"):
    """A prepared split's token ids and its documents as text (the end-of-text tokens between
    them are tokens, not text)."""
    import numpy as np

    from tokenizer import load_tokenizer
    tok = load_tokenizer(data_path)
    with open(os.path.join(data_path, "meta.json")) as f:
        ids = np.fromfile(os.path.join(data_path, f"{split}.bin"), dtype=json.load(f)["dtype"])
    documents = [tok.decode(d[d != tok.eot_id].tolist()) for d in np.split(ids, np.flatnonzero(ids == tok.eot_id))]
    return ids, [d for d in documents if d]


def val_text_size(data_path):
    """The val split's token ids and its characters: its documents' code points counted."""
    ids, documents = split_documents(data_path)
    return ids, sum(map(len, documents))


def describe(args):
    """A model's shape in a few words, from its model_args."""
    if args["arch"] == "lstm":
        return f"LSTM {args['n_layer']}×{args['n_embd']}"
    return (f"{args['arch']} {args['n_layer']}×{args['n_embd']}, {args['n_head']} heads, "
            f"{'pre' if args['norm_first'] else 'post'}-norm {args['norm']}, {args['pos']}, {args['mlp']}"
            + (f" {args['mlp_hidden']}" if args.get("mlp_hidden") else ""))


def ms_per_new_token(model, prompt, vocab_limit, where, ctx):
    """Median ms per generated token after the prompt: (generate(prompt, 1 + n) -
    generate(prompt, 1)) / n leaves the prompt's own pass out. Greedy, with the cache."""
    from engine import generate
    def seconds(n):
        t0 = time.perf_counter()
        with ctx:
            generate(model, prompt, n, temperature=0, vocab_limit=vocab_limit)
        sync(where)
        return time.perf_counter() - t0
    seconds(1 + gen_new_tokens)  # warm-up
    return 1000 * statistics.median_high((seconds(1 + gen_new_tokens) - seconds(1)) / gen_new_tokens
                                         for _ in range(repeats))


def measure_run(out_dir, where, ptdtype, val_ids, val_chars, batches):
    """Everything the table says about one trained run but its training memory."""
    from runtime import autocast, load_run
    model, tok, ckpt = load_run(out_dir, where)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    final = [r for r in records if "val_loss" in r][-1]
    speeds = [r["tok_per_s"] for r in records if "tok_per_s" in r]
    if model.config.arch != "lstm" and gen_prompt_tokens + gen_new_tokens > model.config.block_size:
        fail(f"gen_prompt_tokens + gen_new_tokens = {gen_prompt_tokens + gen_new_tokens} is longer than the "
             f"context of {out_dir} (block_size {model.config.block_size}): the cache would be rebuilt each step")
    c = ckpt["config"]
    prompt = torch.tensor(val_ids[:gen_prompt_tokens].astype("int64"), device=where)
    return {
        "model": describe(ckpt["model_args"]),
        "parameters": model.num_params(non_embedding=False),
        "tokens": ckpt["iter_num"] * c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"],
        "val_loss": round(final["val_loss"], 4),
        "val_ppl": round(math.exp(final["val_loss"]), 2),
        "val_bpb": round(final["val_bpb"], 4),
        "val_bpc": round(final["val_loss"] / math.log(2) * len(val_ids) / val_chars, 4),
        "train_s": final["elapsed_s"],
        "tok_per_s": statistics.median_high(speeds) if speeds else None,
        "ms_per_token": {str(b): round(ms_per_new_token(model, prompt.expand(b, -1), tok.vocab_size, where,
                                                        autocast(where, ptdtype)), 3) for b in batches},
    }, {key: c.get(key) for key in BUDGET}


def study_table(runs, batches):
    columns = ["model", "parameters", "tokens", "val loss", "val ppl", "val bpb", "val bpc", "train s",
               "train tok/s", *[f"ms/token, batch {b}" for b in batches], "train peak RSS MB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, r in runs.items():
        cells = [f"{name}: {r['model']}", f"{r['parameters'] / 1e6:.2f}M", f"{r['tokens'] / 1e6:.2f}M",
                 f"{r['val_loss']:.3f}", f"{r['val_ppl']:.1f}", f"{r['val_bpb']:.3f}", f"{r['val_bpc']:.3f}",
                 f"{r['train_s']:.0f}", f"{r['tok_per_s']:,.0f}" if r["tok_per_s"] else "-",
                 *[f"{r['ms_per_token'][str(b)]:.2f}" for b in batches], f"{r['train_peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_override_words():
    """train_overrides as a list of --key=value words, or a clear error."""
    try:
        overrides = shlex.split(train_overrides)
    except ValueError as e:  # an unclosed quote
        fail(f"train_overrides={train_overrides!r}: {e}")
    if not all(o.startswith("--") for o in overrides):
        fail(f"train_overrides={train_overrides!r} must be --key=value words for train.py")
    return overrides


def bench_study():
    paths = configs.split(",")
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            fail(f"config file not found: {path}")
    if len(set(names)) < len(names):
        fail(f"configs={configs!r}: two configs have the same file name, and the runs are named after it")
    batches = positive_ints("gen_batch_sizes", gen_batch_sizes)
    if min(gen_prompt_tokens, gen_new_tokens, repeats) < 1:
        fail("gen_prompt_tokens, gen_new_tokens and repeats must be at least 1")
    overrides = train_override_words()
    try:
        where, ptdtype = device_and_dtype()
    except ValueError as e:
        fail(str(e))
    if readme:
        read_readme()  # a README that cannot take the table fails now, not after the training
    root = work_dir or tempfile.mkdtemp(prefix="nanolex-study-")
    for name in names:
        if os.path.exists(os.path.join(root, name, "ckpt.pt")):
            fail(f"{os.path.join(root, name)} already holds a run: remove it or choose another --work_dir")
    try:
        data_path = prepare_study_dataset()
        trained = {name: train_run(path, os.path.join(root, name), overrides) for name, path in zip(names, paths)}
        val_ids, val_chars = val_text_size(data_path)
        runs, budgets = {}, {}
        for name in names:
            runs[name], budgets[name] = measure_run(os.path.join(root, name), where, ptdtype, val_ids, val_chars,
                                                    batches)
            runs[name]["train_wall_s"] = round(trained[name][0], 1)
            runs[name]["train_peak_rss_mb"] = round(trained[name][1], 1)
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)
    for key in BUDGET:
        if len({repr(b[key]) for b in budgets.values()}) > 1:
            print(f"warning: the runs do not share one budget: {key} is "
                  + ", ".join(f"{b[key]!r} ({name})" for name, b in budgets.items()))
    if len({r["tokens"] for r in runs.values()}) > 1:
        print("warning: the runs did not all train on the same number of tokens (see the table)")
    dtype_name = str(ptdtype).removeprefix("torch.")
    table = study_table(runs, batches) + (
        f"\nOne tokenizer and one token budget for all: `{dataset}` ({len(val_ids):,} val tokens, {val_chars:,} val "
        f"characters). val loss: train.py's last eval, per token; ppl = e^loss; bpb: train.py's val_bpb (val tokens "
        f"per byte); bpc = loss in bits × val tokens / val characters (the val split decoded by the tokenizer, "
        f"end-of-text tokens counted as tokens, not characters). train s: time at the last eval (evals included); "
        f"tok/s: median of the logged steps. ms/token: median of {repeats} of (generate(prompt, 1 + n) − "
        f"generate(prompt, 1)) / n, n = {gen_new_tokens} new tokens after a {gen_prompt_tokens}-token prompt, greedy, "
        f"with the KV cache (LSTM: its h, c). Peak RSS: the train.py process's own (os.wait4).\n\n"
        f"`python bench.py {shlex.join(sys.argv[1:])}` on {machine(where)}, torch {torch.__version__}, "
        f"{dtype_name} on {where}, {time.strftime('%Y-%m-%d')}.\n")
    print(table, end="")
    if readme:
        from runtime import save_atomically
        text = with_table(read_readme(), table)
        save_atomically(readme, lambda f: f.write(text.encode("utf-8")))
        print(f"wrote the table into {readme}")
    print(json.dumps({"runs": runs, "dataset": dataset, "val_tokens": len(val_ids), "val_chars": val_chars,
                      "device": where, "dtype": dtype_name, "readme": readme}))


# ---- optimizers: loss against time of each optimizer on the same run ------------------------

OPTIMIZERS_BEGIN, OPTIMIZERS_END = "<!-- optimizers:begin -->", "<!-- optimizers:end -->"


def bench_optimizers():
    """train.py with budget and optimizer_config once per optimizer of `optimizers`, the same
    model, batches and schedule shape; each one's loss against wall time in one plot (plot_file)
    and a table (into readme between the optimizers markers)."""
    try:
        runs = {name: float(lr) for name, lr in (pair.split(":") for pair in optimizers.split(","))}
    except ValueError:
        fail(f"optimizers={optimizers!r} must be name:learning_rate pairs separated by commas, "
             "e.g. adamw:2e-3,lion:3e-4")
    for path in (budget, optimizer_config):
        if path and not os.path.isfile(path):
            fail(f"config file not found: {path}")
    overrides = train_override_words()
    if plot_file:
        try:
            import matplotlib
        except ImportError:
            fail("the plot needs matplotlib: pip install matplotlib==3.11.2")
        matplotlib.use("Agg")  # files only, no window
    if readme:
        read_readme(OPTIMIZERS_BEGIN, OPTIMIZERS_END)
    try:
        where, ptdtype = device_and_dtype()
    except ValueError as e:
        fail(str(e))
    root = work_dir or tempfile.mkdtemp(prefix="nanolex-optimizers-")
    logs, rss = {}, {}
    try:
        prepare_study_dataset()
        for name, lr in runs.items():
            out = os.path.join(root, name)
            if os.path.exists(os.path.join(out, "ckpt.pt")):
                fail(f"{out} already holds a run: remove it or choose another --work_dir")
            _, rss[name] = train_run(optimizer_config, out, overrides + [
                f"--optimizer={name}", f"--learning_rate={lr}", f"--min_lr={lr / 10}"])
            with open(os.path.join(out, "log.jsonl")) as f:
                logs[name] = [json.loads(line) for line in f]
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)
    rows = {}
    for name, log in logs.items():
        final = [r for r in log if "val_loss" in r][-1]
        speeds = [r["tok_per_s"] for r in log if "tok_per_s" in r]
        rows[name] = {"learning_rate": runs[name], "iters": final["iter"], "val_loss": round(final["val_loss"], 4),
                      "val_bpb": round(final["val_bpb"], 4) if "val_bpb" in final else None,
                      "train_s": final["elapsed_s"], "tok_per_s": statistics.median_high(speeds) if speeds else None,
                      "peak_rss_mb": round(rss[name], 1)}
    lines = ["| optimizer | learning rate | iterations | val loss | val bpb | train s | train tok/s | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['learning_rate']:g} | {r['iters']} | {r['val_loss']:.3f} | "
                     + (f"{r['val_bpb']:.3f}" if r["val_bpb"] is not None else "-")
                     + f" | {r['train_s']:.0f} | {r['tok_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |")
    table = "\n".join(lines) + (
        f"\n\nval loss and bpb: train.py's last eval; train s: wall time at it (evals included); tok/s: median of "
        f"the logged steps; peak RSS: the train.py process's own. `python bench.py {shlex.join(sys.argv[1:])}` on "
        f"{machine(where)}, torch {torch.__version__}, {str(ptdtype).removeprefix('torch.')} on {where}, "
        f"{time.strftime('%Y-%m-%d')}.\n")
    print(table, end="")
    if plot_file:
        import matplotlib.pyplot as plt
        figure, axes = plt.subplots(figsize=(8, 5))
        for name, log in logs.items():
            steps = [r for r in log if "tok_per_s" in r]
            evals = [r for r in log if "val_loss" in r]
            line, = axes.plot([r["elapsed_s"] for r in steps], [r["loss"] for r in steps], alpha=0.5, linewidth=1)
            axes.plot([r["elapsed_s"] for r in evals], [r["val_loss"] for r in evals], "o-", color=line.get_color(),
                      label=f"{name} (lr {runs[name]:g}): val loss")
        axes.set_xlabel("wall time, s (evals included)")
        axes.set_ylabel("loss, nats per token (thin: train, dots: val)")
        axes.set_title(f"optimizers on {dataset}")
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(plot_file, dpi=100)
        print(f"wrote {plot_file}")
    if readme:
        from runtime import save_atomically
        text = with_table(read_readme(OPTIMIZERS_BEGIN, OPTIMIZERS_END), table, OPTIMIZERS_BEGIN, OPTIMIZERS_END,
                          "Optimizers")
        save_atomically(readme, lambda f: f.write(text.encode("utf-8")))
        print(f"wrote the table into {readme}")
    print(json.dumps({"runs": rows, "dataset": dataset, "device": where, "plot": plot_file, "readme": readme}))


# ---- decode: generation speed of a trained run ------------------------------------------------

def bench_decode():
    """Greedy decoding from a decode_prompt_tokens prompt (random ids) until the context is full,
    per precision (fp32; bf16 where the device has the units; int8 weights on a CPU; fp32 with
    the compiled decoding step), batch size and cache: time to the first token and new tokens/s
    (medians); with draft_out_dir, speculative decoding at batch 1 and its acceptance rate."""
    import copy

    from engine import Engine, generate
    from runtime import autocast, load_run, pick_dtype, quantize
    if not out_dir:
        fail("--what=decode needs --out_dir=RUN, a trained run")
    batches = positive_ints("decode_batch_sizes", decode_batch_sizes)
    try:
        where, _ = device_and_dtype()
        model, tok, _ = load_run(out_dir, where)
    except ValueError as e:
        fail(str(e))
    arch, block = model.config.arch, model.config.block_size
    if arch not in ("gpt", "conditional", "lstm"):
        fail(f"--what=decode times next-token models (gpt, conditional, lstm), not {arch!r}")
    if not 1 <= decode_prompt_tokens < block or repeats < 1:
        fail(f"decode_prompt_tokens must be from 1 to {block - 1} (the run's context), repeats at least 1")
    new = block - decode_prompt_tokens
    precisions = {"float32": (model, torch.float32)}  # name: (model, the dtype it computes in)
    if pick_dtype(where, "auto") != torch.float32:  # bf16 (fp16) where the device has the units
        precisions[str(pick_dtype(where, "auto")).removeprefix("torch.")] = (model, pick_dtype(where, "auto"))
    if where == "cpu":
        precisions["int8"] = (quantize(copy.deepcopy(model)), torch.float32)
    compiled = decode_compile and arch != "lstm" and model.config.attention == "sdpa"
    if compiled:
        precisions["compiled"] = (model, torch.float32)
    rows, compile_seconds = [], {}
    for name, (timed, ptdtype) in precisions.items():
        step = torch.compile(model.decode_step) if name == "compiled" else None
        for batch, cache in [(b, True) for b in batches] + ([] if step else [(1, False)]):
            generator = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, tok.vocab_size, (batch, decode_prompt_tokens), generator=generator).to(where)
            inputs = {"labels": torch.zeros(batch, dtype=torch.long, device=where)} if arch == "conditional" else {}

            def write(n):
                with autocast(where, ptdtype):
                    generate(timed, prompt, n, temperature=0, use_cache=cache, vocab_limit=tok.vocab_size, step=step,
                             **inputs)
                sync(where)
            if step is not None:  # the first steps compile (again for a new batch size: its dimension turns dynamic)
                t0 = time.perf_counter()
                write(3)
                compile_seconds[batch] = round(time.perf_counter() - t0, 1)
            first = median_seconds(lambda: write(1), repeats)
            whole = median_seconds(lambda: write(new), repeats)
            rows.append({"dtype": name, "batch": batch, "cache": cache, "first_token_ms": round(1000 * first, 1),
                         "tok_per_s": round(batch * new / whole, 1)})
            print(f"{name:>9} batch {batch:>3} {'cache' if cache else 'no cache':>8}: first token "
                  f"{1000 * first:7.1f} ms, {batch * new / whole:8.1f} new tokens/s", flush=True)

    def speed(name, batch, cache):
        return next(r["tok_per_s"] for r in rows if (r["dtype"], r["batch"], r["cache"]) == (name, batch, cache))
    ratios = {"cache_over_no_cache": round(speed("float32", 1, True) / speed("float32", 1, False), 2),
              f"batch_{batches[-1]}_over_batch_{batches[0]}": round(speed("float32", batches[-1], True)
                                                                     / speed("float32", batches[0], True), 2)}
    for name in list(precisions)[1:]:
        ratios[f"{name}_over_float32"] = round(speed(name, 1, True) / speed("float32", 1, True), 2)
    if compile_seconds:
        print("compiling the decoding step took " + ", ".join(f"{s} s (batch {b})" for b, s in compile_seconds.items()))
    if draft_out_dir:
        rows.append(speculative_row(Engine(model, tok, where, torch.float32), new))
        ratios["speculative_over_float32"] = round(rows[-1]["tok_per_s"] / speed("float32", 1, True), 2)
    print(f"{decode_prompt_tokens}-token prompt, {new} new tokens, greedy, medians of {repeats}; "
          f"{machine(where)}, torch {torch.__version__}: " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    print(json.dumps({"run": out_dir, "prompt_tokens": decode_prompt_tokens, "new_tokens": new, "rows": rows,
                      "ratios": ratios, "compile_seconds": compile_seconds, "device": where}))


def speculative_row(engine, new):
    """bench_decode's row for speculative decoding with the draft run draft_out_dir, fp32, batch 1;
    the prompt: the same random ids."""
    from engine import Engine
    from tokenizer import tokenizer_fingerprint
    if tokenizer_fingerprint(draft_out_dir) != tokenizer_fingerprint(out_dir):
        fail(f"the draft run {draft_out_dir} has another tokenizer than {out_dir}")
    try:
        engine.draft = Engine.load(draft_out_dir, engine.device, "float32")
    except ValueError as e:
        fail(str(e))
    prompt = torch.randint(0, engine.tokenizer.vocab_size, (decode_prompt_tokens,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    labels = {"condition": engine.labels[0]} if engine.labels else {}
    done = []

    def write(n):
        done.append(engine.generate([prompt], temperature=0, max_new_tokens=n, ignore_eos=True, **labels)[0])
        sync(engine.device)
    first = median_seconds(lambda: write(1), repeats)
    whole = median_seconds(lambda: write(new), repeats)
    row = {"dtype": "float32", "batch": 1, "cache": True, "speculative": True, "draft": draft_out_dir,
           "acceptance": round(done[-1].draft_acceptance, 3), "first_token_ms": round(1000 * first, 1),
           "tok_per_s": round(new / whole, 1)}
    print(f"speculative batch   1    cache: first token {1000 * first:7.1f} ms, {new / whole:8.1f} new tokens/s, "
          f"{row['acceptance']:.0%} of the draft's tokens accepted", flush=True)
    return row


# ---- serve: serve.py under concurrent clients ---------------------------------------------------

def start_server(extra):
    """serve.py on out_dir at a free loopback port, as its own process: (process, url, load seconds)."""
    import re
    server = subprocess.Popen([sys.executable, script("serve.py"), f"--out_dir={out_dir}", "--port=0",
                               f"--device={device}", f"--dtype={dtype}", "--rate_limit=0", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        ready = re.search(r"at (http://\S+/) \(loaded in ([\d.]+) s\)", line)
        if ready:
            return server, ready.group(1), float(ready.group(2))
    fail(f"serve.py --out_dir={out_dir} did not start (exit code {server.wait()})")


def closed_loop(url, clients):
    """clients threads, each sending /generate requests back to back for serve_seconds: new tokens/s,
    requests/s, p50/p95 latency (s) and the largest batch the server ran so far."""
    import threading

    import httpx
    latencies, tokens, errors, stop_at = [], [0], [], time.perf_counter() + serve_seconds

    def client(c):
        with httpx.Client(base_url=url, timeout=120) as http:
            n = 0
            while time.perf_counter() < stop_at:
                body = {"prompt": f"SECTION {c}.{n} The Licensee shall", "max_new_tokens": serve_new_tokens,
                        "ignore_eos": True, "temperature": 0.8, "top_k": 200}  # no seed: a batch shares one
                t0 = time.perf_counter()
                answer = http.post("/generate", json=body)
                if answer.status_code != 200:
                    errors.append(answer.text)
                    return
                latencies.append(time.perf_counter() - t0)
                tokens[0] += answer.json()["usage"]["completion_tokens"]
                n += 1
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        fail(f"the server answered an error under {clients} clients: {errors[0][:200]}")
    cut = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    health = httpx.get(url + "health").json()
    return {"clients": clients, "tok_per_s": round(tokens[0] / wall, 1),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(cut[18], 3),
            "largest_batch": health.get("largest_batch")}


def bench_serve():
    """serve.py as configured, then one request at a time (--max_batch_size=1), under each number of
    clients in serve_clients; the ratio of the most clients' tokens/s batched to one at a time."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        fail("--what=serve sends requests with httpx: pip install httpx==0.28.1")
    if not out_dir:
        fail("--what=serve needs --out_dir=RUN, a trained run")
    counts = positive_ints("serve_clients", serve_clients)
    if serve_seconds <= 0 or serve_new_tokens < 1:
        fail("serve_seconds must be above 0 and serve_new_tokens at least 1")
    rows, loads = [], []
    for server_kind, extra in [("batched", []), ("one at a time", ["--max_batch_size=1"])]:
        for clients in counts:  # a fresh server for each: its largest batch is this load's
            server, url, load = start_server(extra)
            loads.append(load)
            try:
                rows.append({"server": server_kind, **closed_loop(url, clients)})
            finally:
                server.terminate()
                server.wait()
            r = rows[-1]
            print(f"{server_kind:>13}, {clients:>3} clients: {r['tok_per_s']:7.1f} new tokens/s, "
                  f"{r['requests_per_s']:6.2f} requests/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
                  f"largest batch {r['largest_batch']}", flush=True)
    most = max(counts)
    speed = {r["server"]: r["tok_per_s"] for r in rows if r["clients"] == most}
    ratio = round(speed["batched"] / speed["one at a time"], 2)
    print(f"{most} clients: batched serving {ratio}x the new tokens/s of one at a time; the run loaded in "
          f"{min(loads):.1f} to {max(loads):.1f} s; {machine(device_and_dtype()[0])}, torch {torch.__version__}")
    print(json.dumps({"run": out_dir, "rows": rows, f"batched_over_one_at_a_time_{most}_clients": ratio,
                      "load_seconds": [min(loads), max(loads)], "new_tokens": serve_new_tokens,
                      "seconds": serve_seconds}))


# ---- nanogpt: this project against nanoGPT on this machine ----------------------------------------------

# nanoGPT's README's CPU run of its config/train_shakespeare_char.py, as printed there
NANOGPT_RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                  "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                  "--lr_decay_iters=2000", "--dropout=0.0"]
SPEED_SHAPE = ["--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=256", "--batch_size=16",
               "--gradient_accumulation_steps=1"]
DOCUMENT_BREAK = "\n\n"  # between documents in nanoGPT's character stream: context, never scored


def nanogpt_datasets(nano_root, data_path):
    """The built-in corpus as nanoGPT reads a dataset (data/NAME/{train,val}.bin, meta.pkl, under
    nano_root): legal_char, the same documents as characters (its recipe's kind of tokens), and
    legal_bpe, our own token ids (the speed and sampling runs: the same vocabulary on both sides).
    Returns the val documents and the characters' ids."""
    import pickle

    import numpy as np

    from tokenizer import load_tokenizer, token_bytes
    os.makedirs(nano_root, exist_ok=True)
    shutil.copy(os.path.join(nanogpt_dir, "configurator.py"), nano_root)  # its scripts read it from where they run
    texts = {split: split_documents(data_path, split)[1] for split in ("train", "val")}
    chars = sorted(set(DOCUMENT_BREAK).union(*(set(d) for docs in texts.values() for d in docs)))
    stoi = {c: i for i, c in enumerate(chars)}
    folder = os.path.join(nano_root, "data", "legal_char")
    os.makedirs(folder, exist_ok=True)
    for split, docs in texts.items():
        np.array([stoi[c] for c in DOCUMENT_BREAK.join(docs)], dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": stoi, "itos": dict(enumerate(chars))}, f)
    folder = os.path.join(nano_root, "data", "legal_bpe")
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "val"):
        shutil.copy(os.path.join(data_path, f"{split}.bin"), folder)  # uint16, as nanoGPT reads them
    tok = load_tokenizer(data_path)
    pieces = [p.decode(errors="replace") if p else "" for p in token_bytes(tok)[0]]
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:  # its sample.py encodes a prompt a character a token
        pickle.dump({"vocab_size": tok.vocab_size, "itos": dict(enumerate(pieces)),
                     "stoi": {p: t for t, p in enumerate(pieces) if len(p) == 1}}, f)
    return texts["val"], stoi


def run_timed(args, cwd=None):
    """run_logged with no time limit: a command's wall seconds and its output; a failure stops the
    benchmark (its output is shown above)."""
    t0 = time.time()
    code, out = run_logged(args, None, cwd)
    if code:
        fail(f"{os.path.basename(args[1])} failed (exit code {code}; its output is above)")
    return time.time() - t0, out


def nanogpt_bits_per_byte(run, documents, stoi):
    """Exact val bits per byte of a nanoGPT character run: its model (loaded from the checkout's
    model.py) over the documents joined by DOCUMENT_BREAK, in windows of its context that move on
    by half of it, as eval.py reads ours; every character of a document scored once, over its
    UTF-8 bytes."""
    import importlib.util

    import torch.nn.functional as F
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(nanogpt_dir, "model.py"))
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    checkpoint = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=False)
    model = theirs.GPT(theirs.GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
    model.eval()
    stream, weight = [], []  # each position's id, and its bytes if scored (0: a break)
    for i, doc in enumerate(documents):
        if i:
            stream += [stoi[c] for c in DOCUMENT_BREAK]
            weight += [0] * len(DOCUMENT_BREAK)
        stream += [stoi[c] for c in doc]
        weight += [len(c.encode()) for c in doc]
    ids, weight = torch.tensor(stream), torch.tensor(weight)
    T = model.config.block_size
    stride, nats, scored_up_to = T // 2, 0.0, 1  # the next target position to score
    with torch.no_grad():
        for begin in range(0, len(stream) - 1, stride):
            end = min(begin + T, len(stream) - 1)  # inputs begin..end-1 predict begin+1..end
            logits, _ = model(ids[None, begin:end], ids[None, begin + 1:end + 1])
            losses = F.cross_entropy(logits[0], ids[begin + 1:end + 1], reduction="none")
            new = torch.arange(begin + 1, end + 1) >= scored_up_to
            nats += (losses * (weight[begin + 1:end + 1] > 0) * new).sum().item()
            scored_up_to = end + 1
            if end == len(stream) - 1:
                break
    return nats / weight[1:].sum().item() / math.log(2)


def logged_steps(log_path):
    """The lines of a train.py log.jsonl that report steps (with log_interval=1, each one step's tok/s)."""
    with open(log_path) as f:
        return [r for r in map(json.loads, f) if "tok_per_s" in r]


def middle_step(steps):
    """The median step's own line (of an even count, the lower middle one)."""
    return sorted(steps, key=lambda r: r["tok_per_s"])[(len(steps) - 1) // 2]


def median_nanogpt_speed(output, tokens_per_iter, skip=10):
    """Median training tokens/s from nanoGPT's log lines ("iter N: loss L, time Tms, ...") past `skip`."""
    times = [float(line.split("time ")[1].split("ms")[0]) for line in output.splitlines()
             if line.startswith("iter ") and int(line.split()[1].rstrip(":")) > skip]
    return tokens_per_iter / (statistics.median(times) / 1000)


def bench_nanogpt():
    if not os.path.isfile(os.path.join(nanogpt_dir, "train.py")) or not os.path.isfile(os.path.join(nanogpt_dir, "model.py")):
        fail(f"nanogpt_dir={nanogpt_dir!r} is not a nanoGPT checkout (no train.py and model.py there): "
             "git clone https://github.com/karpathy/nanoGPT and give its folder")
    parts = nanogpt_parts.split(",")
    unknown = set(parts) - {"speed", "sample", "quality"}
    if unknown:
        fail(f"nanogpt_parts: {', '.join(sorted(unknown))} not among speed, sample, quality")
    seconds_list = [float(x) for x in quality_seconds.split(",")] if "quality" in parts else []
    data_path = os.path.join(data_dir, "legal")
    if not os.path.isfile(os.path.join(data_path, "meta.json")):
        run_timed([sys.executable, script("prepare.py"), f"--data_dir={data_dir}"])
    root = work_dir or tempfile.mkdtemp(prefix="nanogpt-")
    nano_root = os.path.join(root, "nanogpt")
    theirs = [sys.executable, os.path.join(nanogpt_dir, "train.py")]
    ours = [sys.executable, script("train.py"), f"--data_dir={data_dir}", "--report=False"]
    summary = {"machine": machine("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(summary["machine"], flush=True)
    try:
        val_documents, stoi = nanogpt_datasets(nano_root, data_path)
        if "speed" in parts or "sample" in parts:  # the runs double as the sampling runs: 30 steps is enough
            steps = [f"--max_iters={speed_iters}", f"--eval_interval={speed_iters}", "--eval_iters=1", "--log_interval=1"]
            paths = {"ours": [], "ours_fp32_eager": ["--dtype=float32", "--compile=False"],
                     "nanogpt": ["--compile=False"], "nanogpt_compiled": ["--compile=True"]}
            speeds = {name: [] for name in paths}
            for _ in range(rounds):  # taking turns, so a noisy neighbour slows each alike
                for name, extra in paths.items():
                    out = os.path.join(root, f"speed-{name}")
                    shutil.rmtree(out, ignore_errors=True)
                    if name.startswith("ours"):
                        run_timed([*ours, *SPEED_SHAPE, *steps, *extra, f"--out_dir={out}", "--max_seconds=0"])
                        logged = logged_steps(os.path.join(out, "log.jsonl"))
                        speeds[name].append(middle_step([r for r in logged if r["iter"] > 10])["tok_per_s"])  # 1-10 compile
                    else:
                        _, said = run_timed([*theirs, *SPEED_SHAPE, *steps, *extra, "--dataset=legal_bpe", "--device=cpu",
                                               "--dtype=float32", f"--out_dir={out}"], cwd=nano_root)
                        speeds[name].append(median_nanogpt_speed(said, 16 * 256))
                    print(f"{name}: {speeds[name][-1]:,.0f} tok/s", flush=True)
            best = {name: statistics.median(v) for name, v in speeds.items()}
            summary["speed"] = {"shape": " ".join(SPEED_SHAPE), "tok_per_s": {k: round(v, 1) for k, v in best.items()},
                                "ours_over_nanogpt": round(best["ours"] / max(best["nanogpt"], best["nanogpt_compiled"]), 3),
                                "ours_fp32_eager_over_nanogpt": round(best["ours_fp32_eager"] / best["nanogpt"], 3)}
            print(json.dumps(summary["speed"]), flush=True)
        if "sample" in parts:
            prompt, new = "The Licensee shall", 1000
            commands = {"ours": [sys.executable, script("sample.py"), f"--out_dir={root}/speed-ours", f"--start={prompt}",
                                 "--num_samples=1", f"--max_new_tokens={new}", "--ignore_eos=True"],
                        "nanogpt": [sys.executable, os.path.join(nanogpt_dir, "sample.py"), "--init_from=resume",
                                    f"--out_dir={root}/speed-nanogpt", f"--start={prompt}", "--num_samples=1",
                                    f"--max_new_tokens={new}", "--device=cpu", "--dtype=float32", "--compile=False"]}
            took = {name: [] for name in commands}
            for _ in range(rounds):
                for name, command in commands.items():
                    took[name].append(run_timed(command, cwd=nano_root)[0])
                    print(f"{name}: {new} new tokens, whole process {took[name][-1]:.1f} s", flush=True)
            middle = {k: statistics.median(v) for k, v in took.items()}
            summary["sample"] = {"new_tokens": new, "seconds": {k: round(v, 2) for k, v in middle.items()},
                                 "ours_speedup": round(middle["nanogpt"] / middle["ours"], 2)}
            print(json.dumps(summary["sample"]), flush=True)
        if "quality" in parts:
            quality = {}
            for budget_s in seconds_list:
                out = os.path.join(root, f"legal-small-{budget_s:g}s")
                shutil.rmtree(out, ignore_errors=True)
                took, _ = run_timed([*ours, script("config/legal_small.py"), f"--out_dir={out}", f"--max_seconds={budget_s:g}"])
                run_timed([sys.executable, script("eval.py"), f"--out_dir={out}", f"--data_dir={data_dir}"])
                with open(os.path.join(out, "eval.json")) as f:
                    bpb = next(iter(json.load(f).values()))["bits_per_byte"]
                quality[f"legal_small_{budget_s:g}s"] = {"val_bpb": round(bpb, 4), "seconds": round(took, 1)}
                print(f"legal_small --max_seconds={budget_s:g}: exact val bpb {bpb:.4f} ({took:.0f} s in all)", flush=True)
            out = os.path.join(root, "nanogpt-recipe")
            took, said = run_timed([*theirs, os.path.join(nanogpt_dir, "config", "train_shakespeare_char.py"),
                                      *NANOGPT_RECIPE, "--dataset=legal_char", f"--out_dir={out}",
                                      "--always_save_checkpoint=True", *recipe_overrides.split()], cwd=nano_root)
            bpb = nanogpt_bits_per_byte(out, val_documents, stoi)
            quality["nanogpt_recipe"] = {"val_bpb": round(bpb, 4), "seconds": round(took, 1)}
            print(f"nanoGPT's CPU recipe: exact val bpb {bpb:.4f} ({took:.0f} s in all)", flush=True)
            for key, row in quality.items():
                row["of_nanogpt"] = round(row["val_bpb"] / bpb, 3)
            summary["quality"] = quality
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary))


# ---- gpu: one check of the GPU paths ------------------------------------------------------------------

def run_logged(args, timeout, cwd=None):
    """A command, the tail of its output passed through; (its exit code, its output). A command
    that runs past timeout seconds is stopped and counts as failed (exit code None)."""
    print(f"$ {shlex.join(args)}", flush=True)
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd or script("."))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-3000:] + f"\nstopped after {timeout} s", flush=True)
        return None, out
    print((done.stdout + done.stderr)[-3000:], flush=True)
    return done.returncode, done.stdout


def gpu_training(name, root):
    """GPT-2 small's shape (12 x 768, 12 heads, 1024 tokens) trained for a few hundred steps by
    this script's train mode (train.py, bf16 autocast, torch.compile, the fused AdamW) on the
    built-in corpus, prepared into root (prepare.py's default vocabulary): tokens/s and MFU against the data
    sheet (train.py's) and against the measured bf16 matmul peak."""
    from runtime import measure_matmul_peak
    shape = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024"]
    code, out = run_logged([sys.executable, script("bench.py"), *shape, f"--batch_size={batch_size}",
                            f"--data_dir={root}/data", "--dtype=bfloat16", "--compile=True", "--warmup_iters=20",
                            "--iters=200"], timeout=300)
    if code != 0:
        return {"error": "the training run failed or ran out of time (its output is above)"}
    row = json.loads(out.strip().splitlines()[-1])
    measured = measure_matmul_peak("cuda", torch.bfloat16)
    row["measured_peak_tflops"] = round(measured / 1e12, 1)
    if row["mfu"] is not None:  # the model's FLOP/s, as train.py counted them against the data sheet's peak
        row["mfu_of_measured_peak"] = round(row["mfu"] * row["peak_tflops"] * 1e12 / measured, 4)
    row["gpu"] = name
    return row


def gpu_ddp(root):
    """train.py under torchrun, one process per GPU here, on the built-in corpus (prepared into
    root): config/legal_gpu.py for 100 steps. Its median tokens/s and its last val loss."""
    n = torch.cuda.device_count()
    code, _ = run_logged([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                          script("train.py"), script("config/legal_gpu.py"), f"--data_dir={root}/data",
                          f"--out_dir={root}/ddp", "--max_iters=100", "--eval_interval=100", "--eval_iters=10",
                          f"--gradient_accumulation_steps={n}"], timeout=240)
    if code != 0:
        return {"processes": n, "error": "train.py under torchrun failed or ran out of time (its output is above)"}
    with open(os.path.join(root, "ddp", "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    speeds = [r["tok_per_s"] for r in records if "tok_per_s" in r]
    return {"processes": n, "tok_per_s": statistics.median_high(speeds[1:] or speeds),  # the first: compiling
            "mfu": statistics.median_high([r["mfu"] for r in records if r.get("mfu") is not None] or [None]),
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1]}


def gpu_tests():
    """The GPU-marked tests (tests/test_gpu.py): whether they passed, and pytest's last line."""
    code, out = run_logged([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            script("tests/test_gpu.py")], timeout=300)
    return {"passed": code == 0, "result": (out.strip().splitlines() or ["no output"])[-1]}


def gpu_decoding(out_dir):
    """The DDP run decoding one prompt greedily past its context, eagerly and with the compiled step
    replayed by CUDA graphs (Engine(compile=True) on CUDA): new tokens/s of each, the same ids."""
    from engine import Engine
    rows = {}
    for name, compiled in (("eager", False), ("cuda_graphs", True)):
        engine = Engine.load(out_dir, "cuda", "bfloat16", compile=compiled)
        options = dict(max_new_tokens=400, temperature=0, ignore_eos=True)
        engine.generate("The Licensee shall", **options)  # warm-up: compiles and records the graphs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = engine.generate("The Licensee shall", **options)
        torch.cuda.synchronize()
        rows[name] = {"tok_per_s": round(len(done.ids) / (time.perf_counter() - t0), 1), "ids": done.ids}
    same = rows["eager"].pop("ids") == rows["cuda_graphs"].pop("ids")
    return {**rows, "same_tokens": same,
            "cuda_graphs_over_eager": round(rows["cuda_graphs"]["tok_per_s"] / rows["eager"]["tok_per_s"], 2)}


def bench_gpu():
    """The GPU check: each part's result (or its error) printed as it comes, then all of them in one
    JSON object, printed last. Exits 1 when any part failed, so that a CI job can run it."""
    if not torch.cuda.is_available():
        fail("--what=gpu needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)")
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    summary = {"gpu": gpu, "gpus": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability()),
               "torch": torch.__version__}

    def part(name, measure, *args):
        """One part's result, or the error it raised (its traceback printed: no part stops the others),
        printed as it comes, so that a check cut short still says what it measured."""
        try:
            summary[name] = measure(*args)
        except Exception as e:
            traceback.print_exc()
            summary[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"gpu check, {name}: {json.dumps(summary[name])}", flush=True)

    part("gpu_tests", gpu_tests)
    root = work_dir or tempfile.mkdtemp(prefix="nanolex-gpu-")
    try:
        part("training", gpu_training, gpu, root)
        part("ddp", gpu_ddp, root)
        if "error" in summary["ddp"]:
            summary["decoding"] = {"error": "no run to decode with: the DDP run failed"}
        else:
            part("decoding", gpu_decoding, os.path.join(root, "ddp"))
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 1)
    # a part that raised holds an "error" (and the tests' part then no "passed")
    failed = not summary["gpu_tests"].get("passed") or any("error" in summary[k] for k in ("training", "ddp",
                                                                                           "decoding"))
    print(json.dumps(summary))
    sys.exit(1 if failed else 0)


# ---- train: train.py's own steps, timed by its own log ---------------------------------------------

DATASET_DECIDES = ("vocab_size", "n_labels", "n_classes")  # train.py reads these from the dataset


def train_dataset_path():
    """data_dir/train_dataset, prepared here when it is the built-in corpus and missing; a dataset
    arch cannot train on is a clear error before anything runs."""
    path = os.path.join(data_dir, train_dataset)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        if train_dataset != "legal":
            fail(f"no dataset at {path}: prepare it with python prepare.py --input=YOUR_FILES "
                 f"--dataset={train_dataset} --data_dir={data_dir}, or leave --train_dataset=legal")
        run_timed([sys.executable, script("prepare.py"), f"--data_dir={os.path.abspath(data_dir)}"])
    try:
        with open(os.path.join(path, "meta.json")) as f:
            labelled = bool(json.load(f).get("labels"))
    except (OSError, ValueError, AttributeError) as e:
        fail(f"cannot read {path}/meta.json ({e}): prepare it again with prepare.py")
    if arch == "conditional" and not labelled:
        fail(f"arch='conditional' trains on a control label per document and {path} has none: python prepare.py "
             "--labels=True makes the built-in labelled corpus (then --train_dataset=licenses), or prepare your "
             "own with --labels=True")
    return path


def train_timed(out, baseline):
    """train.py for warmup_iters + iters steps of this shape into out, as a user runs it (baseline: fp32
    eager), its output passed through; the median of its logged steps past the warm-up. With
    log_interval=1 each log line's tok/s is one step's wall time in train.py: batches from the
    memmap, every micro-step, clipping, the optimizer step and its host syncs. Its one eval (and the
    checkpoint it writes) comes after the last logged step, outside the timed steps."""
    steps = warmup_iters + iters
    model_args = [f"--{f.name}={config[f.name]}" for f in fields(ModelConfig) if f.name in given]
    run_timed([sys.executable, script("train.py"), *model_args, f"--batch_size={batch_size}",
               f"--gradient_accumulation_steps={gradient_accumulation_steps}", f"--optimizer={optimizer}",
               f"--grad_checkpoint={grad_checkpoint}", f"--device={device}",
               f"--dtype={'float32' if baseline else dtype}", f"--compile={False if baseline else compile}",
               f"--seed={seed}", f"--data_dir={os.path.abspath(data_dir)}", f"--dataset={train_dataset}", f"--out_dir={out}",
               f"--max_iters={steps}", f"--eval_interval={steps}", "--eval_iters=1", "--log_interval=1",
               "--report=False", "--max_seconds=0"])
    from runtime import peak_flops
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    logged = logged_steps(os.path.join(out, "log.jsonl"))
    timed = [r for r in logged if r["iter"] > warmup_iters]
    if not timed:
        fail(f"train.py logged none of the {iters} steps after the warm-up: every one was skipped (non-finite)")
    middle = middle_step(timed)
    peak = peak_flops(run["device"].split(":")[0], getattr(torch, run["dtype"]))
    print(f"{run['parameters'] / 1e6:.2f}M parameters, median of {len(timed)} of train.py's steps: "
          f"{1000 * run['tokens_per_iter'] / middle['tok_per_s']:.1f} ms", flush=True)
    return {
        "tok_per_s": middle["tok_per_s"],
        "ms_per_iter": round(1000 * run["tokens_per_iter"] / middle["tok_per_s"], 2),
        "mfu": middle["mfu"],  # of the measured peak in this dtype (None: a GPU without a known peak)
        "peak_tflops": None if peak is None else round(peak / 1e12, 3),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in logged),
        "device": run["device"],
        "dtype": run["dtype"],
        "compile": run["compile"],
    }


def bench_train():
    if iters < 1 or warmup_iters < 0 or rounds < 1 or gradient_accumulation_steps < 1:
        fail("iters and rounds must be at least 1, warmup_iters at least 0, gradient_accumulation_steps at least 1")
    decided = [name for name in DATASET_DECIDES if name in given]
    if decided:
        fail(f"{', '.join(decided)}: train mode runs train.py, which takes these from the dataset "
             f"(data_dir/train_dataset); leave them out")
    try:  # a device that is not here, or a model that cannot be, fails before any data is prepared
        pick_compile(*device_and_dtype(), compile)
        ModelConfig.from_settings({**config, "n_labels": int(arch == "conditional")})  # (the dataset's count, later)
    except ValueError as e:
        fail(str(e))
    train_dataset_path()
    root = os.path.abspath(work_dir) if work_dir else tempfile.mkdtemp(prefix="nanolex-train-")
    try:
        if not compare:
            print(json.dumps(train_timed(os.path.join(root, "train"), fp32_eager)))
            return
        # Each path is a train.py process of its own, so neither's memory peak or compiled code leaks
        # into the other; they take turns for `rounds` rounds so that a noisy neighbour slows both alike.
        results = {"default": [], "fp32_eager": []}
        for i in range(rounds):
            for name in results:
                results[name].append(train_timed(os.path.join(root, f"{name}-{i + 1}"), name == "fp32_eager"))
                print(f"{name}: {json.dumps(results[name][-1])}", flush=True)
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)
    speedups = sorted(d["tok_per_s"] / b["tok_per_s"] for d, b in zip(results["default"], results["fp32_eager"]))
    middle = {name: sorted(runs, key=lambda r: r["tok_per_s"])[rounds // 2] for name, runs in results.items()}
    speedup = statistics.median_high(speedups)
    print(f"speedup of the default path over fp32 eager, median of {rounds} rounds: {speedup:.2f}x")
    print(json.dumps({**middle["default"], "fp32_eager": middle["fp32_eager"], "speedup": round(speedup, 3),
                      "speedups": [round(s, 3) for s in speedups]}))


MODES = {"train": bench_train, "tokenizers": bench_tokenizers, "prepare": bench_prepare, "attention": bench_attention,
         "study": bench_study, "decode": bench_decode, "serve": bench_serve, "gpu": bench_gpu,
         "optimizers": bench_optimizers, "nanogpt": bench_nanogpt}
if what not in MODES:
    fail(f"what={what!r} is not one of {', '.join(MODES)}")
MODES[what]()
