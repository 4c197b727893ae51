# A small legal-text model that trains on a 2-core laptop CPU in 5½ to 6½ minutes:
#   python train.py config/legal_small.py
#   python sample.py --out_dir=out-legal-small --start="The Licensee shall"
# and the same model with DDP, two processes (gloo on CPU, nccl on GPUs):
#   torchrun --standalone --nproc_per_node=2 train.py config/legal_small.py
out_dir = "out-legal-small"
eval_interval = 50
eval_iters = 8              # 8 x 16 x 256 tokens: about the val split's 28.5k once, and evals cost ~5% of the
                            # budget (at 20, 13%: 2 splits x 20 batches forward = ~6.7 training steps, every 50)
log_interval = 10

dataset = "legal"
gradient_accumulation_steps = 2  # 2 x 16 x 256 = 8192 tokens per step, split over 1 or 2 processes
batch_size = 16
block_size = 256

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0               # dropout costs ~75% more time per step on CPU (random numbers), and
                            # two passes over this corpus do not overfit a 5M-parameter model much

learning_rate = 2e-3
max_iters = 400
lr_decay_iters = 400
warmup_iters = 25
min_lr = 2e-4
max_seconds = 420           # a safety net on slower machines: stop, eval and save by 7 minutes
