# The LSTM of the LSTM-vs-Transformer study; `python bench.py --what=study` trains and
# measures all three compare_*.py recipes. By hand:
#   python prepare.py --tokenizer=bpe --vocab_size=2000 --dataset=legal_bpe2000
#   python train.py config/compare_lstm.py
# The three recipes share one tokenizer and one budget (data, batch, schedule shape, seed:
# the same tokens in the same order); the model differs, and so does the LSTM's learning rate.
out_dir = "out-compare-lstm"
eval_interval = 100
eval_iters = 20
log_interval = 10

dataset = "legal_bpe2000"
gradient_accumulation_steps = 2  # 2 x 16 x 256 = 8192 tokens per step
batch_size = 16
block_size = 256

learning_rate = 6e-3        # the transformers' 2e-3 left the LSTM at unigram loss (val 6.37) after 200
max_iters = 200             # 1.64M tokens: 1.1 passes over the 1.49M train tokens
lr_decay_iters = 200
warmup_iters = 20
min_lr = 6e-4
seed = 1337
compile = False

arch = "lstm"               # embedding 256 -> 2 LSTM layers of 256 -> projection
n_layer = 2
n_embd = 256
dropout = 0.2
tie_embeddings = False      # untied in all three: 2-3M parameters each
