# The Transformer of the LSTM-vs-Transformer study, as in 'Attention Is All You Need' but
# small: post-norm, sinusoidal positions, FFN 512. `python bench.py --what=study` trains
# and measures all three compare_*.py recipes. By hand:
#   python prepare.py --tokenizer=bpe --vocab_size=2000 --dataset=legal_bpe2000
#   python train.py config/compare_transformer.py
# The three recipes share one tokenizer and one budget (data, batch, schedule, seed: the
# same tokens in the same order); only the model differs.
out_dir = "out-compare-transformer"
eval_interval = 100
eval_iters = 20
log_interval = 10

dataset = "legal_bpe2000"
gradient_accumulation_steps = 2  # 2 x 16 x 256 = 8192 tokens per step
batch_size = 16
block_size = 256

learning_rate = 2e-3
max_iters = 200             # 1.64M tokens: 1.1 passes over the 1.49M train tokens
lr_decay_iters = 200
warmup_iters = 20
min_lr = 2e-4
seed = 1337
compile = False

arch = "gpt"
n_layer = 3
n_head = 4
n_embd = 256
mlp = "gelu"                # the paper's FFN is ReLU; gelu is the nearest here
mlp_hidden = 512
norm = "layernorm"
norm_first = False          # post-norm: normalize after each residual add
pos = "sinusoidal"
dropout = 0.2
tie_embeddings = False
