"""plot.py and what train.py writes for it: the curves of one run or several, attention maps,
embedding maps, report.md; log.jsonl's gradient norm and peak memory; the TensorBoard and W&B
sinks continuing their curves over a resume; and the clear errors of each."""

import glob
import json
import math
import os
import shutil
import struct
import sys
import time

import pytest
import torch

from conftest import (assert_clear_error, labelled_documents, read_log, run_in_process,
                      train_args, train_losses)


def png_size(path):
    """(width, height) of a PNG file, read from its header; fails if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_sane_png(path, min_side=300, max_side=6000):
    assert os.path.getsize(path) > 5000, f"{path} is nearly empty"
    width, height = png_size(path)
    assert min_side <= width <= max_side and min_side <= height <= max_side, (width, height)


def plot(*args):
    return run_in_process("plot.py", *args)


def copy_run(run, to):
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("ckpt-*"))
    return to


# ---- log.jsonl and report.md ---------------------------------------------------------------

def test_the_log_records_gradient_norm_learning_rate_and_peak_memory(trained_run):
    steps = [r for r in read_log(trained_run) if "val_loss" not in r]
    assert [r["iter"] for r in steps] == list(range(1, 31))
    for r in steps:
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["peak_mem_mb"] > 10  # the process's peak RSS on a CPU: torch alone is more than that
        assert r["lr"] > 0
    peaks = [r["peak_mem_mb"] for r in steps]
    assert peaks == sorted(peaks)  # a peak never goes down


def test_training_ends_with_a_report_that_lists_the_right_numbers(trained_run):
    with open(trained_run / "report.md") as f:
        report = f.read()
    log = read_log(trained_run)
    evals = [r for r in log if "val_loss" in r]
    last = evals[-1]
    best = min(evals, key=lambda r: r["val_loss"])
    tokens_per_iter = 2 * 8 * 64  # gradient_accumulation_steps x batch_size x block_size of TINY_MODEL
    model = torch.load(trained_run / "ckpt.pt", weights_only=True)
    from model import ModelConfig, build_model
    n_params = build_model(ModelConfig(**model["model_args"])).num_params()
    assert "| iterations | 30 |" in report
    assert f"| tokens seen | {30 * tokens_per_iter:,} |" in report
    assert f"| val loss (last eval, iteration 30) | {last['val_loss']:.4f} |" in report
    assert f"| val bits per byte (last eval) | {last['val_bpb']:.4f} |" in report
    assert f"| best val loss (iteration {best['iter']}) | {best['val_loss']:.4f} |" in report
    assert f"| train loss (last logged step) | {train_losses(log)[30]:.4f} |" in report
    assert f"{n_params:,} parameters" in report
    assert "| `n_layer` | `2` |" in report and "| `learning_rate` | `0.003` |" in report
    assert "`seed`" not in report  # left at its default
    assert "tokenizer `bpe` of 320 tokens" in report
    assert "| train | " in report and "| val | " in report
    assert "![curves](curves.png)" in report
    assert_sane_png(trained_run / "curves.png", min_side=1000)  # the picture the report shows


def test_the_report_is_written_again_on_demand(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    os.remove(run / "report.md")
    os.remove(run / "curves.png")
    done = plot("--report", run)
    assert done.returncode == 0, done.stderr
    assert "| iterations | 30 |" in (run / "report.md").read_text()
    assert_sane_png(run / "curves.png", min_side=1000)


# ---- the pictures ---------------------------------------------------------------------

def test_curves_of_several_runs_are_drawn_together_into_each(trained_run, tmp_path):
    runs = [copy_run(trained_run, tmp_path / name) for name in ("first", "second")]
    with open(runs[1] / "log.jsonl", "a") as f:  # a resumed run: its clock starts again at 0
        f.write(json.dumps({"iter": 31, "loss": 3.0, "lr": 1e-4, "elapsed_s": 0.5}) + "\n")
    for run in runs:
        os.remove(run / "curves.png")
    done = plot(*runs)
    assert done.returncode == 0, done.stderr
    for run in runs:
        assert_sane_png(run / "curves.png", min_side=1000)
        assert "second" in (run / "curves.svg").read_text()  # the legend names both runs, in each
        assert f"wrote {run / 'curves.png'}" in done.stdout


def test_attention_maps_show_each_head_of_each_layer(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    done = plot("--attention", run, "--start=The Licensee shall pay all fees due")
    assert done.returncode == 0, done.stderr
    assert_sane_png(run / "attention.png")


def test_attention_weights_are_what_the_fast_path_computes():
    """Attention.weights() times the values is what scaled_dot_product_attention gives, for
    causal masks, alibi's float biases and grouped-query heads alike."""
    from model import ModelConfig, build_model
    torch.manual_seed(0)
    for extra in ({}, {"pos": "alibi", "n_kv_head": 1}, {"pos": "rope"}):
        model = build_model(ModelConfig(n_layer=1, n_head=4, n_embd=32, block_size=16, vocab_size=64, **extra)).eval()
        seen = {}
        attn = model.body.blocks[0].attn
        attn.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
        with torch.no_grad():
            model.hidden(torch.randint(0, 64, (2, 12)))
            weights = attn.weights(*seen["args"][:4])  # (B, nh, T, T)
            _, _, v = attn.project(seen["args"][0], seen["args"][1])
            v = v.repeat_interleave(attn.n_head // v.size(1), dim=1)
            y = (weights @ v).transpose(1, 2).reshape(2, 12, 32)
            assert torch.allclose(attn.c_proj(y), seen["out"], atol=1e-5), extra
        assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 12))
        assert (weights.triu(1) == 0).all()  # causal: no query sees a later key


def test_embeddings_are_mapped_and_coloured_by_folder(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    for kind, docs in labelled_documents(4).items():
        (tmp_path / "docs" / kind).mkdir(parents=True)
        for i, doc in enumerate(docs):
            (tmp_path / "docs" / kind / f"{i}.txt").write_text(doc)
    done = plot("--embeddings", run, f"--input={tmp_path / 'docs'}")
    assert done.returncode == 0, done.stderr
    assert_sane_png(run / "embeddings.png")


# ---- bad input -------------------------------------------------------------------------

def test_plot_refuses_what_is_no_run(tmp_path):
    assert_clear_error(plot(tmp_path), "is no run", "log.jsonl")
    assert_clear_error(plot(tmp_path / "nowhere"), "is not a directory")
    (tmp_path / "log.jsonl").write_text('{"iter": 1, "skipped": "non-finite loss"}\nnot json\n')
    assert_clear_error(plot(tmp_path), "no numbers to plot")
    assert_clear_error(plot(), "name a run directory")
    assert not list(tmp_path.glob("*.png"))


def test_plot_refuses_bad_settings(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    assert_clear_error(plot("--report", "--attention", run), "one at a time")
    assert_clear_error(plot("--report", run, run), "take one run")
    assert_clear_error(plot("--embeddings", run), "--input=")
    assert_clear_error(plot("--embeddings", run, f"--input={tmp_path / 'none*.txt'}"), "names no files")
    (tmp_path / "one.txt").write_text("The Licensee shall pay.")
    assert_clear_error(plot("--embeddings", run, f"--input={tmp_path / 'one.txt'}"), "at least 3")
    assert_clear_error(plot("--attention", run, "--start=T"), "at least 2")
    assert_clear_error(plot("--attention", run, f"--start=FILE:{tmp_path / 'missing.txt'}"), "cannot read")
    assert_clear_error(plot("--attention", run, "--max_tokens=1"), "max_tokens")


def test_attention_needs_softmax_attention(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    from model import ModelConfig, build_model
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["model_args"] = {**ckpt["model_args"], "arch": "lstm"}
    ckpt["model"] = build_model(ModelConfig(**ckpt["model_args"])).state_dict()
    torch.save(ckpt, run / "ckpt.pt")
    assert_clear_error(plot("--attention", run), "lstm run", "softmax attention")


def test_missing_packages_are_named_with_their_install_command(trained_run, dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert_clear_error(plot(trained_run), "pip install matplotlib==")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    for sink, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        out = tmp_path / sink
        done = run_in_process("train.py", *train_args(dataset, out, f"--{sink}=True", "--max_iters=1"))
        assert_clear_error(done, f"pip install {package}==")
        assert not out.exists() or not os.listdir(out)  # nothing written


# ---- TensorBoard and W&B ---------------------------------------------------------------

def wandb_records(path, timeout=60):
    """The records of an offline W&B run's .wandb file (W&B's log format: 32 KiB blocks of
    protobuf records), once it is whole: W&B's own process may still be writing it after
    wandb.finish() returns, so this waits for its exit record."""
    from wandb.proto import wandb_internal_pb2
    deadline = time.time() + timeout
    while True:
        with open(path, "rb") as f:
            data = f.read()
        chunks, pos, block, buffer = [], 7, 32768, b""  # after the 7-byte file header
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if pos + 7 + length > len(data):  # a record still being written
                break
            if length == 0 and kind == 0:
                pos += block - pos % block
                continue
            buffer += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                chunks.append(buffer)
                buffer = b""
        records = []
        for chunk in chunks:
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(chunk)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(run_dir):
    """[(run id, [(step, {name: value})])] of each offline W&B run under run_dir, oldest first."""
    runs = []
    # by the time each was last written, not by name: W&B names a run's folder by its start to
    # the second, and a second run in the same second gets "-1" after the name, which sorts first
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb")), key=os.path.getmtime):
        run_id, steps = None, []
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                steps.append((items.get("_step", record.history.step.num), items))
        runs.append((run_id, steps))
    return runs


def test_tensorboard_and_wandb_continue_the_same_curves_after_a_resume(dataset, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    sinks = ["--tensorboard=True", "--wandb=True", "--eval_interval=2", "--eval_iters=1", "--keep_last=3",
             "--batch_size=2", "--gradient_accumulation_steps=1"]
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)  # W&B with no account and no network, leaving stdout alone
    done = run_in_process("train.py", *train_args(dataset, out, *sinks, "--max_iters=4"))
    assert done.returncode == 0, done.stderr
    # as if killed after iteration 4 was logged but before its checkpoint: the newest is that of 2
    os.remove(out / "ckpt.pt")
    os.remove(out / "ckpt-00000004.pt")
    done = run_in_process("train.py", *train_args(dataset, out, *sinks, "--max_iters=5", "--init_from=resume"))
    assert done.returncode == 0, done.stderr
    losses = train_losses(read_log(out))
    assert sorted(losses) == list(range(1, 6))

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, 6))  # 3 and 4 once, though logged twice
    assert [s.value for s in scalars] == pytest.approx([losses[i] for i in range(1, 6)], rel=1e-6)
    assert [s.step for s in events.Scalars("eval/val_loss")] == [2, 4, 5]

    (first_id, first), (second_id, second) = wandb_history(out)
    assert first_id == second_id  # one W&B run, continued
    assert [step for step, _ in first] == list(range(1, 5))
    assert [step for step, _ in second] == [5]  # only steps past what W&B has
    logged = {step: items["train/loss"] for step, items in first + second}
    assert logged == pytest.approx(losses, rel=1e-6)
    assert json.loads((out / "run.json").read_text())["wandb_id"] == first_id
