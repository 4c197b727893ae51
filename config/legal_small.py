# A small legal-text model that trains on a 2-core laptop CPU in about 7 minutes:
#   python train.py config/legal_small.py
#   python sample.py --out_dir=out-legal-small --start="The Licensee shall"
# and the same model with DDP, two processes (gloo on CPU, nccl on GPUs):
#   torchrun --standalone --nproc_per_node=2 train.py config/legal_small.py
out_dir = "out-legal-small"
eval_interval = 100
eval_iters = 16             # 16 x 8 x 256 tokens: about the val split's 28.5k once, and evals cost ~5% of the
                            # budget (2 splits x 16 batches forward = ~5 training steps, every 100)
log_interval = 10

dataset = "legal"           # prepare.py's default: BPE, vocabulary 4096. At 100 s on machine D, side by
                            # side in two pairs of runs: exact val bpb 1.386 and 1.497 against 1.521 and 1.761
                            # with 8192 (30-35% more steps: half the head; 10% more tokens per byte)
gradient_accumulation_steps = 2  # 2 x 8 x 256 = 4096 tokens per step, split over 1 or 2 processes: in
batch_size = 8              # 100 s on machine D, 185 such steps reached val bpb 1.80, 94 of 8192 tokens 2.11
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
