"""
The promises of reliability, for every script: training survives kills, signals, numerical
faults, full disks and dead processes without losing anything, and every bad input ends
with one clear line and exit code 2. Faults are injected from outside our code, into torch
or the process (tests/inject.py), the way the world would inject them.
"""

import json
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (FORKED, ROOT, assert_clear_error, fork_server, made_once, read_log, run_forked,
                      run_in_process, train_args, train_losses)

INJECT = os.path.join(ROOT, "tests", "inject.py")
TRAIN = os.path.join(ROOT, "train.py")

# small enough that a dozen runs take seconds: 12 iterations of 2 micro-steps, an eval and a
# checkpoint every 4 (iterations 4, 8, 12); eval_iters 2 = two val batches each; no report at the
# end (plot.py: ~2 s a run, which tests/test_plot.py tests)
SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
         "--gradient_accumulation_steps=2", "--compile=False", "--dropout=0.1", "--learning_rate=3e-3",
         "--warmup_iters=2", "--lr_decay_iters=12", "--min_lr=3e-4", "--max_iters=12", "--eval_interval=4",
         "--eval_iters=2", "--log_interval=1", "--report=False"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # side by side on two cores; the same kernels in every run


def small_args(dataset, out_dir, *more):
    data_dir, name = dataset
    return [f"--data_dir={data_dir}", f"--dataset={name}", f"--out_dir={out_dir}", *SMALL, *more]


def run(argv, preexec_fn=None):
    """python argv in a process of its own (forked from one that has imported torch, unless the
    process first needs preexec_fn)."""
    if preexec_fn:
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD,
                              timeout=240, preexec_fn=preexec_fn)
    return run_forked(argv, cwd=ROOT, env=ONE_THREAD)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, dataset):
    def train(folder):  # a process of its own, like the runs compared with it bit for bit
        done = run([TRAIN, *small_args(dataset, folder / "out")])
        assert done.returncode == 0, done.stderr
    return read_log(made_once(tmp_path_factory, "uninterrupted", train) / "out")


# ---- kills, signals and faults, one after another in one run, each resumed ---------------------------
# (what happens, the faults for tests/inject.py, how that process ends, the iteration the next resumes from)
# Counts are per process: iteration i of a process's own is its backward calls 2i-1 and 2i; argmax
# comes once per val batch in an eval; torch.save once per checkpoint (iterations 4, 8, 12).
INTERRUPTIONS = [
    ("SIGTERM between micro-steps", "TERM@backward:6", 0, 3),
    ("SIGKILL between micro-steps", "kill@backward:4", -9, 4),
    ("SIGKILL during eval", "kill@argmax:1", -9, 4),
    ("SIGKILL halfway through writing a checkpoint", "kill@save:1", -9, 4),
    ("Ctrl-C twice while a checkpoint is written", "INTx2@save:1", 130, 4),
    ("a full disk at a checkpoint", "full@save:1", 2, 4),
    ("Ctrl-C between micro-steps", "INT@backward:5", 0, 7),
    ("Ctrl-C twice", "INTx2@backward:1", 130, 7),
    # some moment after the process's first checkpoint (iteration 8); it may come after the run's end
    ("SIGKILL at a random moment", f"kill@seconds:{random.Random(1).uniform(0.02, 0.4):.3f}", None, None),
    ("SIGKILL at another random moment", f"kill@seconds:{random.Random(2).uniform(0.02, 0.4):.3f}", None, None),
]


def test_a_run_interrupted_again_and_again_resumes_on_the_same_loss_curve_bit_for_bit(tmp_path, dataset,
                                                                                      uninterrupted):
    out_dir, resume_from = tmp_path / "out", 0
    for n, (what, faults, code, next_from) in enumerate(INTERRUPTIONS + [("the last resume", "", 0, None)]):
        args = small_args(dataset, out_dir, *(["--init_from=resume"] if n else []))
        done = run([INJECT, faults, TRAIN, *args] if faults else [TRAIN, *args])
        where = f"{what}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
        assert done.returncode == code if code is not None else done.returncode in (-9, 0), where
        if resume_from is not None:
            assert f"/ckpt.pt (iteration {resume_from}" in done.stdout or n == 0, where
        log = read_log(out_dir)
        assert train_losses(log) == {i: loss for i, loss in train_losses(uninterrupted).items() if i in train_losses(log)}, where
        killed_anywhere = code is None and done.returncode == -9  # a random moment may fall in a checkpoint's write
        if "writing" not in what and not killed_anywhere:  # a .tmp left by a kill is gone at the next start
            assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")], where
        if code == 0 and faults:  # a graceful stop says where its checkpoint is
            assert f"stopped by SIG{'TERM' if 'TERM' in what else 'INT'} at iteration {next_from}: checkpoint" \
                in done.stdout, where
        if code in (2, 130):  # one line on stderr; after a second Ctrl-C, the first one's notice on stdout
            assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, where
        if code == 2:
            assert_clear_error(done, "cannot write the checkpoint of iteration 8", "No space left on device")
        resume_from = next_from
    assert [r["iter"] for r in log if "val_loss" not in r] == list(range(1, 13))  # each iteration once
    assert train_losses(log) == train_losses(uninterrupted)  # floats compared exactly
    assert [r["val_loss"] for r in log if "val_loss" in r][-1] == uninterrupted[-1]["val_loss"]


# ---- numerical faults ------------------------------------------------------------------------------
# cross_entropy calls: 2 per iteration, and 4 in each eval (2 train + 2 val batches): call 15 is iteration 6's

@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("faults")
    cases = {"one NaN": ("nan@loss:15+1", []), "NaN for ever": ("nan@loss:15+0", ["--max_bad_steps=3"]),
             "one NaN in fp16": ("nan@loss:15+1", ["--dtype=float16"]),
             # backward call 12 is iteration 6's second micro-step: the loss stays finite, its gradients do not
             "an infinite gradient in fp16": ("inf@backward:12", ["--dtype=float16"])}
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = pool.map(run, [[INJECT, faults, TRAIN, *small_args(dataset, root / name, *more)]
                         for name, (faults, more) in cases.items()])
    return root, dict(zip(cases, done))


@pytest.mark.parametrize("case", ["one NaN", "one NaN in fp16"])
def test_a_step_with_a_non_finite_loss_is_skipped_and_logged(case, faulty_runs):
    root, done = faulty_runs
    assert done[case].returncode == 0, done[case].stderr[-2000:]
    assert "iter 6: skipped, the loss is not finite (1 in a row)" in done[case].stdout
    log = read_log(root / case)
    assert [r for r in log if "skipped" in r] == [{**log[6], "skipped": "non-finite loss"}]
    assert sorted(train_losses(log)) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    assert all(loss == loss for loss in train_losses(log).values())  # no NaN reached the weights
    ckpt = torch.load(root / case / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 12
    if "fp16" in case:  # the GradScaler saw the overflow too: its scale halved
        assert ckpt["scaler"]["scale"] == 2.0 ** 15


def test_a_step_with_an_infinite_gradient_is_skipped_like_a_gradscaler_overflow(faulty_runs):
    root, done = faulty_runs
    case = "an infinite gradient in fp16"
    assert done[case].returncode == 0, done[case].stderr[-2000:]
    assert "iter 6: skipped, the gradient norm is not finite (1 in a row)" in done[case].stdout
    log = read_log(root / case)
    assert [r["skipped"] for r in log if "skipped" in r] == ["non-finite gradient norm"]
    assert sorted(train_losses(log)) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    ckpt = torch.load(root / case / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 12 and ckpt["scaler"]["scale"] == 2.0 ** 15


def test_max_bad_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint_intact(faulty_runs):
    root, done = faulty_runs
    assert_clear_error(done["NaN for ever"], "3 steps in a row had a non-finite loss (iterations 6-8)")
    assert torch.load(root / "NaN for ever" / "ckpt.pt", weights_only=True)["iter_num"] == 4


# ---- checkpoints kept ------------------------------------------------------------------------------

def test_keep_last_keeps_the_newest_checkpoints_and_the_best_and_resume_falls_back_to_one_that_loads(
        tmp_path, dataset, trained_run):
    # trained_run: 30 iterations with an eval and a checkpoint every 10, keep_last=2
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run, out_dir)
    names = sorted(name for name in os.listdir(out_dir) if name.startswith("ckpt"))
    assert names == ["ckpt-00000020.pt", "ckpt-00000030.pt", "ckpt-best.pt", "ckpt.pt"]
    best = min((r for r in read_log(out_dir) if "val_loss" in r), key=lambda r: r["val_loss"])
    assert torch.load(out_dir / "ckpt-best.pt", weights_only=True)["iter_num"] == best["iter"]
    assert torch.load(out_dir / "ckpt-00000020.pt", weights_only=True)["iter_num"] == 20
    assert os.path.samefile(trained_run / "ckpt.pt", trained_run / "ckpt-00000030.pt")  # a link, not a copy
    # the newest is damaged (a bad disk, say): resume says so and picks the newest one that loads
    (out_dir / "ckpt.pt").write_bytes(b"\0" * 100)
    os.remove(out_dir / "ckpt-00000030.pt")
    done = run_in_process("train.py", *train_args(dataset, out_dir, "--max_iters=30", "--keep_last=2",
                                                  "--init_from=resume"))
    assert done.returncode == 0, done.stderr
    assert "ckpt.pt is not a readable checkpoint" in done.stdout and "skipped" in done.stdout
    assert "ckpt-00000020.pt (iteration 20" in done.stdout
    log = read_log(out_dir)
    assert [r["iter"] for r in log if "val_loss" not in r] == list(range(1, 31))
    assert train_losses(log) == train_losses(read_log(trained_run))  # floats compared exactly


# ---- the disk ---------------------------------------------------------------------------------------

def test_no_room_in_out_dir_is_a_clear_error_before_training(tmp_path, dataset):
    # files may not grow past 100 kB: the probe cannot reserve a checkpoint's worth (~400 kB)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    done = run([TRAIN, *small_args(dataset, tmp_path / "out")], preexec_fn=limit)
    assert_clear_error(done, "cannot write in out_dir=", "File too large", "a checkpoint needs about")
    assert "iter 1:" not in done.stdout and os.listdir(tmp_path / "out") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_dir_is_a_clear_error_before_training(tmp_path, dataset):
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path / "out", 0o555)
    done = run([TRAIN, *small_args(dataset, tmp_path / "out")])
    assert_clear_error(done, "cannot write in out_dir=", "Permission denied")


# ---- several processes ------------------------------------------------------------------------------

def torchrun(nproc, *args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", TRAIN, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tmp_path, dataset, uninterrupted):
    # gradient_accumulation_steps counts the micro-batches of all processes: 2 in one, 1 in each of two
    two = torchrun(2, *small_args(dataset, tmp_path / "two"))
    assert two.returncode == 0, two.stdout[-1500:] + two.stderr[-3000:]  # how far it got, and why it stopped
    assert "2 process(es)" in two.stdout
    log = read_log(tmp_path / "two")  # only rank 0 writes the log
    assert [r["iter"] for r in log] == [r["iter"] for r in uninterrupted]
    for a, b in zip(log, uninterrupted):
        assert ("val_loss" in a) == ("val_loss" in b)  # evals at the same iterations
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert train_losses(log)[12] < train_losses(log)[1] - 0.5
    assert torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["iter_num"] == 12


@pytest.mark.parametrize("fault", ["kill@backward:8", "STOP@backward:8"], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_makes_the_other_exit_with_a_clear_line(fault, tmp_path, dataset):
    # two processes started by hand, as torchrun would, but with no torchrun to clean up after them
    port = str(29500 + random.Random(str(tmp_path)).randrange(1000))
    env = {**ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "FORKSERVER": fork_server()}  # each forked, as run_forked's (killed with it)
    args = small_args(dataset, tmp_path / "out", "--gradient_accumulation_steps=2", "--max_iters=1000", "--ddp_timeout=3")
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, command in enumerate([[sys.executable, FORKED, TRAIN, *args],
                                          [sys.executable, FORKED, INJECT, fault, TRAIN, *args]])]
    try:
        start = time.time()
        out, err = ranks[0].communicate(timeout=120)
        assert time.time() - start < 60
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert_clear_error(subprocess.CompletedProcess([], ranks[0].returncode, out, err),
                       "process 0 of 2 lost the others", "ddp_timeout=3s", "--init_from=resume")


# ---- bad input everywhere: one line, exit code 2, nothing overwritten ---------------------------------

class Workspace:
    """Copies of a dataset and a trained run in tmp_path, to break as a case needs. Each method
    that breaks something returns the workspace, so that a case reads as one expression."""

    def __init__(self, tmp_path, dataset, run=None):
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        shutil.copytree(dataset[0] / dataset[1], self.data / "tiny")
        self.run = tmp_path / "run"
        if run:  # with its newest checkpoint only: resume has no other to fall back on
            shutil.copytree(run, self.run, ignore=shutil.ignore_patterns("ckpt-*.pt"))

    def train(self, *more):
        return [f"--data_dir={self.data}", "--dataset=tiny", f"--out_dir={self.tmp / 'out'}", *SMALL, *more]

    def resume(self, *more):
        return self.train(f"--out_dir={self.run}", "--init_from=resume", "--max_iters=40", *more)

    def sample(self, *more):
        return [f"--out_dir={self.run}", "--max_new_tokens=4", "--num_samples=1", *more]

    def write(self, name, content):
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return self

    def without(self, name):
        os.remove(self.tmp / name)
        return self

    def cut(self, name, keep):
        """Keep the first `keep` bytes of the file (negative: drop the last -keep)."""
        path = self.tmp / name
        content = path.read_bytes()
        path.write_bytes(content[:keep])
        return self

    def save(self, obj, name):
        torch.save(obj, self.tmp / name)
        return self

    def edit_meta(self, **changes):
        meta = json.loads((self.data / "tiny" / "meta.json").read_text())
        meta.update(changes)
        return self.write("data/tiny/meta.json", json.dumps(meta))

    def edit_checkpoint(self, change):
        ckpt = torch.load(self.run / "ckpt.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, self.run / "ckpt.pt")
        return self


class RunsCode:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def smaller_vocabulary(ckpt):
    ckpt["model_args"]["vocab_size"] = 64
    ckpt["model"] = {k: v[:64] if v.size(0) == 320 else v for k, v in ckpt["model"].items()}


BINARY = b"PK\3\4\0\0" * 50  # the start of a zip file, NUL bytes and all


def uint16(*ids):
    return b"".join(i.to_bytes(2, "little") for i in ids)


# (script, the case's arguments from a Workspace, what the one line must say); adding a case is one line
BAD_INPUTS = {
    # settings and config files
    "mistyped key": ("train.py", lambda w: w.train("--n_layr=2"), ["did you mean 'n_layer'"]),
    "wrong type": ("train.py", lambda w: w.train("--max_iters=ten"), ["max_iters must be int"]),
    "compile not a choice": ("train.py", lambda w: w.train("--compile=maybe"),
                             ["compile='maybe' is not one of auto, True, False"]),
    "device a bool": ("train.py", lambda w: w.train("--device=True"), ["device=True is not one of"]),
    "config file missing": ("train.py", lambda w: [str(w.tmp / "nope.py")], ["config file not found"]),
    "config file raises": ("train.py", lambda w: [str(w.write("c.py", "x = 1 / 0").tmp / "c.py")],
                           ["config file", "ZeroDivisionError"]),
    "config file unknown key": ("train.py", lambda w: [str(w.write("c.py", "n_layers = 2").tmp / "c.py")],
                                ["unknown setting 'n_layers'", "did you mean 'n_layer'"]),
    "config file of NUL bytes": ("train.py", lambda w: [str(w.write("c.py", b"n_layer = 2\0\0").tmp / "c.py")],
                                 ["config file", "failed"]),
    "config file not UTF-8": ("train.py", lambda w: [str(w.write("c.py", b"out_dir = '\xff\xfe'").tmp / "c.py")],
                              ["config file", "failed"]),
    "config file NUL in a value": ("train.py", lambda w: [str(w.write("c.py", "out_dir = 'a\\0b'").tmp / "c.py")],
                                   ["out_dir contains a NUL byte"]),
    "negative learning rate": ("train.py", lambda w: w.train("--learning_rate=-1e-3"), ["learning_rate must be > 0"]),
    "NaN learning rate": ("train.py", lambda w: [str(w.write("c.py", "learning_rate = float('nan')").tmp / "c.py")],
                          ["learning_rate must be > 0, got nan"]),
    "block_size 0": ("train.py", lambda w: w.train("--block_size=0"), ["block_size must be >= 1"]),
    "n_head not dividing n_embd": ("train.py", lambda w: w.train("--n_head=3"), ["n_head=3 must divide n_embd=32"]),
    "dropout 1": ("train.py", lambda w: w.train("--dropout=1.0"), ["dropout must be in [0, 1)"]),
    "beta2 1": ("train.py", lambda w: w.train("--beta2=1.0"), ["beta2 must be in [0, 1)"]),
    "no micro-steps": ("train.py", lambda w: w.train("--gradient_accumulation_steps=0"),
                       ["gradient_accumulation_steps must be >= 1"]),
    "keep_last 0": ("train.py", lambda w: w.train("--keep_last=0"), ["keep_last must be >= 1"]),
    "mask_prob 0": ("train.py", lambda w: w.train("--arch=encoder", "--mask_prob=0"), ["mask_prob must be in (0, 1)"]),
    "unknown arch": ("train.py", lambda w: w.train("--arch=transformer"), ["arch='transformer' is not one of"]),
    "conditional without labels": ("train.py", lambda w: w.train("--arch=conditional"), ["--labels=True"]),
    "a block longer than the data": ("train.py", lambda w: w.train("--block_size=100000"),
                                     ["fewer than block_size+1"]),
    "cuda without CUDA": ("train.py", lambda w: w.train("--device=cuda"), ["no CUDA device"]),
    "unknown device": ("train.py", lambda w: w.train("--device=tpu"), ["device='tpu' is not one of"]),
    "unknown dtype": ("train.py", lambda w: w.train("--dtype=float8"), ["dtype='float8' is not one of"]),
    "out_dir inside a file": ("train.py", lambda w: w.write("f", "x").train(f"--out_dir={w.tmp / 'f' / 'out'}"),
                              ["cannot make out_dir="]),
    # data
    "no dataset": ("train.py", lambda w: w.train("--dataset=contracts"), ["no dataset at", "--dataset=contracts"]),
    "train.bin missing": ("train.py", lambda w: w.without("data/tiny/train.bin").train(),
                          ["cannot read the dataset at", "prepare it again"]),
    "meta.json not JSON": ("train.py", lambda w: w.write("data/tiny/meta.json", "{not json").train(),
                           ["cannot read the dataset at"]),
    "meta.json truncated": ("train.py", lambda w: w.cut("data/tiny/meta.json", 40).train(),
                            ["cannot read the dataset at"]),
    "meta.json empty object": ("train.py", lambda w: w.write("data/tiny/meta.json", "{}").train(),
                               ["cannot read the dataset at"]),
    "meta.json a list": ("train.py", lambda w: w.write("data/tiny/meta.json", "[1, 2]").train(),
                         ["cannot read the dataset at"]),
    "meta.json dtype float": ("train.py", lambda w: w.edit_meta(dtype="float32").train(),
                              ["dtype must be uint16 or uint32"]),
    "train.bin cut mid-token": ("train.py", lambda w: w.cut("data/tiny/train.bin", -1).train(),
                                ["not a whole number of uint16 values"]),
    "train.bin truncated": ("train.py", lambda w: w.cut("data/tiny/train.bin", -200).train(),
                            ["meta.json says", "truncated"]),
    "train.bin empty": ("train.py", lambda w: w.cut("data/tiny/train.bin", 0).train(), ["meta.json says"]),
    "a token beyond the vocabulary": ("train.py", lambda w: w.write("data/tiny/val.bin", uint16(
        *([5] * ((w.data / "tiny" / "val.bin").stat().st_size // 2 - 1)), 40000)).train(),
        ["holds the value 40000 at or beyond 320"]),
    "tokenizer file corrupt": ("train.py", lambda w: w.write("data/tiny/tokenizer.bpe", "garbage\n").train(),
                               ["cannot read the dataset at"]),
    # checkpoints
    "scratch over a run": ("train.py", lambda w: w.train(f"--out_dir={w.run}"), ["exists", "--init_from=resume"]),
    "resume with no checkpoint": ("train.py", lambda w: w.train("--init_from=resume"), ["no checkpoint at"]),
    "init_from neither": ("train.py", lambda w: w.train("--init_from=latest"), ["is not scratch, resume, the directory of a run to fine-tune, or hf:DIR"]),
    "resume another architecture": ("train.py", lambda w: w.resume("--arch=encoder"),
                                    ["is a 'gpt' model", "--arch=gpt"]),
    "fine-tune another architecture": ("train.py", lambda w: w.train(f"--init_from={w.run}", "--arch=lstm"),
                                       ["is a 'gpt' model"]),
    "resume a smaller vocabulary": ("train.py", lambda w: w.edit_checkpoint(smaller_vocabulary).resume(),
                                    ["vocabulary of 64 tokens", "tokenizer has 320"]),
    "resume a checkpoint of nonsense shape": (
        "train.py", lambda w: w.edit_checkpoint(lambda c: c["model_args"].update(n_layer=-1)).resume(),
        ["n_layer must be positive"]),
    "resume weights that do not fit": (
        "train.py", lambda w: w.edit_checkpoint(lambda c: c["model_args"].update(n_embd=48, n_head=2)).resume(),
        ["its weights do not fit its model_args"]),
    "resume a text file": ("train.py", lambda w: w.write("run/ckpt.pt", "not a checkpoint").resume(),
                           ["is not a readable checkpoint"]),
    "resume a truncated checkpoint": ("train.py", lambda w: w.cut("run/ckpt.pt", 2000).resume(),
                                      ["is not a readable checkpoint"]),
    "resume a tensor file": ("train.py", lambda w: w.save({"w": torch.zeros(2)}, "run/ckpt.pt").resume(),
                             ["is not a nanolex checkpoint"]),
    # sample.py
    "sample: no run": ("sample.py", lambda w: [f"--out_dir={w.tmp / 'nowhere'}"], ["no checkpoint at"]),
    "sample: truncated checkpoint": ("sample.py", lambda w: w.cut("run/ckpt.pt", 5000).sample(),
                                     ["is not a readable checkpoint"]),
    "sample: not a checkpoint": ("sample.py", lambda w: w.write("run/ckpt.pt", "{}").sample(),
                                 ["is not a readable checkpoint"]),
    "sample: mistyped key": ("sample.py", lambda w: w.sample("--num_sample=2"), ["did you mean 'num_samples'"]),
    "sample: empty prompt": ("sample.py", lambda w: w.sample("--start="), ["--start is empty"]),
    "sample: blank prompt": ("sample.py", lambda w: w.sample("--start=  \n"), ["--start is empty"]),
    "sample: prompt longer than the context": ("sample.py", lambda w: w.sample("--start=" + "the Tenant " * 100),
                                               ["longer than the model's context of 64"]),
    "sample: prompt file missing": ("sample.py", lambda w: w.sample(f"--start=FILE:{w.tmp / 'no.txt'}"),
                                    ["cannot read the --start file"]),
    "sample: prompt file empty": ("sample.py", lambda w: w.write("p.txt", "").sample(f"--start=FILE:{w.tmp / 'p.txt'}"),
                                  ["file", "is empty"]),
    "sample: prompt file not UTF-8": ("sample.py", lambda w: w.write("p.txt", b"The \xff Tenant").sample(
        f"--start=FILE:{w.tmp / 'p.txt'}"), ["is not UTF-8 text (byte 4 is 0xff)"]),
    "sample: prompt file with NUL": ("sample.py", lambda w: w.write("p.txt", b"The\0Tenant").sample(
        f"--start=FILE:{w.tmp / 'p.txt'}"), ["holds a NUL byte"]),
    "sample: prompt argument not UTF-8": ("sample.py", lambda w: w.sample("--start=The \udcff Tenant"),
                                          ["--start is not UTF-8 text"]),
    "sample: negative temperature": ("sample.py", lambda w: w.sample("--temperature=-1"),
                                     ["temperature must be >= 0"]),
    "sample: top_p 0": ("sample.py", lambda w: w.sample("--top_p=0"), ["top_p must be in (0, 1]"]),
    "sample: stop list not strings": ("sample.py", lambda w: w.sample("--stop=[1, 2]"),
                                      ["stop must be a list of non-empty strings"]),
    "sample: stop not a JSON list": ("sample.py", lambda w: w.sample("--stop=[oops"), ["is not one"]),
    "sample: negative penalty": ("sample.py", lambda w: w.sample("--presence_penalty=-1"),
                                 ["presence_penalty must be >= 0"]),
    "sample: prompts file missing": ("sample.py", lambda w: w.sample(f"--prompts={w.tmp / 'no.jsonl'}"),
                                     ["cannot read --prompts="]),
    "sample: prompts line not a prompt": ("sample.py", lambda w: w.write("p.jsonl", '{"text": 3}\n').sample(
        f"--prompts={w.tmp / 'p.jsonl'}"), ['must be a non-empty string or an object with a "prompt" string']),
    "sample: unknown quantization": ("sample.py", lambda w: w.sample("--quantize=int4"),
                                     ["quantize='int4' is not supported"]),
    "sample: int8 with bf16": ("sample.py", lambda w: w.sample("--quantize=int8", "--dtype=bfloat16"),
                               ["computes in float32, not dtype=bfloat16"]),
    "sample: cuda without CUDA": ("sample.py", lambda w: w.sample("--device=cuda"), ["no CUDA device"]),
    "sample: checkpoint from another vocabulary": ("sample.py", lambda w: w.edit_checkpoint(
        smaller_vocabulary).sample(), ["vocabulary of 64 tokens"]),
    "sample: empty query": ("sample.py", lambda w: w.write("d.txt", "The Tenant").sample(
        f"--embed={w.tmp / 'd.txt'}", f"--query=FILE:{w.write('q.txt', '').tmp / 'q.txt'}"), ["is empty"]),
    "sample: embed names no files": ("sample.py", lambda w: w.sample(f"--embed={w.tmp}/*.none", "--query=x"),
                                     ["names no files"]),
    "sample: embed without query": ("sample.py", lambda w: w.sample(f"--embed={w.tmp}"), ["--embed needs --query="]),
    "sample: embed rows without text": ("sample.py", lambda w: w.write("d.jsonl", '{"body": 3}\n').sample(
        f"--embed={w.tmp / 'd.jsonl'}", "--query=x"), ['must be an object with a "text" string']),
    "sample: embed file not JSON Lines": ("sample.py", lambda w: w.write("d.jsonl", '{"text": \n').sample(
        f"--embed={w.tmp / 'd.jsonl'}", "--query=x"), ["is not JSON Lines"]),
    # prepare.py
    "prepare: input missing": ("prepare.py", lambda w: [f"--input={w.tmp / 'none.txt'}", f"--data_dir={w.data}"],
                               ["input not found"]),
    "prepare: only a binary file": ("prepare.py", lambda w: [f"--input={w.write('in/a.txt', BINARY).tmp / 'in'}",
                                                             f"--data_dir={w.data}"], ["no text"]),
    "prepare: JSON Lines that are not": ("prepare.py", lambda w: [f"--input={w.write('a.jsonl', '{x').tmp / 'a.jsonl'}",
                                                                  f"--data_dir={w.data}"], ["not valid JSON"]),
    "prepare: val_fraction 1.5": ("prepare.py", lambda w: ["--val_fraction=1.5", f"--data_dir={w.data}"],
                                  ["val_fraction must be"]),
    "prepare: vocab_size 0": ("prepare.py", lambda w: ["--vocab_size=0", f"--data_dir={w.data}"],
                              ["vocab_size must be an integer from"]),
    "prepare: unknown tokenizer": ("prepare.py", lambda w: ["--tokenizer=bytes", f"--data_dir={w.data}"],
                                   ["bytes"]),
    "prepare: tokenizer_from nowhere": ("prepare.py", lambda w: [f"--tokenizer_from={w.tmp / 'none'}",
                                                                 f"--data_dir={w.data}"], ["none"]),
    # bench.py
    "bench: unknown measurement": ("bench.py", lambda w: ["--what=speed"], ["what='speed' is not one of"]),
    "bench: cuda without CUDA": ("bench.py", lambda w: ["--device=cuda"], ["no CUDA device"]),
    "bench: no iterations": ("bench.py", lambda w: ["--iters=0"], ["iters and rounds must be at least 1"]),
    "bench: n_head not dividing n_embd": ("bench.py", lambda w: ["--n_head=5"], ["must divide n_embd"]),
    "bench: unknown dtype": ("bench.py", lambda w: ["--dtype=fp8"], ["dtype='fp8' is not one of"]),
    "bench: compile not a choice": ("bench.py", lambda w: ["--compile=maybe"], ["compile='maybe' is not one of"]),
    "bench: tokenizers timed no times": ("bench.py", lambda w: ["--what=tokenizers", "--repeats=0"],
                                         ["repeats must be at least 1"]),
}


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_clear_line_and_overwrites_nothing(case, tmp_path, dataset, trained_run):
    if "cuda without CUDA" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script, make_args, fragments = BAD_INPUTS[case]
    args = make_args(Workspace(tmp_path, dataset, trained_run))
    before = snapshot(tmp_path)
    assert_clear_error(run_in_process(script, *args, cwd=tmp_path), *fragments)
    assert snapshot(tmp_path) == before  # nothing the user had was changed, nothing half-written left


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, dataset, trained_run):
    w = Workspace(tmp_path, dataset, trained_run)
    ckpt = torch.load(w.run / "ckpt.pt", weights_only=True)
    ckpt["model_args"] = RunsCode(tmp_path / "pwned")
    with open(w.run / "ckpt.pt", "wb") as f:
        pickle.dump(ckpt, f)
    assert_clear_error(run_in_process("train.py", *w.resume()), "is not a readable checkpoint")
    assert_clear_error(run_in_process("sample.py", *w.sample()), "is not a readable checkpoint")
    assert not (tmp_path / "pwned").exists()


def test_the_real_processes_give_the_same_clear_line(tmp_path, dataset, trained_run):
    # the table runs the scripts inside pytest; one case each as a user runs them, as a check on that
    w = Workspace(tmp_path, dataset, trained_run)
    for script, args, fragment in (("train.py", w.train("--n_head=3"), "must divide n_embd"),
                                   ("sample.py", w.sample("--start="), "--start is empty")):
        done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert_clear_error(done, fragment)


# ---- random bytes where data should be --------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["train.bin", "val.bin", "meta.json"]), content=st.binary(max_size=3000))
def test_train_reads_random_bytes_in_a_dataset_as_a_clear_error(name, content, tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("fuzz")
    w = Workspace(tmp, dataset)
    w.write(f"data/tiny/{name}", content)
    done = run_in_process("train.py", *w.train("--max_iters=0"), cwd=tmp)
    if done.returncode:
        assert_clear_error(done)
