# Supervised fine-tuning of a GPT on prompt/response pairs (the loss on the responses alone),
# starting from the run the main command trains, in its tokenizer:
#   python prepare.py --input=pairs.jsonl --dataset=sft --tokenizer_from=out-legal-small
#   python train.py config/finetune_sft.py
#   python sample.py --out_dir=out-sft --start="Who shall repair the roof?" --temperature=0
# Block size, batch shape, dtype and compile come from the run (init_from), unless set here or on the
# command line; the rest is the fine-tuning's own: a short run at a tenth of pre-training's rate.
init_from = "out-legal-small"
out_dir = "out-sft"
dataset = "sft"
dropout = 0.0
learning_rate = 2e-4
min_lr = 2e-5
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
eval_interval = 50
eval_iters = 20
log_interval = 10
