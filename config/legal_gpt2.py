# GPT-2 124M shape on the legal corpus, for a GPU node:
#   torchrun --standalone --nproc_per_node=8 train.py config/legal_gpt2.py
# 12 sequences x 1024 tokens x 40 micro-steps = ~0.5M tokens per optimizer step.
out_dir = "out-legal-gpt2"
eval_interval = 500
eval_iters = 100
log_interval = 10

dataset = "legal"
gradient_accumulation_steps = 5 * 8
batch_size = 12
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1               # the legal corpus is small (~1.5M tokens): regularize

learning_rate = 6e-4
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 200
min_lr = 6e-5
