# An encoder-decoder pretrained by span corruption (out-t5: python train.py config/legal_small.py
# --arch=encdec --out_dir=out-t5), taught to answer questions from question/answer pairs:
#   python prepare.py --input=qa.jsonl --dataset=qa --tokenizer_from=out-t5
#   python train.py config/finetune_qa.py --init_from=out-t5 --out_dir=out-t5-qa
#   python sample.py --out_dir=out-t5-qa --temperature=0 \
#       --start="Clause 7: the Tenant shall keep records. Who shall keep records?"
# Architecture, block size, batch shape, dtype and compile come from the run, unless set here or
# on the command line.
init_from = "out-t5"
out_dir = "out-t5-qa"
dataset = "qa"
dropout = 0.0
learning_rate = 5e-4
min_lr = 5e-5
max_iters = 500
lr_decay_iters = 500
warmup_iters = 20
eval_interval = 100
eval_iters = 20
log_interval = 10
