# A model the size of the built-in legal corpus (~1.2M tokens), for one GPU:
#   python train.py config/legal_gpu.py
#   python sample.py --out_dir=out-legal-gpu --start="The Licensee shall"
# A 6-layer, 6-head, 384-wide GPT (~12M parameters at prepare.py's default 4096-token vocabulary) on
# 64 x 256 = 16,384 tokens per step: 1500 steps are ~25M tokens, ~20 passes over the corpus.
# Twenty passes are many for a model this size: dropout 0.2 against overfitting, and
# ckpt-best.pt keeps the checkpoint of the best val loss should a later one be worse.
# Not yet run on a GPU.
out_dir = "out-legal-gpu"
eval_interval = 250
eval_iters = 50
log_interval = 10

dataset = "legal"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 1500
lr_decay_iters = 1500       # cosine down to min_lr at the last step
warmup_iters = 100
min_lr = 1e-4
