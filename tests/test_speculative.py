import math
import shutil

import pytest
import torch

from conftest import assert_clear_error, run_in_process
from engine import Engine, Row, check_options, decode, probabilities, speculative_decode
from model import KVCache, ModelConfig, build_model
from test_engine import BYTES, engine_of

CASES = [("gpt", {}), ("gpt", dict(attention="linear")), ("conditional", {})]


def with_draft(arch="gpt", **switches):
    """A target and a speculating engine over it whose draft is a smaller random model of the same kind."""
    target = engine_of(arch, **switches)
    draft = engine_of(arch, n_layer=1, n_head=2, n_embd=16, **switches)
    return target, Engine(target.model, BYTES, labels=target.labels, draft=draft)


@pytest.mark.parametrize("arch,switches", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
@pytest.mark.parametrize("steps", [8, 40], ids=["within", "past-the-context"])
def test_greedy_speculative_output_is_plain_greedy_output(arch, switches, steps):
    target, speculating = with_draft(arch, **switches)
    options = dict(max_new_tokens=steps, temperature=0, ignore_eos=True, condition="license")
    plain = target.generate(["The Licensee", "a"], **options)
    for k in (1, 3):
        fast = speculating.generate(["The Licensee", "a"], draft_tokens=k, **options)
        assert [c.ids for c in fast] == [c.ids for c in plain]
        assert [c.text for c in fast] == [c.text for c in plain]
        assert all(c.finish_reason == "length" and c.completion_tokens == steps for c in fast)
        assert any(c.draft_acceptance < 1 for c in fast)  # drafts were rejected: the caches rolled back


def test_a_draft_that_is_the_model_itself_has_every_token_accepted():
    target = engine_of(attention="linear")
    same = Engine(target.model, BYTES, draft=target)
    options = dict(max_new_tokens=15, temperature=0, ignore_eos=True)
    fast = same.generate("The Licensee", draft_tokens=4, **options)
    assert fast.ids == target.generate("The Licensee", **options).ids and fast.draft_acceptance == 1.0


def test_stops_and_max_new_tokens_end_the_output_as_in_plain_decoding():
    target, speculating = with_draft()
    free = target.generate("The Licensee", max_new_tokens=20, temperature=0, ignore_eos=True)
    ids, idx, inputs = target.batch(["The Licensee"])
    for stop, eot, max_new in (([free.text[5:7]], None, 20), ((), None, 7), ((), None, 0), ((), free.ids[6], 20)):
        o = check_options(dict(max_new_tokens=max_new, temperature=0, stop=stop))
        plain, fast = Row(BYTES, ids[0], o["stop"]), Row(BYTES, ids[0], o["stop"])
        plain_pieces = [p for _, p in decode(target.model, idx, inputs, [plain], [None], o, True, 256, eot)]
        fast_pieces = list(speculative_decode(target.model, speculating.draft.model, idx, {}, {}, fast, None,
                                              o, 256, eot))
        assert "".join(fast_pieces) == "".join(plain_pieces) == fast.text == plain.text
        assert (fast.ids, fast.finish_reason, fast.generated) == (plain.ids, plain.finish_reason, plain.generated)
        assert fast.generated == max_new or fast.finish_reason == "stop"


def tiny(seed, scale=5.0):
    """A model over 8 tokens whose head is scaled up, so its distributions are far from uniform."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@torch.no_grad()
def first_two(model, prompt, **processing):
    """The exact distribution (8, 8) of a model's first two sampled tokens after prompt."""
    def next_token(ids):
        probs = probabilities(model(torch.tensor([ids]))[0][:, -1], **processing)[0]
        return probs / probs.sum()
    first = next_token(prompt)
    return torch.stack([first[a] * next_token(prompt + [a]) for a in range(8)])


def test_sampled_speculative_output_has_the_target_models_distribution():
    target, draft, prompt = tiny(0), tiny(1), [1, 2]
    processing = dict(temperature=0.8, top_k=6, min_p=0.02)
    o = check_options(dict(max_new_tokens=3, draft_tokens=2, **processing))
    n = 2000
    counts = torch.zeros(8, 8)
    for seed in range(n):
        row = Row(None, prompt, ())
        for _ in speculative_decode(target, draft, torch.tensor([prompt]), {}, {}, row,
                                    torch.Generator().manual_seed(seed), o):
            pass
        counts[row.ids[0], row.ids[1]] += 1
    p, q = first_two(target, prompt, **processing), first_two(draft, prompt, **processing)
    # Bretagnolle-Huber-Carol: P(|empirical - p|_1 >= bound) <= 2^m exp(-n bound^2 / 2), m the
    # outcomes p can give; this bound makes that 1e-4 (about 0.18 here)
    m = int((p > 0).sum())
    bound = math.sqrt(2 * (m * math.log(2) + math.log(1e4)) / n)
    assert float((counts / n - p).abs().sum()) < bound
    assert float((p - q).abs().sum()) > 2 * bound  # the draft's own distribution is far from the target's,
    assert float((counts / n - q).abs().sum()) > bound  # and the output is not the draft's


def test_a_rolled_back_cache_is_the_cache_of_the_accepted_tokens_alone():
    for attention in ("sdpa", "linear"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=320, block_size=24, n_layer=2, n_head=4, n_embd=32,
                                        attention=attention)).eval()
        prompt, accepted, rejected, after = [5, 6, 7], [8, 9], [10, 11], [12]
        with torch.no_grad():
            rolled = KVCache(model.config, 1, "cpu", torch.float32)
            model.hidden(torch.tensor([prompt]), rolled)
            saved = rolled.snapshot()
            model.hidden(torch.tensor([accepted + rejected]), rolled)  # a verify pass over the drafts
            rolled.rollback(len(prompt + accepted), saved)
            seq = prompt + accepted + after
            model.hidden(torch.tensor([seq[rolled.pos:]]), rolled)  # the next pass reads what the cache lacks
            plain = KVCache(model.config, 1, "cpu", torch.float32)
            for t in seq:
                model.hidden(torch.tensor([[t]]), plain)
        assert rolled.pos == plain.pos == len(seq)
        if attention == "linear":
            for (kv, z), (kv2, z2) in zip(rolled.sums, plain.sums):
                torch.testing.assert_close(kv, kv2)
                torch.testing.assert_close(z, z2)
        else:
            for a, b in zip(rolled.k + rolled.v, plain.k + plain.v):
                torch.testing.assert_close(a[:, :, :len(seq)], b[:, :, :len(seq)])


def test_what_speculative_decoding_does_not_support_is_refused_by_name():
    with pytest.raises(ValueError, match="gpt and conditional.*'lstm'"):
        Engine(engine_of("lstm").model, BYTES, draft=engine_of())
    _, speculating = with_draft()
    for options, name in ((dict(repetition_penalty=1.3), "repetition_penalty"), (dict(regex="a+"), "regex"),
                          (dict(num_beams=2), "beam search"), (dict(use_cache=False), "use_cache=False")):
        with pytest.raises(ValueError, match=name):
            speculating.generate("The", max_new_tokens=3, **options)


def test_sample_py_speculates_with_a_draft_of_the_same_tokenizer_and_refuses_another(tmp_path, trained_run):
    args = [f"--out_dir={trained_run}", "--start=The Licensee", "--temperature=0", "--num_samples=1",
            "--max_new_tokens=20"]
    plain = run_in_process("sample.py", *args)
    fast = run_in_process("sample.py", *args, f"--draft_out_dir={trained_run}", "--draft_tokens=3")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    with open(other / "tokenizer.json", "a") as f:
        f.write(" ")  # the same tokens, but not provably: other files
    assert_clear_error(run_in_process("sample.py", *args, f"--draft_out_dir={other}"), "draft run", "another tokenizer")
