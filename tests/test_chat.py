"""Conversations: the chat template from prepare.py's "messages" to a multi-turn exchange."""
import io
import json
import random
import shutil

import pytest
import torch

from conftest import assert_clear_error, run_in_process, train_args
from engine import Engine
from tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_fingerprint

REPAIRS = {"roof": "Landlord", "window": "Tenant", "boiler": "Landlord", "carpet": "Tenant", "fence": "Licensor",
           "lock": "Licensee"}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny run trained on conversations of one to three questions: who repairs an item, and
    the party that does, which the reply must take from the last question, not the first."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(400):
            messages = []
            for _ in range(rng.randint(1, 3)):
                item = rng.choice(list(REPAIRS))
                messages += [{"role": "user", "content": f"Who repairs the {item}?"},
                             {"role": "assistant", "content": f"The {REPAIRS[item]}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    done = run_in_process("prepare.py", "--input=chats.jsonl", "--vocab_size=300", "--val_fraction=0.1", cwd=root)
    assert done.returncode == 0, done.stderr
    out_dir = root / "out"
    done = run_in_process("train.py", *train_args((root / "data", "legal"), out_dir, "--max_iters=100",
                                              "--lr_decay_iters=100", "--eval_interval=50", "--dropout=0"))
    assert done.returncode == 0, done.stderr[-2000:]
    return out_dir


def test_a_run_trained_on_conversations_answers_each_turn_of_an_exchange(chat_run, monkeypatch):
    questions = ["roof", "lock", "carpet", "fence"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"Who repairs the {q}?\n" for q in questions)))
    done = run_in_process("sample.py", f"--out_dir={chat_run}", "--chat=True", "--temperature=0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"The {REPAIRS[q]}." for q in questions]
    engine = Engine.load(chat_run, dtype="float32")
    assert engine.has_chat
    messages = [{"role": "user", "content": "Who repairs the window?"}, {"role": "assistant", "content": "The Tenant."},
                {"role": "user", "content": "Who repairs the boiler?"}]
    reply = engine.chat(messages, temperature=0, max_new_tokens=20)
    assert (reply.text, reply.finish_reason) == ("The Landlord.", "stop")  # it ended the turn itself
    assert engine.generate([engine.chat_prompt(messages)], temperature=0, max_new_tokens=20)[0] == reply
    assert "".join(engine.stream(engine.chat_prompt(messages), temperature=0, max_new_tokens=20)) == reply.text


def test_a_long_conversation_drops_its_oldest_turns_to_fit_the_context(chat_run, monkeypatch):
    # block_size 64: a dozen turns are about 130 tokens; the system message stays
    questions = [random.Random(i).choice(list(REPAIRS)) for i in range(12)]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"Who repairs the {q}?\n" for q in questions)))
    done = run_in_process("sample.py", f"--out_dir={chat_run}", "--chat=True", "--temperature=0",
                          "--system=Answer briefly.")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == len(questions)


def test_a_run_made_before_the_chat_template_still_generates_but_cannot_chat(trained_run, tmp_path, monkeypatch):
    # a run as runs were before the role tokens: the same tokenizer with four special tokens
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    tok = load_tokenizer(old)
    type(tok)(tok.ranks, tok.pattern, SPECIAL_TOKENS[:4]).save(old)
    ckpt = torch.load(old / "ckpt.pt", weights_only=True)
    ckpt["tokenizer_fingerprint"] = tokenizer_fingerprint(old)
    torch.save(ckpt, old / "ckpt.pt")
    engine = Engine.load(old, dtype="float32")
    assert not engine.has_chat and engine.tokenizer.vocab_size == tok.vocab_size - 3
    assert engine.generate("The Licensee shall", temperature=0, max_new_tokens=5).completion_tokens >= 1
    with pytest.raises(ValueError, match="no role tokens"):
        engine.chat([{"role": "user", "content": "Who pays?"}])
    monkeypatch.setattr("sys.stdin", io.StringIO("Who pays?\n"))
    assert_clear_error(run_in_process("sample.py", f"--out_dir={old}", "--chat=True"), "has no chat template")


def test_prompts_of_token_ids_must_be_ids_of_the_vocabulary(trained_run):
    engine = Engine.load(trained_run, dtype="float32")
    ids = engine.tokenizer.encode("The Licensee shall")
    assert engine.generate([ids], temperature=0, max_new_tokens=8)[0] == \
        engine.generate("The Licensee shall", temperature=0, max_new_tokens=8)
    for bad in ([], [engine.tokenizer.vocab_size], ["1"], 3):
        with pytest.raises(ValueError, match="a prompt"):
            engine.generate([bad], max_new_tokens=1)
