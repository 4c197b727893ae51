import itertools

import pytest
import torch
from torch.nn import functional as F

from conftest import assert_clear_error, run_in_process
from engine import batch_of, beam_search, check_options
from model import ModelConfig, build_model
from test_engine import ARCHS, BYTES, PROMPTS, engine_of, forced_to_end

V, N, EOT = 8, 3, 7  # a vocabulary of 8 and 3 new tokens: 512 sequences to try
PROMPT = [1, 2, 3]
TINY = [("gpt", {}), ("gpt", dict(attention="linear")), ("lstm", {}), ("encdec", {})]


def arch_ids(value):
    return value if isinstance(value, str) else "-".join(map(str, value.values()))


def tiny_model(arch, seed=0, **switches):
    """A model over 8 tokens whose guesses are far from uniform: its head's weights are scaled up."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16, arch=arch,
                                    tie_embeddings=False, **switches)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def search(model, eot=EOT, **options):
    """beam_search over PROMPT: (score, the new ids with the eot that ended them, if one did)."""
    idx, inputs = batch_of(model, [PROMPT])  # encdec: the decoder starts at token 0
    score, ids, ended = beam_search(model, idx, inputs, check_options(dict(max_new_tokens=N, **options)),
                                    vocab_limit=V, eot=eot)
    return score, tuple(ids + [eot] * ended)


@torch.no_grad()
def best_of_every_sequence(model, eot, length_penalty):
    """Every sequence of N tokens scored by one pass of the model, cut after its first eot:
    (the best score, its ids)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))  # (V**N, N)
    prompt = torch.tensor([PROMPT]).expand(len(seqs), -1)
    if model.config.arch == "encdec":
        idx = torch.cat((torch.zeros(len(seqs), 1, dtype=torch.long), seqs), dim=1)
        logits, _ = model(prompt, idx[:, :-1], targets=seqs)
    else:
        idx = torch.cat((prompt, seqs), dim=1)
        logits, _ = model(idx[:, :-1], targets=idx[:, 1:])
    logp = F.log_softmax(logits[:, -N:].float(), dim=-1).gather(2, seqs[..., None])[..., 0]  # (V**N, N)
    hypotheses = {}
    for seq, sums in zip(seqs.tolist(), logp.cumsum(dim=1).tolist()):
        length = seq.index(eot) + 1 if eot in seq else N
        hypotheses[tuple(seq[:length])] = sums[length - 1] / length ** length_penalty
    ids = max(hypotheses, key=hypotheses.get)
    return hypotheses[ids], ids


@pytest.mark.parametrize("arch,switches", TINY, ids=arch_ids)
@pytest.mark.parametrize("eot", [None, EOT], ids=["ignore-eos", "eos"])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
def test_beams_as_many_as_the_sequences_find_the_best_of_all_sequences(arch, switches, eot, length_penalty):
    model = tiny_model(arch, **switches)
    best, ids = best_of_every_sequence(model, eot, length_penalty)
    score, found = search(model, eot, num_beams=V ** N, length_penalty=length_penalty)
    assert found == ids and score == pytest.approx(best, abs=1e-4)


def test_the_length_penalty_decides_between_short_and_long_endings():
    model = tiny_model("gpt")
    short = search(model, num_beams=V ** N, length_penalty=0.0)[1]
    long = search(model, num_beams=V ** N, length_penalty=3.0)[1]
    assert short != long and len(short) < len(long)  # a plain sum favours the short; a large penalty the long


def test_the_early_stop_never_drops_a_longer_hypothesis_that_would_still_win():
    model = tiny_model("gpt", seed=1)  # ending at once is likely, and finished after the first step
    best, ids = best_of_every_sequence(model, eot=3, length_penalty=3.0)
    assert len(ids) == N and 3 not in ids  # but a longer one wins: a search that stopped then would miss it
    assert search(model, eot=3, num_beams=V ** N, length_penalty=3.0)[1] == ids


def test_the_penalties_follow_each_beam():
    engine = engine_of()
    done = engine.generate("aaaa", num_beams=4, max_new_tokens=30, ignore_eos=True, presence_penalty=1e4)
    assert len(set(done.ids)) == len(done.ids) == 30  # each beam's counts are its own ancestors'


@pytest.mark.parametrize("arch,switches", ARCHS, ids=arch_ids)
def test_one_beam_is_greedy_decoding(arch, switches):
    engine = engine_of(arch, **switches)
    options = dict(max_new_tokens=20, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.3)
    greedy = engine.generate("The Licensee", temperature=0, condition="lease", **options)
    _, idx, inputs = engine.batch(["The Licensee"], "lease")
    _, beam, _ = beam_search(engine.model, idx, inputs, check_options(options), vocab_limit=BYTES.vocab_size)
    assert beam == greedy.ids


@pytest.mark.parametrize("arch,switches", ARCHS, ids=arch_ids)
def test_beam_search_is_the_same_with_and_without_the_cache(arch, switches):
    engine = engine_of(arch, **switches)  # 20 new tokens after the longest prompt run past the context of 24
    options = dict(num_beams=4, max_new_tokens=20, no_repeat_ngram_size=4, condition="license")
    cached = engine.generate(PROMPTS, **options)
    uncached = engine.generate(PROMPTS, use_cache=False, **options)
    assert [c.ids for c in cached] == [c.ids for c in uncached]
    assert [c.text for c in cached] == [c.text for c in uncached]


def repeated(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) < len(grams)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_leaves_no_ngram_twice_in_prompt_and_output(arch, n):
    engine = engine_of(arch)
    prompt = "Licensor"  # no repeated token in it
    free = engine.generate(prompt, num_beams=3, max_new_tokens=30, ignore_eos=True)
    done = engine.generate(prompt, num_beams=3, max_new_tokens=30, ignore_eos=True, no_repeat_ngram_size=n)
    assert repeated(list(prompt.encode()) + free.ids, n)  # without it, the tiny model repeats itself
    assert not repeated(list(prompt.encode()) + done.ids, n) and len(done.ids) == 30


def test_a_beam_that_picks_end_of_text_finishes_with_stop_unless_ignore_eos():
    engine = forced_to_end(engine_of(bias=True, tie_embeddings=False))
    done = engine.generate("The Tenant", num_beams=3, max_new_tokens=10)
    assert (done.text, done.ids, done.finish_reason, done.completion_tokens) == ("", [], "stop", 1)
    going = engine.generate("The Tenant", num_beams=3, max_new_tokens=10, ignore_eos=True)
    assert going.finish_reason == "length" and going.completion_tokens == len(going.ids) == 10


def test_the_best_beam_is_cut_before_a_stop_string():
    engine = engine_of()
    free = engine.generate("The Licensee", num_beams=3, max_new_tokens=20, ignore_eos=True)
    stop = free.text[3:5]
    done = engine.generate("The Licensee", num_beams=3, max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert done.text == free.text[:free.text.index(stop)] and done.finish_reason == "stop"
    assert done.ids == free.ids[:len(done.ids)] and done.completion_tokens == len(done.ids)


@pytest.mark.parametrize("options,message", [
    (dict(num_beams=2, temperature=0.7), "temperature would sample"),
    (dict(num_beams=2, top_k=40, top_p=0.9, min_p=0.05), "top_k, top_p, min_p would sample"),
    (dict(num_beams=0), "num_beams must be an integer from 1 up"),
    (dict(num_beams=2.5), "num_beams must be an integer from 1 up"),
    (dict(num_beams=2, no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer from 0 up"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(length_penalty=2.0), "beam search's: set num_beams > 1"),
    (dict(no_repeat_ngram_size=3, temperature=0), "beam search's: set num_beams > 1"),
])
def test_options_that_contradict_beam_search_are_refused_with_a_reason(options, message):
    with pytest.raises(ValueError, match=message):
        engine_of().generate("a", **options)


def test_beam_search_does_not_stream():
    with pytest.raises(ValueError, match="does not stream"):
        list(engine_of().stream("a", num_beams=2))


@pytest.mark.parametrize("args,message", [
    (["--num_beams=2", "--temperature=0.5"], "temperature would sample"),
    (["--num_beams=0"], "num_beams must be an integer from 1 up"),
    (["--length_penalty=2.0"], "set num_beams > 1"),
    (["--num_beams=2", "--stream=True"], "has it only at the end"),
])
def test_sample_refuses_bad_beam_settings_in_one_line(args, message):
    assert_clear_error(run_in_process("sample.py", "--out_dir=nowhere", *args), message)


def test_sample_prints_one_beam_search_result_per_prompt(trained_run):
    args = [f"--out_dir={trained_run}", "--start=The Licensee shall", "--num_beams=3", "--max_new_tokens=20",
            "--no_repeat_ngram_size=3", "--dtype=float32"]
    done = run_in_process("sample.py", *args)  # num_samples is 3: beam search has one result
    assert done.returncode == 0, done.stderr
    texts = done.stdout.split("-" * 40)[:-1]
    assert len(texts) == 1 and texts[0].startswith("The Licensee shall")
    assert run_in_process("sample.py", *args, "--use_cache=False").stdout == done.stdout
