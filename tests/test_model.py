import itertools
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from engine import embed_documents, generate, rank_by_cosine, sample_next
from model import KVCache, ModelConfig, alibi_slopes, attention_mask, build_model, linear_attention, sinusoid_table

SWITCHES = list(itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]))


def tiny(**overrides):
    args = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**args, **overrides})).eval()


@pytest.mark.parametrize("pos,norm,mlp", SWITCHES)
@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_greedy_generation_is_the_same_with_and_without_kv_cache(pos, norm, mlp, n_kv_head):
    model = tiny(pos=pos, norm=norm, mlp=mlp, n_kv_head=n_kv_head)
    prompt = torch.randint(0, 61, (2, 5))
    # 30 new tokens from 5: the window slides past block_size=24, and must still agree
    with_cache = generate(model, prompt, 30, temperature=0, use_cache=True)
    without = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_a_decoder_never_sees_the_future(pos):
    model = tiny(pos=pos)
    x = torch.randint(0, 61, (1, 16))
    logits, _ = model(x, x)
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 61
    logits2, _ = model(changed, changed)
    assert torch.allclose(logits[0, :10], logits2[0, :10], atol=1e-6)
    assert not torch.allclose(logits[0, 10:], logits2[0, 10:])


def test_prefill_after_a_filled_cache_matches_one_pass():
    model = tiny(pos="rope")
    x = torch.randint(0, 61, (2, 12))
    full, _ = model(x, x)  # targets given: logits at every position
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    model(x[:, :7], cache=cache)
    last, _ = model(x[:, 7:], cache=cache)  # five tokens at once on top of seven cached
    assert cache.pos == 12
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-5)


def test_tied_embeddings_share_one_matrix_and_untied_do_not():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.embed.wte.weight is tied.lm_head.weight
    assert untied.embed.wte.weight is not untied.lm_head.weight
    assert untied.num_params() == tied.num_params() + 61 * 32


def test_grouped_query_attention_has_fewer_key_value_weights():
    full, grouped = tiny(n_kv_head=0), tiny(n_kv_head=1)
    assert grouped.num_params() < full.num_params()
    assert grouped.body.blocks[0].attn.c_attn.weight.shape == (32 + 2 * 8, 32)


def test_loss_ignores_targets_of_minus_one():
    model = tiny()
    x = torch.randint(0, 61, (1, 8))
    y = x.clone()
    _, loss_all = model(x, y)
    y[0, :4] = -1
    _, loss_half = model(x, y)
    logits, _ = model(x, x)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], x[0, 4:])
    assert torch.allclose(loss_half, expected, atol=1e-5) and not torch.allclose(loss_half, loss_all)


@pytest.mark.parametrize("bad,message", [
    (dict(n_embd=30, n_head=4), "must divide n_embd"),
    (dict(n_kv_head=3), "must divide n_head"),
    (dict(pos="xpos"), "pos='xpos' is not one of"),
    (dict(pos="alibi", attention="linear"), "attention='linear' does not compute"),
    (dict(n_expert=2, expert_top_k=3), "expert_top_k <= n_expert"),
    (dict(arch="conditional"), "needs n_labels > 0"),
    (dict(arch="lstm", n_expert=2), "arch='lstm' has none"),
    (dict(block_size=0), "block_size must be positive"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_impossible_shapes_are_refused_with_a_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**dict(n_head=4, n_embd=32), **bad})


def test_sequences_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="longer than block_size"):
        tiny()(torch.zeros(1, 25, dtype=torch.long))


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).flatten().tolist()) == {0, 1}
    # the first token holds 0.64 of the mass, the first two 0.87: nucleus 0.8 needs exactly two
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 0).flatten().tolist()) == {0}


def test_generation_never_picks_the_padding_rows_past_the_tokenizers_vocabulary():
    model, prompt = tiny(), torch.zeros(4, 3, dtype=torch.long)
    free = generate(model, prompt, 20, generator=torch.Generator().manual_seed(0))
    limited = generate(model, prompt, 20, generator=torch.Generator().manual_seed(0), vocab_limit=10)
    assert free[:, 3:].max() >= 10 and limited[:, 3:].max() < 10


def test_weight_decay_applies_to_matrices_only():
    model = tiny(bias=True, tie_embeddings=False)
    decay, no_decay = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in decay["params"])
    assert any(p is model.body.ln_f.bias for p in no_decay["params"])


# ---- every architecture --------------------------------------------------------------------

def model_of(arch, **overrides):
    return tiny(arch=arch, n_labels=3 if arch == "conditional" else 0, **overrides)


def inputs_of(arch, batch=2):
    """What an architecture reads besides idx: a label per row, or a padded source."""
    if arch == "conditional":
        return {"labels": torch.tensor([0, 2, 1, 1][:batch])}
    if arch == "encdec":
        src = torch.randint(0, 61, (batch, 9))
        src_mask = torch.ones(batch, 9, dtype=torch.bool)
        src_mask[0, 6:] = False  # the first row's source is 6 tokens and padding
        return {"src": src, "src_mask": src_mask}
    return {}


VARIANTS = [dict(pos=p, attention=a, norm_first=nf) for p in ("learned", "sinusoidal", "rope", "alibi")
            for a in ("sdpa", "linear") for nf in (True, False) if not (p == "alibi" and a == "linear")]


@pytest.mark.parametrize("arch", ["gpt", "conditional", "encdec"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_every_transformer_generates_the_same_with_and_without_its_cache(arch, variant):
    model = model_of(arch, **variant)
    inputs = inputs_of(arch)
    prompt = torch.randint(0, 61, (2, 5))
    steps = 30 if arch != "encdec" else 18  # the decoder's context is 24: it does not slide
    with_cache = generate(model, prompt, steps, temperature=0, use_cache=True, **inputs)
    without = generate(model, prompt, steps, temperature=0, use_cache=False, **inputs)
    assert torch.equal(with_cache, without)


def test_a_mixture_of_experts_generates_the_same_with_and_without_the_cache():
    model = model_of("gpt", n_expert=4, expert_top_k=2)
    prompt = torch.randint(0, 61, (3, 4))
    assert torch.equal(generate(model, prompt, 25, temperature=0), generate(model, prompt, 25, temperature=0,
                                                                                 use_cache=False))


def test_the_lstm_carries_its_state_instead_of_reading_the_prompt_again():
    model = model_of("lstm")
    prompt = torch.randint(0, 61, (2, 5))
    # 40 new tokens: past block_size, which an LSTM does not have to respect
    assert torch.equal(generate(model, prompt, 40, temperature=0), generate(model, prompt, 40, temperature=0,
                                                                                 use_cache=False))
    cache = model.next_logits(prompt, None, True)[1]
    assert cache.pos == 5 and cache.hc[0].shape == (2, 2, 32)  # (layers, batch, hidden)


def logits_of(model, arch, x, inputs):
    if arch == "encdec":
        return model(inputs["src"], x, x, src_mask=inputs["src_mask"])[0]
    return model(x, x, **inputs)[0]


@pytest.mark.parametrize("arch,variant", [(a, v) for a in ("gpt", "conditional", "encdec", "lstm")
                                          for v in (VARIANTS if a != "lstm" else [{}])])
def test_a_decoder_never_sees_the_future_with_any_positions_or_attention(arch, variant):
    model = model_of(arch, **variant)
    inputs = inputs_of(arch, batch=1)
    x = torch.randint(0, 61, (1, 16))
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 61
    before, after = logits_of(model, arch, x, inputs), logits_of(model, arch, changed, inputs)
    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-5)
    assert not torch.allclose(before[0, 10:], after[0, 10:])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_an_encoder_sees_both_sides(variant):
    model = model_of("encoder", **variant)
    x = torch.randint(0, 61, (1, 16))
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 61
    before, after = model(x)[0], model(changed)[0]
    assert before.shape == (1, 16, 61)  # every position: the masks can be anywhere
    assert not torch.allclose(before[0, :10], after[0, :10])  # earlier positions saw the later token
    assert not torch.allclose(before[0, 11:], after[0, 11:])


@pytest.mark.parametrize("attention", ["sdpa", "linear"])
def test_the_encoder_decoder_ignores_source_padding_and_reads_the_source(attention):
    model = model_of("encdec", attention=attention)
    src, idx = torch.randint(0, 61, (1, 6)), torch.randint(0, 61, (1, 8))
    padded = torch.cat([src, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    keep = torch.tensor([[True] * 6 + [False] * 5])
    alone = model(src, idx, idx)[0]
    assert torch.allclose(alone, model(padded, idx, idx, src_mask=keep)[0], atol=1e-5)
    assert not torch.allclose(alone, model(padded, idx, idx)[0], atol=1e-5)  # unmasked padding is read
    other = src.clone()
    other[0, 0] = (src[0, 0] + 1) % 61
    assert not torch.allclose(alone, model(other, idx, idx)[0])


def test_the_control_label_changes_the_conditional_models_output():
    model = model_of("conditional")
    x = torch.randint(0, 61, (1, 8))
    per_row = model(x, x, labels=torch.tensor([1]))[0]
    assert not torch.allclose(per_row, model(x, x, labels=torch.tensor([2]))[0])
    assert torch.allclose(per_row, model(x, x, labels=torch.full((1, 8), 1))[0])  # (B,) = (B, T) of that label
    with pytest.raises(ValueError, match="needs the control labels"):
        model(x, x)


def reference_linear_attention(q, k, v, causal):
    """The definition, quadratic: phi(q) phi(k)^T (masked when causal), normalized by row, times v."""
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = q @ k.transpose(-2, -1)
    if causal:
        weights = weights.tril()
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [5, 64, 150])  # within one chunk, exactly one, and three chunks with a rest
def test_linear_attention_computes_the_kernelized_definition(causal, T):
    q, k, v = (torch.randn(2, 3, T, 8) for _ in range(3))
    y, _ = linear_attention(q, k, v, causal)
    assert torch.allclose(y, reference_linear_attention(q, k, v, causal), atol=1e-4)


def test_linear_attention_continues_from_its_carried_sums():
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    whole, _ = linear_attention(q, k, v, causal=True)
    first, sums = linear_attention(q[:, :, :25], k[:, :, :25], v[:, :, :25], causal=True)
    rest, _ = linear_attention(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], causal=True, state=sums)
    assert torch.allclose(torch.cat([first, rest], dim=2), whole, atol=1e-5)


def test_sinusoidal_positions_and_alibi_slopes_follow_their_papers():
    table = sinusoid_table(50, 8)
    assert torch.allclose(table[7, 0], torch.sin(torch.tensor(7.0)))
    assert torch.allclose(table[7, 1], torch.cos(torch.tensor(7.0)))
    assert torch.allclose(table[7, 6], torch.sin(torch.tensor(7.0 / 10000 ** (6 / 8))))
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    bias = attention_mask(True, 3, 0, slopes=alibi_slopes(2))
    inf = float("inf")  # head 0's slope is 2^(-8/2) = 1/16; a key may not be in the future
    assert bias[0].tolist() == [[0, -inf, -inf], [-0.0625, 0, -inf], [-0.125, -0.0625, 0]]


def test_post_norm_blocks_leave_a_normalized_residual_stream():
    pre, post = model_of("gpt", norm_first=True), model_of("gpt", norm_first=False)
    x = torch.randint(0, 61, (2, 10))
    assert isinstance(post.body.ln_f, torch.nn.Identity)  # the last block already normalized
    h = post.hidden(x)
    assert torch.allclose(h.mean(dim=-1), torch.zeros(2, 10), atol=1e-5)
    assert torch.allclose(h.std(dim=-1, unbiased=False), torch.ones(2, 10), atol=1e-3)
    assert not torch.allclose(pre.body.blocks[0](pre.embed(x, torch.arange(10))).std(dim=-1), torch.ones(2, 10), atol=1e-2)


def test_experts_are_balanced_by_a_loss_and_bounded_by_capacity_in_training_only():
    model = model_of("gpt", n_expert=4, expert_top_k=1, expert_capacity=0.5)
    moe = model.body.blocks[0].mlp
    x = torch.randn(1, 40, 32)
    torch.nn.init.zeros_(moe.router.weight)  # equal scores: every token's first choice is expert 0
    model.train()
    trained = moe(x)
    # capacity 0.5 x 40 / 4 = 5 tokens: the other 35 skip the experts entirely
    assert (trained.abs().sum(dim=-1) > 0).sum() == 5
    assert moe.balance_loss.item() == pytest.approx(4 * 1.0 * 0.25)  # all tokens on one expert: E * 1 * 1/E
    model.eval()
    assert (moe(x).abs().sum(dim=-1) > 0).all()  # in eval every token gets its expert
    tokens = torch.randint(0, 61, (2, 8))
    model.train()
    loss_with, loss_without = model(tokens, tokens)[1], model.head(model.hidden(tokens), tokens)[1]
    assert loss_with > loss_without - 1e-6  # the balancing term is part of the training loss


def test_a_mixture_counts_only_the_experts_a_token_passes_through_as_flops():
    dense, sparse = model_of("gpt"), model_of("gpt", n_expert=4, expert_top_k=1)
    one_mlp = sum(p.numel() for p in dense.body.blocks[0].mlp.parameters())
    assert sparse.num_params() == dense.num_params() + 2 * (3 * one_mlp + 32 * 4)  # 3 more MLPs + a router, per layer
    assert sparse.flops_per_token() == dense.flops_per_token() + 6 * 2 * 32 * 4  # only the routers' work is extra


def test_embeddings_rank_a_document_first_for_its_own_text():
    model = model_of("gpt")
    docs = [torch.randint(0, 61, (n,)).tolist() for n in (10, 30, 55)]  # the last is longer than the context
    vectors = embed_documents(model, docs)
    assert vectors.shape == (3, 32)
    for i in range(3):
        order, similarity = rank_by_cosine(vectors[i], vectors)
        assert order[0] == i and similarity[0] == pytest.approx(1.0)


# ---- checkpoints written before model.py was rearranged -------------------------------------

def test_checkpoints_of_the_earlier_model_py_load_and_give_the_same_logits():
    # tiny models of every architecture and switch, saved by the model.py of commit e4464ef with an
    # input and the logits they gave then
    saved = torch.load(os.path.join(ROOT, "tests", "data", "checkpoints_e4464ef.pt"), weights_only=True)
    assert len(saved) == 12
    for name, case in saved.items():
        model = build_model(ModelConfig(**case["model_args"])).eval()
        model.load_state_dict(case["model"])  # the parameters kept their names
        with torch.no_grad():
            if case["model_args"]["arch"] == "encdec":
                logits, _ = model(case["inputs"]["src"], case["idx"], case["idx"], src_mask=case["inputs"]["src_mask"])
            else:
                logits, _ = model(case["idx"], case["idx"], **case["inputs"])
        assert torch.allclose(logits, case["logits"], atol=1e-5), name


@pytest.mark.parametrize("arch,switches", [("gpt", dict(pos="rope", n_kv_head=2)), ("gpt", dict(pos="alibi")),
                                           ("gpt", dict(pos="sinusoidal", tie_embeddings=False)),
                                           ("gpt", dict(attention="linear", n_expert=3, expert_top_k=2)),
                                           ("conditional", {}), ("encoder", {}), ("lstm", {}),
                                           ("encdec", dict(attention="linear"))])
def test_a_model_built_from_a_state_dict_is_the_model_that_was_saved(arch, switches):
    # built on the meta device, then given the weights: no tensor may stay on meta, the
    # position tables must be computed, and tied matrices must be one again
    config = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, arch=arch,
                         n_labels=2 if arch == "conditional" else 0, **switches)
    torch.manual_seed(0)
    saved = build_model(config).eval()
    loaded = build_model(config, {k: v.clone() for k, v in saved.state_dict().items()}).eval()
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    wte = loaded.wte if arch == "lstm" else loaded.embed.wte
    assert (wte.weight is loaded.lm_head.weight) == config.tie_embeddings
    idx = torch.randint(0, 64, (2, 12))
    inputs = (idx, idx, idx) if arch == "encdec" else (idx, idx)
    labels = {"labels": torch.tensor([0, 1])} if arch == "conditional" else {}
    with torch.no_grad():
        assert torch.equal(saved(*inputs, **labels)[0], loaded(*inputs, **labels)[0])


def test_loading_a_model_leaves_torch_init_as_it_was_and_does_not_import_the_compiler():
    # drawing a random init on the meta device imports torch._dynamo (seconds of a sample.py
    # start-up); build_model turns torch.nn.init off while it builds, and on again after
    code = ("import sys, torch; from model import ModelConfig, build_model; "
            "c = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32); "
            "state = build_model(c).state_dict(); assert 'torch._dynamo' not in sys.modules; "
            "build_model(c, state); assert 'torch._dynamo' not in sys.modules, 'loading imported torch._dynamo'; "
            "w = torch.zeros(3, 3); torch.nn.init.ones_(w); assert w.sum() == 9, 'torch.nn.init left off'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("chunk", [128, 3])  # one chunk; three (3, 3, 1), each over the keys up to its end
def test_written_out_causal_attention_is_sdpas_causal_attention_with_its_gradients(chunk):
    import torch.nn.functional as F

    from model import causal_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    ours = causal_attention(q, k, v, chunk)
    ours_grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    theirs_grads = torch.autograd.grad(theirs.square().sum(), (q, k, v))
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours_grads, theirs_grads))


def test_compiled_training_keeps_a_graph_for_many_lengths_of_a_growing_window():
    # block_size_schedule trains on windows of growing length: causal_attention's chunks must
    # not make torch.compile trace a graph per length (8 lengths here; a loop over range(T) did)
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.compile(build_model(ModelConfig(vocab_size=64, block_size=256, n_layer=1, n_head=2, n_embd=32)),
                          backend="eager")
    for T in range(32, 257, 32):
        idx = torch.randint(0, 64, (2, T))
        model(idx, idx)[1].backward()
    assert counters["stats"]["unique_graphs"] <= 3  # the first length; then one per band of 128 (chunks)


def test_compiled_cpu_training_writes_causal_attention_out_and_learns_as_eager(monkeypatch):
    import model as models
    calls = []
    written = models.causal_attention
    monkeypatch.setattr(models, "causal_attention", lambda *a: calls.append(1) or written(*a))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    _, eager = model(idx, targets)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    assert not calls  # eager: the sdpa kernel
    _, compiled = torch.compile(model, backend="aot_eager")(idx, targets)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    assert len(calls) == 2  # traced once per layer
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled_grads, eager_grads))
    with torch.no_grad():  # no gradients (evaluation): the sdpa kernel again
        torch.compile(model, backend="aot_eager")(idx, targets)
    assert len(calls) == 2


@pytest.mark.parametrize("arch,n_expert", [("gpt", 0), ("gpt", 2), ("lstm", 0)])
def test_dropout_acts_in_training_and_not_in_eval(arch, n_expert):
    x = torch.randint(0, 61, (2, 12))
    model = tiny(arch=arch, n_expert=n_expert, dropout=0.3)
    with torch.no_grad():
        assert torch.equal(model(x, x)[0], model(x, x)[0])  # eval mode: every unit kept
        model.train()
        first, second = model(x, x)[0], model(x, x)[0]
        assert not torch.allclose(first, second)  # fresh masks each pass
        plain = tiny(arch=arch, n_expert=n_expert).train()
        assert torch.equal(plain(x, x)[0], plain(x, x)[0])  # dropout=0: nothing dropped in training either
