"""
parallelism="fsdp": FSDP2 on two CPU processes (gloo) trains like DDP, its sharded checkpoints
survive kills and resume bit for bit, on another number of processes too, and consolidate into
the ckpt.pt every other script reads. Bad settings and broken checkpoints end with one clear line.
"""

import os
import random
import shutil

import pytest
import torch

from conftest import (ROOT, assert_clear_error, made_once, read_log, run_forked, run_in_process, run_torchrun,
                      train_losses)
from test_reliability import INJECT, ONE_THREAD, TRAIN, small_args

# 12 iterations of 2 micro-steps (1 per process), evals and checkpoints at 4, 8 and 12; 3 eval
# batches, so under FSDP one process takes a batch it does not count (every forward is collective)
FSDP = ["--parallelism=fsdp", "--dtype=float32", "--eval_iters=3"]


def alone(*args):
    """train.py as the only process of a world of one, started as torchrun would start it (but with
    no torchrun: its own report on a failed process would follow the script's one line)."""
    env = {**ONE_THREAD, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + random.randrange(1000))}
    return run_forked([TRAIN, *args], cwd=ROOT, env=env)


def said(done):
    return done.stdout[-1500:] + done.stderr[-3000:]


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory, dataset):
    """The sharded run the tests read (made once; tests copy it before changing anything in it)."""
    def train(folder):
        done = run_torchrun(2, TRAIN, *small_args(dataset, folder / "out", *FSDP, "--keep_last=2"))
        assert done.returncode == 0, said(done)
    return made_once(tmp_path_factory, "fsdp", train) / "out"


def test_fsdp_gives_the_losses_of_ddp_on_the_same_batches(tmp_path, dataset, fsdp_run):
    ddp = run_torchrun(2, TRAIN, *small_args(dataset, tmp_path / "ddp", *FSDP[1:]))
    assert ddp.returncode == 0, said(ddp)
    fsdp, ddp = read_log(fsdp_run), read_log(tmp_path / "ddp")
    assert [r["iter"] for r in fsdp] == [r["iter"] for r in ddp]
    for a, b in zip(fsdp, ddp):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    assert train_losses(fsdp)[12] < train_losses(fsdp)[1] - 0.5


def test_sharded_checkpoints_are_whole_directories_the_newest_kept_and_the_best_linked(fsdp_run):
    assert sorted(n for n in os.listdir(fsdp_run) if n.startswith("ckpt")) == \
        ["ckpt-00000008", "ckpt-00000012", "ckpt-best-00000012"]  # keep_last=2; the val loss fell at each eval
    newest = fsdp_run / "ckpt-00000012"
    assert sorted(os.listdir(newest)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "complete.json", "train.pt"]
    for name in os.listdir(newest):  # the best is the same files on disk, not a copy
        assert os.path.samefile(newest / name, fsdp_run / "ckpt-best-00000012" / name)
    assert torch.load(newest / "train.pt", weights_only=True)["iter_num"] == 12


def test_a_run_killed_at_any_moment_resumes_on_the_same_loss_curve_bit_for_bit(tmp_path, dataset, fsdp_run):
    out_dir = tmp_path / "out"
    # both processes die: in iteration 6 (a process's Nth backward is its Nth iteration's); then at
    # some moment after the first write of iteration 8's checkpoint began (during it, or after); then
    # the run goes on to its end
    when = f"{random.Random(3).uniform(0.0, 0.3):.3f}"
    for n, fault in enumerate(["kill@backward:6", f"kill@seconds:{when}", ""]):
        args = small_args(dataset, out_dir, *FSDP, *(["--init_from=resume"] if n else []))
        done = run_torchrun(2, *([INJECT, fault] if fault else []), TRAIN, *args)
        if n == 0:
            assert done.returncode != 0 and "iter 5:" in done.stdout and "iter 6:" not in done.stdout, said(done)
        if n == 1:
            assert "ckpt-00000004 (iteration 4" in done.stdout, said(done)
    assert done.returncode == 0, said(done)
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]  # what a kill left is cleared
    log = read_log(out_dir)
    assert [r["iter"] for r in log if "val_loss" not in r] == list(range(1, 13))
    assert train_losses(log) == train_losses(read_log(fsdp_run))  # floats compared exactly
    assert [r["val_loss"] for r in log if "val_loss" in r] == [r["val_loss"] for r in read_log(fsdp_run) if "val_loss" in r]


def test_a_run_of_two_processes_goes_on_in_one_with_the_same_global_batch(tmp_path, dataset, fsdp_run):
    out_dir = tmp_path / "out"
    shutil.copytree(fsdp_run, out_dir, ignore=shutil.ignore_patterns("*-00000012"))
    done = alone(*small_args(dataset, out_dir, *FSDP, "--init_from=resume"))
    assert done.returncode == 0, said(done)
    assert "ckpt-00000008 (iteration 8" in done.stdout and "fsdp on 1 process" in done.stdout
    two, one = train_losses(read_log(fsdp_run)), train_losses(read_log(out_dir))
    assert sorted(one) == list(range(1, 13))
    for i in range(9, 13):  # DCP resharded the weights and AdamW's moments onto one process
        assert one[i] == pytest.approx(two[i], rel=1e-5)
    assert sorted(os.listdir(out_dir / "ckpt-00000012")) == [".metadata", "__0_0.distcp", "complete.json", "train.pt"]


def test_consolidate_writes_the_ckpt_pt_that_sample_reads(tmp_path, fsdp_run):
    out_dir = tmp_path / "out"
    shutil.copytree(fsdp_run, out_dir)
    done = run_in_process("train.py", f"--consolidate={out_dir}")
    assert done.returncode == 0, done.stderr
    assert f"consolidated {out_dir / 'ckpt-00000012'} (iteration 12)" in done.stdout
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    sharded = torch.load(out_dir / "ckpt-00000012" / "train.pt", weights_only=True)
    assert ckpt["iter_num"] == 12 and ckpt["model_args"] == sharded["model_args"]
    assert set(ckpt["optimizer"]["state"]) == set(range(len(ckpt["model"]) - 1))  # one per weight (the head is tied)
    sample = run_in_process("sample.py", f"--out_dir={out_dir}", "--start=The Licensee", "--max_new_tokens=30",
                        "--num_samples=1", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The Licensee") and len(sample.stdout.split("\n")[0]) > len("The Licensee ")
    # an older checkpoint does not replace it; nor does a directory with no sharded checkpoint
    assert_clear_error(run_in_process("train.py", f"--consolidate={out_dir / 'ckpt-00000008'}"),
                       "ckpt.pt holds iteration 12, newer than")
    assert_clear_error(run_in_process("train.py", f"--consolidate={tmp_path}"),
                       f"consolidate={tmp_path} is neither a run with sharded checkpoints")
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 12


# ---- bad input: one line, exit code 2 ------------------------------------------------------------------

BAD = {  # (settings, with torchrun's environment?, what the line says)
    "an unknown parallelism": (["--parallelism=zero3"], False, "parallelism='zero3' is not one of ddp, fsdp"),
    "an unknown offload": (["--parallelism=fsdp", "--offload=disk"], False, "offload='disk' is not one of none, params"),
    "offload under ddp": (["--offload=params"], False, "it needs parallelism=fsdp"),
    "fsdp without torchrun": (["--parallelism=fsdp"], False, "parallelism=fsdp runs under torchrun"),
    "offload on a CPU": (["--parallelism=fsdp", "--offload=params", "--device=cpu"], True,
                         "this run is on cpu, which has nothing to offload"),
    "fsdp in float16": (["--parallelism=fsdp", "--dtype=float16"], True, "parallelism=fsdp computes in float32"),
    "fsdp with muon": (["--parallelism=fsdp", "--optimizer=muon"], True, "optimizer=muon orthogonalizes whole"),
}


@pytest.mark.parametrize("case", BAD)
def test_settings_fsdp_does_not_take_are_one_clear_line(case, tmp_path, dataset, monkeypatch):
    settings, under_torchrun, fragment = BAD[case]
    if under_torchrun:  # the check comes before the process group is made: no peer is needed
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(name, value)
    done = run_in_process("train.py", *small_args(dataset, tmp_path / "out", *settings))
    assert_clear_error(done, fragment)
    assert not (tmp_path / "out").exists()


def test_a_broken_sharded_checkpoint_or_one_of_the_other_kind_is_one_clear_line(tmp_path, dataset, fsdp_run):
    out_dir = tmp_path / "out"
    shutil.copytree(fsdp_run, out_dir, ignore=shutil.ignore_patterns("ckpt-best-*", "ckpt-00000008"))
    os.remove(out_dir / "ckpt-00000012" / "__1_0.distcp")
    assert_clear_error(run_in_process("train.py", f"--consolidate={out_dir}"),
                       "ckpt-00000012 is not a complete sharded checkpoint: __1_0.distcp is missing")
    assert not (out_dir / "ckpt.pt").exists()
    assert_clear_error(alone(*small_args(dataset, out_dir, *FSDP, "--init_from=resume")),
                       "ckpt-00000012 is not a complete sharded checkpoint: __1_0.distcp is missing")
    assert_clear_error(run_in_process("train.py", *small_args(dataset, out_dir, "--init_from=resume")),
                       "holds sharded checkpoints", f"--consolidate={out_dir}")
    shard = out_dir / "ckpt-00000008" / "__0_0.distcp"  # complete by its sizes, but bytes DCP cannot read
    shutil.copytree(fsdp_run / "ckpt-00000008", shard.parent)
    shard.write_bytes(b"\0" * shard.stat().st_size)
    assert_clear_error(run_in_process("train.py", f"--consolidate={shard.parent}"), "ckpt-00000008: its shards")
    shutil.rmtree(out_dir / "ckpt-00000008")
    shutil.rmtree(out_dir / "ckpt-00000012")
    torch.save({"model": {}, "model_args": {}}, out_dir / "ckpt.pt")  # a DDP run's checkpoint, as far as resume looks
    assert_clear_error(alone(*small_args(dataset, out_dir, *FSDP, "--init_from=resume")),
                       "holds no sharded checkpoint (ckpt-ITER/) but", "resume it with parallelism=ddp")
