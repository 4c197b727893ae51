import json
import math
import os
import shutil
from dataclasses import fields

import pytest
import torch

from conftest import (ARCHS, ROOT, assert_clear_error, prepare_dataset, read_log, run_forked, run_in_process,
                      run_script, train_args, train_losses)
from model import ModelConfig

INJECT = os.path.join(ROOT, "tests", "inject.py")

LOG_FIELDS = {"iter", "loss", "lr", "tok_per_s", "mfu", "elapsed_s"}
EVAL_FIELDS = {"iter", "loss", "val_loss", "val_bpb", "elapsed_s"}


def test_training_lowers_the_loss_and_leaves_a_complete_run_directory(trained_run):
    log = read_log(trained_run)
    steps = [r for r in log if "val_loss" not in r]
    evals = [r for r in log if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 31))
    assert [r["iter"] for r in evals] == [10, 20, 30]
    assert all(LOG_FIELDS <= r.keys() for r in steps) and all(EVAL_FIELDS <= r.keys() for r in evals)
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[-1]["val_bpb"] < 8
    assert {"ckpt.pt", "tokenizer.json", "meta.json", "log.jsonl"} <= set(os.listdir(trained_run))
    ckpt = torch.load(os.path.join(trained_run, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert {"model", "optimizer", "model_args", "config", "sampler"} <= ckpt.keys()
    assert ckpt["config"]["max_iters"] == 30
    assert not any(name.endswith(".tmp") for name in os.listdir(trained_run))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr(trained_run):
    # TINY_MODEL: learning_rate 3e-3, warmup_iters 5, lr_decay_iters 30, min_lr 3e-4; step i logs the lr it used
    lr = {r["iter"]: r["lr"] for r in read_log(trained_run) if "val_loss" not in r}
    warmup = [lr[i] for i in range(1, 7)]
    assert all(a < b for a, b in zip(warmup, warmup[1:])) and lr[6] == pytest.approx(3e-3)
    assert all(abs((lr[i + 1] - lr[i]) - (lr[2] - lr[1])) < 1e-9 for i in range(1, 5))  # linear
    decay = [lr[i] for i in range(6, 31)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    for i in range(6, 31):  # cosine from the peak to min_lr over the iterations 5..30
        assert lr[i] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * (i - 1 - 5) / 25)) * (3e-3 - 3e-4))
    assert 3e-4 < lr[30] < 3.2e-4


def test_max_seconds_stops_training_then_evaluates_and_saves_having_warmed_up_and_decayed_in_time(tmp_path, dataset):
    out_dir = tmp_path / "out"
    # a schedule of 100,000 iterations that only the clock can move along: warmup over the first tenth of the
    # time budget, cosine decay over the rest; the first step takes 2 seconds more (as if compiling), which
    # the schedule leaves out, so it has the rest of the 10 to warm up and decay in
    done = run_forked([INJECT, "slow@backward:1", "train.py", *train_args(dataset, out_dir, "--max_iters=100000",
                       "--max_seconds=10", "--lr_decay_iters=100000", "--warmup_iters=10000")])
    assert done.returncode == 0, done.stderr
    log = read_log(out_dir)
    assert "val_loss" in log[-1]
    stopped_at = log[-1]["iter"]
    assert 0 < stopped_at < 100000
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == stopped_at and ckpt["seconds"] >= 10 and ckpt["setup_seconds"] >= 2
    lrs = [r["lr"] for r in log if "val_loss" not in r]  # TINY_MODEL: learning_rate 3e-3, min_lr 3e-4
    assert lrs[0] < 1e-3 and lrs[1] < 1e-3  # still warming up after the slow first step
    assert max(lrs) > 2.4e-3 and lrs[-1] < 1.2e-3
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_the_first_eval_does_not_turn_a_time_boxed_learning_rate_back_up(tmp_path, dataset):
    # the peak comes within the first steps, so the first eval (iteration 10, of many batches: longer
    # than a step) falls in the decay; its seconds leave the schedule, and the rate must go on down
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args(dataset, out_dir, "--max_iters=100000", "--max_seconds=8",
                                                  "--lr_decay_iters=100000", "--warmup_iters=100",
                                                  "--eval_iters=60"))
    assert done.returncode == 0, done.stderr
    log = read_log(out_dir)
    assert any(r["iter"] == 10 and "val_loss" in r for r in log) and log[-1]["iter"] > 12
    lrs = [r["lr"] for r in log if "val_loss" not in r]
    peak = lrs.index(max(lrs))
    assert peak < 10
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_a_missing_default_dataset_is_prepared_instead_of_failing(tmp_path):
    data_dir = tmp_path / "data"
    done = run_in_process("train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
                          "--max_iters=0", "--eval_iters=1", "--n_layer=1", "--n_head=1", "--n_embd=32",
                          "--block_size=32", "--batch_size=2", "--compile=False")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preparing the built-in legal corpus" in done.stdout
    meta = json.loads((data_dir / "legal" / "meta.json").read_text())
    assert meta["splits"]["train"]["bytes"] > 1_000_000


# ---- settings ----------------------------------------------------------------------------

def help_lines(*args):
    """{setting: its line} of python train.py ARGS --help."""
    done = run_in_process("train.py", *args, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.split()[0].partition("=")[0]: line.strip() for line in done.stdout.splitlines()
            if line.startswith("  --")}


def comment_in_source(path, prefix):
    """The comment beside the line of path that starts with prefix."""
    with open(os.path.join(ROOT, path)) as f:
        return next(line for line in f if line.startswith(prefix)).partition("#")[2].strip()


def test_every_model_setting_but_the_datasets_is_a_train_setting_with_the_models_default():
    lines = help_lines()
    for field in fields(ModelConfig):
        if field.name in ("vocab_size", "n_labels", "n_classes"):  # the dataset decides them
            assert f"--{field.name}" not in lines
            continue
        value = field.default if isinstance(field.default, str) else repr(field.default)
        assert lines[f"--{field.name}"].startswith(f"--{field.name}={value}"), lines.get(f"--{field.name}")


def test_help_shows_each_setting_with_its_value_after_a_config_file_and_the_comment_beside_it():
    lines = help_lines("config/compare_transformer.py")
    assert lines["--n_layer"].startswith("--n_layer=3 ")  # the config's, not the default 12
    assert lines["--n_layer"].endswith(comment_in_source("configurator.py", "    n_layer:"))  # a model setting's
    assert lines["--keep_last"].endswith(comment_in_source("train.py", "keep_last ="))  # one of train.py's own


@pytest.mark.parametrize("device, bf16_units, n_layer, pos", [
    ("cpu", True, 4, "learned"), ("cpu", False, 1, "rope"), ("cuda", False, 4, "learned")])
def test_legal_small_is_one_small_layer_only_on_a_cpu_without_bf16_units(monkeypatch, device, bf16_units,
                                                                          n_layer, pos):
    import runtime
    monkeypatch.setattr(runtime, "pick_device", lambda name: device)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: bf16_units)
    lines = help_lines("config/legal_small.py")
    assert lines["--n_layer"].startswith(f"--n_layer={n_layer} ")
    assert lines["--pos"].startswith(f"--pos={pos} ")
    assert help_lines("config/legal_small.py", "--n_layer=2")["--n_layer"].startswith("--n_layer=2 ")  # flags win


def test_legal_small_on_a_cpu_without_bf16_units_takes_one_micro_step_a_process(monkeypatch):
    import runtime  # so torchrun's 2 processes divide its step
    monkeypatch.setattr(runtime, "pick_device", lambda name: "cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    lines = help_lines("config/legal_small.py")
    assert lines["--gradient_accumulation_steps"].startswith("--gradient_accumulation_steps=2 ")


def test_rope_theta_set_on_the_command_line_is_the_trained_models(tmp_path, dataset):
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args(dataset, out_dir, "--pos=rope", "--rope_theta=500000.0",
                                                  "--max_iters=1", "--eval_iters=1"))
    assert done.returncode == 0, done.stderr[-2000:]
    model_args = torch.load(out_dir / "ckpt.pt", weights_only=True)["model_args"]
    assert model_args["pos"] == "rope" and model_args["rope_theta"] == 500000.0


def broken_dataset(tmp_path, dataset, breakage):
    data_dir, name = dataset
    copy = tmp_path / "data"
    shutil.copytree(data_dir / name, copy / name)
    breakage(copy / name)
    return copy, name


def test_the_compiled_path_trains_like_eager(tmp_path, dataset, trained_run):
    # torch.compile must give the same training within bf16 rounding. trained_run is the same training
    # in eager mode: a step's batch, dropout and learning rate do not depend on max_iters
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args(dataset, out_dir, "--max_iters=5", "--compile=True"))
    assert done.returncode == 0, done.stderr[-2000:]
    compiled, eager = train_losses(read_log(out_dir)), train_losses(read_log(trained_run))
    assert sorted(compiled) == [1, 2, 3, 4, 5]
    assert all(abs(compiled[i] - eager[i]) < 0.05 for i in range(1, 6))
    assert json.loads((out_dir / "run.json").read_text())["compile"] is True
    # compile=auto (the default) does not compile on a CPU in fp32: the run says what it did
    done = run_in_process("train.py", *train_args(dataset, tmp_path / "fp32", "--max_iters=1", "--compile=auto",
                                                  "--dtype=float32"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "fp32" / "run.json").read_text())["compile"] is False
    assert "dtype float32, compile False" in done.stdout


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory, corpus):
    """The same corpus prepared with another (smaller) tokenizer."""
    return prepare_dataset(corpus, tmp_path_factory.mktemp("other"), "other", 300)


def test_resuming_on_a_dataset_with_another_tokenizer_is_refused(tmp_path, trained_run, other_dataset):
    run_copy = tmp_path / "run"
    shutil.copytree(trained_run, run_copy)
    done = run_in_process("train.py", *train_args(other_dataset, run_copy, "--init_from=resume", "--max_iters=40"))
    assert_clear_error(done, "was trained with another tokenizer than the dataset")


def test_a_dataset_whose_tokenizer_is_not_its_meta_is_refused(tmp_path, dataset, other_dataset):
    def swap_tokenizer(d):
        for name in ("tokenizer.json", "tokenizer.bpe"):
            shutil.copyfile(other_dataset[0] / "other" / name, d / name)
    broken = broken_dataset(tmp_path, dataset, swap_tokenizer)
    done = run_in_process("train.py", *train_args(broken, tmp_path / "out", "--max_iters=5"))
    assert_clear_error(done, "not the ones meta.json was written with")


def test_prompt_response_data_trains_only_on_the_responses(tmp_path):
    # The prompts are random letters nobody can predict (a loss over them stays above ~2.5
    # nats per token); every response is the same, so the loss over responses alone falls.
    rng = __import__("random").Random(0)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(300):
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(20, 90)))
            f.write(json.dumps({"prompt": f"{prompt}\nIs it lawful?", "response": " It is lawful."}) + "\n")
    done = run_in_process("prepare.py", "--input=qa.jsonl", "--vocab_size=300", "--val_fraction=0.1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args((tmp_path / "data", "legal"), out_dir, "--max_iters=30"))
    assert done.returncode == 0, done.stderr[-2000:]
    evals = [r for r in read_log(out_dir) if "val_loss" in r]
    assert evals[0]["val_loss"] > evals[1]["val_loss"] > evals[2]["val_loss"]
    assert evals[-1]["val_loss"] < 1.2


def test_an_encoder_decoders_pairs_are_padded_to_the_longest_prompt_and_response_not_to_block_size(tmp_path):
    from batches import Batches
    rng = __import__("random").Random(0)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(60):
            words = " ".join(rng.choice(["the Tenant", "shall", "pay", "the rent"]) for _ in range(rng.randint(2, 12)))
            response = " Tenant" * rng.randint(1, 3)
            f.write(json.dumps({"prompt": f"Clause {i}: {words}. Who pays?", "response": response}) + "\n")
    done = run_in_process("prepare.py", "--input=qa.jsonl", "--vocab_size=300", "--val_fraction=0.2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = Batches(tmp_path / "data" / "legal", "encdec", 128, 8, 0.15, 3)
    pairs = [data.prompt_response(split, start) for split in ("train", "val") for start in data.doc_starts[split]]
    longest_prompt, longest_response = (max(len(pair[i]) for pair in pairs) for i in (0, 1))
    assert 10 < longest_prompt < 100 and 3 < longest_response < 20  # the data's, far below block_size
    batch = data.get("train", torch.Generator().manual_seed(0))
    assert batch["src"].shape == (8, longest_prompt)
    assert batch["idx"].shape == batch["targets"].shape == (8, longest_response)
    for row in range(8):  # each row is a whole pair, then padding
        source = batch["src"][row][batch["src_mask"][row]].tolist()
        target = batch["targets"][row][batch["targets"][row] >= 0].tolist()
        assert any(source == p.tolist() and target == r.tolist() for p, r in pairs)
    short = Batches(tmp_path / "data" / "legal", "encdec", 8, 8, 0.15, 3)  # block_size still caps both
    assert short.source_length == 8 and short.target_length == min(8, longest_response)


# ---- every architecture --------------------------------------------------------------------

def resume_from_20(run_dir, tmp_path, dataset, *args):
    """A copy of a run kept at its checkpoint of iteration 20 (keep_last=2), trained on to 30."""
    out_dir = tmp_path / "out"
    shutil.copytree(run_dir, out_dir)
    for name in ("ckpt.pt", "ckpt-00000030.pt", "ckpt-best.pt"):
        os.remove(out_dir / name)
    done = run_script("train.py", *train_args(dataset, out_dir, *args, "--max_iters=30", "--init_from=resume"))
    assert done.returncode == 0, done.stderr
    assert "ckpt-00000020.pt (iteration 20" in done.stdout
    return read_log(out_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_learns_and_resumes_on_the_same_loss_curve(arch, tmp_path, arch_run, dataset,
                                                                     labelled_dataset):
    uninterrupted = read_log(arch_run(arch))
    steps = [r for r in uninterrupted if "val_loss" not in r]
    evals = [r for r in uninterrupted if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 31))
    assert sum(r["loss"] for r in steps[-3:]) / 3 < sum(r["loss"] for r in steps[:3]) / 3 - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and 0 < evals[-1]["val_accuracy"] <= 1
    # bits per byte only where every token is predicted from the ones before it
    assert ("val_bpb" in evals[-1]) == (arch in ("conditional", "lstm"))
    assert ("balance_loss" in steps[-1]) == (arch == "encoder")  # the encoder's recipe has experts
    ckpt = torch.load(arch_run(arch) / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["arch"] == arch
    resumed = resume_from_20(arch_run(arch), tmp_path, labelled_dataset if arch == "conditional" else dataset,
                             *ARCHS[arch])
    assert train_losses(resumed) == train_losses(uninterrupted)
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in evals]


def test_an_encoder_decoder_fine_tuned_on_prompt_response_pairs_answers_them(tmp_path, arch_run):
    # pretrained by span corruption (arch_run), then taught to name the party a clause names:
    # the answer is in the source, so only a decoder that reads it through cross-attention gets it
    # (it learns to at about 300-500 steps: after 250, the party was right in 3 to 6 of 12 prompts)
    rng = __import__("random").Random(0)
    parties = ["Tenant", "Landlord", "Licensee", "Licensor"]
    duties = ["pay the rent", "repair the roof", "keep records"]
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(300):
            party, duty = rng.choice(parties), rng.choice(duties)
            f.write(json.dumps({"prompt": f"Clause {i}: the {party} shall {duty}. Who shall {duty}?",
                                "response": f" The {party}."}) + "\n")
    pretrained = arch_run("encdec")
    done = run_in_process("prepare.py", "--input=qa.jsonl", "--dataset=qa", f"--tokenizer_from={pretrained}",
                      "--val_fraction=0.1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args((tmp_path / "data", "qa"), out_dir, "--arch=encdec",
                                              f"--init_from={pretrained}", "--batch_size=16",
                                              "--gradient_accumulation_steps=1", "--dropout=0", "--block_size=48",
                                              "--max_iters=500", "--lr_decay_iters=500", "--eval_interval=250"))
    assert done.returncode == 0, done.stderr
    assert "fine-tuning" in done.stdout
    evals = [r for r in read_log(out_dir) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_accuracy"] > 0.9
    asked = ("Tenant", "Licensor")
    with open(tmp_path / "ask.jsonl", "w") as f:
        for party in asked:
            f.write(json.dumps(f"Clause 7: the {party} shall keep records. Who shall keep records?") + "\n")
    done = run_in_process("sample.py", f"--out_dir={out_dir}", "--temperature=0", "--num_samples=1",
                      f"--prompts={tmp_path / 'ask.jsonl'}")
    answers = done.stdout.split("-" * 40 + "\n")[:-1]  # each answer is followed by a line of dashes
    assert len(answers) == 2 and all(a.startswith(f" The {p}.\n") for a, p in zip(answers, asked)), done.stdout


def test_fine_tuning_needs_a_dataset_in_the_runs_own_tokenizer(tmp_path, trained_run, other_dataset):
    done = run_in_process("train.py", *train_args(other_dataset, tmp_path / "out", f"--init_from={trained_run}"))
    assert_clear_error(done, "another tokenizer", f"--tokenizer_from={trained_run}")
