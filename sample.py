"""
Use a trained run, with only what is in its out_dir (weights, model args, tokenizer).
What it does follows the run's architecture:

    python sample.py --out_dir=out-legal-small --start="The Licensee shall"       # gpt, lstm: continue
    python sample.py --out_dir=out-cond --condition=lease --start="The Tenant"     # conditional: steer by label
    python sample.py --out_dir=out-mlm --start="The <|mask|> shall indemnify"      # encoder: fill each mask
    python sample.py --out_dir=out-t5 --start="Summarize: ..." --temperature=0     # encdec: the response to start
    python sample.py --out_dir=out-legal-small --embed='docs/*.txt' --query=FILE:q.txt   # retrieval, any arch
    python sample.py --out_dir=out-legal-small --prompts=prompts.jsonl --stop='["\\n\\n"]' --temperature=0
    python sample.py --out_dir=out-legal-small --start="WHEREAS" --stream=True --repetition_penalty=1.3
    python sample.py --out_dir=out-legal-small --start="WHEREAS" --num_beams=4 --no_repeat_ngram_size=3
    python sample.py --out_dir=out-legal-small --start="Who pays? The" --choices='[" Licensor", " Licensee"]'
    python sample.py --out_dir=out-legal-small --start="as set out in " --regex='§ \\d+(\\.\\d+)*' --temperature=0
    python sample.py --out_dir=out-legal-small --draft_out_dir=out-draft --start="WHEREAS"   # speculative decoding
    python sample.py --out_dir=out-chat --chat=True --temperature=0     # a conversation: a turn a line of stdin

A sample ends at <|endoftext|> (unless --ignore_eos), at a --stop string (not printed), or
after max_new_tokens. The prompts of --prompts= are generated in one batch.

--chat=True holds a conversation with a run trained on conversations (prepare.py's
"messages"): each line of stdin is the user's next turn, and the reply is printed as it
is made; the turns that no longer fit the context are dropped, oldest first.

--embed= embeds documents (a .jsonl file, one per line in its "text" field, or files,
folders and globs, a file each) as the mean of the model's final hidden states, and
with --query= prints the nearest by cosine similarity; --embed_out= saves the vectors.
"""

import json
import sys

import numpy as np

# -----------------------------------------------------------------------------
out_dir = "out"
start = "<|endoftext|>"     # prompt text, or FILE:path to read it from a file; the default: a new document
prompts = ""                # a .jsonl file of prompts, one a line ("a string" or {"prompt": ...}), in one batch
num_samples = 3             # samples of each prompt
# decoding (see engine.py)
max_new_tokens = 300
temperature = 0.8           # 0 = greedy
top_k = 200                 # 0 = off
top_p = 1.0                 # nucleus sampling; 1.0 = off
min_p = 0.0                 # keep tokens at least this times as likely as the likeliest; 0 = off
repetition_penalty = 1.0    # > 1 discourages tokens already in the prompt or the output; 1.0 = off
frequency_penalty = 0.0     # subtracted from a token's logit per time it was generated
presence_penalty = 0.0      # subtracted from a token's logit once it was generated
num_beams = 1               # > 1: beam search instead of sampling, one result per prompt; 1 = off
length_penalty = 1.0        # beam search: a finished hypothesis scores its log-probability / length ** this
no_repeat_ngram_size = 0    # beam search: no n-gram of this size twice in prompt + output; 0 = off
stop = ""                   # a string that ends a sample, or several as a JSON list: '["\\n\\n", "WHEREAS"]'
ignore_eos = False          # go on past <|endoftext|>
choices = ""                # a JSON list of strings: print the one the model finds likeliest, and each one's score
regex = ""                  # a pattern the output must match, e.g. a section number: '§ \d+(\.\d+)*'
draft_out_dir = ""          # speculative decoding: a smaller run with the same tokenizer drafts tokens for this one
draft_tokens = 4            # with draft_out_dir: tokens the draft proposes per round
stream = False              # print the text as it is made
chat = False                # hold a conversation: a user turn a line of stdin, each reply printed (see above)
system = ""                 # with chat: the system message that begins the conversation
seed = 1337                 # sample i uses seed + i
use_cache = True            # KV cache (or LSTM state): each new token reads the state of the ones before
slide = 0                   # past the context the window moves this many tokens at once; 1 = per token; 0 = half
condition = ""              # conditional: the control label to generate under (one of the run's labels)
# the other architectures' uses, and retrieval
fill_top_k = 5              # encoder: fillers printed per <|mask|>
embed = ""                  # documents to embed (see above)
query = ""                  # with embed: text (or FILE:path) whose nearest documents to print
num_results = 5
embed_out = ""              # with embed: write the vectors and document names here (.npz)
# system
device = "auto"
dtype = "auto"
quantize = ""               # int8: int8 weights for decoding on the CPU (computed in float32)
compile = False             # torch.compile the one-token decoding step (gpt, conditional; softmax attention)
# -----------------------------------------------------------------------------
sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)  # the defaults, for beam search
from configurator import check_ranges, configure, fail  # noqa: E402
configure(globals())
check_ranges(globals(), {"num_samples": ">= 1", "max_new_tokens": ">= 0", "temperature": ">= 0", "top_k": ">= 0",
                         "fill_top_k": ">= 1", "num_results": ">= 1", "top_p": "(0, 1]", "min_p": "[0, 1]",
                         "repetition_penalty": "> 0", "frequency_penalty": ">= 0", "presence_penalty": ">= 0",
                         "draft_tokens": ">= 1", "slide": ">= 0"})

import gc  # noqa: E402

# torch's import makes a few hundred thousand objects that live as long as the process: the
# collector would walk them over and over as they are made, and once more at exit. Off while
# importing, then frozen (never walked again); the collector works as usual on what comes after
gc.disable()
import torch  # noqa: E402
from engine import Engine, check_options, embed_documents, rank_by_cosine, read_documents  # noqa: E402
from runtime import save_atomically  # noqa: E402
gc.freeze()
gc.enable()

if embed and not (query or embed_out):
    fail("--embed needs --query= (print the nearest documents) or --embed_out= (save the vectors), or both")
if stream and num_beams > 1:
    fail("--stream prints the text as it is made, but beam search (--num_beams > 1) has it only at the end")


def read_text(value, what):
    """value itself, or the contents of the file that FILE:path names: text, which is not empty,
    is UTF-8, and holds no NUL byte (the mark of a binary file)."""
    if value.startswith("FILE:"):
        path = value[len("FILE:"):]
        what = f"the {what} file {path}"
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read()
        except OSError as e:
            fail(f"cannot read {what}: {e.strerror}")
        except UnicodeDecodeError as e:
            fail(f"{what} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})")
    elif any("\udc80" <= c <= "\udcff" for c in value):  # bytes in the command line that are not UTF-8
        fail(f"{what} is not UTF-8 text")
    if not value.strip():
        fail(f"{what} is empty: give some text (leave --start out to begin a new document)")
    if "\0" in value:
        fail(f"{what} holds a NUL byte: it is not text")
    return value


def read_prompts(path):
    """The prompts of a .jsonl file: one a line, a JSON string or an object with a "prompt" string."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        fail(f"cannot read --prompts={path}: {e.strerror}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"--prompts={path} is not JSON Lines of UTF-8 text ({e})")
    texts = [r.get("prompt") if isinstance(r, dict) else r for r in rows]
    if not texts or not all(isinstance(t, str) and t.strip() and "\0" not in t for t in texts):
        fail(f"--prompts={path}: every line must be a non-empty string or an object with a \"prompt\" string")
    return texts


def choice_list(value):
    """--choices: a JSON list (engine.check_options says what is wrong with its items), or None."""
    if not value:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        fail(f"--choices={value!r} is not a JSON list of strings ({e})")


def stop_strings(value):
    """--stop: one string, or several as a JSON list."""
    if not value.startswith("["):
        return [value] if value else []
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        fail(f"--stop={value!r} starts like a JSON list but is not one ({e})")


start = read_text(start, "--start")
query = read_text(query, "--query") if query else ""
texts = read_prompts(prompts) if prompts else [start]
options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
               repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
               presence_penalty=presence_penalty, stop=stop_strings(stop), ignore_eos=ignore_eos, seed=seed,
               num_beams=num_beams, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
               choices=choice_list(choices), regex=regex or None, draft_tokens=draft_tokens,
               slide=slide)
if num_beams > 1:  # beam search does not sample: the sampling settings count only when set away from their defaults
    options = {k: v for k, v in options.items() if not (k in sampling and v == sampling[k])}
try:
    check_options(options)
    engine = Engine.load(out_dir, device, dtype, quantize, draft_out_dir, compile)
except ValueError as e:
    fail(str(e))
model, tokenizer = engine.model, engine.tokenizer
arch, block_size = model.config.arch, model.config.block_size
ctx = engine.autocast()


def prompt_ids(text):
    """The prompt's ids (special tokens written in it, like <|mask|>, are meant as such); it must fit the context."""
    try:
        return engine.prompt_ids(text)
    except ValueError as e:
        fail(str(e))


def native_kernels_for(rows):
    """This script owns its process: while it decodes `rows` rows in float32 on a CPU, oneDNN is
    off. Its GELU costs a fixed ~15 µs a call more than ATen's own kernel on so few rows, and its
    bf16 products are not used then (docs/generation.md). Not with compile (inductor's CPU code
    reads the switch) nor int8 weights (their kernels may be oneDNN's)."""
    if engine.device == "cpu" and not compile and not quantize and engine.decode_dtype(rows) == torch.float32:
        torch.backends.mkldnn.enabled = False


def write():
    """gpt, conditional, lstm: continue each prompt; encdec: answer it. Each sample after its prompt
    (none for a new document, nor for encdec, whose prompt is the source), then a line of dashes."""
    for text in texts:
        prompt_ids(text)  # fits the context, or a clear error
    one = num_beams > 1 or choices  # beam search and choices have one result
    batch = [text for text in texts for _ in range(1 if one else num_samples)]
    native_kernels_for(1 if stream else num_beams if num_beams > 1 else len(batch))
    shown = ["" if arch == "encdec" or prompt_ids(text) == [tokenizer.eot_id] else tokenizer.decode(prompt_ids(text))
             for text in batch]
    try:
        if stream:  # one sample at a time, each with the seed it has in the batch
            for i, (text, prompt) in enumerate(zip(batch, shown)):
                print(prompt, end="", flush=True)
                for piece in engine.stream(text, condition, use_cache, **{**options, "seed": seed + i}):
                    print(piece, end="", flush=True)
                print("\n" + "-" * 40)
            return
        for completion, prompt in zip(engine.generate(batch, condition, use_cache, **options), shown):
            print(prompt + completion.text)
            if completion.choice_scores is not None:
                print("log-likelihoods: " + ", ".join(f"{c!r} {s:.3f}" for c, s in
                                                      zip(options["choices"], completion.choice_scores)))
            print("-" * 40)
    except ValueError as e:  # a condition that is not one of the run's labels
        fail(f"--{e}" if str(e).startswith("condition=") else str(e))


def fill_masks():
    """encoder: for each <|mask|> in the prompt, the likeliest fillers and their probabilities."""
    try:
        filled = engine.fill(prompt_ids(start), fill_top_k)
    except ValueError as e:
        fail(f"an encoder fills in masks: {e} (in --start)")
    for n, fillers in enumerate(filled["masks"], 1):
        print(f"mask {n}: " + ", ".join(f"{f['text']!r} {f['probability']:.3f}" for f in fillers))
    print(filled["text"])


def retrieve():
    """Embed the documents; print the nearest to the query, and/or save the vectors."""
    try:
        docs = read_documents(embed)
    except ValueError as e:
        fail(f"--embed={embed}: {e}")
    with ctx:
        vectors = embed_documents(model, [tokenizer.encode(text) for _, text, _ in docs])
    if embed_out:
        save_atomically(embed_out, lambda f: np.savez(f, vectors=vectors.cpu().numpy(),
                                                     names=np.array([name for name, _, _ in docs])))
        print(f"wrote {len(docs)} embeddings of size {vectors.size(1)} to {embed_out}")
    if query:
        with ctx:
            target = embed_documents(model, [tokenizer.encode(query)])[0]
        order, similarity = rank_by_cosine(target, vectors)
        for rank, (i, s) in enumerate(zip(order.tolist()[:num_results], similarity.tolist()), 1):
            print(f"{rank}. {s:.4f} {docs[i][0]}")


def fitting(messages):
    """The chat prompt of messages, without their oldest turns (after the system message) while it
    leaves less than a quarter of the context for the reply."""
    try:
        while True:
            ids = engine.chat_prompt(messages)
            first = 1 if messages[0]["role"] == "system" else 0
            if arch == "lstm" or len(ids) <= block_size * 3 // 4 or len(messages) - first <= 1:
                return engine.prompt_ids(ids)  # a clear error if even the last turn does not fit
            del messages[first]
    except ValueError as e:
        fail(str(e))


def converse():
    """--chat: the user's turns from stdin, a line each; the model's replies, as they are made."""
    messages = [{"role": "system", "content": system}] if system else []
    if not engine.has_chat:
        fail(f"{out_dir} has no chat template: its tokenizer was made before the role tokens; train a run on "
             "conversations prepared with a new tokenizer")
    native_kernels_for(num_beams)
    for turn, line in enumerate(sys.stdin):
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt, reply = fitting(messages), ""
        try:
            if num_beams > 1:
                reply = engine.generate([prompt], condition, use_cache, **options)[0].text
                print(reply, end="")
            else:
                for piece in engine.stream(prompt, condition, use_cache, **{**options, "seed": seed + turn}):
                    reply += piece
                    print(piece, end="", flush=True)
        except ValueError as e:
            fail(str(e))
        print()
        messages.append({"role": "assistant", "content": reply})


if embed:
    retrieve()
elif chat:
    converse()
elif arch == "encoder":
    fill_masks()
else:
    write()
