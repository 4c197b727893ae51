import json
import os

import pytest

from conftest import assert_clear_error, run_script

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--vocab_size=128",
        "--warmup_iters=1", "--iters=3", "--compile=False"]
FIELDS = {"tok_per_s", "ms_per_iter", "mfu", "peak_mem_mb", "device", "dtype", "compile"}


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_prints_one_json_object_last():
    done = run_script("bench.py", *TINY, "--device=cpu")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert FIELDS <= result.keys()
    assert result["device"] == "cpu" and result["tok_per_s"] > 0 and result["peak_mem_mb"] > 0
    assert abs(result["tok_per_s"] * result["ms_per_iter"] / 1000 - 2 * 32) < 1


def test_compare_runs_the_fp32_eager_baseline_beside_the_default_path():
    done = run_script("bench.py", *TINY, "--compare", "--rounds=3")
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    baseline = result["fp32_eager"]
    assert baseline["dtype"] == "float32" and baseline["compile"] is False
    assert result["compile"] is False and result["device"] == baseline["device"]
    assert len(result["speedups"]) == 3 and result["speedup"] == result["speedups"][1]
    assert sum(line.startswith("fp32_eager: ") for line in done.stdout.splitlines()) == 3


def test_bad_settings_give_one_clear_line():
    assert_clear_error(run_script("bench.py", *TINY, "--iters=0"), "iters and rounds must be at least 1")
    assert_clear_error(run_script("bench.py", *TINY, "--n_head=3"), "must divide n_embd")
    assert_clear_error(run_script("bench.py", *TINY, "--dtype=fp8"), "dtype='fp8' is not one of")


# both data benchmarks draw on the built-in legal corpus
needs_legal_corpus = pytest.mark.skipif(not os.path.isdir("/usr/share/common-licenses"),
                                        reason="no Debian license texts here")


@needs_legal_corpus
def test_tokenizer_bench_measures_every_kind_asked_for():
    done = run_script("bench.py", "--what=tokenizers", "--kinds=byte,char,bpe", "--vocab_size=300", "--repeats=1")
    assert done.returncode == 0, done.stderr
    rows = last_json(done.stdout)
    assert list(rows) == ["byte", "char", "bpe"]
    assert rows["byte"]["vocab_size"] == 260 and rows["bpe"]["vocab_size"] <= 300
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
    assert_clear_error(run_script("bench.py", "--what=everything"), "what='everything' is not one of")
