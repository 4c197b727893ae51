import json
import math
import os
from dataclasses import fields

import pytest

from conftest import ROOT, assert_clear_error, run_in_process, run_script
from model import ModelConfig

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--warmup_iters=1",
        "--iters=3", "--compile=False", "--device=cpu"]
FIELDS = {"tok_per_s", "ms_per_iter", "mfu", "peak_tflops", "peak_mem_mb", "device", "dtype", "compile"}


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def on(dataset):
    """bench.py's settings for training on a prepared (data_dir, name)."""
    return [f"--data_dir={dataset[0]}", f"--train_dataset={dataset[1]}"]


def test_compare_times_train_py_and_its_fp32_eager_baseline_by_their_own_logs(dataset, tmp_path):
    done = run_in_process("bench.py", *TINY, *on(dataset), "--compare", "--rounds=2", f"--work_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    baseline = result["fp32_eager"]
    assert FIELDS <= result.keys() and FIELDS <= baseline.keys()
    assert baseline["dtype"] == "float32" and baseline["compile"] is False
    assert result["compile"] is False and result["device"] == baseline["device"] == "cpu"
    assert len(result["speedups"]) == 2 and result["speedup"] == result["speedups"][1]
    runs = {name: [json.loads(line.split(": ", 1)[1]) for line in done.stdout.splitlines()
                   if line.startswith(f"{name}: ")] for name in ("default", "fp32_eager")}
    assert [len(r) for r in runs.values()] == [2, 2]
    for name, rows in runs.items():
        for i, row in enumerate(rows):
            # what was reported is train.py's log of that run: its steps after the warm-up, the median one
            log = [json.loads(line) for line in open(tmp_path / f"{name}-{i + 1}" / "log.jsonl")]
            steps = [r for r in log if "tok_per_s" in r]
            assert [r["iter"] for r in steps] == [1, 2, 3, 4]
            assert [r["iter"] for r in log if "val_loss" in r] == [4]  # the one eval: after the last timed step
            middle = sorted(r["tok_per_s"] for r in steps[1:])[1]
            assert row["tok_per_s"] == middle
            assert row["ms_per_iter"] == round(1000 * 2 * 32 / middle, 2)
            assert row["mfu"] == next(r["mfu"] for r in steps[1:] if r["tok_per_s"] == middle)
            assert row["peak_mem_mb"] == max(r["peak_mem_mb"] for r in steps) > 0


def test_every_model_config_field_is_a_bench_setting_listed_by_help():
    done = run_in_process("bench.py", "--help")
    assert done.returncode == 0, done.stderr
    flags = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  --")}
    for field in fields(ModelConfig):
        default = field.default if isinstance(field.default, str) else repr(field.default)
        assert f"--{field.name}={default}" in flags


# each architecture and variant train.py trains, two at a time where they combine (as tests/conftest.py's ARCHS)
VARIANTS = {"encdec_linear_attention": ["--arch=encdec", "--attention=linear"],
            "encoder_moe": ["--arch=encoder", "--n_expert=4", "--expert_top_k=2"],
            "conditional": ["--arch=conditional"], "lstm": ["--arch=lstm"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_mode_times_every_architecture_and_variant(variant, request):
    data = request.getfixturevalue("labelled_dataset" if variant == "conditional" else "dataset")
    done = run_in_process("bench.py", *TINY, "--warmup_iters=0", "--iters=1", *on(data), *VARIANTS[variant])
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert FIELDS <= result.keys() and result["tok_per_s"] > 0
    assert f"--arch={VARIANTS[variant][0].split('=')[1]}" in done.stdout  # given to train.py


def test_train_mode_needs_a_dataset_that_fits_and_takes_its_vocabulary_from_it(dataset, tmp_path):
    assert_clear_error(run_in_process("bench.py", *TINY, *on(dataset), "--arch=conditional"),
                       "arch='conditional' trains on a control label per document", "--labels=True")
    assert_clear_error(run_in_process("bench.py", *TINY, *on(dataset), "--vocab_size=128"),
                       "vocab_size: train mode runs train.py, which takes these from the dataset")
    assert_clear_error(run_in_process("bench.py", *TINY, f"--data_dir={tmp_path}", "--train_dataset=mine"),
                       f"no dataset at {tmp_path}/mine: prepare it with python prepare.py")
    assert not list(tmp_path.iterdir())  # nothing was trained or prepared


# both data benchmarks draw on the built-in legal corpus
needs_legal_corpus = pytest.mark.skipif(not os.path.isdir("/usr/share/common-licenses"),
                                        reason="no Debian license texts here")


@needs_legal_corpus
def test_tokenizer_bench_measures_every_kind_asked_for():
    done = run_in_process("bench.py", "--what=tokenizers", "--kinds=byte,char,bpe", "--vocab_size=300", "--repeats=1")
    assert done.returncode == 0, done.stderr
    rows = last_json(done.stdout)
    assert list(rows) == ["byte", "char", "bpe"]
    assert rows["byte"]["vocab_size"] == 263 and rows["bpe"]["vocab_size"] <= 300
    for row in rows.values():
        assert row["encode_mb_s_1_thread"] > 0 and row["val_bytes_per_token"] >= 1
        assert row["round_trip"] == row["ids_round_trip"] == 1.0  # all three are exact on the legal corpus
    assert rows["bpe"]["val_bytes_per_token"] > rows["byte"]["val_bytes_per_token"]


@needs_legal_corpus
def test_prepare_bench_runs_prepare_on_a_generated_corpus(tmp_path):
    done = run_script("bench.py", "--what=prepare", "--corpus_mb=1", "--vocab_size=300", f"--work_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert 1 <= result["input_mb"] < 1.1 and result["tokens"] > 100_000
    assert result["mb_per_s"] > 0 and result["peak_rss_mb"] > 0
    meta = json.loads((tmp_path / "bench" / "meta.json").read_text())
    assert sum(s["tokens"] for s in meta["splits"].values()) == result["tokens"]


def test_an_unknown_measurement_is_a_clear_error():
    assert_clear_error(run_in_process("bench.py", "--what=everything"), "what='everything' is not one of")


def test_attention_bench_measures_both_kinds_at_every_length():
    done = run_script("bench.py", "--what=attention", "--lengths=1024,64", "--repeats=1", "--sdpa_max_length=64",
                      "--attention_batch=1", "--attention_heads=2", "--attention_embd=32", "--device=cpu")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert result["lengths"] == [64, 1024]
    for kind in ("sdpa", "linear"):
        assert set(result[kind]) == {"64", "1024"}
    for row in (result["sdpa"]["64"], result["linear"]["64"], result["linear"]["1024"]):
        assert row["fwd_bwd_ms"] > 0 and row["fwd_ms"] > 0 and row["peak_mb"] >= 0
    assert result["linear"]["1024"]["peak_mb"] > 0.2  # fp32 copies of q and k alone are 128 KiB each
    assert "skipped" in result["sdpa"]["1024"]  # longer than sdpa_max_length
    assert set(result["linear_wins_from"]) == {"fwd_bwd", "fwd", "memory"}
    assert "linear attention takes less memory: " in done.stdout


# the comparison's three recipes at a size that trains in seconds
TINY_BUDGET = ("--n_layer=1 --n_head=2 --n_embd=32 --mlp_hidden=48 --block_size=32 --batch_size=4 "
               "--gradient_accumulation_steps=1 --max_iters=3 --warmup_iters=1 --lr_decay_iters=3 "
               "--eval_interval=3 --eval_iters=2 --log_interval=1 --report=False")


def study_args(dataset, tmp_path, *more):
    data_dir, name = dataset
    return ["--what=study", f"--data_dir={data_dir}", f"--dataset={name}", f"--work_dir={tmp_path / 'runs'}",
            f"--train_overrides={TINY_BUDGET}", "--gen_prompt_tokens=8", "--gen_new_tokens=4", "--gen_batch_sizes=1,3",
            "--repeats=1", *more]


def study(dataset, tmp_path, *more, cwd=None):
    return run_in_process("bench.py", *study_args(dataset, tmp_path, *more), cwd=cwd)


def test_study_trains_each_recipe_and_writes_the_table_between_the_markers(dataset, tmp_path):
    head = "# Project\r\n\r\nSome text, CRLF and all.\r\n<!-- study:begin -->\n"
    tail = "<!-- study:end -->\n\n## Later\nmore text, no newline at the end"
    readme = tmp_path / "README.md"
    readme.write_bytes((head + "an old table\n" + tail).encode())
    done = study(dataset, tmp_path, f"--readme={readme}")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    runs = result["runs"]
    assert "warning" not in done.stdout  # the three recipes share one budget
    assert list(runs) == ["compare_lstm", "compare_transformer", "compare_modern"]
    assert runs["compare_lstm"]["model"] == "LSTM 1×32"
    assert "post-norm layernorm, sinusoidal, gelu 48" in runs["compare_transformer"]["model"]
    assert "pre-norm rmsnorm, rope, swiglu 48" in runs["compare_modern"]["model"]
    for run in runs.values():
        assert run["tokens"] == 3 * 4 * 32  # one budget
        assert run["parameters"] > 0 and run["train_s"] > 0 and run["train_peak_rss_mb"] > 0
        assert abs(run["val_ppl"] - math.exp(run["val_loss"])) < 0.01 * run["val_ppl"]
        assert run["val_bpc"] >= run["val_bpb"] * 0.999  # a character is at least a byte
        assert set(run["ms_per_token"]) == {"1", "3"}  # a difference of two timings: its sign is noise here
    text = readme.read_bytes().decode()
    assert text.startswith(head) and text.endswith(tail)  # byte for byte outside the markers
    table = text[len(head):-len(tail)]
    assert "an old table" not in table and table.count("| compare_") == 3
    assert "`python bench.py --what=study " in table and "torch " in table
    assert not (tmp_path / "README.md.tmp").exists()


def test_study_adds_a_section_with_the_markers_to_a_readme_without_them(dataset, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nno markers here")
    done = study(dataset, tmp_path, f"--readme={readme}", "--configs=config/compare_lstm.py")
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("# Project\n\nno markers here\n\n## LSTM vs Transformer\n\n<!-- study:begin -->\n")
    assert text.endswith("<!-- study:end -->\n") and "| compare_lstm: LSTM 1×32 |" in text
    assert list(last_json(done.stdout)["runs"]) == ["compare_lstm"]


def test_study_without_a_readme_setting_prints_the_table_and_writes_no_file(dataset, tmp_path):
    readme = tmp_path / "README.md"  # in the folder it runs in, with markers: the old default wrote here
    readme.write_text("<!-- study:begin -->\nan old table\n<!-- study:end -->\n")
    done = study(dataset, tmp_path, f"--configs={ROOT}/config/compare_lstm.py",
                 f"--budget={ROOT}/config/compare_budget.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| compare_lstm: LSTM 1×32 |" in done.stdout and last_json(done.stdout)["readme"] == ""
    assert readme.read_text() == "<!-- study:begin -->\nan old table\n<!-- study:end -->\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "runs"]


def test_bad_attention_and_study_settings_give_one_clear_line(dataset, tmp_path):
    assert_clear_error(run_in_process("bench.py", "--what=attention", "--lengths=64,abc"),
                       "lengths='64,abc' must be positive whole numbers")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- study:end -->\n<!-- study:begin -->\n")
    assert_clear_error(run_in_process("bench.py", *study_args(dataset, tmp_path, f"--readme={readme}")),
                       "once each and in that order")
    assert readme.read_text() == "<!-- study:end -->\n<!-- study:begin -->\n"
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_decode_bench_times_the_cache_batches_and_precisions_of_a_run(trained_run):
    done = run_in_process("bench.py", "--what=decode", f"--out_dir={trained_run}", "--decode_prompt_tokens=48",
                      "--decode_batch_sizes=1,3", "--repeats=1", "--device=cpu", f"--draft_out_dir={trained_run}",
                      "--decode_compile=False")  # inductor's compile takes ~30 s per batch size on 2 cores
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert result["new_tokens"] == 64 - 48  # until the tiny run's context of 64 is full
    cells = {(r["dtype"], r["batch"], r["cache"]) for r in result["rows"]}
    assert {("float32", 1, True), ("float32", 3, True), ("float32", 1, False)} <= cells
    assert all(r["tok_per_s"] > 0 and r["first_token_ms"] > 0 for r in result["rows"])
    assert {"cache_over_no_cache", "batch_3_over_batch_1", "int8_over_float32",
            "speculative_over_float32"} <= result["ratios"].keys()
    assert result["rows"][-1]["acceptance"] == 1.0  # a draft that is the model itself: every greedy draft is kept


def test_decode_bench_needs_a_run_that_writes(trained_run):
    assert_clear_error(run_in_process("bench.py", "--what=decode"), "--what=decode needs --out_dir=RUN")
    assert_clear_error(run_in_process("bench.py", "--what=decode", f"--out_dir={trained_run}",
                                      "--decode_prompt_tokens=64"), "decode_prompt_tokens must be from 1 to 63")


def test_serve_bench_times_batched_and_one_at_a_time_serving_under_clients(trained_run):
    done = run_in_process("bench.py", "--what=serve", f"--out_dir={trained_run}", "--serve_clients=3",
                      "--serve_seconds=1", "--serve_new_tokens=4", "--device=cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert [(r["server"], r["clients"]) for r in rows] == [("batched", 3), ("one at a time", 3)]
    assert all(r["tok_per_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"] for r in rows)
    assert rows[1]["largest_batch"] == 1 and 1 <= rows[0]["largest_batch"] <= 3
    by = {(r["server"], r["clients"]): r["tok_per_s"] for r in rows}
    assert result["batched_over_one_at_a_time_3_clients"] == round(by["batched", 3] / by["one at a time", 3], 2)


def test_serve_bench_needs_a_run_and_sane_settings(trained_run):
    assert_clear_error(run_in_process("bench.py", "--what=serve"), "--what=serve needs --out_dir=RUN")
    assert_clear_error(run_in_process("bench.py", "--what=serve", f"--out_dir={trained_run}", "--serve_seconds=0"),
                       "serve_seconds must be above 0")
    assert_clear_error(run_in_process("bench.py", "--what=serve", f"--out_dir={trained_run}",
                                      "--serve_clients=0"), "serve_clients")


def test_the_nanogpt_comparison_needs_a_nanogpt_checkout_and_known_parts(tmp_path):
    assert_clear_error(run_in_process("bench.py", "--what=nanogpt", f"--nanogpt_dir={tmp_path}"),
                       "is not a nanoGPT checkout", "git clone https://github.com/karpathy/nanoGPT")
    for name in ("train.py", "model.py"):
        (tmp_path / name).write_text("")
    assert_clear_error(run_in_process("bench.py", "--what=nanogpt", f"--nanogpt_dir={tmp_path}",
                                      "--nanogpt_parts=speed,taste"), "nanogpt_parts: taste not among")
