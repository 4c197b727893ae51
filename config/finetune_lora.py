# LoRA: low-rank adapters on the attention's query and value projections of a frozen run, here the
# main command's out-legal-small, adapted to one kind of document (the licenses under
# /usr/share/common-licenses) in its own tokenizer:
#   mkdir -p licenses && for f in /usr/share/common-licenses/*; do cp -L "$f" "licenses/${f##*/}.txt"; done
#   python prepare.py --input=licenses --dataset=licenses --tokenizer_from=out-legal-small
#   python train.py config/finetune_lora.py
#   python sample.py --out_dir=out-lora --start="The Licensee shall"        # base + adapters
#   python train.py --merge_lora=out-lora --out_dir=out-lora-merged        # folded into one run
# The checkpoint holds the adapters alone (and the base's fingerprint): out-legal-small must stay.
# QLoRA, the frozen base in 8 or 4 bits: --lora_base_weights=int8, or nf4 (pip install torchao==0.18.0).
init_from = "out-legal-small"
out_dir = "out-lora"
dataset = "licenses"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "q,v"
learning_rate = 2e-3        # adapters start from zero and are few: a higher rate than full fine-tuning's
min_lr = 2e-4
weight_decay = 0.0
max_iters = 200
lr_decay_iters = 200
warmup_iters = 10
eval_interval = 50
eval_iters = 20
log_interval = 10
