import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import assert_clear_error, prepare_dataset, run_in_process, run_script, train_args
from engine import Completion, Engine

SEPARATOR = "-" * 40


@pytest.fixture
def run_alone(tmp_path, trained_run):
    """The trained run copied somewhere with no data/ next to it."""
    out_dir = tmp_path / "run"
    shutil.copytree(trained_run, out_dir)
    return out_dir


def test_a_run_whose_tokenizer_package_is_missing_says_to_install_the_requirements(run_alone, dataset, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # the run's BPE tokenizer encodes with it
    for done in (run_in_process("sample.py", f"--out_dir={run_alone}", "--max_new_tokens=4"),
                 run_in_process("train.py", *train_args(dataset, tmp_path / "new", "--max_iters=1"))):
        assert_clear_error(done, "the tiktoken package is not installed: pip install -r requirements.txt")
    assert not (tmp_path / "new").exists()


def test_few_rows_decoding_in_float32_on_a_cpu_run_with_onednn_off_and_nothing_else_does(run_alone, monkeypatch):
    seen = []  # oneDNN's switch as each generate() began; each answered at once, so no decoding runs

    def generate(self, prompts, *args, **options):
        seen.append(torch.backends.mkldnn.enabled)
        return [Completion(" x", [1], "length", 1, 1) for _ in prompts]
    monkeypatch.setattr(Engine, "generate", generate)
    for flags, onednn in ((["--dtype=auto"], False), (["--dtype=float32", "--num_samples=8"], False),
                          (["--dtype=bfloat16"], True), (["--quantize=int8"], True), (["--compile=True"], True)):
        done = run_in_process("sample.py", f"--out_dir={run_alone}", "--start=The Licensee", *flags)
        assert done.returncode == 0, done.stderr
        assert seen.pop() is onednn, flags
        assert torch.backends.mkldnn.enabled  # back on once the script is done (as a process's end would)


def samples(stdout):
    return [s.strip("\n") for s in stdout.split(SEPARATOR)[:-1]]


def test_with_no_start_samples_are_new_documents(run_alone):
    done = run_in_process("sample.py", f"--out_dir={run_alone}", "--num_samples=2", "--max_new_tokens=40")
    assert done.returncode == 0, done.stderr
    assert len(samples(done.stdout)) == 2 and all(len(t) > 10 for t in samples(done.stdout))


def test_sample_prints_new_text_from_the_run_directory_alone(run_alone, tmp_path):
    done = run_in_process("sample.py", f"--out_dir={run_alone}", "--start=The Licensee shall",
                      "--num_samples=2", "--max_new_tokens=40", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    texts = samples(done.stdout)
    assert len(texts) == 2
    assert all(t.startswith("The Licensee shall") and len(t) > len("The Licensee shall") + 10 for t in texts)
    assert texts[0] != texts[1]  # sampled, not greedy


def test_greedy_sampling_is_the_same_with_and_without_the_kv_cache(run_alone):
    args = [f"--out_dir={run_alone}", "--start=The Tenant", "--temperature=0", "--num_samples=1",
            "--max_new_tokens=80", "--dtype=float32"]
    cached = run_in_process("sample.py", *args)
    uncached = run_in_process("sample.py", *args, "--use_cache=False")
    assert cached.returncode == 0 and uncached.returncode == 0
    assert cached.stdout == uncached.stdout


def test_the_same_seed_gives_the_same_samples(run_alone):
    args = [f"--out_dir={run_alone}", "--num_samples=2", "--max_new_tokens=30", "--seed=7"]
    # one run in a process of its own: the seed alone, not what a process has drawn before, makes the samples
    assert run_script("sample.py", *args).stdout == run_in_process("sample.py", *args).stdout


def test_a_prompt_can_come_from_a_file(run_alone, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("SECTION 3. The Contractor")
    done = run_in_process("sample.py", f"--out_dir={run_alone}", f"--start=FILE:{prompt}", "--num_samples=1",
                      "--max_new_tokens=10")
    assert done.returncode == 0 and done.stdout.startswith("SECTION 3. The Contractor")


def swap_tokenizer(run_dir, corpus, tmp_path, vocab_size):
    """Put another dataset's tokenizer files into a run directory."""
    data_dir, name = prepare_dataset(corpus, tmp_path, "other", vocab_size)
    for file in ("tokenizer.json", "tokenizer.bpe"):
        shutil.copyfile(data_dir / name / file, run_dir / file)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(run_alone, tmp_path, corpus):
    swap_tokenizer(run_alone, corpus, tmp_path, 600)
    assert_clear_error(run_in_process("sample.py", f"--out_dir={run_alone}"), "do not belong together")


def test_a_tokenizer_other_than_the_one_trained_with_is_refused(run_alone, tmp_path, corpus):
    swap_tokenizer(run_alone, corpus, tmp_path, 300)  # smaller: only the fingerprint can tell
    assert_clear_error(run_in_process("sample.py", f"--out_dir={run_alone}"), "not the ones ckpt.pt was trained with")


@pytest.mark.parametrize("kind", ["char", "wordpiece", "unigram"])
def test_runs_with_other_tokenizer_kinds_train_and_sample(tmp_path, corpus, kind):
    done = run_in_process("prepare.py", f"--input={corpus}", f"--tokenizer={kind}", "--vocab_size=400",
                          f"--data_dir={tmp_path}", "--dataset=k")
    assert done.returncode == 0, done.stderr
    done = run_in_process("train.py", *train_args((tmp_path, "k"), tmp_path / "out", "--max_iters=3", "--eval_interval=3"))
    assert done.returncode == 0, done.stderr[-2000:]
    # an untrained model: any id may come up, the vocabulary's padding rows must not
    done = run_in_process("sample.py", f"--out_dir={tmp_path / 'out'}", "--start=the Premises shall",
                      "--num_samples=3", "--max_new_tokens=60")
    assert done.returncode == 0, done.stderr
    assert all(s.startswith("the Premises shall") for s in samples(done.stdout))


# ---- every architecture --------------------------------------------------------------------

@pytest.mark.parametrize("arch,args", [("lstm", ["--start=The Tenant"]),
                                       ("conditional", ["--start=The", "--condition=lease"]),
                                       ("encdec", ["--start=The Licensee shall <|mask|> the Software"])])
def test_greedy_output_is_the_same_with_and_without_each_architectures_cache(arch, args, arch_run):
    args = [f"--out_dir={arch_run(arch)}", *args, "--temperature=0", "--num_samples=1", "--max_new_tokens=40",
            "--dtype=float32"]
    cached, uncached = run_in_process("sample.py", *args), run_in_process("sample.py", *args, "--use_cache=False")
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout == uncached.stdout and len(samples(cached.stdout)[0]) > 0


def test_an_encoder_prints_the_likeliest_fillers_of_each_mask(arch_run):
    done = run_in_process("sample.py", f"--out_dir={arch_run('encoder')}",
                      "--start=The <|mask|> shall indemnify the <|mask|>", "--fill_top_k=3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["mask 1", "mask 2"]
    for line in lines[:2]:
        probabilities = [float(p) for p in re.findall(r"' (\d\.\d+)", line)]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1
    assert lines[2].startswith("The") and "<|mask|>" not in lines[2]  # the sentence with the best fillers
    many = run_in_process("sample.py", f"--out_dir={arch_run('encoder')}", "--start=The <|mask|> shall", "--fill_top_k=60")
    assert many.returncode == 0 and "<|" not in many.stdout.splitlines()[0]  # no special token among 60 fillers
    assert_clear_error(run_in_process("sample.py", f"--out_dir={arch_run('encoder')}", "--start=No mask here"),
                       "put <|mask|> where a word is missing (in --start)")


def test_a_conditional_run_needs_one_of_its_labels(arch_run):
    done = run_in_process("sample.py", f"--out_dir={arch_run('conditional')}", "--condition=statute")
    assert_clear_error(done, "--condition='statute' is not one of this run's labels: lease, license")


def test_compile_on_a_run_whose_decoding_step_it_cannot_compile_is_refused(arch_run):
    done = run_in_process("sample.py", f"--out_dir={arch_run('lstm')}", "--compile=True")
    assert_clear_error(done, "compile supports gpt and conditional runs with softmax attention; this run is 'lstm'")


def test_the_label_steers_what_a_conditional_model_writes(tmp_path, labelled_dataset):
    # leases and licenses share no words but "The", "shall", "the": count each kind's words in
    # what the model writes under each label, from the same start and the same seed
    out_dir = tmp_path / "out"
    done = run_in_process("train.py", *train_args(labelled_dataset, out_dir, "--arch=conditional", "--dropout=0",
                                              "--max_iters=150", "--lr_decay_iters=150", "--eval_interval=150"))
    assert done.returncode == 0, done.stderr
    counts = {}
    for label in ("lease", "license"):
        done = run_in_process("sample.py", f"--out_dir={out_dir}", f"--condition={label}", "--start=The",
                          "--num_samples=8", "--max_new_tokens=40", "--temperature=1", "--top_k=0")
        assert done.returncode == 0, done.stderr
        counts[label] = (len(re.findall(r"Tenant|Landlord|rent|Premises|deposit", done.stdout)),
                         len(re.findall(r"Licens|Software|source code|Work", done.stdout)))
    lease_words, license_words = counts["lease"]
    assert lease_words > 5 * max(1, license_words)  # under "lease"
    lease_words, license_words = counts["license"]
    assert license_words > 5 * max(1, lease_words)  # under "license"


LICENSES = "/usr/share/common-licenses"


@pytest.mark.skipif(not os.path.isdir(LICENSES), reason="no /usr/share/common-licenses on this machine")
def test_a_licenses_own_text_ranks_it_first_among_the_built_in_licenses(run_alone, tmp_path):
    names = sorted(os.listdir(LICENSES))
    out = tmp_path / "licenses.npz"
    for name in ("Apache-2.0", "MPL-2.0"):
        if name not in names:
            continue
        done = run_in_process("sample.py", f"--out_dir={run_alone}", f"--embed={LICENSES}",
                          f"--query=FILE:{LICENSES}/{name}", "--num_results=3", f"--embed_out={out}")
        assert done.returncode == 0, done.stderr
        ranking = [line.split()[-1] for line in done.stdout.splitlines() if re.match(r"\d+\. ", line)]
        assert len(ranking) == 3 and os.path.realpath(ranking[0]) == os.path.realpath(f"{LICENSES}/{name}")
    saved = np.load(out)
    # links (GPL -> GPL-3) are one document, not two
    assert len(saved["names"]) == len({os.path.realpath(f"{LICENSES}/{n}") for n in names}) == len(saved["vectors"])
    assert saved["vectors"].shape[1] == 64 and not (tmp_path / "licenses.npz.tmp").exists()


# ---- decoding options ------------------------------------------------------------------------

def test_a_stop_string_ends_each_sample_before_it(run_alone):
    args = [f"--out_dir={run_alone}", "--start=The Licensee shall", "--temperature=0", "--num_samples=1",
            "--max_new_tokens=40", "--ignore_eos=True", "--dtype=float32"]
    free = samples(run_in_process("sample.py", *args).stdout)[0]
    stop = free[len("The Licensee shall") + 4:][:3]
    cut = run_in_process("sample.py", *args, f"--stop={stop}")
    assert cut.returncode == 0, cut.stderr
    assert samples(cut.stdout)[0] == free[:free.index(stop, len("The Licensee shall"))]


def test_prompts_of_a_file_in_one_batch_give_what_each_gives_alone(run_alone, tmp_path):
    texts = ["The Licensee shall", "SECTION 3. The", "In witness whereof the parties"]
    (tmp_path / "p.jsonl").write_text('"The Licensee shall"\n{"prompt": "SECTION 3. The"}\n'
                                      '"In witness whereof the parties"\n')
    args = [f"--out_dir={run_alone}", "--temperature=0", "--num_samples=1", "--max_new_tokens=30", "--dtype=float32"]
    batch = run_in_process("sample.py", *args, f"--prompts={tmp_path / 'p.jsonl'}")
    assert batch.returncode == 0, batch.stderr
    alone = [samples(run_in_process("sample.py", *args, f"--start={t}").stdout)[0] for t in texts]
    assert samples(batch.stdout) == alone


def test_streamed_samples_are_the_samples_printed_at_once(run_alone):
    args = [f"--out_dir={run_alone}", "--start=The Tenant", "--num_samples=2", "--max_new_tokens=40", "--seed=3"]
    at_once, streamed = run_in_process("sample.py", *args), run_in_process("sample.py", *args, "--stream=True")
    assert streamed.returncode == 0, streamed.stderr
    assert samples(streamed.stdout) == samples(at_once.stdout)


def test_int8_weights_write_what_float32_writes_greedily(run_alone):
    args = [f"--out_dir={run_alone}", "--start=The Tenant", "--temperature=0", "--num_samples=1", "--max_new_tokens=30",
            "--dtype=float32"]
    full, int8 = run_in_process("sample.py", *args), run_in_process("sample.py", *args, "--quantize=int8")
    assert int8.returncode == 0, int8.stderr
    assert int8.stdout == full.stdout  # a tiny model's greedy choices are far apart enough for int8's rounding
