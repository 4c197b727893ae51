import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from conftest import assert_clear_error, legal_documents, run_in_process, untrained_run
from engine import Engine
from eval import (LegalWords, corpus_bleu, distinct_n, encode_documents, exact_match, language_model_numbers,
                  ordinary_ids, rouge, token_lengths, windows)
from runtime import load_run
from tokenizer import load_tokenizer, train_tokenizer

LN2 = math.log(2)


def results(out_dir):
    with open(os.path.join(out_dir, "eval.json")) as f:
        return json.load(f)


@pytest.fixture
def run(tmp_path, trained_run):
    """The trained gpt run, copied: eval.py writes its eval.json into it."""
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


# ---- exact bits per byte ------------------------------------------------------------------

def test_bits_per_byte_divides_the_scored_tokens_nats_by_their_own_bytes():
    # byte tokenizer: an id per byte; "§" and "é" are two bytes, one character each
    tok = train_tokenizer("byte", [], 1)
    ids, counted = encode_documents(tok, [[("a§", True)], [("Q: ", False), ("é", True)]])
    eot = tok.eot_id
    assert ids.tolist() == [eot, 97, 0xC2, 0xA7, eot, 81, 58, 32, 0xC3, 0xA9, eot]
    # scored: the text of the first document and the response; not the prompt "Q: " (masked),
    # not the <|endoftext|>s (special), not the first id (nothing predicts it)
    nats = np.array([np.nan, 0.1, 0.2, 0.3, 5.0, 7.0, 7.0, 7.0, 0.8, 0.9, 5.0])
    top1 = np.array([False, True, False, False, True, True, True, True, True, False, True])
    top5 = top1 | (np.arange(11) == 2)
    numbers = language_model_numbers(nats, top1, top5, ids, counted, ordinary_ids(tok), token_lengths(tok))
    total = 0.1 + 0.2 + 0.3 + 0.8 + 0.9
    assert numbers["tokens"] == 5 and numbers["bytes"] == 5 and numbers["characters"] == 3  # a, §, é
    assert numbers["nats"] == pytest.approx(total)
    assert numbers["bits_per_byte"] == pytest.approx(total / LN2 / 5)
    assert numbers["bits_per_character"] == pytest.approx(total / LN2 / 3)
    assert numbers["perplexity"] == pytest.approx(math.exp(total / 5))
    assert numbers["top1_accuracy"] == pytest.approx(2 / 5) and numbers["top5_accuracy"] == pytest.approx(3 / 5)


def test_the_tokens_of_a_text_add_up_to_its_bytes_and_characters(dataset):
    tok = load_tokenizer(os.path.join(*map(str, dataset)))
    text = "§ 4.2 The Licensee shall pay 1.000 € to the Licensor — straße, café.\n\nSECTION 9"
    ids = np.array(tok.encode(text))
    nbytes, nchars = token_lengths(tok)
    assert any(nbytes[ids] > 1) and nbytes[ids].sum() == len(text.encode())
    assert nchars[ids].sum() == len(text)
    assert nbytes[tok.eot_id] == 0 and nchars[tok.eot_id] == 0


def test_windows_score_every_target_once_with_at_least_context_minus_stride_before_it():
    for n in (2, 9, 33, 100):
        for stride in (1, 3, 8):
            plan, length = windows(n, 8, stride)
            scored = [t for end, first in plan for t in range(first + 1, end + 1)]
            assert scored == list(range(1, n))
            for end, first in plan[1:]:  # the first window's targets have what there is before them
                assert length == 8 and end - first <= stride and first + 1 - (end - length) >= length - stride


# ---- text metrics -------------------------------------------------------------------------

def test_corpus_bleu_hands_sacrebleu_reference_streams_not_one_list_per_output():
    outputs = ["a b c d e", "x y z w"]
    references = [["a b c d f"], ["q r s t", "x y z w"]]  # the second output has a perfect reference
    # n-gram precisions over the corpus: 8/9, 6/7, 4/5, 2/3; the references are as long as the outputs
    expected = 100 * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    bleu, signature = corpus_bleu(outputs, references)
    assert bleu == pytest.approx(expected)
    assert signature == f"nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    assert corpus_bleu(outputs, [["a b c d f"], ["x y z w"]]) == (pytest.approx(expected), signature.replace(
        "nrefs:var", "nrefs:1"))
    # the trap: one reference per output, passed as it is, is read as two streams of characters
    assert sacrebleu.corpus_bleu(outputs, ["a b c d f", "x y z w"]).score < expected / 10


def test_rouge_counts_section_signs_digits_and_accented_words():
    assert LegalWords().tokenize("§ 4.2 der Straße, ÖL") == ["§", "4", "2", "der", "straße", "öl"]
    output, reference = "the tenant shall pay § 4", "the landlord shall pay § 4 rent"
    # 6 and 7 words, 5 shared and in order; bigrams: 5 and 6, 3 shared (shall pay, pay §, § 4)
    scores = rouge([output], [[reference]])
    assert scores["rouge1"] == pytest.approx(100 * 2 * 5 / (6 + 7))
    assert scores["rouge2"] == pytest.approx(100 * 2 * 3 / (5 + 6))
    assert scores["rougeL"] == scores["rougeLsum"] == pytest.approx(100 * 2 * 5 / (6 + 7))
    default = rouge_scorer.RougeScorer(["rouge1"]).score(reference, output)["rouge1"].fmeasure
    assert default == pytest.approx(2 * 4 / (5 + 6))  # rouge-score's own tokenizer drops the §
    assert rouge([output, "nothing alike"], [["no", reference], ["the rent"]])["rouge1"] == pytest.approx(
        100 * 10 / 13 / 2)  # the best of several references; the mean over outputs


def test_distinct_n_counts_the_distinct_ngrams_of_all_outputs_within_each_output():
    outputs = ["The Tenant shall pay.", "the tenant shall go"]
    assert distinct_n(outputs, 1) == pytest.approx(5 / 8)  # the tenant shall pay go, of 8 words
    assert distinct_n(outputs, 2) == pytest.approx(4 / 6)  # the-tenant tenant-shall shall-pay shall-go, of 6
    assert distinct_n(["a b", "b a"], 2) == 1.0  # no bigram "b b" across the two outputs
    assert distinct_n(["one", ""], 2) is None
    assert exact_match([" The Tenant.", "no"], [["The Tenant.\n"], ["yes", "maybe"]]) == 0.5


# ---- end to end -----------------------------------------------------------------------------

def test_eval_reads_a_whole_split_counting_its_exact_bytes_and_writes_eval_json(run, dataset):
    data_dir, name = dataset
    done = run_in_process("eval.py", f"--out_dir={run}", f"--data_dir={data_dir}", f"--dataset={name}",
                          "--batch_size=32")
    assert done.returncode == 0, done.stderr
    found = results(run)[f"dataset {os.path.join(data_dir, name)}, val"]
    with open(os.path.join(data_dir, name, "meta.json")) as f:
        val = json.load(f)["splits"]["val"]
    # every val token but the documents' <|endoftext|> is scored, and their bytes are the split's
    assert found["tokens"] == val["tokens"] - val["documents"] and found["bytes"] == val["bytes"]
    assert found["bits_per_byte"] == pytest.approx(found["nats"] / LN2 / found["bytes"])
    assert found["perplexity"] == pytest.approx(math.exp(found["nats"] / found["tokens"]))
    assert 0 < found["top1_accuracy"] <= found["top5_accuracy"] <= 1 and found["stride"] == 32
    assert "bits_per_byte" in done.stdout and f"{found['bits_per_byte']:.4f}" in done.stdout

    # one window: the sum of the log-probabilities the model itself gives the scored targets
    done = run_in_process("eval.py", f"--out_dir={run}", f"--data_dir={data_dir}", f"--dataset={name}",
                          "--max_tokens=60")
    assert done.returncode == 0, done.stderr
    model, tok, _ = load_run(run)
    ids = torch.tensor([tok.eot_id] + np.fromfile(os.path.join(data_dir, name, "val.bin"), np.uint16)[:60].tolist())
    with torch.no_grad():
        logits, _ = model(ids[None, :-1], ids[None, 1:])
    nats = torch.nn.functional.cross_entropy(logits[0].double(), ids[1:], reduction="none")
    text = ids[1:] != tok.eot_id
    assert results(run)[f"dataset {os.path.join(data_dir, name)}, val"]["nats"] == pytest.approx(
        nats[text].sum().item(), rel=1e-5)


def test_several_runs_give_one_table_and_each_keeps_its_other_texts(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (tmp_path / "a.txt").write_text(legal_documents(1, seed=5)[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "Who pays? ", "response": "The Tenant."}) + "\n")
    (run / "eval.json").write_text(json.dumps({"earlier text": {"bits_per_byte": 1.5}}))
    done = run_in_process("eval.py", f"--out_dir={run},{other}", f"--input={tmp_path}/a.txt,{tmp_path}/b.jsonl",
                          "--stride=64")
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0]
    assert str(run) in header and str(other) in header
    row = next(line for line in done.stdout.splitlines() if line.startswith("bits_per_byte")).split()
    assert len(row) == 3 and row[1] == row[2]  # the same run twice: the same numbers
    key = f"input {tmp_path}/a.txt,{tmp_path}/b.jsonl"
    assert results(run)["earlier text"] == {"bits_per_byte": 1.5} and results(run)[key] == results(other)[key]
    assert results(run)[key]["bytes"] == len((tmp_path / "a.txt").read_bytes()) + len(b"The Tenant.")


def test_an_lstm_carries_its_state_through_the_whole_text(tmp_path, dataset):
    lstm = untrained_run(tmp_path / "lstm", dataset, "lstm")
    done = run_in_process("eval.py", f"--out_dir={lstm}", "--max_tokens=100", "--stride=32")
    assert done.returncode == 0, done.stderr
    found = next(iter(results(lstm).values()))
    model, tok, _ = load_run(lstm)
    val = np.fromfile(os.path.join(*map(str, dataset), "val.bin"), np.uint16)[:100].tolist()
    ids = torch.tensor([tok.eot_id] + val)
    with torch.no_grad():  # one pass over all 100 tokens, where eval.py reads them 32 at a time
        logits, _ = model(ids[None, :-1], ids[None, 1:])
    nats = torch.nn.functional.cross_entropy(logits[0].double(), ids[1:], reduction="none")
    assert found["nats"] == pytest.approx(nats[ids[1:] != tok.eot_id].sum().item(), rel=1e-5)


def test_the_encoder_is_scored_on_a_fixed_seeded_masking(tmp_path, dataset):
    encoder = untrained_run(tmp_path / "encoder", dataset, "encoder")
    found = []
    for _ in range(2):
        done = run_in_process("eval.py", f"--out_dir={encoder}", "--max_tokens=300")
        assert done.returncode == 0, done.stderr
        found.append(next(iter(results(encoder).values())))
    assert found[0] == {**found[1], "evaluated": found[0]["evaluated"]}
    numbers = found[0]
    assert 0.05 * 300 < numbers["masked_tokens"] < 0.3 * 300
    assert 0 <= numbers["masked_accuracy"] <= numbers["masked_top5_accuracy"] <= 1
    assert numbers["pseudo_perplexity"] == pytest.approx(math.exp(numbers["masked_loss"]))


def test_an_encoder_decoder_is_scored_on_its_responses_teacher_forced(tmp_path, dataset):
    encdec = untrained_run(tmp_path / "encdec", dataset, "encdec")
    pairs = [("Who repairs the roof? ", "The Landlord."), ("Who pays the rent of the Premises? ", "The Tenant."),
             ("Clause 4: notice", " within thirty days.")]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    done = run_in_process("eval.py", f"--out_dir={encdec}", f"--input={tmp_path}/qa.jsonl", "--batch_size=2")
    assert done.returncode == 0, done.stderr
    found = next(iter(results(encdec).values()))
    model, tok, _ = load_run(encdec)
    total, count = 0.0, 0
    with torch.no_grad():  # each pair alone, with no padding: the batched numbers must be the same
        for prompt, response in pairs:
            target = torch.tensor(tok.encode(response) + [tok.eot_id])
            idx = torch.cat([torch.tensor([tok.bos_id]), target[:-1]])
            _, loss = model(torch.tensor([tok.encode(prompt)]), idx[None], target[None])
            total, count = total + loss.item() * len(target), count + len(target)
    assert found["responses"] == 3 and found["response_tokens"] == count
    assert found["response_loss"] == pytest.approx(total / count, rel=1e-5)

    done = run_in_process("eval.py", f"--out_dir={encdec}", "--max_tokens=100")  # plain text: no responses
    assert_clear_error(done, "prompt/response")


def test_a_conditional_run_reads_the_datasets_labels_by_name(tmp_path, dataset):
    cond = untrained_run(tmp_path / "cond", dataset, "conditional", labels=["license", "lease"])
    (tmp_path / "docs" / "lease").mkdir(parents=True)
    for i, doc in enumerate(legal_documents(10, seed=3)):
        (tmp_path / "docs" / "lease" / f"{i}.txt").write_text(doc)
    done = run_in_process("prepare.py", f"--input={tmp_path}/docs", "--dataset=leases", f"--data_dir={tmp_path}",
                          "--labels=True", f"--tokenizer_from={cond}", "--val_fraction=0.2")
    assert done.returncode == 0, done.stderr
    found = []
    for args in ([], ["--condition=lease"]):
        done = run_in_process("eval.py", f"--out_dir={cond}", f"--data_dir={tmp_path}", "--dataset=leases",
                              "--batch_size=32", *args)
        assert done.returncode == 0, done.stderr
        found.append(results(cond)[f"dataset {tmp_path}/leases, val"])
        del found[-1]["evaluated"]
    by_label, by_condition = found
    assert by_label == by_condition  # the dataset's label 0 is the run's label 1
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "The Tenant", "response": " shall pay."}) + "\n")
    done = run_in_process("eval.py", f"--out_dir={cond}", f"--task_file={tmp_path}/prompts.jsonl",
                          "--condition=lease", "--max_new_tokens=4")
    assert done.returncode == 0, done.stderr

    with open(cond / "meta.json") as f:
        meta = json.load(f)
    with open(cond / "meta.json", "w") as f:
        json.dump({**meta, "labels": ["license", "tenancy"]}, f)
    done = run_in_process("eval.py", f"--out_dir={cond}", f"--data_dir={tmp_path}", "--dataset=leases")
    assert_clear_error(done, "labels the run", "lease")
    done = run_in_process("eval.py", f"--out_dir={cond}", f"--input={tmp_path}/prompts.jsonl", "--condition=rent")
    assert_clear_error(done, "--condition='rent'", "license, tenancy")


def test_generation_tasks_are_answered_greedily_and_scored(run, tmp_path):
    prompts = ["The Licensee shall", "SECTION 3. AGREEMENT", "The Tenant may terminate"]
    greedy = Engine.load(run, device="cpu", dtype="float32").generate(prompts, temperature=0, max_new_tokens=8)
    tasks = [{"prompt": prompts[0], "response": ["something else", greedy[0].text]},  # right among two
             {"prompt": prompts[1], "response": "NUMBER 1002 the Licensor shall pay"},
             {"prompt": prompts[2], "response": "this Agreement within thirty days."}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    done = run_in_process("eval.py", f"--out_dir={run}", f"--task_file={tmp_path}/tasks.jsonl",
                          "--max_new_tokens=8", "--batch_size=2")
    assert done.returncode == 0, done.stderr
    found = results(run)[f"task {tmp_path}/tasks.jsonl"]
    outputs = [c.text for c in greedy]
    references = [t["response"] if isinstance(t["response"], list) else [t["response"]] for t in tasks]
    assert found["exact_match"] == pytest.approx(exact_match(outputs, references)) and found["exact_match"] >= 1 / 3
    assert found["bleu"] == pytest.approx(corpus_bleu(outputs, references)[0])
    assert found["rougeL"] == pytest.approx(rouge(outputs, references)["rougeL"])
    assert found["distinct_2"] == distinct_n(outputs, 2) and found["tokens_per_second"] > 0
    assert found["bleu_signature"].startswith("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert found["decoding"]["temperature"] == 0 and "BLEU signature (sacrebleu): nrefs:var" in done.stdout


@pytest.mark.parametrize("module, package", [("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score")])
def test_a_metric_package_that_is_missing_is_named_before_any_answer_is_generated(run, tmp_path, monkeypatch,
                                                                                  module, package):
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"prompt": "The Licensee shall", "response": "pay."}) + "\n")
    monkeypatch.setitem(sys.modules, module, None)  # as if an install had missed it
    generated = []
    monkeypatch.setattr(Engine, "generate", lambda *args, **kwargs: generated.append(1))
    done = run_in_process("eval.py", f"--out_dir={run}", f"--task_file={tmp_path}/tasks.jsonl")
    assert_clear_error(done, f"need the {package} package: pip install -r requirements.txt")
    assert not generated


# ---- bad input -------------------------------------------------------------------------------

def test_bad_input_is_one_clear_line_and_writes_nothing(run, tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    done = run_in_process("eval.py", f"--out_dir={run}", f"--input={tmp_path}/empty.txt")
    assert_clear_error(done, "no text")

    done = run_in_process("prepare.py", f"--input={corpus}", "--dataset=bytes", f"--data_dir={tmp_path}",
                          "--tokenizer=byte", "--val_fraction=0.1")
    assert done.returncode == 0, done.stderr
    done = run_in_process("eval.py", f"--out_dir={run}", f"--data_dir={tmp_path}", "--dataset=bytes")
    assert_clear_error(done, "another tokenizer", f"--tokenizer_from={run}")

    (tmp_path / "tasks.jsonl").write_text(json.dumps({"question": "Who pays?", "answer": "The Tenant."}) + "\n")
    done = run_in_process("eval.py", f"--out_dir={run}", f"--task_file={tmp_path}/tasks.jsonl")
    assert_clear_error(done, "tasks.jsonl:1", '"prompt"', '"response"')

    done = run_in_process("eval.py", f"--out_dir={run}", "--stride=65")
    assert_clear_error(done, "--stride=65", "64 tokens")

    (run / "eval.json").write_text("{not json")
    done = run_in_process("eval.py", f"--out_dir={run}", "--max_tokens=50")
    assert_clear_error(done, "eval.json", "move it away")
    assert (run / "eval.json").read_text() == "{not json"
    assert not any(name.endswith(".tmp") for name in os.listdir(run))

    done = run_in_process("eval.py", "--help")
    assert done.returncode == 0 and "--task_file=" in done.stdout
