"""eval.py's legal tasks built from a text's own documents: retrieval and cloze."""
import json
import math
import os

import pytest

from conftest import assert_clear_error, run_in_process
from eval import bm25_scores, draw_cloze_items, held_out_paragraphs
from test_eval import results, run, untrained_run  # noqa: F401  (run: a fixture)

PARTIES = ["Smith", "Jones", "Garcia", "Okafor", "Larsen", "Novak"]


def paragraph(name, i):
    return (f"The Tenant {name} shall pay the rent of {name} on the first day of month {i} and the Landlord "
            f"shall give {name} a receipt for it.")


def test_held_out_paragraphs_leave_each_document_at_least_half_of_its_own():
    documents = ["\n\n".join(paragraph(name, i) for i in range(4)) for name in PARTIES]
    queries, rest = held_out_paragraphs(documents, 100, seed=3)
    assert len(queries) == 2 * len(PARTIES)  # half of each document's four paragraphs
    for text, d in queries:
        assert PARTIES[d] in text and text in documents[d] and text not in rest[d]
    assert all(len(r.split("\n\n")) == 2 for r in rest)
    assert held_out_paragraphs(documents, 5, seed=3) == held_out_paragraphs(documents, 5, seed=3)
    assert len(held_out_paragraphs(documents, 5, seed=3)[0]) == 5


def test_bm25_scores_match_the_formula_worked_by_hand():
    documents = ["rent rent deposit", "rent", "software license"]
    scores = bm25_scores(["rent", "license fee"], documents, k1=1.5, b=0.75)
    mean_length = 2  # (3 + 1 + 2) / 3 words
    idf_rent = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # in two of the three documents
    idf_license = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    assert scores[0, 0] == pytest.approx(idf_rent * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3 / mean_length)))
    assert scores[0, 1] == pytest.approx(idf_rent * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 1 / mean_length)))
    assert scores[1].tolist()[:2] == [0, 0]  # "fee" is nowhere, "license" only in the third
    assert scores[1, 2] == pytest.approx(idf_license * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 2 / mean_length)))


def test_retrieval_finds_a_repeated_paragraphs_document_by_embedding_and_by_bm25(run, tmp_path):
    # each document is one paragraph twice: the held-out copy reads exactly as what is left of its
    # document, so its mean-pooled states are the document's and both ways must rank it first
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, name in enumerate(PARTIES):
        (folder / f"{i}.txt").write_text(f"{paragraph(name, i)}\n\n{paragraph(name, i)}\n")
    done = run_in_process("eval.py", f"--out_dir={run}", f"--input={folder}", "--retrieval_queries=50")
    assert done.returncode == 0, done.stderr
    found = results(run)[f"retrieval, input {folder}"]
    assert found["queries"] == found["documents"] == len(PARTIES)
    for way in ("embedding", "bm25"):
        assert found[f"{way}_recall_at_1"] == found[f"{way}_recall_at_10"] == found[f"{way}_mrr"] == 1.0
    assert "retrieval_embedding_recall_at_1" in done.stdout


def test_retrieval_searches_both_splits_of_a_dataset_when_asked(run, dataset):
    data_dir, name = dataset
    with open(os.path.join(data_dir, name, "meta.json")) as f:
        splits = json.load(f)["splits"]
    done = run_in_process("eval.py", f"--out_dir={run}", "--retrieval_queries=10", "--retrieval_among=dataset")
    assert done.returncode == 0, done.stderr
    found = results(run)[f"retrieval, dataset {os.path.join(data_dir, name)}, val"]
    assert found["queries"] == 10
    assert found["documents"] == splits["val"]["documents"] + splits["train"]["documents"]
    for way in ("embedding", "bm25"):
        assert 0 <= found[f"{way}_recall_at_1"] <= found[f"{way}_recall_at_10"] <= 1
        assert found[f"{way}_recall_at_1"] <= found[f"{way}_mrr"] <= 1


def test_cloze_items_mask_a_term_the_text_uses_among_others_it_uses():
    documents = ['This License applies to the "Licensed Work". The Licensee may copy the Licensed Work. '
                 "The Licensor keeps the Software and the Program. The Licensee shall not sell the Software.",
                 "Nothing here uses a term. " * 3 + "Then the Licensor may end this License."]
    items, terms = draw_cloze_items(documents, 20, 3, seed=1)
    assert terms == ["License", "Licensed Work", "Licensee", "Licensor", "Program", "Software"]
    assert len(items) == 9  # every use 40 characters or more into its document
    for before, term, after, offered in items:
        assert before + term + after in documents and len(before) >= 40
        assert term in offered and len(set(offered)) == 3 and set(offered) <= set(terms)
    assert {term for _, term, _, _ in items[:6]} == set(terms)  # the terms take turns
    assert draw_cloze_items(documents, 20, 3, seed=1) == (items, terms)


def test_cloze_scores_a_decoder_by_likelihood_and_an_encoder_by_its_masked_tokens(run, tmp_path, dataset):
    done = run_in_process("eval.py", f"--out_dir={run}", "--cloze_items=12", "--cloze_choices=3",
                          "--max_tokens=3000")
    assert done.returncode == 0, done.stderr
    data_dir, name = dataset
    found = results(run)[f"cloze, dataset {os.path.join(data_dir, name)}, val"]
    assert found["items"] == 12 and found["choices"] == 3 and found["chance"] == pytest.approx(1 / 3)
    assert 0 <= found["accuracy"] <= 1 and 0 <= found["most_used_term_accuracy"] <= 1
    assert "cloze_accuracy" in done.stdout

    encoder = untrained_run(tmp_path / "encoder", dataset, "encoder")
    numbers = []
    for _ in range(2):  # the items and their scores are the same every time
        done = run_in_process("eval.py", f"--out_dir={encoder}", "--cloze_items=6", "--cloze_choices=3")
        assert done.returncode == 0, done.stderr
        numbers.append(results(encoder)[f"cloze, dataset {os.path.join(data_dir, name)}, val"])
        numbers[-1].pop("evaluated")
    assert numbers[0] == numbers[1] and numbers[0]["items"] == 6

    cond = untrained_run(tmp_path / "cond", dataset, "conditional", labels=["license", "lease"])
    done = run_in_process("eval.py", f"--out_dir={cond}", "--cloze_items=4", "--cloze_choices=3",
                          "--max_tokens=3000", "--condition=lease")
    assert done.returncode == 0, done.stderr
    assert results(cond)[f"cloze, dataset {os.path.join(data_dir, name)}, val"]["items"] == 4
    done = run_in_process("eval.py", f"--out_dir={cond}", "--cloze_items=4", "--max_tokens=3000")
    assert_clear_error(done, "conditional run: cloze needs --condition=")


def test_bad_task_input_is_one_clear_line(run, tmp_path):
    done = run_in_process("eval.py", f"--out_dir={run}", "--retrieval_queries=5", "--retrieval_among=web")
    assert_clear_error(done, "--retrieval_among='web'")

    (tmp_path / "a.txt").write_text("The Licensee shall pay the Licensor within thirty days of the invoice.\n")
    done = run_in_process("eval.py", f"--out_dir={run}", f"--input={tmp_path}/a.txt", "--retrieval_queries=5",
                          "--retrieval_among=dataset")
    assert_clear_error(done, "--retrieval_among=dataset", "not --input")

    done = run_in_process("eval.py", f"--out_dir={run}", f"--input={tmp_path}/a.txt", "--retrieval_queries=5")
    assert_clear_error(done, "retrieval needs documents of at least two paragraphs")

    done = run_in_process("eval.py", f"--out_dir={run}", f"--input={tmp_path}/a.txt", "--cloze_items=5")
    assert_clear_error(done, "cloze needs 4 legal terms", "uses 2")

    done = run_in_process("eval.py", f"--out_dir={run}", "--cloze_items=5", "--cloze_choices=1")
    assert_clear_error(done, "cloze_choices must be")
    assert not (run / "eval.json").exists()
