# The keys evolve.py searches and their ranges, around config/legal_small.py:
#   python evolve.py --space=config/evolve_space.py --base_config=config/legal_small.py
# (low, high): an int or float between them (positive floats on a log scale); [a, b, ...]: one of them.
learning_rate = (5e-4, 6e-3)
warmup_iters = (0, 60)
n_layer = (2, 6)
n_head = [2, 4, 8]
n_embd = [128, 192, 256, 320]
batch_size = [8, 16, 32]
block_size = [128, 256]
dropout = (0.0, 0.1)
vocab_size = [4096, 8192, 16384]  # the tokenizer's: evolve.py prepares the corpus once for each
