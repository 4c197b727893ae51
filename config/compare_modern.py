# Today's default decoder at the size of the study's Transformer: pre-norm RMSNorm, rotary
# positions, SwiGLU with its FFN narrowed so the parameters match (3 x 256 x 344 ~ 2 x 256 x 512).
# After the shared budget:
#   python train.py config/compare_budget.py config/compare_modern.py
out_dir = "out-compare-modern"
arch = "gpt"
n_layer = 3
n_head = 4
n_embd = 256
mlp = "swiglu"
mlp_hidden = 344
norm = "rmsnorm"
norm_first = True
pos = "rope"
