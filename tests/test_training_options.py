"""train.py's training options: optimizers (AdamW, SGD, Lion, Muon), learning-rate schedules,
activation checkpointing, label smoothing, the adaptive softmax head and the sequence-length
warm-up. Two short runs carry most of the options at once, and each resumes bit for bit."""
import copy
import json
import io
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import (ROOT, assert_clear_error, made_once, read_log, run_in_process, run_script, run_torchrun,
                      train_args, train_losses)
from model import Lion, ModelConfig, Muon, Optimizers, build_model

SHORT = ["--max_iters=20", "--lr_decay_iters=20", "--keep_last=2"]  # checkpoints at 10 and 20 (eval_interval 10)
# muon, wsd, grad_checkpoint, label smoothing, windows of 16 growing to 64 over 12 iterations
OPTIONS = ["--optimizer=muon", "--lr_schedule=wsd", "--wsd_decay_iters=8", "--grad_checkpoint=True",
           "--label_smoothing=0.1", "--block_size_schedule=12", "--block_size_start=16"]
ADAPTIVE = ["--head=adaptive", "--tie_embeddings=False", "--adaptive_cutoffs=64,160", "--lr_schedule=linear"]


def trained(tmp_path_factory, dataset, name, options):
    def train(folder):
        done = run_in_process("train.py", *train_args(dataset, folder / "out", *options, *SHORT))  # as conftest's
        assert done.returncode == 0, done.stderr[-2000:]
    return made_once(tmp_path_factory, name, train) / "out"


@pytest.fixture(scope="session")
def options_run(tmp_path_factory, dataset):
    return trained(tmp_path_factory, dataset, "options-run", OPTIONS)


@pytest.fixture(scope="session")
def adaptive_run(tmp_path_factory, dataset):
    return trained(tmp_path_factory, dataset, "adaptive-run", ADAPTIVE)


def resumed_from_10(run_dir, tmp_path, dataset, options):
    out_dir = tmp_path / "out"
    shutil.copytree(run_dir, out_dir)
    for name in ("ckpt.pt", "ckpt-00000020.pt", "ckpt-best.pt"):
        os.remove(out_dir / name)
    done = run_script("train.py", *train_args(dataset, out_dir, *options, *SHORT, "--init_from=resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ckpt-00000010.pt (iteration 10" in done.stdout
    return read_log(out_dir)


def assert_learns(log):
    losses = train_losses(log)
    assert sorted(losses) == list(range(1, 21))
    assert sum(losses[i] for i in (18, 19, 20)) / 3 < sum(losses[i] for i in (1, 2, 3)) / 3 - 0.5
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.parametrize("run, options", [("options_run", OPTIONS), ("adaptive_run", ADAPTIVE)])
def test_a_run_with_the_options_learns_and_resumes_on_the_same_loss_curve(run, options, request, tmp_path,
                                                                           dataset):
    uninterrupted = read_log(request.getfixturevalue(run))
    assert_learns(uninterrupted)
    resumed = resumed_from_10(request.getfixturevalue(run), tmp_path, dataset, options)
    assert train_losses(resumed) == train_losses(uninterrupted)  # floats compared exactly
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in uninterrupted
                                                                   if "val_loss" in r]


def test_two_processes_train_the_options_run_with_the_losses_of_one(options_run, tmp_path, dataset):
    # Muon, grad_checkpoint, label smoothing, wsd and growing windows under DDP: one micro-step in each of
    # two processes is the same global batch as the one process's two (gradient_accumulation_steps=2)
    two = run_torchrun(2, "train.py", *train_args(dataset, tmp_path / "two", *OPTIONS, *SHORT))
    assert two.returncode == 0, two.stdout[-1500:] + two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    one, log = read_log(options_run), read_log(tmp_path / "two")
    assert [r["iter"] for r in log] == [r["iter"] for r in one]
    for a, b in zip(log, one):  # not bit for bit: the gradients are summed in another order
        assert ("val_loss" in a) == ("val_loss" in b)  # evals at the same iterations
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-3)


def test_windows_grow_from_block_size_start_to_block_size_over_block_size_schedule(options_run):
    windows = {r["iter"]: r["block_size"] for r in read_log(options_run) if "val_loss" not in r}
    # iteration i (logged as i + 1) trains on 16 + 48 i / 12 tokens, rounded down to a multiple of 16
    assert windows == {i + 1: 16 * int((16 + 48 * i / 12) // 16) if i < 12 else 64 for i in range(20)}
    assert windows[1] == 16 and windows[12] == 48 and windows[13] == 64


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr(options_run):
    lr = {r["iter"]: r["lr"] for r in read_log(options_run) if "val_loss" not in r}
    # warmup 5, decay over the 8 iterations up to lr_decay_iters 20, 3e-3 -> 3e-4; step i logs iteration i - 1's
    assert [lr[i] for i in range(6, 14)] == [3e-3] * 8
    for i in range(13, 21):
        assert lr[i] == pytest.approx(3e-3 - (i - 1 - 12) / 8 * (3e-3 - 3e-4))


def test_linear_schedule_falls_in_a_straight_line_from_the_peak_to_min_lr(adaptive_run):
    lr = {r["iter"]: r["lr"] for r in read_log(adaptive_run) if "val_loss" not in r}
    for i in range(6, 21):
        assert lr[i] == pytest.approx(3e-3 - (i - 1 - 5) / 15 * (3e-3 - 3e-4))


def test_constant_schedule_warms_up_then_stays(tmp_path, dataset):
    done = run_in_process("train.py", *train_args(dataset, tmp_path / "out", "--lr_schedule=constant",
                                                  "--warmup_iters=2", "--max_iters=4", "--eval_iters=1"))
    assert done.returncode == 0, done.stderr[-2000:]
    lr = [r["lr"] for r in read_log(tmp_path / "out") if "val_loss" not in r]
    assert lr == [3e-3 / 3, 2 * 3e-3 / 3, 3e-3, 3e-3]


# ---- the adaptive head: sampling and eval read its log-probabilities ----------------------------

def test_an_adaptive_head_run_samples_and_evaluates(adaptive_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(adaptive_run, run_copy)
    done = run_in_process("sample.py", f"--out_dir={run_copy}", "--num_samples=1", "--max_new_tokens=12",
                          "--start=The Licensee", "--compile=False")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("The Licensee") and len(done.stdout.split("-" * 40)[0]) > len("The Licensee")
    done = run_in_process("eval.py", f"--out_dir={run_copy}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bpb" in done.stdout or "bits" in done.stdout


def adaptive_model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32, head="adaptive",
                                   tie_embeddings=False, adaptive_cutoffs="8,32", **overrides))


def test_the_adaptive_heads_logits_are_log_probabilities_and_its_training_loss_is_their_cross_entropy():
    model = adaptive_model()
    idx, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    targets[0, :3] = -1  # not counted
    model.eval()
    logits, eval_loss = model(idx, targets)
    assert logits.shape == (2, 16, 96)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(2, 16), atol=1e-5)
    model.train()  # no dropout: the same function, computed without the full distribution
    none, train_loss = model(idx, targets)
    assert none is None and train_loss.item() == pytest.approx(eval_loss.item(), abs=1e-5)
    counted = targets != -1
    assert eval_loss.item() == pytest.approx(-logits.gather(-1, targets.clamp(min=0)[..., None])[counted].mean().item(),
                                             abs=1e-5)


def test_an_adaptive_head_trains_and_generates_under_torch_compile():
    # the adaptive head's training loss gathers each cluster's targets, shapes that depend on the data:
    # torch.compile must trace it (breaking the graph where it has to) and its backward. Backend aot_eager
    # is torch.compile with that tracing and AOTAutograd but without inductor's C++ code generation,
    # which takes minutes on a loaded 2-core machine; train.py's compile=True adds only that.
    from engine import generate
    model = adaptive_model()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = model.configure_optimizer(0.0, 1e-2, (0.9, 0.95), "cpu")
    data = torch.arange(3000) * 7 % 96  # each token fixes the next
    losses = []
    for i in range(20):
        rows = torch.stack([data[s:s + 17] for s in range(i * 5, i * 5 + 320, 40)])  # (8, 17)
        _, loss = compiled(rows[:, :-1], rows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    model.eval()
    prompt = data[None, :4]
    with torch.no_grad():
        assert torch.allclose(compiled(prompt)[0], model(prompt)[0], atol=1e-5)
    eager = generate(model, prompt, 8, temperature=0)
    stepped = generate(model, prompt, 8, temperature=0, step=torch.compile(model.decode_step, backend="aot_eager"))
    assert torch.equal(stepped, eager)


# ---- label smoothing and activation checkpointing --------------------------------------------

def tiny(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                                      **overrides}))


def test_label_smoothing_changes_the_training_loss_only():
    model = tiny()
    idx, targets = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    logits, plain = model(idx, targets)
    model.set_training_options(label_smoothing=0.1)
    _, smoothed = model(idx, targets)
    flat = logits.view(-1, 64)
    assert smoothed.item() == pytest.approx(F.cross_entropy(flat, targets.view(-1), label_smoothing=0.1).item())
    assert smoothed.item() == pytest.approx(0.9 * plain.item() - 0.1 * flat.log_softmax(-1).mean().item(),
                                            rel=1e-5)
    model.eval()
    _, evaluated = model(idx, targets)
    assert evaluated.item() == pytest.approx(plain.item(), abs=1e-6)  # what val loss and bits per byte see


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_grad_checkpoint_keeps_the_gradients_and_saves_less_for_the_backward_pass(arch):
    def gradients_and_saved_bytes(grad_checkpoint):
        model = tiny(arch=arch, dropout=0.1)
        model.set_training_options(grad_checkpoint=grad_checkpoint)
        idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t
        torch.manual_seed(2)  # the dropout masks
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            _, loss = model(idx, idx, idx) if arch == "encdec" else model(idx, idx)
        loss.backward()
        return [p.grad for p in model.parameters()], sum(saved)
    plain, plain_bytes = gradients_and_saved_bytes(False)
    checkpointed, checkpointed_bytes = gradients_and_saved_bytes(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert checkpointed_bytes < plain_bytes / 2


# ---- optimizers -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, lr", [("adamw", 3e-3), ("sgd", 0.3), ("lion", 1e-3), ("muon", 3e-3)])
def test_each_optimizer_lowers_the_loss_and_resumes_from_its_state_exactly(kind, lr):
    data = torch.arange(2000) * 7 % 61  # a sequence a model can learn: each token fixes the next
    batches = [torch.stack([data[s:s + 17] for s in range(i, i + 320, 40)]) for i in range(16)]

    def steps(model, optimizer, rows):
        losses = []
        for row in rows:
            _, loss = model(row[:, :-1], row[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
    model = tiny(bias=True)
    optimizer = model.configure_optimizer(0.1, lr, (0.9, 0.95), "cpu", kind)
    losses = steps(model, optimizer, batches[:8])
    state = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, state)
    uninterrupted = losses + steps(model, optimizer, batches[8:])
    assert sum(uninterrupted[-3:]) / 3 < sum(uninterrupted[:3]) / 3 - 0.3
    state.seek(0)
    saved = torch.load(state, weights_only=True)
    resumed = tiny(bias=True)
    resumed.load_state_dict(saved["model"])
    optimizer = resumed.configure_optimizer(0.1, lr, (0.9, 0.95), "cpu", kind)
    optimizer.load_state_dict(saved["optimizer"])
    assert losses + steps(resumed, optimizer, batches[8:]) == uninterrupted


def test_muon_takes_the_hidden_matrices_and_adamw_the_embeddings_head_norms_and_biases():
    model = tiny(bias=True, tie_embeddings=False)
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    assert isinstance(optimizer, Optimizers)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {f"body.blocks.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    blocks = {names[id(p)]: g["blocks"] for g in muon.param_groups for p in g["params"]}
    assert blocks["body.blocks.0.attn.c_attn.weight"] == [(0, 32), (32, 64), (64, 96)]  # q, k, v
    assert blocks["body.blocks.1.mlp.c_proj.weight"] == [(0, 32)]  # one matrix
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == set(names.values()) - in_muon
    assert {"embed.wte.weight", "embed.wpe.weight", "lm_head.weight", "body.ln_f.weight"} <= in_adamw


def test_muon_orthogonalizes_each_block_of_a_fused_matrix_as_torchs_muon_does_each_matrix_alone():
    # a fused (q; k; v) matrix, grouped q 32 rows, k and v 16 each (GQA's shape), against torch's Muon
    # stepping three separate matrices: the same weights, bit for bit, step after step
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(64, 32))
    apart = [torch.nn.Parameter(block.clone()) for block in fused.detach().split([32, 16, 16])]
    ours = Muon([{"params": [fused], "blocks": [(0, 32), (32, 48), (48, 64)]}], lr=0.02, weight_decay=0.1)
    torchs = torch.optim.Muon(apart, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    whole = torch.nn.Parameter(fused.detach().clone())  # and uncut: torch's Muon on the whole matrix
    ours_whole = Muon([whole], lr=0.02, weight_decay=0.1)
    torchs_whole = torch.nn.Parameter(fused.detach().clone())
    reference_whole = torch.optim.Muon([torchs_whole], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(64, 32)
        fused.grad, whole.grad, torchs_whole.grad = grad.clone(), grad.clone(), grad.clone()
        for p, g in zip(apart, grad.split([32, 16, 16])):
            p.grad = g.clone()
        for optimizer in (ours, torchs, ours_whole, reference_whole):
            optimizer.step()
        assert torch.equal(fused.detach(), torch.cat([p.detach() for p in apart]))
        assert torch.equal(whole.detach(), torchs_whole.detach())
    assert not torch.equal(fused.detach(), whole.detach())  # cutting the matrix changes the update
    # and each block's update alone is near-orthogonal: its singular values near 1 (Newton-Schulz's 0.6-1.2 mostly)
    update = Muon([{"params": [p := torch.nn.Parameter(torch.zeros(64, 32))], "blocks": [(0, 32), (32, 48),
                                                                                          (48, 64)]}], lr=1.0)
    p.grad = torch.randn(64, 32)
    update.step()
    for block, rows in zip(p.detach().split([32, 16, 16]), (32, 16, 16)):
        singular = torch.linalg.svdvals(block / (0.2 * math.sqrt(max(rows, 32))))
        assert ((singular > 0.6) & (singular < 1.25)).float().mean() > 0.9 and singular.max() < 1.3


def test_muon_cuts_swiglu_lstm_and_expert_matrices_into_their_linear_maps():
    names = lambda model: {id(p): n for n, p in model.named_parameters()}  # noqa: E731
    swiglu = tiny(mlp="swiglu", mlp_hidden=48, n_kv_head=1)
    cut = {names(swiglu)[id(p)]: blocks for p, blocks in swiglu.hidden_matrices()}
    assert cut["body.blocks.0.mlp.c_fc.weight"] == [(0, 48), (48, 96)]  # gate, up
    assert cut["body.blocks.0.attn.c_attn.weight"] == [(0, 32), (32, 48), (48, 64)]  # q; one kv head of 16
    lstm = tiny(arch="lstm")
    cut = {names(lstm)[id(p)]: blocks for p, blocks in lstm.hidden_matrices()}
    assert set(cut) == {f"lstm.weight_{kind}_l{i}" for kind in ("ih", "hh") for i in range(2)}
    assert all(blocks == [(0, 32), (32, 64), (64, 96), (96, 128)] for blocks in cut.values())  # i, f, g, o
    moe = tiny(n_expert=2, mlp="swiglu", mlp_hidden=48)
    cut = {names(moe)[id(p)]: blocks for p, blocks in moe.hidden_matrices()}
    assert cut["body.blocks.0.mlp.c_fc"] == [(0, 48), (48, 96)] and cut["body.blocks.0.mlp.c_proj"] == [(0, 32)]
    # a stack of experts: each expert's matrix is stepped as torch's Muon steps it alone
    stack = torch.nn.Parameter(torch.randn(2, 8, 16))
    alone = [torch.nn.Parameter(m.clone()) for m in stack.detach()]
    stack.grad = torch.randn(2, 8, 16)
    for p, g in zip(alone, stack.grad):
        p.grad = g.clone()
    Muon([stack], lr=0.02).step()
    torch.optim.Muon(alone, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw").step()
    assert torch.equal(stack.detach(), torch.stack([p.detach() for p in alone]))


def test_muon_leaves_a_run_whose_hidden_matrices_are_frozen_to_adamw():
    model = tiny()  # as a LoRA run's base is: only the adapters (here: the norms and embeddings) train
    for p, _ in model.hidden_matrices():
        p.requires_grad_(False)
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len([p for p in model.parameters()
                                                                         if p.requires_grad])


@pytest.mark.parametrize("kind, lr", [("muon", 3e-3), ("lion", 1e-3), ("sgd", 0.3)])
def test_fp16_skips_an_overflowing_step_and_halves_the_loss_scale_with_each_unfused_optimizer(kind, lr, tmp_path,
                                                                                             dataset):
    # fp16 autocast and the GradScaler run on a CPU too (torch 2.13), so the path a GPU without bf16 takes
    # (unscale, the norm, the skipped step, the shrunk scale) is the one tested. Backward call 6 is
    # iteration 3's second micro-step: its gradients are infinite, the loss is not.
    out_dir = tmp_path / "out"
    done = run_script("tests/inject.py", "inf@backward:6", os.path.join(ROOT, "train.py"),
                      *train_args(dataset, out_dir, "--dtype=float16", f"--optimizer={kind}", f"--learning_rate={lr}",
                                  "--n_layer=1", "--n_embd=32", "--block_size=32", "--max_iters=12",
                                  "--lr_decay_iters=12", "--warmup_iters=2", "--eval_interval=12", "--eval_iters=2"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dtype float16" in done.stdout
    assert "iter 3: skipped, the gradient norm is not finite (1 in a row)" in done.stdout
    losses = train_losses(read_log(out_dir))
    assert sorted(losses) == [i for i in range(1, 13) if i != 3]
    assert all(math.isfinite(loss) for loss in losses.values())  # no inf reached the weights
    assert sum(losses[i] for i in (10, 11, 12)) < sum(losses[i] for i in (1, 2, 4)) - 0.3
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] == 2.0 ** 15  # from 2 ** 16: the overflow halved it


def test_lion_moves_each_weight_by_the_sign_of_its_interpolated_momentum_as_in_the_paper():
    # by hand, lr 0.1, betas (0.9, 0.99), weight decay 0.5, weights w0 = (1, -2), gradients (0.5, -3) then (-1, 1):
    # step 1: m = 0, c = 0.1 g = (0.05, -0.3), sign (1, -1); w = w0 (1 - 0.05) - 0.1 sign = (0.85, -1.8)
    #         m = 0.01 g = (0.005, -0.03)
    # step 2: c = 0.9 m + 0.1 g = (0.0045 - 0.1, -0.027 + 0.1) = (-0.0955, 0.073), sign (-1, 1)
    #         w = (0.85 * 0.95 + 0.1, -1.8 * 0.95 - 0.1) = (0.9075, -1.81); m = 0.99 m + 0.01 g = (-0.00505, -0.0197)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    lion = Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    for grad, expected_w, expected_m in [((0.5, -3.0), (0.85, -1.8), (0.005, -0.03)),
                                         ((-1.0, 1.0), (0.9075, -1.81), (-0.00505, -0.0197))]:
        w.grad = torch.tensor(grad)
        lion.step()
        assert torch.allclose(w.detach(), torch.tensor(expected_w))
        assert torch.allclose(lion.state[w]["exp_avg"], torch.tensor(expected_m))


def test_resuming_with_another_optimizer_is_refused(tmp_path, dataset, options_run):
    run_copy = tmp_path / "run"
    shutil.copytree(options_run, run_copy)
    done = run_in_process("train.py", *train_args(dataset, run_copy, "--init_from=resume", "--max_iters=30",
                                                  "--optimizer=lion"))
    assert_clear_error(done, "optimizer=muon", "not lion")


def test_resuming_an_optimizer_state_that_does_not_fit_is_refused(tmp_path, dataset, options_run):
    # as a Muon checkpoint from before fused matrices were cut into blocks: one group for all matrices
    run_copy = tmp_path / "run"
    shutil.copytree(options_run, run_copy)
    ckpt = torch.load(run_copy / "ckpt.pt", weights_only=True)
    muon = ckpt["optimizer"]["optimizers"][0]
    muon["param_groups"] = [{**muon["param_groups"][0], "blocks": None,
                             "params": [i for g in muon["param_groups"] for i in g["params"]]}]
    torch.save(ckpt, run_copy / "ckpt.pt")
    done = run_in_process("train.py", *train_args(dataset, run_copy, "--init_from=resume", *OPTIONS, "--max_iters=30",
                                                  "--lr_decay_iters=30"))
    assert_clear_error(done, "its optimizer state does not fit this code's Optimizers")


# ---- bad input: one line, exit 2, nothing written -------------------------------------------

BAD = {
    "unknown optimizer": (["--optimizer=adam"], "optimizer='adam' is not one of adamw, sgd, lion, muon"),
    "unknown schedule": (["--lr_schedule=step"], "lr_schedule='step' is not one of"),
    "wsd decay longer than the run": (["--lr_schedule=wsd", "--wsd_decay_iters=40", "--lr_decay_iters=30",
                                       "--max_iters=30"], "lr_schedule=wsd does not fit the run"),
    "wsd decaying after the run ends": (["--lr_schedule=wsd", "--lr_decay_iters=50", "--max_iters=30"],
                                        "must be at most max_iters=30"),
    "a window schedule longer than the run": (["--block_size_schedule=40", "--max_iters=30"],
                                              "block_size_schedule=40 iterations is longer than the run"),
    "a first window longer than block_size": (["--block_size_schedule=10", "--block_size_start=128"],
                                              "block_size_start=128 is longer than block_size=64"),
    "a window schedule for encdec": (["--block_size_schedule=10", "--arch=encdec"], "arch='encdec'"),
    "cutoffs that do not increase": (["--head=adaptive", "--tie_embeddings=False", "--adaptive_cutoffs=100,50"],
                                     "adaptive_cutoffs='100,50' must increase"),
    "a cutoff past the vocabulary": (["--head=adaptive", "--tie_embeddings=False", "--adaptive_cutoffs=64,320"],
                                     "between 0 and the vocabulary's 320"),
    "cutoffs that are not numbers": (["--head=adaptive", "--tie_embeddings=False", "--adaptive_cutoffs=many"],
                                     "is not a comma-separated list of token ids"),
    "an adaptive head tied to the embedding": (["--head=adaptive"], "set tie_embeddings=False"),
    "label smoothing with an adaptive head": (["--head=adaptive", "--tie_embeddings=False", "--label_smoothing=0.1"],
                                              "label_smoothing is not available with head='adaptive'"),
    "grad_checkpoint for an LSTM": (["--grad_checkpoint=True", "--arch=lstm"], "arch='lstm' has none"),
    "an unknown head": (["--head=hierarchical"], "head='hierarchical' is not one of softmax, adaptive"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_training_options_give_one_clear_line(case, tmp_path, dataset):
    args, fragment = BAD[case]
    done = run_in_process("train.py", *train_args(dataset, tmp_path / "out", "--max_iters=30", *args))
    assert_clear_error(done, fragment)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_help_lists_the_training_options():
    done = run_in_process("train.py", "--help")
    assert done.returncode == 0
    for setting in ("--optimizer=adamw", "--lr_schedule=cosine", "--grad_checkpoint=False", "--label_smoothing=0.0",
                    "--block_size_schedule=0", "--head=softmax"):
        assert setting in done.stdout


def test_optimizer_state_is_one_state_dict_for_muon_and_adamw_together():
    model = tiny()
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    loss.backward()
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    other = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    other.load_state_dict(state)
    for group in other.param_groups:  # the schedule's lr reaches the groups that the load put in place
        group["lr"] = 0.5
    assert all(g["lr"] == 0.5 for o in other.optimizers for g in o.param_groups)
    assert not math.isnan(loss.item())


# ---- bench.py --what=optimizers: one run per optimizer, a plot and a table ----------------------

def test_the_optimizer_comparison_trains_each_optimizer_and_writes_its_plot_and_table(tmp_path, dataset):
    data_dir, name = dataset
    readme = tmp_path / "options.md"
    readme.write_text("# Options\n\n<!-- optimizers:begin -->\nold\n<!-- optimizers:end -->\nafter\n")
    done = run_in_process("bench.py", "--what=optimizers", "--optimizers=muon:3e-3", "--budget=",
                          f"--data_dir={data_dir}", f"--dataset={name}", f"--work_dir={tmp_path / 'runs'}",
                          f"--plot_file={tmp_path / 'plot.png'}", f"--readme={readme}",
                          "--train_overrides=--n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 "
                          "--gradient_accumulation_steps=1 --max_iters=3 --warmup_iters=1 --lr_decay_iters=3 "
                          "--eval_interval=3 --eval_iters=2 --compile=False --report=False")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["runs"]) == {"muon"} and result["runs"]["muon"]["iters"] == 3
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- optimizers:end -->\nafter\n")
    assert "| muon | 0.003 | 3 |" in text


@pytest.mark.parametrize("args, fragment", [
    (["--optimizers=adamw"], "must be name:learning_rate pairs"),
    (["--optimizer_config=config/nothing.py"], "config file not found: config/nothing.py")])
def test_the_optimizer_comparison_refuses_bad_settings_in_one_line(args, fragment):
    assert_clear_error(run_in_process("bench.py", "--what=optimizers", *args), fragment)
