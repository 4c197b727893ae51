# The budget every model of the LSTM-vs-Transformer study shares: one dataset (BPE, vocab
# 2000), the same batches in the same order, the same schedule shape. Give it first, then a
# model recipe (compare_lstm.py, compare_transformer.py, compare_modern.py):
#   python prepare.py --tokenizer=bpe --vocab_size=2000 --dataset=legal_bpe2000
#   python train.py config/compare_budget.py config/compare_transformer.py
# `python bench.py --what=study` does this for all three and measures them.
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
dropout = 0.2
tie_embeddings = False      # untied in all three: 2-3M parameters each
