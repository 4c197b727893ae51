# The Transformer of the LSTM-vs-Transformer study, as in 'Attention Is All You Need' but
# small: post-norm, sinusoidal positions, FFN 512. After the shared budget:
#   python train.py config/compare_budget.py config/compare_transformer.py
out_dir = "out-compare-transformer"
arch = "gpt"
n_layer = 3
n_head = 4
n_embd = 256
mlp = "gelu"                # the paper's FFN is ReLU; gelu is the nearest here
mlp_hidden = 512
norm = "layernorm"
norm_first = False          # post-norm: normalize after each residual add
pos = "sinusoidal"
