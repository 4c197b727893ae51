# GPT-2 124M shape, for a GPU node and a corpus of your own:
#   python prepare.py --input=/path/to/your/corpus/ --dataset=NAME
#   torchrun --standalone --nproc_per_node=8 train.py config/legal_gpt2.py --dataset=NAME
# 12 sequences x 1024 tokens x 40 micro-steps = ~0.5M tokens per optimizer step.
# Mind the data: a 124M model wants on the order of billions of tokens (~2.5B at 20 tokens
# per parameter). The built-in legal corpus is about 1.2M tokens, far too little: these 5000
# steps would pass over it some 2,000 times. For the built-in corpus use config/legal_gpu.py.
out_dir = "out-legal-gpt2"
eval_interval = 500
eval_iters = 100
log_interval = 10

dataset = "legal"           # a stand-in: give --dataset=NAME, your own corpus prepared as above
gradient_accumulation_steps = 5 * 8
batch_size = 12
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1

learning_rate = 6e-4
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 200
min_lr = 6e-5
