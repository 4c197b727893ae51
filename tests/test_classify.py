"""Classification: prepare.py's labelled datasets and its license-family example, train.py
--task=classify, and eval.py's accuracy, macro-F1 and confusion matrix."""
import json
import random

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, assert_clear_error, read_log, run_in_process, untrained_run
import prepare as prepare_module
from eval import classification_metrics
from model import ModelConfig, build_model
from prepare import dep5_paragraphs, license_family
from tokenizer import load_tokenizer

KEYWORDS = {"lease": ["tenant", "landlord", "rent", "premises"], "license": ["licensee", "software", "copy", "source"],
            "sale": ["buyer", "seller", "goods", "invoice"], "loan": ["lender", "borrower", "interest", "principal"]}
FILLER = ["the", "of", "and", "shall", "be", "this", "agreement", "party", "any", "under"]


def write_labelled(path, n, seed, kinds=("lease", "lease", "license", "sale")):
    """n {"text", "label"} lines: filler words with a few of the label's keywords; lease is half of them."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = kinds[i % len(kinds)]
            words = [rng.choice(KEYWORDS[label]) if rng.random() < 0.25 else rng.choice(FILLER) for _ in range(24)]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")


def prepare_labelled(folder, name, *more, kinds=("lease", "lease", "license", "sale")):
    write_labelled(folder / f"{name}-train.jsonl", 80, 0, kinds)
    write_labelled(folder / f"{name}-val.jsonl", 24, 1, kinds)
    done = run_in_process("prepare.py", f"--input={folder / f'{name}-train.jsonl'}", "--labels=True",
                      f"--val_input={folder / f'{name}-val.jsonl'}", f"--data_dir={folder / 'data'}",
                      f"--dataset={name}", "--vocab_size=300", *more)
    assert done.returncode == 0, done.stderr
    return folder / "data"


CLASSIFIER = ["--task=classify", "--block_size=32", "--n_layer=1", "--n_embd=32", "--batch_size=16",
              "--gradient_accumulation_steps=1", "--eval_iters=2", "--eval_interval=15", "--max_iters=30"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(folder, run) of a tiny gpt classifier trained from scratch on the labelled set for 30 iterations."""
    folder = tmp_path_factory.mktemp("classify")
    data = prepare_labelled(folder, "contracts")
    done = run_in_process("train.py", f"--data_dir={data}", "--dataset=contracts", f"--out_dir={folder / 'run'}",
                      *TINY_MODEL, *CLASSIFIER)
    assert done.returncode == 0, done.stderr
    return folder, folder / "run"


def test_a_classifier_trained_end_to_end_beats_always_answering_the_majority_class(classifier):
    pytest.importorskip("sklearn")
    folder, run = classifier
    evals = [r for r in read_log(run) if "val_loss" in r]
    assert evals and all(0 <= r["val_accuracy"] <= 1 for r in evals)
    done = run_in_process("eval.py", f"--out_dir={run}", "--tfidf_baseline=True")
    assert done.returncode == 0, done.stderr
    assert "confusion matrix of the TF-IDF baseline" in done.stdout
    numbers = next(iter(json.loads((run / "eval.json").read_text()).values()))
    assert numbers["examples"] == 24 and numbers["classes"] == ["lease", "license", "sale"]
    assert numbers["majority_class"] == "lease" and numbers["majority_accuracy"] == 0.5
    assert numbers["accuracy"] > numbers["majority_accuracy"]
    confusion = np.array(numbers["confusion"])
    assert confusion.sum() == 24 and confusion.sum(1).tolist() == [12, 6, 6]  # rows: the true classes
    assert numbers["accuracy"] == pytest.approx(np.trace(confusion) / 24)
    # the baseline, on the same documents: their keywords give the classes away
    assert np.array(numbers["tfidf_confusion"]).sum(1).tolist() == [12, 6, 6]
    assert numbers["tfidf_accuracy"] > numbers["majority_accuracy"]


def test_a_lora_classifier_keeps_its_head_beside_the_adapters_and_evaluates_from_its_base(tmp_path):
    data = prepare_labelled(tmp_path, "contracts", "--tokenizer=byte")
    base = untrained_run(tmp_path / "base", (data, "contracts"), "encoder")
    done = run_in_process("train.py", f"--data_dir={data}", "--dataset=contracts", f"--out_dir={tmp_path / 'lora'}",
                          f"--init_from={base}", "--arch=encoder", "--lora_rank=2", "--lora_targets=q,v",
                          "--pool=first",
                          *TINY_MODEL, *CLASSIFIER, "--max_iters=4", "--eval_interval=4")
    assert done.returncode == 0, done.stderr
    ckpt = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["n_classes"] == 3 and ckpt["model_args"]["pool"] == "first"
    assert {k for k in ckpt["model"] if ".lora_" not in k} == {"classifier.weight", "classifier.bias"}
    done = run_in_process("eval.py", f"--out_dir={tmp_path / 'lora'}")
    assert done.returncode == 0, done.stderr
    assert "macro_f1" in done.stdout


@pytest.mark.parametrize("arch, pool", [("gpt", "last"), ("gpt", "mean"), ("encoder", "first"), ("encoder", "mean"),
                                        ("encdec", "first"), ("lstm", "last"), ("lstm", "mean")])
def test_the_padding_after_a_document_does_not_change_its_class_logits(arch, pool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                    n_classes=3, pool=pool)).eval()
    idx = torch.randint(60, (2, 12))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 7:] = False  # the second document is 7 tokens long
    with torch.no_grad():
        padded, _ = model.classify(idx, keep)
        alone, _ = model.classify(idx[1:, :7], keep[1:, :7])
        other_padding, _ = model.classify(torch.where(keep, idx, 63), keep)
    assert torch.allclose(padded[1], alone[0], atol=1e-5)
    assert torch.allclose(padded, other_padding, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(arch="conditional", n_labels=2), "arch='conditional' reads a control label"),
    (dict(arch="gpt", pool="first"), "pool='first'"), (dict(arch="gpt", pool="max"), "pool one of first, last, mean")])
def test_a_classification_head_the_model_cannot_use_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(n_classes=3, **settings)


def test_accuracy_macro_f1_and_the_confusion_matrix_of_a_hand_computed_case():
    truth, predicted = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 0, 2])
    numbers = classification_metrics(truth, predicted, 4)  # class 3 occurs nowhere: it has no F1
    assert numbers["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert numbers["accuracy"] == pytest.approx(4 / 6)
    # F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3
    assert numbers["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    metrics = pytest.importorskip("sklearn.metrics")
    assert numbers["macro_f1"] == pytest.approx(metrics.f1_score(truth, predicted, average="macro"))


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: {name}

Files: *
Copyright: 2020 Someone
License: {license}

Files: debian/*
Copyright: 2021 Someone Else
License: {license}
 This is {name}'s own license text.
 .
 It has two paragraphs.
Comment: not the license

License: {license}
 The full text of {name}'s license, by itself.
"""


def test_dep5_license_paragraphs_become_texts_labelled_by_their_family():
    text = COPYRIGHT.format(name="foo", license="GPL-2+ with OpenSSL exception")
    assert list(dep5_paragraphs(text)) == [
        ("GPL-2+ with OpenSSL exception", "This is foo's own license text.\n\nIt has two paragraphs."),
        ("GPL-2+ with OpenSSL exception", "The full text of foo's license, by itself.")]
    assert list(dep5_paragraphs(text.split("\n", 1)[1])) == []  # no Format line: not machine-readable
    names = {"GPL-2+": "GPL", "AGPL-3": "GPL", "LGPL-2.1+": "LGPL", "BSD-3-clause": "BSD", "Expat": "MIT/Expat",
             "MIT/X11": "MIT/Expat", "Apache-2.0": "Apache", "MPL-2.0": "MPL", "public-domain": "public domain",
             "CC0-1.0": "public domain", "Zlib": "other", "BSL-1.0": "other", "GPL-2+ or GPL-3+": "GPL",
             "GPL-1+ or Artistic": None, "LGPL-2.1+ and BSD-3-clause": None}
    assert {name: license_family(name) for name in names} == names


def test_the_license_example_holds_out_whole_packages(tmp_path, monkeypatch, capsys):
    paths = []
    for i, license in enumerate(["GPL-2+", "Expat", "BSD-3-clause", "Apache-2.0", "LGPL-2+", "MPL-2.0"]):
        folder = tmp_path / "doc" / f"pkg{i}"
        folder.mkdir(parents=True)
        (folder / "copyright").write_text(COPYRIGHT.format(name=f"pkg{i}", license=license))
        paths.append(str(folder / "copyright"))
    (tmp_path / "doc" / "old").mkdir()
    (tmp_path / "doc" / "old" / "copyright").write_text("This package is in the public domain.\n")
    settings = {"labels": True, "input": "", "data_dir": str(tmp_path / "data"), "dataset": "licenses",
                "tokenizer": "byte", "val_fraction": 0.34, "num_workers": 1}
    for name, value in settings.items():
        monkeypatch.setattr(prepare_module, name, value)
    monkeypatch.setattr(prepare_module, "legal_corpus_files", lambda: paths + [str(tmp_path / "doc/old/copyright")])
    prepare_module.main()
    out = tmp_path / "data" / "licenses"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] == list(prepare_module.LICENSE_FAMILIES)
    assert len(meta["val_packages"]) == 2
    tok = load_tokenizer(out)
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        labels = np.fromfile(out / f"{split}_label.bin", dtype=np.uint16)
        ends = np.flatnonzero(ids == tok.eot_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for start, end in zip(starts, ends):
            text = tok.decode(ids[start:end].tolist())
            package = text.split("pkg")[1][0]
            assert (f"pkg{package}" in meta["val_packages"]) == (split == "val")  # each package on one side
            expected = license_family(["GPL-2+", "Expat", "BSD-3-clause", "Apache-2.0", "LGPL-2+", "MPL-2.0"]
                                      [int(package)])
            assert meta["labels"][labels[start]] == expected
        assert len(ends) == (4 if split == "val" else 8)  # two License paragraphs with a text per package


def test_bad_input_to_classification_is_one_line_and_exit_2(classifier, dataset, tmp_path):
    folder, run = classifier
    data = folder / "data"
    assert_clear_error(run_in_process("train.py", *map(str, [f"--data_dir={dataset[0]}", f"--dataset={dataset[1]}",
                                                             f"--out_dir={tmp_path / 'a'}"]), *TINY_MODEL,
                                      "--task=classify"), "task='classify' needs a label per document")
    assert_clear_error(run_in_process("train.py", f"--data_dir={data}", "--dataset=contracts",
                                      f"--out_dir={tmp_path / 'b'}", "--task=sort"), "task='sort' is not one of")
    assert_clear_error(run_in_process("train.py", f"--data_dir={data}", "--dataset=contracts",
                                      f"--out_dir={tmp_path / 'c'}", *TINY_MODEL, "--task=classify", "--pool=first"),
                       "pool='first'")
    assert_clear_error(run_in_process("train.py", f"--data_dir={data}", "--dataset=contracts",
                                      f"--out_dir={tmp_path / 'd'}", f"--init_from={run}", *TINY_MODEL,
                                      "--block_size=32"),
                       "a classifier trains with --task=classify")
    # a dataset with a class the run never saw
    other = prepare_labelled(tmp_path, "other", f"--tokenizer_from={run}", kinds=("lease", "loan"))
    assert_clear_error(run_in_process("eval.py", f"--out_dir={run}", f"--data_dir={other}", "--dataset=other"),
                       "labels the run", "was not trained on: loan")
    assert_clear_error(run_in_process("eval.py", f"--out_dir={run}", f"--input={tmp_path / 'other-val.jsonl'}"),
                       "is a classification run")
    lm = untrained_run(tmp_path / "lm", (data, "contracts"), "gpt")
    assert_clear_error(run_in_process("eval.py", f"--out_dir={lm}", "--tfidf_baseline=True"),
                       "--tfidf_baseline is compared with a classification run")
