import os
import random
from fractions import Fraction

import pytest
import torch

from engine import generate
from model import CrossAttention, ModelConfig, MoE, build_model
from runtime import (Int8Linear, cpu_has_bf16_units, int8_backend, load_checkpoint, pick_compile, pick_device,
                     pick_dtype, quantize, save_checkpoint)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, path)
    with pytest.raises(Exception):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_args": {}, "bad": lambda: 0}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoints_holding_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {}, "payload": Fraction(1, 3)}, path)  # an object, not plain data
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_checkpoint(str(path))


def test_dtype_auto_follows_the_hardware_and_names_are_checked():
    assert pick_dtype("cpu", "auto") == (torch.bfloat16 if cpu_has_bf16_units() else torch.float32)
    assert pick_dtype("cpu", "float32") == torch.float32
    with pytest.raises(ValueError, match="dtype='fp8' is not one of"):
        pick_dtype("cpu", "fp8")


def test_compile_auto_compiles_on_a_gpu_and_on_a_cpu_only_in_bf16():
    assert pick_compile("cuda", torch.bfloat16, "auto") and pick_compile("cuda:1", torch.float32, "auto")
    assert pick_compile("cpu", torch.bfloat16, "auto") and not pick_compile("cpu", torch.float32, "auto")
    assert not pick_compile("mps", torch.float32, "auto")
    assert pick_compile("cpu", torch.float32, True) is True and pick_compile("cuda", torch.bfloat16, False) is False
    with pytest.raises(ValueError, match="compile='yes' is not one of auto, True, False"):
        pick_compile("cpu", torch.float32, "yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    assert pick_device("auto") in ("cpu", "mps")
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="is not one of"):
        pick_device("tpu")


# ---- int8 weights ------------------------------------------------------------------

def tiny_model(arch, overrides=None):
    torch.manual_seed(0)
    settings = dict(arch=arch, vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True,
                    n_labels=3 if arch == "conditional" else 0, **(overrides or {}))
    return build_model(ModelConfig(**settings)).eval()


def logits_of(model, arch):
    """Every position's logits (given targets, a causal model computes them all)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 96, (2, 12), generator=g)
    with torch.no_grad():
        if arch == "encdec":
            return model(torch.randint(0, 96, (2, 10), generator=g), idx, targets=idx)[0]
        if arch == "conditional":
            return model(idx, targets=idx, labels=torch.tensor([0, 2]))[0]
        return model(idx, targets=idx)[0]


@pytest.mark.parametrize("arch, overrides", [
    ("gpt", {}), ("gpt", {"n_expert": 2, "attention": "linear", "n_kv_head": 1}),
    ("conditional", {}), ("encoder", {}), ("encdec", {}), ("lstm", {})])
def test_int8_logits_stay_close_to_the_float_ones_in_every_architecture(arch, overrides):
    model = tiny_model(arch, overrides)
    wte = (model.wte if arch == "lstm" else model.embed.wte).weight.detach().clone()
    want = logits_of(model, arch)
    quantize(model, "int8")
    got = logits_of(model, arch)
    assert (got - want).norm() / want.norm() < 0.04
    assert isinstance(model.lm_head, Int8Linear)  # the tied head is int8, the embedding it shared stays float
    assert torch.equal((model.wte if arch == "lstm" else model.embed.wte).weight, wte)
    left_float = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert left_float == [m.c_attn for m in model.modules() if isinstance(m, CrossAttention)] + \
        [m.router for m in model.modules() if isinstance(m, MoE)]  # (a model has one kind or none)


def test_int8_keeps_val_loss_within_one_percent_and_the_greedy_choices_mostly_the_same():
    """A tiny GPT trained for a few seconds on made-up clauses, then int8: the issue's measure."""
    rng = random.Random(0)
    parties, verbs = ["Licensee", "Licensor", "Tenant", "Landlord"], ["shall pay", "may terminate", "shall notify"]
    text = " ".join(f"The {rng.choice(parties)} {rng.choice(verbs)} the {rng.choice(parties)} within "
                    f"{rng.randint(1, 9)}0 days." for _ in range(600))
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    train, val = data[:len(data) * 9 // 10], data[len(data) * 9 // 10:]
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(chars), block_size=32, n_layer=2, n_head=2, n_embd=64))
    optimizer = model.configure_optimizer(0.0, 3e-3, (0.9, 0.99), "cpu")

    def batch(split, g):
        starts = torch.randint(0, len(split) - 33, (16,), generator=g)
        rows = torch.stack([split[s:s + 33] for s in starts])
        return rows[:, :-1], rows[:, 1:]

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        _, loss = model(*batch(train, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val_batches = [batch(val, torch.Generator().manual_seed(i)) for i in range(8)]

    def val_loss_and_next_tokens():
        with torch.no_grad():
            results = [model(x, y) for x, y in val_batches]
        return sum(loss.item() for _, loss in results) / len(results), [logits.argmax(-1) for logits, _ in results]

    float_loss, float_next = val_loss_and_next_tokens()
    quantize(model, "int8")
    int8_loss, int8_next = val_loss_and_next_tokens()
    assert float_loss < 1.5  # it learned the clauses (a uniform guess is ln(len(chars)) ~ 3.4)
    assert abs(int8_loss - float_loss) < 0.01 * float_loss
    assert torch.cat(int8_next).eq(torch.cat(float_next)).float().mean() > 0.95  # the greedy choices


def test_int8_decodes_under_bf16_autocast_as_a_float_linear_would():
    model = quantize(tiny_model("gpt"), "int8")
    idx = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
        assert logits.dtype == torch.bfloat16
        assert generate(model, idx, 8, temperature=0).shape == (1, 12)


def test_the_dequantizing_fallback_gives_the_int8_kernels_answer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = linear(x)
        fallback = Int8Linear(linear, "dequantize")(x)
        assert (fallback - want).norm() / want.norm() < 0.02
        if int8_backend() == "dynamic":
            assert (Int8Linear(linear, "dynamic")(x) - fallback).norm() / want.norm() < 0.03


def test_int8_refuses_other_kinds_and_devices_with_a_clear_error():
    with pytest.raises(ValueError, match="the one kind is int8"):
        quantize(tiny_model("gpt"), "int4")
    with pytest.raises(ValueError, match="run on the CPU only, and this model is on meta"):
        quantize(tiny_model("gpt").to("meta"), "int8")
