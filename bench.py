"""
Training speed of a model shape: forward + backward + optimizer step on random tokens,
timed after warm-up. The last line printed is one JSON object.

    python bench.py --n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=16
    python bench.py ... --compare     # also the same model in plain fp32 eager mode, and the ratio
"""

import json
import resource
import subprocess
import sys
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
# -----------------------------------------------------------------------------
from configurator import configure, fail  # noqa: E402
config = configure(globals())

from model import GPT, ModelConfig, peak_flops  # noqa: E402
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
model = GPT(model_config).to(device)
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
