import regex
import pytest
import torch

from conftest import assert_clear_error, run_in_process
from engine import RegexMask, Row
from test_engine import BYTES, engine_of
from tokenizer import train_tokenizer

ARCHS = [("gpt", {}), ("gpt", dict(attention="linear", pos="rope")), ("conditional", {}), ("lstm", {}),
         ("encdec", {})]
ARCH_IDS = ["gpt", "gpt-linear", "conditional", "lstm", "encdec"]

DATE = r"\d{1,2} (January|February|March|April|May|June|July|August|September|October|November|December) \d{4}"
SECTION = r"§ \d+(\.\d+)*"
JSON = r'\{"party": "(Licensor|Licensee)", "days": \d{1,3}\}'
ANSWER = r"(yes|no|not stated)\."


@torch.no_grad()
def log_likelihood_token_by_token(engine, prompt, choice, condition):
    """The choice's log-likelihood after the prompt, one generation step per token, no cache."""
    model, vocab = engine.model, BYTES.vocab_size
    if model.config.arch == "encdec":
        inputs, seq = {"src": torch.tensor([BYTES.encode(prompt)])}, [BYTES.bos_id]
    else:
        seq = BYTES.encode(prompt)
        inputs = {"labels": torch.tensor([engine.labels.index(condition)])} if engine.labels else {}
    total = 0.0
    for t in BYTES.encode(choice):
        logits, _ = model.next_logits(torch.tensor([seq]), None, False, **inputs)
        total += torch.log_softmax(logits[0, :vocab].float(), dim=-1)[t].item()
        seq.append(t)
    return total


@pytest.mark.parametrize("arch,switches", ARCHS, ids=ARCH_IDS)
def test_choices_answer_with_the_choice_the_model_finds_likeliest(arch, switches):
    engine = engine_of(arch, **switches)
    choices = ["Licensor", "Licensee", "Landlord", " the Tenant", "§ 4"]  # different lengths share a batch
    prompts = ["Who pays?", "x"]
    done = engine.generate(prompts, choices=choices, condition="lease")
    for prompt, completion in zip(prompts, done):
        expected = [log_likelihood_token_by_token(engine, prompt, c, "lease") for c in choices]
        assert completion.choice_scores == pytest.approx(expected, abs=1e-4)
        best = choices[max(range(len(choices)), key=expected.__getitem__)]
        assert completion.text == best and completion.ids == BYTES.encode(best)
        assert completion.finish_reason == "stop" and completion.completion_tokens == len(completion.ids)
    assert "".join(engine.stream("x", choices=choices, condition="lease")) == done[1].text


def test_a_prompt_and_choice_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="longer than the model's 24: shorten them"):
        engine_of().generate("The Licensee shall pay", choices=["the Licensor", "nobody"])


def matches_so_far(pattern, completion):
    """A full match when it stopped; the start of one when max_new_tokens ran out (maybe in the
    middle of a character, whose first bytes show as U+FFFD)."""
    if completion.finish_reason == "stop":
        return regex.fullmatch(pattern, completion.text) is not None
    return regex.fullmatch(pattern, completion.text.rstrip("\ufffd"), partial=True) is not None


@pytest.mark.parametrize("arch,switches", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("pattern", [DATE, SECTION, JSON, ANSWER], ids=["date", "section", "json", "answer"])
def test_regex_output_is_a_match_or_the_start_of_one_greedy_and_sampled(arch, switches, pattern):
    engine = engine_of(arch, **switches)
    prompts = ["Signed on", "§"]
    ways = [dict(temperature=0), dict(seed=0), dict(seed=1, top_k=3), dict(seed=2, top_p=0.8, min_p=0.05)]
    for way in ways:
        for completion in engine.generate(prompts, regex=pattern, max_new_tokens=20, condition="license", **way):
            assert matches_so_far(pattern, completion), (way, completion)
            if pattern in (DATE, ANSWER):  # a match fits in 20 tokens, and then nothing can follow
                assert completion.finish_reason == "stop"


def allowed_by_brute_force(pattern, ids):
    """Every byte token that keeps bytes(ids) a possible start of a full match (ASCII patterns),
    and end-of-text when it is a full match; end-of-text alone when nothing is allowed."""
    text = bytes(ids).decode()
    allowed = {t for t in range(256) if t < 128 and regex.fullmatch(pattern, text + chr(t), partial=True)}
    if regex.fullmatch(pattern, text):
        allowed.add(BYTES.eot_id)
    return allowed or {BYTES.eot_id}


@pytest.mark.parametrize("pattern", [DATE, JSON, ANSWER, r"[a-c]*x?"])
def test_sampling_keeps_exactly_the_tokens_that_can_still_lead_to_a_match(pattern):
    engine = engine_of()
    sampled = engine.generate("Answer:", regex=pattern, max_new_tokens=20, seed=4).ids
    mask = RegexMask(pattern, BYTES, BYTES.eot_id, greedy=False)
    row = Row(BYTES, BYTES.encode("Answer:"), ())
    for n in range(len(sampled) + 1):
        row.ids = sampled[:n]
        logits = mask(torch.zeros(1, BYTES.vocab_size), [row])
        assert set(torch.isfinite(logits[0]).nonzero()[:, 0].tolist()) == allowed_by_brute_force(pattern, row.ids)


@pytest.mark.parametrize("arch,switches", ARCHS, ids=ARCH_IDS)
def test_greedy_regex_output_takes_the_likeliest_allowed_token_each_step(arch, switches):
    engine = engine_of(arch, **switches)
    done = engine.generate("On", regex=JSON, max_new_tokens=20, temperature=0, condition="lease")
    model, prompt = engine.model, BYTES.encode("On")
    if arch == "encdec":
        inputs, seq = {"src": torch.tensor([prompt])}, [BYTES.bos_id]
    else:
        inputs, seq = ({"labels": torch.tensor([0])} if arch == "conditional" else {}), list(prompt)
    start, expected = len(seq), []
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model.next_logits(torch.tensor([seq]), None, False, **inputs)
            allowed = sorted(allowed_by_brute_force(JSON, expected))
            best = allowed[int(logits[0, allowed].argmax())]
            if best == BYTES.eot_id:
                break
            seq.append(best)
            expected = seq[start:]
    assert done.ids == expected


@pytest.mark.parametrize("options,message", [
    (dict(choices="Licensor"), "choices must be a list of non-empty strings"),
    (dict(choices=[]), "choices must be a list of non-empty strings"),
    (dict(choices=["Licensor", ""]), "choices must be a list of non-empty strings"),
    (dict(choices=["Licensor", 2]), "choices must be a list of non-empty strings"),
    (dict(regex=r"(\d+"), r"regex='\(.*' does not compile: missing \) at position 4"),
    (dict(regex=5), "regex must be a string"),
    (dict(regex=r"\d+", choices=["1", "2"]), "choices and regex do not go together"),
    (dict(regex=r"\d+", ignore_eos=True), "leave ignore_eos off"),
    (dict(choices=["a", "b"], num_beams=2, temperature=0), "do not go with beam search"),
])
def test_bad_constraints_are_refused_with_a_reason(options, message):
    with pytest.raises(ValueError, match=message):
        engine_of().generate("a", **options)


def test_regex_and_choices_of_no_tokens_are_refused_where_the_tokenizer_cannot_serve_them():
    engine = engine_of()
    engine.tokenizer = train_tokenizer("wordpiece", ["the Licensee shall pay the Licensor"] * 3, 40)
    with pytest.raises(ValueError, match="a wordpiece tokenizer's do not"):
        engine.generate("the", regex=r"\d+")
    with pytest.raises(ValueError, match="choice '  ' encodes to no tokens"):
        engine.generate("the", choices=["the Licensor", "  "])


def test_sample_answers_with_a_choice_and_writes_to_a_pattern(trained_run):
    args = [f"--out_dir={trained_run}", "--start=The Licensee shall", "--max_new_tokens=20", "--dtype=float32"]
    chose = run_in_process("sample.py", *args, '--choices=[" pay", " indemnify", " notify"]', "--num_samples=2")
    assert chose.returncode == 0, chose.stderr
    answer, scores, _ = chose.stdout.split("\n", 2)
    assert answer in ("The Licensee shall pay", "The Licensee shall indemnify", "The Licensee shall notify")
    assert scores.startswith("log-likelihoods: ' pay' -") and chose.stdout.count("-" * 40) == 1
    wrote = run_in_process("sample.py", *args, f"--regex=, {SECTION}", "--temperature=0", "--num_samples=1")
    assert wrote.returncode == 0, wrote.stderr
    text = wrote.stdout.split("\n" + "-" * 40)[0][len("The Licensee shall"):]
    assert regex.fullmatch(", " + SECTION, text, partial=True), text


@pytest.mark.parametrize("flag,message", [
    ("--choices=Licensor", "--choices='Licensor' is not a JSON list of strings"),
    ('--choices=["Licensor", 3]', "choices must be a list of non-empty strings"),
    ("--regex=(a", "does not compile"),
])
def test_sample_refuses_bad_constraints_with_one_line(flag, message):
    assert_clear_error(run_in_process("sample.py", "--out_dir=nowhere", flag), message)
