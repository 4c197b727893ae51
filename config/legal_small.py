# A small legal-text model that trains on a 2-core laptop CPU in about 7 minutes:
#   python train.py config/legal_small.py
#   python sample.py --out_dir=out-legal-small --start="The Licensee shall"
# and the same model with DDP, two processes (gloo on CPU, nccl on GPUs):
#   torchrun --standalone --nproc_per_node=2 train.py config/legal_small.py
out_dir = "out-legal-small"
eval_interval = 100
eval_iters = 16             # 16 x 8 x 256 tokens: about the val split once, and evals cost ~5% of the
                            # budget (2 splits x 16 batches forward = ~5 training steps, every 100)
log_interval = 10

dataset = "legal"           # prepare.py's default: BPE, vocabulary 4096, whose head costs half 8192's for
                            # ~10% more tokens per byte: more learned per second (docs/performance.md)
gradient_accumulation_steps = 2  # 2 x 8 x 256 = 4096 tokens per step, split over 1 or 2 processes: in a
batch_size = 8              # short budget more steps of fewer tokens learn more (docs/performance.md)
block_size = 256

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0               # dropout costs ~75% more time per step on CPU (random numbers), and
                            # two passes over this corpus do not overfit a 5M-parameter model much

learning_rate = 2e-3
max_iters = 800
lr_decay_iters = 800
warmup_iters = 50
min_lr = 2e-4
max_seconds = 420           # stop, eval and save by 7 minutes; warmup and decay follow the share of it used

# A CPU without bf16 units (AVX2 only) trains a tenth of the tokens a second of one with AMX, and the
# model above would see ~165,000 tokens in 100 s there (val bpb 2.82 against nanoGPT's recipe's 2.24). A
# one-layer, 128-wide model with rotary positions, RMSNorm and SwiGLU takes 5x the tokens in the same
# time and reaches 1.61 (docs/performance.md, "A CPU without bf16 units"); on a GPU, or a CPU
# with bf16 units, the model above. --key=value on the command line still overrides either.
import os
import runtime  # (it imports torch, as train.py does next)

if runtime.pick_device("auto") == "cpu" and not runtime.cpu_has_bf16_units():
    n_layer = 1
    n_embd = 128
    pos = "rope"
    norm = "rmsnorm"
    mlp = "swiglu"
    batch_size = 4              # 4 x 256 = 1024 tokens a micro-step, and one micro-step a process:
    gradient_accumulation_steps = int(os.environ.get("WORLD_SIZE", "1"))  # 2 under torchrun's 2 processes
    max_iters = 4000            # ~4M tokens, as the model above in its 800 steps
    lr_decay_iters = 4000
    warmup_iters = 250
    eval_interval = 250         # a step is ~0.12 s there: an eval (~1 s) every ~30 s, not every ~12 s
