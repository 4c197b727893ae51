# The LSTM of the LSTM-vs-Transformer study, after the shared budget:
#   python train.py config/compare_budget.py config/compare_lstm.py
out_dir = "out-compare-lstm"
arch = "lstm"               # embedding 256 -> 2 LSTM layers of 256 -> projection
n_layer = 2
n_embd = 256
learning_rate = 6e-3        # the transformers' 2e-3 left the LSTM at unigram loss (val 6.37) after 200 steps
min_lr = 6e-4
