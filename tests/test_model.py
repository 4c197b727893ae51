import itertools

import pytest
import torch

from model import KVCache, ModelConfig, build_model, sample_next

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
    with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    without = model.generate(prompt, 30, temperature=0, use_cache=False)
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
    free = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    limited = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0), vocab_limit=10)
    assert free[:, 3:].max() >= 10 and limited[:, 3:].max() < 10


def test_weight_decay_applies_to_matrices_only():
    model = tiny(bias=True, tie_embeddings=False)
    decay, no_decay = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in decay["params"])
    assert any(p is model.body.ln_f.bias for p in no_decay["params"])
