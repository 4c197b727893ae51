import json

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
