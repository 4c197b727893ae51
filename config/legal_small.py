# A small legal-text model that trains on a laptop CPU in about 5 minutes:
#   python train.py config/legal_small.py
#   python sample.py --out_dir=out-legal-small --start="The Licensee shall"
out_dir = "out-legal-small"
eval_interval = 100
eval_iters = 20
log_interval = 10

dataset = "legal"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 256

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0                 # dropout costs ~75% more time per step on CPU (random numbers), and
                              # 2 epochs of this corpus do not overfit a 5M model much

learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 600
warmup_iters = 50
min_lr = 2e-4
max_seconds = 360           # a safety net on slower machines: stop, eval and save by 6 minutes
