import math

import pytest
import torch

from engine import FP32_DECODE_ROWS, Engine, Row, check_options, draw, penalize, sample_next
from model import ModelConfig, build_model
from tokenizer import train_tokenizer

BYTES = train_tokenizer("byte", [], 1)  # one token per byte: a character of two bytes is two tokens


def engine_of(arch="gpt", **overrides):
    args = dict(vocab_size=320, block_size=24, n_layer=2, n_head=4, n_embd=32, arch=arch,
                n_labels=2 if arch == "conditional" else 0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**args, **overrides})).eval()
    return Engine(model, BYTES, labels=["lease", "license"] if arch == "conditional" else ())


PROMPTS = ["a", "The Licensee", "xy z", "§ 4(b)"]
ARCHS = [("gpt", {}), ("gpt", dict(pos="rope", n_kv_head=2)), ("gpt", dict(pos="sinusoidal", norm_first=False)),
         ("gpt", dict(pos="alibi")), ("gpt", dict(attention="linear")), ("gpt", dict(n_expert=3, expert_top_k=2)),
         ("conditional", {}), ("lstm", {}), ("encdec", {}), ("encdec", dict(attention="linear"))]


@pytest.mark.parametrize("arch,switches", ARCHS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
@pytest.mark.parametrize("steps", [8, 20], ids=["within", "past-the-context"])
def test_a_batch_of_different_prompts_gives_each_prompt_what_it_gives_alone(arch, switches, steps):
    engine = engine_of(arch, **switches)
    options = dict(max_new_tokens=steps, temperature=0, ignore_eos=True, condition="license")
    together = engine.generate(PROMPTS, **options)
    alone = [engine.generate(p, **options) for p in PROMPTS]
    assert [c.ids for c in together] == [c.ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.finish_reason == "length" and len(c.ids) == c.completion_tokens for c in together)
    assert [c.prompt_tokens for c in together] == [len(p.encode()) for p in PROMPTS]


def test_sampled_rows_are_the_same_alone_and_in_a_batch_with_their_seed():
    engine = engine_of()
    together = engine.generate(["one", "three"], max_new_tokens=10, seed=5, ignore_eos=True)
    assert together[1].ids == engine.generate("three", max_new_tokens=10, seed=6, ignore_eos=True).ids
    assert together[0].ids == engine.generate("one", max_new_tokens=10, seed=5, ignore_eos=True).ids


def test_rows_that_finish_early_leave_the_batch_and_the_rest_go_on():
    engine = engine_of()
    free = engine.generate(PROMPTS, max_new_tokens=12, temperature=0, ignore_eos=True)
    stop = free[1].text[2:4]  # ends the second row early, and maybe others
    stopped = engine.generate(PROMPTS, max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    for f, s in zip(free, stopped):
        if stop in f.text:
            assert s.finish_reason == "stop" and s.text == f.text[:f.text.index(stop)]
        else:
            assert s.finish_reason == "length" and s.ids == f.ids
    assert stopped[1].finish_reason == "stop"


def forced_to_end(engine):
    """The model's every guess becomes <|endoftext|>: the final norm gives a vector of ones and
    only the end-of-text row of the (untied) head reads it."""
    head, norm = engine.model.lm_head.weight, engine.model.body.ln_f
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(1.0)
        head.zero_()
        head[BYTES.eot_id] = 1.0
    return engine


def test_end_of_text_ends_the_output_unless_ignore_eos():
    engine = forced_to_end(engine_of(bias=True, tie_embeddings=False))
    done = engine.generate("The Tenant", max_new_tokens=10, temperature=0)
    assert (done.text, done.ids, done.finish_reason, done.completion_tokens) == ("", [], "stop", 1)
    going = engine.generate("The Tenant", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert going.finish_reason == "length" and going.ids == [BYTES.eot_id] * 10


def test_a_stop_string_across_tokens_cuts_the_text_before_it_and_streaming_never_shows_its_start():
    engine = engine_of()
    options = dict(max_new_tokens=30, seed=3, ignore_eos=True)
    free = engine.generate("The Licensee shall", **options)
    at = next(i for i in range(4, 20) if free.text.index(free.text[i:i + 3]) == i)  # first seen at i
    stop = free.text[at:at + 3]  # three tokens of the byte tokenizer
    done = engine.generate("The Licensee shall", stop=["never there", stop], **options)
    assert done.text == free.text[:at] and done.finish_reason == "stop"
    assert done.ids == free.ids[:len(done.ids)] and len(done.ids) >= at + 3  # up to the token that completed it
    pieces = list(engine.stream("The Licensee shall", stop=["never there", stop], **options))
    assert "".join(pieces) == done.text


def test_streaming_yields_each_piece_as_it_is_made():
    engine = engine_of()
    done = engine.generate("The Licensee shall", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert done.text.isascii()  # one character per token of the byte tokenizer
    pieces = list(engine.stream("The Licensee shall", max_new_tokens=12, temperature=0, ignore_eos=True))
    assert pieces == list(done.text)


def test_streamed_pieces_never_split_a_character_and_text_held_for_a_stop_comes_out_at_the_end():
    row = Row(BYTES, BYTES.encode("x"), stop=["é!"])
    pieces = [row.add(t) for t in "aé".encode()]  # a, then é as two bytes
    assert pieces == ["a", "", ""]  # é's first byte is half a character; then é might start "é!"
    assert row.finish("length") == "é" and row.text == "aé"


def test_the_penalties_change_the_logits_as_their_definitions_say():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])  # in the prompt or the output
    counts = torch.tensor([[0.0, 3.0, 0.0, 1.0]])  # generated this many times
    o = check_options(dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0))
    expected = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 * 3 - 1.0, 0.5, 3.0 - 0.5 * 1 - 1.0]])
    assert torch.allclose(penalize(logits, seen, counts, o), expected)
    assert torch.equal(penalize(logits, seen, counts, check_options({})), logits)


def test_a_large_presence_penalty_never_picks_a_token_twice():
    engine = engine_of()
    done = engine.generate("aaaa", max_new_tokens=30, temperature=0, ignore_eos=True, presence_penalty=1e4)
    assert len(set(done.ids)) == len(done.ids) == 30


def test_min_p_keeps_only_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picked = {sample_next(logits, 1.0, generator=g, min_p=0.5).item() for _ in range(200)}
    assert picked == {0, 1}  # 0.15 < 0.5 * 0.5


def test_draw_picks_each_token_as_often_as_its_probability_and_never_an_impossible_one():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])  # row 2: unnormalized
    g = torch.Generator().manual_seed(0)
    n = 20000
    picks = torch.cat([draw(probs, g) for _ in range(n)], dim=1)  # (2, n)
    counts = torch.bincount(picks[0], minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0 and set(picks[1].tolist()) == {5}
    expected = probs[0].double() * n
    chi2 = ((counts - expected)[[1, 3, 4]] ** 2 / expected[[1, 3, 4]]).sum().item()
    assert chi2 < 13.8  # 2 degrees of freedom: p = 0.001


def test_top_k_sampling_draws_each_of_the_top_k_as_often_as_its_renormalized_probability():
    # sample_next draws among the top_k logits alone: the law must still be softmax over them,
    # at temperature 0.5, in the vocabulary's own ids (the likeliest are not the first ids)
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5, -3.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    picks = torch.cat([sample_next(logits, 0.5, top_k=3, generator=[g]) for _ in range(n)], dim=1)[0]
    counts = torch.bincount(picks, minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    top = [3, 1, 4]
    expected = (logits[0, top] / 0.5).softmax(dim=0).double() * n
    chi2 = ((counts[top] - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8  # 2 degrees of freedom: p = 0.001


def test_a_cpu_engine_with_the_auto_dtype_decodes_few_rows_in_float32(monkeypatch):
    engine = engine_of()
    engine.dtype, engine.auto_dtype = torch.bfloat16, True
    seen = []
    step = engine.model.next_logits

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return step(*args, **kwargs)
    monkeypatch.setattr(engine.model, "next_logits", spy)
    engine.generate(["ab"] * (FP32_DECODE_ROWS - 1), max_new_tokens=2, ignore_eos=True)
    engine.generate(["ab"] * FP32_DECODE_ROWS, max_new_tokens=2, ignore_eos=True)
    engine.auto_dtype = False  # bf16 asked for by name: kept for one row too
    engine.generate("ab", max_new_tokens=2, ignore_eos=True)
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 4


@pytest.mark.parametrize("options,message", [
    (dict(stop=[1, 2]), "stop must be a list of non-empty strings"),
    (dict(stop=[""]), "stop must be a list of non-empty strings"),
    (dict(presence_penalty=-1), "presence_penalty must be a number"),
    (dict(repetition_penalty=0), "repetition_penalty must be above 0"),
    (dict(top_p=1.5), "top_p must be a number"),
    (dict(beams=2), "unknown generation option(s): beams"),
])
def test_bad_options_are_refused_with_a_reason(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine_of().generate("a", **options)


def test_score_is_the_log_likelihood_of_each_token_after_the_ones_before():
    engine = engine_of()
    text = "The Licensee shall pay."  # 23 bytes: one window of the 24-token context
    ids = [BYTES.eot_id] + BYTES.encode(text)
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    expected = torch.log_softmax(logits[0], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    got = engine.score(text)
    assert got["tokens"] == len(text) and got["log_likelihood"] == pytest.approx(expected, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-expected / math.log(2) / len(text), rel=1e-5)
    longer = engine.score(text * 4)  # windows that overlap: every token still scored once
    assert longer["tokens"] == 4 * len(text) and math.isfinite(longer["log_likelihood"])


# ---- the compiled decoding step ---------------------------------------------------------------

@pytest.mark.parametrize("arch,switches", [("gpt", {}), ("gpt", dict(pos="rope", n_kv_head=2)),
                                           ("gpt", dict(pos="alibi")), ("conditional", dict(pos="sinusoidal"))],
                         ids=["learned", "rope-gqa", "alibi", "conditional-sinusoidal"])
def test_the_compiled_decoding_step_compiles_once_and_writes_what_eager_writes(arch, switches):
    # torch.compile with a backend that counts what dynamo hands it: a recompilation is a new
    # frame, whatever the backend; inductor itself is timed by bench.py --what=decode
    from torch._dynamo.testing import CompileCounter
    engine = engine_of(arch, **switches)
    options = dict(max_new_tokens=30, temperature=0, ignore_eos=True, condition="license")  # past the context of 24
    eager = engine.generate(PROMPTS, **options)
    torch._dynamo.reset()
    counter = CompileCounter()
    engine.step = torch.compile(engine.model.decode_step, backend=counter)
    assert [c.ids for c in engine.generate(PROMPTS, **options)] == [c.ids for c in eager]
    assert counter.frame_count == 1  # ~20 steps, one compilation
    alone = engine.generate(PROMPTS[1], **options)  # batch 1: a new batch size compiles once more
    assert alone.ids == eager[1].ids and counter.frame_count == 2
    stop = eager[1].text[2:4]  # rows that finish leave the batch: its size turns dynamic, once
    stopped = engine.generate(PROMPTS, **options, stop=[stop])
    assert stopped[1].finish_reason == "stop" and counter.frame_count <= 3
    torch._dynamo.reset()


def test_compile_is_refused_where_the_decoding_step_does_not_apply():
    engine = engine_of("lstm")
    with pytest.raises(ValueError, match="compile supports gpt and conditional runs with softmax attention; "
                                         "this run is 'lstm'"):
        Engine(engine.model, BYTES, compile=True)
    with pytest.raises(ValueError, match="'linear' attention"):
        Engine(engine_of(attention="linear").model, BYTES, compile=True)


def test_fill_names_the_likeliest_fillers_of_each_mask_and_refuses_what_it_cannot_fill():
    engine = engine_of("encoder")
    filled = engine.fill("The <|mask|> shall <|mask|>", top_k=4)
    assert [len(fillers) for fillers in filled["masks"]] == [4, 4]
    for fillers in filled["masks"]:
        probs = [f["probability"] for f in fillers]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    best = [fillers[0]["text"] for fillers in filled["masks"]]
    assert filled["text"] == f"The {best[0]} shall {best[1]}"
    with pytest.raises(ValueError, match="put <\\|mask\\|> where a word is missing"):
        engine.fill("No mask here")
    with pytest.raises(ValueError, match="needs an encoder run"):
        engine_of("gpt").fill("The <|mask|> shall")


def test_a_cancelled_row_stops_at_the_next_step_and_the_others_go_on_as_alone():
    engine = engine_of()
    options = dict(max_new_tokens=10, temperature=0, ignore_eos=True)
    rows, steps = engine.steps(["a", "The Licensee"], **options)
    r, _ = next(steps)
    rows[0].cancel()
    for _ in steps:
        pass
    assert rows[0].finish_reason == "cancelled" and rows[0].generated == 1
    assert rows[1].finish_reason == "length" and rows[1].ids == engine.generate("The Licensee", **options).ids


# ---- past the context: the window slides by a chunk ---------------------------------------------

@pytest.mark.parametrize("slide,windows", [
    (1, {n: 24 for n in range(25, 40)}),  # exact: every token sees a full window
    (5, {n: [20, 21, 22, 23, 24][(n - 25) % 5] for n in range(25, 40)}),  # 20 after each slide, up to 24
    (0, {n: [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24][(n - 25) % 12] for n in range(25, 40)})])  # half
@pytest.mark.parametrize("switches", [{}, dict(pos="rope", n_kv_head=2), dict(attention="linear")],
                         ids=["learned", "rope-gqa", "linear"])
def test_past_the_context_each_token_sees_the_window_its_slide_gives(slide, windows, switches):
    # the logits after each length L of one sequence read token by token, against the model reading
    # the last windows[L] tokens (L within the context of 24) from scratch: computed by hand
    model = engine_of(**switches).model
    seq = torch.randint(0, 256, (1, 39), generator=torch.Generator().manual_seed(0))
    by_hand = {n: model(seq[:, n - windows.get(n, n):n])[0][0, -1] for n in range(18, 40)}
    for use_cache in (True, False):
        cache = None
        for n in range(18, 40):
            logits, cache = model.next_logits(seq[:, :n], cache, use_cache, slide=slide)
            assert torch.allclose(logits[0], by_hand[n], atol=1e-4), n
    # and the windows matter: a full window gives other logits than a shorter one
    assert not torch.allclose(model(seq[:, 1:25])[0][0, -1], model(seq[:, 5:25])[0][0, -1], atol=1e-3)


@pytest.mark.parametrize("slide", [1, 7])
def test_past_the_context_a_row_in_a_batch_gets_what_it_gets_alone_whatever_the_slide(slide):
    engine = engine_of(pos="rope")
    options = dict(max_new_tokens=30, ignore_eos=True, slide=slide)  # prompts of 1 to 12 tokens
    together = engine.generate(PROMPTS, **options, seed=3)  # sampled: row i with seed 3 + i
    assert [c.ids for c in together] == [engine.generate(p, **options, seed=3 + i).ids for i, p in enumerate(PROMPTS)]
    assert len({tuple(c.ids) for c in together}) == len(PROMPTS)


def test_a_slide_that_is_not_a_whole_number_is_refused():
    with pytest.raises(ValueError, match="slide must be an integer from 0 up"):
        check_options({"slide": -1})
