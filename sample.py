"""
Use a trained run, with only what is in its out_dir (weights, model args, tokenizer).
What it does follows the run's architecture:

    python sample.py --out_dir=out-legal-small --start="The Licensee shall"       # gpt, lstm: continue
    python sample.py --out_dir=out-cond --condition=lease --start="The Tenant"     # conditional: steer by label
    python sample.py --out_dir=out-mlm --start="The <|mask|> shall indemnify"      # encoder: fill each mask
    python sample.py --out_dir=out-t5 --start="Summarize: ..." --temperature=0     # encdec: the response to start
    python sample.py --out_dir=out-legal-small --embed='docs/*.txt' --query=FILE:q.txt   # retrieval, any arch

--embed= embeds documents (a .jsonl file, one per line in its "text" field, or files,
folders and globs, a file each) as the mean of the model's final hidden states, and
with --query= prints the nearest by cosine similarity; --embed_out= saves the vectors.
"""

import glob
import json
import os

import numpy as np
import torch

# -----------------------------------------------------------------------------
out_dir = "out"
start = "<|endoftext|>"     # prompt text, or FILE:path to read it from a file; the default: a new document
num_samples = 3
max_new_tokens = 300
temperature = 0.8           # 0 = greedy
top_k = 200                 # 0 = off
top_p = 1.0                 # nucleus sampling; 1.0 = off
seed = 1337
use_cache = True            # KV cache (or LSTM state): each new token reads the state of the ones before
condition = ""              # conditional: the control label to generate under (one of the run's labels)
fill_top_k = 5              # encoder: fillers printed per <|mask|>
embed = ""                  # documents to embed (see above)
query = ""                  # with embed: text (or FILE:path) whose nearest documents to print
num_results = 5
embed_out = ""              # with embed: write the vectors and document names here (.npz)
device = "auto"
dtype = "auto"
compile = False
# -----------------------------------------------------------------------------
from configurator import check_ranges, configure, fail  # noqa: E402
configure(globals())
check_ranges(globals(), {"num_samples": ">= 1", "max_new_tokens": ">= 0", "temperature": ">= 0", "top_k": ">= 0",
                         "fill_top_k": ">= 1", "num_results": ">= 1", "top_p": "(0, 1]"})

from engine import embed_documents, generate, rank_by_cosine  # noqa: E402
from runtime import autocast, load_run, pick_device, pick_dtype, save_atomically  # noqa: E402

if embed and not (query or embed_out):
    fail("--embed needs --query= (print the nearest documents) or --embed_out= (save the vectors), or both")


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


start = read_text(start, "--start")
query = read_text(query, "--query") if query else ""
try:
    device = pick_device(device)
    ptdtype = pick_dtype(device, dtype)
    model, tokenizer, _ = load_run(out_dir, device)
except ValueError as e:
    fail(str(e))
arch, block_size = model.config.arch, model.config.block_size
generator = torch.Generator(device=device).manual_seed(seed)  # the only randomness in sampling
if compile:
    model = torch.compile(model)
ctx = autocast(device, ptdtype)


def prompt_ids(text):
    """The prompt's ids (special tokens written in it, like <|mask|>, are meant as such); it must fit the context."""
    ids = tokenizer.encode(text, allow_special=True)
    if len(ids) > block_size:
        fail(f"the prompt is {len(ids)} tokens, longer than the model's context of {block_size}: shorten it")
    return ids


def print_samples(rows, prompt, show_prompt=True):
    """Each row's new tokens up to the end of its document, after the prompt text if show_prompt."""
    for row in rows:
        new = row[len(prompt):]
        if tokenizer.eot_id in new:  # a document ended: stop there
            new = new[:new.index(tokenizer.eot_id)]
        # prompt and continuation decoded together: a piece may join the prompt's last word (wordpiece "##")
        print(tokenizer.decode(prompt + new if show_prompt else new))
        print("-" * 40)


def continue_text():
    """gpt, conditional, lstm: continue the prompt."""
    inputs = {}
    if arch == "conditional":
        with open(os.path.join(out_dir, "meta.json")) as f:
            names = json.load(f)["labels"]
        if condition not in names:
            fail(f"--condition={condition!r} is not one of this run's labels: {', '.join(names)}")
        inputs["labels"] = torch.full((num_samples,), names.index(condition), device=device)
    ids = prompt_ids(start)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    with ctx:
        y = generate(model, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           use_cache=use_cache, generator=generator, vocab_limit=tokenizer.vocab_size, **inputs)
    print_samples(y.tolist(), ids, show_prompt=ids != [tokenizer.eot_id])  # a new document: no prompt to show


def respond():
    """encdec: the response to the prompt, written by the decoder from <|bos|>."""
    src = torch.tensor([prompt_ids(start)] * num_samples, dtype=torch.long, device=device)
    bos = torch.full((num_samples, 1), tokenizer.bos_id, dtype=torch.long, device=device)
    with ctx:
        y = generate(model, bos, min(max_new_tokens, block_size - 1), temperature=temperature, top_k=top_k,
                           top_p=top_p, use_cache=use_cache, generator=generator,
                           vocab_limit=tokenizer.vocab_size, src=src)
    print_samples(y.tolist(), [tokenizer.bos_id], show_prompt=False)


def fill_masks():
    """encoder: for each <|mask|> in the prompt, the likeliest fillers and their probabilities."""
    ids = prompt_ids(start)
    where = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not where:
        fail("an encoder fills in masks: put <|mask|> in --start where a word is missing")
    with torch.no_grad(), ctx:
        logits, _ = model(torch.tensor([ids], device=device))
    for n, i in enumerate(where, 1):
        probs = logits[0, i, :tokenizer.vocab_size].float().softmax(dim=-1)
        best = torch.topk(probs, fill_top_k)
        fillers = ", ".join(f"{tokenizer.decode([t])!r} {p:.3f}" for p, t in zip(best.values.tolist(),
                                                                                 best.indices.tolist()))
        print(f"mask {n}: {fillers}")
    best = logits[0, :, :tokenizer.vocab_size].argmax(dim=-1).tolist()
    print(tokenizer.decode([best[i] if i in where else t for i, t in enumerate(ids)]))


def documents(spec):
    """(name, text) of each document --embed names, read as UTF-8 (bad bytes replaced)."""
    if spec.endswith(".jsonl"):
        try:
            with open(spec, encoding="utf-8", errors="replace") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except OSError as e:
            fail(f"cannot read {spec}: {e.strerror}")
        except json.JSONDecodeError as e:
            fail(f"{spec} is not JSON Lines ({e})")
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            fail(f"{spec}: every line must be an object with a \"text\" string")
        return [(f"{spec}:{i + 1}", r["text"]) for i, r in enumerate(rows)]
    paths, seen = [], set()
    for part in spec.split(","):
        found = glob.glob(os.path.join(part, "**", "*"), recursive=True) if os.path.isdir(part) else glob.glob(part)
        for path in sorted(found):
            if os.path.isfile(path) and os.path.realpath(path) not in seen:  # a link to a file already read
                seen.add(os.path.realpath(path))
                paths.append(path)
    if not paths:
        fail(f"--embed={spec} names no files")
    out = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append((path, f.read()))
    return out


def retrieve():
    """Embed the documents; print the nearest to the query, and/or save the vectors."""
    docs = documents(embed)
    with ctx:
        vectors = embed_documents(model, [tokenizer.encode(text) for _, text in docs])
    if embed_out:
        save_atomically(embed_out, lambda f: np.savez(f, vectors=vectors.cpu().numpy(),
                                                     names=np.array([name for name, _ in docs])))
        print(f"wrote {len(docs)} embeddings of size {vectors.size(1)} to {embed_out}")
    if query:
        with ctx:
            target = embed_documents(model, [tokenizer.encode(query)])[0]
        order, similarity = rank_by_cosine(target, vectors)
        for rank, (i, s) in enumerate(zip(order.tolist()[:num_results], similarity.tolist()), 1):
            print(f"{rank}. {s:.4f} {docs[i][0]}")


if embed:
    retrieve()
elif arch == "encoder":
    fill_masks()
elif arch == "encdec":
    respond()
else:
    continue_text()
