"""The GPU paths: what can be checked on a CPU is checked here on every machine (the dtype and
peak choices with the CUDA queries answered by hand, linear attention under CPU autocast, the
experts' static dispatch, DDP's eval, resuming in fp16, waits for the device); the tests marked
gpu run only where CUDA is (bench.py --what=gpu runs them)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import runtime
from conftest import ROOT, assert_clear_error, read_log, run_in_process, run_torchrun, train_args
from model import GPT, LinearAttention, ModelConfig, MoE, build_model, linear_attention_fp32, mlp_activation



def gpu(test):
    """A test of the GPU itself: marked gpu (pytest -m gpu selects them), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


# ---- precision and the peak MFU is measured against ----------------------------------------------

@pytest.mark.parametrize("capability,name,dtype", [((7, 0), "Tesla V100-SXM2-16GB", torch.float16),
                                                   ((7, 5), "Tesla T4", torch.float16),
                                                   ((8, 0), "NVIDIA A100-SXM4-80GB", torch.bfloat16),
                                                   ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16)])
def test_dtype_auto_picks_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, name, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counts there
    assert runtime.pick_dtype("cuda", "auto") == dtype


@pytest.mark.parametrize("name,dtype,tf32,peak", [
    ("NVIDIA L40S", torch.bfloat16, False, 362e12), ("NVIDIA L40", torch.bfloat16, False, 181e12),
    ("NVIDIA L4", torch.bfloat16, False, 121e12), ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, False, 835e12), ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989e12),
    ("NVIDIA A10G", torch.bfloat16, False, None), ("NVIDIA A10", torch.float16, False, 125e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156e12), ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None), ("Tesla T4", torch.float32, True, 8.1e12),
    ("Some Future GPU 9000", torch.bfloat16, False, None)])
def test_the_peak_table_matches_the_most_specific_name_and_knows_tf32_and_unknown_gpus(name, dtype, tf32, peak):
    assert runtime.datasheet_peak(name, dtype, tf32) == peak


def test_an_unknown_gpu_reports_no_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU 9000")
    assert runtime.mfu_of(1e12, "cuda", torch.bfloat16) is None


def test_the_measured_peak_is_cached_per_machine_and_dtype_and_mfu_never_reads_above_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "_measured_peaks", {})
    key = runtime.machine_key("cpu", torch.float32)
    assert "float32" in key and f"{torch.get_num_threads()} threads" in key
    runtime.write_peak(key, 1e9)  # as if measured before, in another process
    assert runtime.peak_flops("cpu", torch.float32) == 1e9  # read, not measured again
    assert runtime.mfu_of(5e8, "cpu", torch.float32) == 0.5
    assert runtime.mfu_of(3e9, "cpu", torch.float32) == 1.0  # a faster model raises the peak...
    with open(tmp_path / "nanolex" / "peaks.json") as f:
        assert json.load(f)[key] == 3e9  # ...for the next run too
    assert runtime.mfu_of(1.5e9, "cpu", torch.float32) == 0.5


def test_untied_embeddings_are_lookups_not_matmul_flops():
    shape = dict(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=64)
    tied, untied = GPT(ModelConfig(**shape)), GPT(ModelConfig(**shape, tie_embeddings=False))
    assert untied.num_params() == tied.num_params() + 320 * 64  # one matrix more...
    assert untied.flops_per_token() == tied.flops_per_token()  # ...that is only looked up


# ---- linear attention's sums -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_keeps_fp32_sums_under_autocast_over_long_sequences(dtype):
    torch.manual_seed(0)
    layer = LinearAttention(ModelConfig(n_embd=64, n_head=2, block_size=4096, attention="linear"), causal=True)
    x = 3 * torch.randn(1, 4096, 64)  # (B, T, C): loud enough that fp16's sums would overflow
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cpu", dtype=dtype):
            got = layer(x)
            q, k, v = layer.project(x)
            unguarded, _ = linear_attention_fp32(q, k, v, True, None, None, 64, dtype)  # autocast left on
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - want).norm() < 0.05 * want.norm()
    if dtype == torch.float16:  # the inputs do overflow fp16 when the sums are not kept in fp32
        assert not torch.isfinite(unguarded).all() or (unguarded.float()[:, :, -64:] == 0).all()


# ---- experts: static dispatch ------------------------------------------------------------------------

def dispatched_one_expert_at_a_time(moe, x):
    """The dispatch before the experts were batched: for each expert, its tokens in order up to the
    capacity, through its MLP (its slices of the stacked weights), weighted, added back."""
    flat = x.reshape(-1, x.size(-1))
    probs = moe.router(flat).float().softmax(dim=-1)
    weights, chosen = probs.topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    capacity = math.ceil(moe.capacity_factor * flat.size(0) * moe.top_k / moe.c_fc.size(0)) if moe.training \
        else flat.size(0)
    out = torch.zeros_like(flat)
    for e in range(moe.c_fc.size(0)):
        token, slot = torch.where(chosen == e)
        token, slot = token[:capacity], slot[:capacity]
        h = mlp_activation(F.linear(flat[token], moe.c_fc[e], moe.c_fc_bias[e]), moe.gated)
        y = F.linear(h, moe.c_proj[e], moe.c_proj_bias[e])
        out.index_add_(0, token, y * weights[token, slot, None])
    return out.view_as(x)


@pytest.mark.parametrize("training,capacity", [(False, 1.25), (True, 1.25), (True, 0.5)])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_experts_dispatched_with_static_shapes_give_what_one_expert_at_a_time_gives(training, capacity, mlp):
    torch.manual_seed(0)
    moe = MoE(ModelConfig(n_embd=32, n_head=2, n_expert=4, expert_top_k=2, expert_capacity=capacity, mlp=mlp,
                          bias=True)).train(training)
    with torch.no_grad():
        moe.c_fc_bias.normal_()
        moe.c_proj_bias.normal_()
    x = torch.randn(3, 20, 32)
    want = dispatched_one_expert_at_a_time(moe, x)
    assert torch.allclose(moe(x), want, atol=1e-5)
    if capacity == 0.5:  # some tokens did skip experts: the capacity was tested, not just the mixing
        assert not torch.allclose(want, dispatched_one_expert_at_a_time(moe.eval(), x), atol=1e-3)


# ---- grouped-query attention ----------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_sdpa_serves_each_key_value_head_to_its_group_without_copies(mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)  # 4 heads per group
    options = dict(is_causal=True) if mask == "causal" else dict(attn_mask=torch.rand(2, 1, 10, 10) > 0.3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), **options)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **options), want, atol=1e-6)


# ---- train.py: DDP's eval, resuming in fp16, waits for the device -------------------------------------

def test_ddp_eval_with_fewer_batches_than_processes_and_rope_buffers_does_not_hang(tmp_path, dataset):
    # eval_iters=1 of 2 processes: one has no eval batch, and DDP's forward (a collective) would wait for it
    done = run_torchrun(2, "train.py", *train_args(dataset, tmp_path / "out", "--pos=rope", "--eval_only=True",
                                                   "--eval_iters=1", "--ddp_timeout=30"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["iter"] for r in read_log(tmp_path / "out") if "val_loss" in r] == [0]


def test_resuming_in_fp16_a_run_saved_without_a_gradscaler(tmp_path, dataset, trained_run):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run, out_dir)  # trained in fp32 or bf16: its scaler was off and saved nothing
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["scaler"] == {}
    done = run_in_process("train.py", *train_args(dataset, out_dir, "--init_from=resume", "--dtype=float16",
                                              "--max_iters=32"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dtype float16" in done.stdout
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["scaler"]["scale"] > 0


def device_waits(monkeypatch, dataset, out_dir, iters):
    """How often train.py's own code, run for iters iterations, reads a tensor's value on the host."""
    calls = [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, original=original):
            calls[0] += sys._getframe(1).f_code.co_filename == os.path.join(ROOT, "train.py")  # (not batches.py's
            return original(self, *args)  # reads of the CPU tensors that pick the batches)
        monkeypatch.setattr(torch.Tensor, name, counted)
    done = run_in_process("train.py", *train_args(dataset, out_dir, f"--max_iters={iters}", "--log_interval=5",
                                                  "--eval_interval=1000", "--dropout=0", "--dtype=float32"))
    monkeypatch.undo()
    assert done.returncode == 0, done.stderr[-2000:]
    return calls[0]


def test_a_training_step_waits_for_the_device_only_when_it_logs(monkeypatch, tmp_path, dataset):
    five, ten = (device_waits(monkeypatch, dataset, tmp_path / f"out{n}", n) for n in (5, 10))
    # five more steps, one more log line: two reads at a log line (the skipped steps, the losses), none
    # in the steps between
    assert ten - five == 2


# ---- on a GPU ----------------------------------------------------------------------------------------

@gpu
def test_the_default_gpt_trains_on_the_flash_kernels_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = build_model(ModelConfig()).cuda()  # GPT-2 small's shape: 12 x 768, 12 heads, 1024 tokens
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)  # no flash kernel for these inputs: "No available kernel", not a slow path
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@gpu
def test_dtype_auto_on_this_gpu_follows_its_compute_capability():
    native = torch.cuda.get_device_capability()[0] >= 8
    assert runtime.pick_dtype("cuda", "auto") == (torch.bfloat16 if native else torch.float16)


@gpu
def test_linear_attention_in_fp16_on_the_gpu_stays_finite_past_a_thousand_positions():
    torch.manual_seed(0)
    layer = LinearAttention(ModelConfig(n_embd=256, n_head=4, block_size=4096, attention="linear"), causal=True)
    x = 3 * torch.randn(2, 4096, 256, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        y = layer.cuda()(x)
    assert torch.isfinite(y).all() and (y[:, -64:].abs().sum(dim=-1) > 0).all()


@gpu
def test_the_compiled_decoding_step_with_cuda_graphs_writes_what_eager_decoding_writes():
    from engine import Engine
    from tokenizer import train_tokenizer
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    tok = train_tokenizer("byte", [], 1)
    eager, graphs = Engine(model, tok, "cuda"), Engine(model, tok, "cuda", compile=True)
    options = dict(max_new_tokens=100, temperature=0, ignore_eos=True)  # past the context of 64
    assert graphs.generate("The Licensee", **options).ids == eager.generate("The Licensee", **options).ids


def test_bench_gpu_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clear_error(run_in_process("bench.py", "--what=gpu"), "needs a CUDA GPU")


def test_the_gpu_check_reports_each_part_as_it_comes_and_goes_on_past_one_that_breaks(monkeypatch, tmp_path):
    """Its flow, on a CPU made to look like two GPUs: the commands it starts are answered, not run."""
    for name, value in (("is_available", True), ("get_device_name", "NVIDIA H200"), ("device_count", 2),
                        ("get_device_capability", (9, 0))):
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    started = []

    def answer(args, **kwargs):
        started.append(args)
        if "bench.py" in args[1]:  # the training part's command cannot even start
            raise OSError("no such file")
        return subprocess.CompletedProcess(args, 1, "1 failed, 3 passed\n", "")
    monkeypatch.setattr(subprocess, "run", answer)
    done = run_in_process("bench.py", "--what=gpu", f"--work_dir={tmp_path}")
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["gpu"] == "NVIDIA H200" and summary["gpus"] == 2
    assert summary["gpu_tests"] == {"passed": False, "result": "1 failed, 3 passed"}
    assert summary["training"] == {"error": "OSError: no such file"} and "Traceback" in done.stderr
    assert summary["ddp"]["processes"] == 2 and "error" in summary["ddp"]  # ran after the training part broke
    assert "--nproc_per_node=2" in started[-1]
    assert summary["decoding"] == {"error": "no run to decode with: the DDP run failed"}
    said = [line.split(":")[0] for line in lines if line.startswith("gpu check, ")]
    assert said == ["gpu check, gpu_tests", "gpu check, training", "gpu check, ddp"]
