"""
Fine-tuning: a run started from another takes its shape and its batch settings; LoRA trains
adapters alone, saves them alone, resumes exactly, loads everywhere and merges; QLoRA's
quantized base; distillation from a teacher; and the bad input of each, one line and exit 2.
"""

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import (ROOT, assert_clear_error, made_once, prepare_dataset, read_log, run_in_process,
                      run_torchrun, train_args, train_losses)
from model import LoRALinear, distillation_kl
from runtime import Int8Linear, NF4Linear, attach_lora, load_run

# a short LoRA run on the shared 30-iteration run: an eval and a checkpoint every 3 iterations
LORA = ["--lora_rank=4", "--lora_dropout=0.1", "--learning_rate=1e-2", "--warmup_iters=0", "--lr_decay_iters=6",
        "--max_iters=6", "--eval_interval=3", "--eval_iters=2", "--dropout=0.0"]


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, dataset, trained_run):
    """A LoRA run of 6 iterations on trained_run, its checkpoints of 3 and 6 kept."""
    def train(folder):
        done = run_in_process("train.py", *train_args(dataset, folder / "out", f"--init_from={trained_run}", *LORA,
                                                      "--keep_last=2"))
        assert done.returncode == 0, done.stderr
    return made_once(tmp_path_factory, "lora", train) / "out"


def logits_of(model, dataset):
    """The model's logits (fp32, no autocast) for the first 64 tokens of the val split."""
    data_dir, name = dataset
    import numpy as np
    meta = json.loads((data_dir / name / "meta.json").read_text())
    ids = np.memmap(data_dir / name / "val.bin", dtype=meta["dtype"], mode="r")[:64].astype("int64")
    idx = torch.from_numpy(ids)[None]
    with torch.no_grad():
        logits, _ = model(idx, targets=idx)  # targets: the logits of every position
    return logits


def test_lora_trains_the_adapters_alone_and_saves_them_alone_with_their_base(lora_run, trained_run, dataset):
    ckpt = torch.load(lora_run / "ckpt.pt", weights_only=True)
    base = torch.load(trained_run / "ckpt.pt", weights_only=True)
    assert ckpt["model"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["model"])
    # the default targets: the query and value rows of each block's fused c_attn, each its own adapter
    assert sorted(k for k in ckpt["model"] if k.startswith("body.blocks.0.")) == [
        "body.blocks.0.attn.c_attn.lora_A.0", "body.blocks.0.attn.c_attn.lora_A.1",
        "body.blocks.0.attn.c_attn.lora_B.0", "body.blocks.0.attn.c_attn.lora_B.1"]
    assert ckpt["model"]["body.blocks.0.attn.c_attn.lora_B.0"].shape == (64, 4)  # q's 64 rows of 192
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # the optimizer holds the adapters alone
    assert ckpt["lora"]["rank"] == 4 and ckpt["lora"]["targets"] == "q,v"
    assert ckpt["lora"]["base"] == str(trained_run) and len(ckpt["lora"]["base_fingerprint"]) == 64
    model, _, _ = load_run(lora_run)
    state = model.state_dict()
    for name, weight in base["model"].items():  # every base weight as it was, bit for bit
        wrapped = name.replace("c_attn.weight", "c_attn.base.weight")
        assert torch.equal(state[wrapped], weight), name
    assert all(ckpt["model"][k].abs().sum() > 0 for k in ckpt["model"] if ".lora_B." in k)  # and the adapters moved
    log = read_log(lora_run)
    evals = [r["val_loss"] for r in log if "val_loss" in r]
    assert evals[-1] < evals[0]
    assert not torch.allclose(logits_of(model, dataset), logits_of(load_run(trained_run)[0], dataset))


def test_a_lora_run_resumes_on_the_same_loss_curve_bit_for_bit(tmp_path, lora_run, trained_run, dataset):
    out_dir = tmp_path / "out"
    shutil.copytree(lora_run, out_dir)
    for name in ("ckpt.pt", "ckpt-00000006.pt", "ckpt-best.pt"):
        os.remove(out_dir / name)
    done = run_in_process("train.py", *train_args(dataset, out_dir, "--init_from=resume", *LORA))
    assert done.returncode == 0, done.stderr
    assert "ckpt-00000003.pt (iteration 3" in done.stdout
    assert train_losses(read_log(out_dir)) == train_losses(read_log(lora_run))  # floats compared exactly
    assert [r["val_loss"] for r in read_log(out_dir) if "val_loss" in r] == \
        [r["val_loss"] for r in read_log(lora_run) if "val_loss" in r]


def test_a_lora_run_on_two_processes_gives_the_losses_of_one_and_resumes(tmp_path, lora_run, trained_run, dataset):
    # TINY_MODEL's two micro-steps: one in each process, the same global batch and adapter dropout masks
    out_dir = tmp_path / "two"
    two = run_torchrun(2, "train.py", *train_args(dataset, out_dir, f"--init_from={trained_run}", *LORA,
                                                  "--keep_last=2"))
    assert two.returncode == 0, two.stdout[-1500:] + two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "LoRA: " in two.stdout
    one = train_losses(read_log(lora_run))
    assert train_losses(read_log(out_dir)) == pytest.approx(one, rel=1e-4)
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["lora"]["base"] == str(trained_run) and all(".lora_" in k for k in ckpt["model"])
    for name in ("ckpt.pt", "ckpt-00000006.pt", "ckpt-best.pt"):  # killed after iteration 3: resume on two
        os.remove(out_dir / name)
    resumed = run_torchrun(2, "train.py", *train_args(dataset, out_dir, "--init_from=resume", *LORA))
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-3000:]
    assert "ckpt-00000003.pt (iteration 3" in resumed.stdout
    assert train_losses(read_log(out_dir)) == pytest.approx(one, rel=1e-4)


def test_a_merged_run_gives_the_adapted_models_logits_and_sample_loads_both(tmp_path, lora_run, dataset):
    merged = tmp_path / "merged"
    done = run_in_process("train.py", f"--merge_lora={lora_run}", f"--out_dir={merged}")
    assert done.returncode == 0, done.stderr
    merged_model, _, ckpt = load_run(merged)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules()) and "lora" not in ckpt
    adapted = logits_of(load_run(lora_run)[0], dataset)
    assert torch.allclose(logits_of(merged_model, dataset), adapted, rtol=0, atol=1e-5)
    texts = [run_in_process("sample.py", f"--out_dir={run}", "--start=The Licensee", "--temperature=0",
                            "--max_new_tokens=12", "--num_samples=1").stdout for run in (lora_run, merged)]
    assert texts[0].startswith("The Licensee") and texts[0] == texts[1]
    done = run_in_process("eval.py", f"--out_dir={lora_run}", "--max_tokens=256")
    assert done.returncode == 0, done.stderr
    refused = run_in_process("export.py", f"--out_dir={lora_run}", f"--to={tmp_path / 'hf'}")
    assert_clear_error(refused, f"python train.py --merge_lora={lora_run} --out_dir=MERGED")
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_trains_adapters_on_a_quantized_base_and_loads_it_again(kind, tmp_path, trained_run, dataset):
    if kind == "nf4":
        pytest.importorskip("torchao")
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args(dataset, out_dir, f"--init_from={trained_run}", *LORA,
                                                  "--max_iters=2", "--eval_interval=2", f"--lora_base_weights={kind}"))
    assert done.returncode == 0, done.stderr
    losses = train_losses(read_log(out_dir))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    model, _, _ = load_run(out_dir)
    layer = model.body.blocks[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, {"int8": Int8Linear, "nf4": NF4Linear}[kind])
    assert isinstance(model.lm_head, {"int8": Int8Linear, "nf4": NF4Linear}[kind])  # the whole base
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert all(ckpt["model"][k].abs().sum() > 0 for k in ckpt["model"] if ".lora_B." in k)
    on_float = load_run(trained_run)[0]  # the same adapters on the float base: quantization's error alone
    attach_lora(on_float, {**ckpt["lora"], "base_weights": "float"}, ckpt["model"])
    want = logits_of(on_float.eval(), dataset)
    error = (logits_of(model, dataset) - want).abs().mean() / want.abs().mean()
    assert 0 < error < {"int8": 0.01, "nf4": 0.1}[kind]  # measured: 0.003 and 0.04


# ---- settings a fine-tuned run takes from its run, and the README's example ---------------------

def test_the_readme_fine_tuning_example_runs_with_the_runs_own_batch_settings(tmp_path, arch_run):
    pretrained = arch_run("encdec")  # out-t5 of the example
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(40):
            party = ["Tenant", "Landlord"][i % 2]
            f.write(json.dumps({"prompt": f"Clause {i}: the {party} shall keep records. Who shall keep records?",
                                "response": f" The {party}."}) + "\n")
    done = run_in_process("prepare.py", "--input=qa.jsonl", "--dataset=qa", f"--tokenizer_from={pretrained}",
                          "--val_fraction=0.1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tiny = ["--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=1"]  # the recipe, shortened
    # python train.py config/finetune_qa.py --init_from=out-t5 --out_dir=out-t5-qa, here in tmp_path
    done = run_in_process("train.py", os.path.join(ROOT, "config", "finetune_qa.py"), f"--init_from={pretrained}",
                          "--out_dir=out-t5-qa", *tiny, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    trained = torch.load(pretrained / "ckpt.pt", weights_only=True)["config"]
    config = torch.load(tmp_path / "out-t5-qa" / "ckpt.pt", weights_only=True)["config"]
    for key in ("arch", "block_size", "batch_size", "gradient_accumulation_steps", "compile", "dtype"):
        assert config[key] == trained[key], key
    assert config["max_iters"] == 2 and config["dataset"] == "qa"  # the command line's and the recipe's
    done = run_in_process("sample.py", "--out_dir=out-t5-qa",
                          "--start=Clause 7: the Tenant shall keep records. Who shall keep records?",
                          "--temperature=0", "--max_new_tokens=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_setting_given_explicitly_wins_over_the_runs_even_at_the_default_value(tmp_path, trained_run, dataset):
    # trained_run: batch_size 8, 2 micro-steps, block 64, compile=False. The command line asks for batch_size
    # 4, and a config file sets 40 micro-steps, which is also the default: both are the user's choice
    (tmp_path / "cfg.py").write_text("gradient_accumulation_steps = 40\n")
    data_dir, name = dataset
    done = run_in_process("train.py", str(tmp_path / "cfg.py"), f"--data_dir={data_dir}", f"--dataset={name}",
                          f"--out_dir={tmp_path / 'out'}", f"--init_from={trained_run}", "--batch_size=4",
                          "--max_iters=0", "--eval_iters=1")
    assert done.returncode == 0, done.stderr[-2000:]
    config = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["config"]
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (4, 40)
    assert (config["block_size"], config["compile"]) == (64, False)  # the run's
    assert "block_size=64, compile=False as it was trained" in done.stdout


# ---- distillation ----------------------------------------------------------------------------

def test_the_kl_term_is_the_hand_computed_one_with_padding_rows_and_masked_positions_left_out():
    # two positions, vocabulary of 2 real tokens + 1 padding row; the second position is masked (-1)
    student = torch.tensor([[0.0, 0.0, 50.0], [5.0, -5.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, -50.0], [-5.0, 5.0, 0.0]])
    targets = torch.tensor([0, -1])
    T = 2.0
    p = torch.tensor([1.0, 0.0]).exp() / torch.tensor([1.0, 0.0]).exp().sum()  # teacher at T: softmax(1, 0)
    q = torch.tensor([0.5, 0.5])                                                 # student at T: softmax(0, 0)
    want = float((p * (p / q).log()).sum())  # 0.731 ln(0.731/0.5) + 0.269 ln(0.269/0.5) = 0.1109
    got = distillation_kl(student, teacher, targets, vocab_size=2, temperature=T)
    assert got.item() == pytest.approx(want, rel=1e-6) and 0.1109 < want < 0.1110
    assert distillation_kl(teacher, teacher, targets, 2, T).item() == pytest.approx(0.0, abs=1e-7)


def test_a_student_distills_from_a_teacher_with_a_finite_falling_loss(tmp_path, trained_run, dataset):
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args(dataset, out_dir, f"--teacher={trained_run}", "--n_layer=1",
                                                  "--n_embd=32", "--max_iters=10", "--eval_interval=10",
                                              "--distill_weight=0.5", "--distill_temperature=2.0"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"distilling {trained_run}" in done.stdout
    losses = list(train_losses(read_log(out_dir)).values())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]) - 0.3


# ---- bad input: one line, exit code 2 --------------------------------------------------------------

@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, corpus):
    return prepare_dataset(corpus, tmp_path_factory.mktemp("other"), "other", 300)


def changed_base(tmp_path, lora_run, trained_run):
    """A copy of lora_run whose base is a copy of trained_run with one weight changed."""
    base, run = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(trained_run, base)
    shutil.copytree(lora_run, run)
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"][0, 0] += 1.0
    torch.save(ckpt, base / "ckpt.pt")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["lora"]["base"] = str(base)
    torch.save(ckpt, run / "ckpt.pt")
    return run


def wider_vocabulary(tmp_path, trained_run):
    """A copy of trained_run with 64 more (padding) vocabulary rows."""
    run = tmp_path / "teacher"
    shutil.copytree(trained_run, run)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    for name in ("embed.wte.weight", "lm_head.weight"):
        ckpt["model"][name] = torch.cat([ckpt["model"][name], torch.zeros(64, 64)])
    ckpt["model_args"]["vocab_size"] += 64
    torch.save(ckpt, run / "ckpt.pt")
    return run


BAD = {
    "targets that match no layer": (lambda t, r, d: ["--lora_targets=q,attn.c_query"],
                                    ["'attn.c_query' match no layer", "body.blocks.*.attn.c_attn (q, k, v)",
                                     "body.blocks.*.mlp.c_fc (up)"]),
    "a tied head": (lambda t, r, d: ["--lora_targets=lm_head"], ["tied to the token embedding"]),
    "a rank larger than the layer": (lambda t, r, d: ["--lora_rank=65", "--lora_targets=v"],
                                     ["lora_rank=65 is larger than body.blocks.0.attn.c_attn", "is 64"]),
    "LoRA from scratch": (lambda t, r, d: ["--init_from=scratch"], ["--init_from=RUN"]),
    "an unknown base kind": (lambda t, r, d: ["--lora_base_weights=int4"], ["not one of float, int8, nf4"]),
    "a teacher of another tokenizer": (lambda t, r, d: ["--lora_rank=0", f"--teacher={r}", "OTHER"],
                                       ["another tokenizer"]),
    "a teacher of another vocabulary": (lambda t, r, d: ["--lora_rank=0", f"--teacher={wider_vocabulary(t, r)}"],
                                        ["384 vocabulary rows", "320"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_fine_tuning_input_is_one_clear_line(case, tmp_path, trained_run, dataset, other_tokenizer):
    more, fragments = BAD[case]
    args = more(tmp_path, trained_run, dataset)
    data = other_tokenizer if "OTHER" in args else dataset
    args = [a for a in args if a != "OTHER"]
    init = [] if "--lora_rank=0" in args else [f"--init_from={trained_run}", "--lora_rank=4"]
    done = run_in_process("train.py", *train_args(data, tmp_path / "out", *init, *args, "--max_iters=2"))
    assert_clear_error(done, *fragments)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_an_adapter_on_another_base_is_refused_by_every_script(tmp_path, lora_run, trained_run, dataset):
    run = changed_base(tmp_path, lora_run, trained_run)
    for script, args in [("sample.py", [f"--out_dir={run}", "--max_new_tokens=2"]),
                         ("eval.py", [f"--out_dir={run}"]),
                         ("train.py", train_args(dataset, run, "--init_from=resume", *LORA)),
                         ("train.py", [f"--merge_lora={run}", f"--out_dir={tmp_path / 'merged'}"])]:
        assert_clear_error(run_in_process(script, *args), "LoRA adapters trained on other weights")
    assert not (tmp_path / "merged").exists()


def test_nf4_without_torchao_names_the_package_and_its_install_command(tmp_path, trained_run, dataset, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed (transformers may have loaded it)
    done = run_in_process("train.py", *train_args(dataset, tmp_path / "out", f"--init_from={trained_run}",
                                                  "--lora_rank=4", "--lora_base_weights=nf4", "--max_iters=2"))
    assert_clear_error(done, "torchao", "pip install torchao==")
