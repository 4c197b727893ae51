"""
Text from a trained run, using only what is in its out_dir (weights, model args, tokenizer):

    python sample.py --out_dir=out-legal-small --start="The Licensee shall"
    python sample.py --out_dir=out-legal-small --start=FILE:prompt.txt --temperature=0
"""

import sys

import torch

# -----------------------------------------------------------------------------
out_dir = "out"
start = ""                  # prompt text, or FILE:path to read it from a file; "" = a new document
num_samples = 3
max_new_tokens = 300
temperature = 0.8           # 0 = greedy
top_k = 200                 # 0 = off
top_p = 1.0                 # nucleus sampling; 1.0 = off
seed = 1337
use_cache = True            # KV cache: each new token reads the cached keys/values
device = "auto"
dtype = "auto"
compile = False
# -----------------------------------------------------------------------------
from configurator import configure, fail  # noqa: E402
configure(globals())

from runtime import autocast, load_run, pick_device, pick_dtype  # noqa: E402

for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 0),
                         ("temperature", temperature, 0), ("top_k", top_k, 0)):
    if value < low:
        fail(f"{name} must be at least {low}, got {value}")
if not 0 < top_p <= 1:
    fail(f"top_p must be in (0, 1], got {top_p}")
if start.startswith("FILE:"):
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the --start file {path}: {e.strerror}")
try:
    device = pick_device(device)
    ptdtype = pick_dtype(device, dtype)
    model, tokenizer, _ = load_run(out_dir, device)
except ValueError as e:
    fail(str(e))

generator = torch.Generator(device=device).manual_seed(seed)  # the only randomness in sampling
if compile:
    model = torch.compile(model)

# special tokens written in the prompt (<|endoftext|>, <|mask|>) are meant as such
ids = tokenizer.encode(start, allow_special=True) if start else [tokenizer.eot_id]
block_size = model.config.block_size
if len(ids) > block_size:
    print(f"warning: the prompt is {len(ids)} tokens, longer than the context of {block_size}; "
          f"keeping its last {block_size}", file=sys.stderr)
    ids = ids[-block_size:]
x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)

with autocast(device, ptdtype):
    y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       use_cache=use_cache, generator=generator, vocab_limit=tokenizer.vocab_size)
for row in y.tolist():
    new = row[len(ids):]
    if tokenizer.eot_id in new:  # a document ended: stop there
        new = new[:new.index(tokenizer.eot_id)]
    # prompt and continuation decoded together: a piece may join the prompt's last word (wordpiece "##")
    print(tokenizer.decode((ids if start else []) + new))
    print("-" * 40)
