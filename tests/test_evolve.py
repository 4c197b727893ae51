import json
import os

import evolve as evolve_module
from conftest import assert_clear_error, run_in_process
from evolve import first_generation

# a member: 2 x 1024-token steps of a model of at most 2 layers x 32 wide, scored on 300 val tokens
# (no report of its own at the end: plot.py would take longer than its training)
TINY = ["--n_layer=2", "--n_embd=32", "--learning_rate=3e-3", "--n_head=2", "--block_size=32", "--batch_size=8",
        "--gradient_accumulation_steps=4", "--compile=False", "--eval_iters=1", "--log_interval=1", "--warmup_iters=0",
        "--dtype=float32", "--report=False"]
SPACE = "learning_rate = (1e-3, 1e-2)\nn_layer = (1, 2)\nn_embd = [16, 32]\nvocab_size = [288]\n"  # one vocabulary: one prepare


def evolve(tmp_path, dataset, corpus, *more):
    # in this process: what is tested is the search, and each member is still a train.py and an eval.py of its own
    data_dir, name = dataset
    train_args = " ".join([f"--data_dir={data_dir}", f"--dataset={name}", *TINY])
    return run_in_process("evolve.py", f"--out_dir={tmp_path / 'search'}", f"--space={tmp_path / 'space.py'}",
                          f"--train_args={train_args}", "--population=3", "--elite=1", "--budget_tokens=2048",
                          "--eval_tokens=300", "--workers=1", f"--prepare_args=--input={corpus} --val_fraction=0.1",
                          f"--best_config={tmp_path / 'best.py'}", *more)


def population(tmp_path):
    with open(tmp_path / "search" / "population.json") as f:
        return json.load(f)


def test_the_first_generation_starts_from_the_base_and_draws_the_rest_within_the_ranges(monkeypatch):
    monkeypatch.setattr(evolve_module, "population", 3)
    monkeypatch.setattr(evolve_module, "seed", 5)
    ranges = {"learning_rate": (1e-3, 1e-2), "n_layer": (1, 4), "n_embd": [16, 32, 64]}
    members = first_generation(ranges, {"learning_rate": 3e-3, "n_layer": 2, "n_embd": 32, "dropout": 0.0})
    assert [m["id"] for m in members] == ["g0-m0", "g0-m1", "g0-m2"] and all(m["status"] == "pending" for m in members)
    assert members[0]["config"] == {"learning_rate": 3e-3, "n_layer": 2, "n_embd": 32}  # the base's own values
    for m in members[1:]:
        c = m["config"]
        assert 1e-3 <= c["learning_rate"] <= 1e-2 and c["n_layer"] in range(1, 5) and c["n_embd"] in (16, 32, 64)
    assert members[1]["config"] != members[2]["config"]
    assert first_generation(ranges, {"learning_rate": 3e-3, "n_layer": 2, "n_embd": 32}) == members  # seeded


def test_a_search_killed_in_its_first_generation_resumes_and_runs_the_second(tmp_path, dataset, corpus):
    # the population file as a kill while g0-m2 trained leaves it: g0-m0 and g0-m1 scored (their
    # folders are gone: they are not trained again), g0-m2 pending
    (tmp_path / "space.py").write_text(SPACE)
    (tmp_path / "search").mkdir()
    done_member = {"status": "done", "parents": [], "train": {"max_iters": 2, "lr_decay_iters": 2, "eval_interval": 2}}
    state = {"space": {"learning_rate": [1e-3, 1e-2], "n_layer": [1, 2], "n_embd": [16, 32], "vocab_size": [288]},
             "generation": 0,
             "past": [], "members": [
                 {**done_member, "id": "g0-m0", "config": {"learning_rate": 3e-3, "n_layer": 2, "n_embd": 32,
                                                          "vocab_size": 288}, "bits_per_byte": 9.5},
                 {**done_member, "id": "g0-m1", "config": {"learning_rate": 2e-3, "n_layer": 1, "n_embd": 16,
                                                          "vocab_size": 288}, "bits_per_byte": 9.0},
                 {"id": "g0-m2", "config": {"learning_rate": 5e-3, "n_layer": 2, "n_embd": 16, "vocab_size": 288},
                  "parents": [],
                  "status": "pending"}]}
    (tmp_path / "search" / "population.json").write_text(json.dumps(state))
    done = evolve(tmp_path, dataset, corpus, "--generations=2")
    assert done.returncode == 0, done.stderr
    assert "resuming generation 0" in done.stdout
    assert sorted(os.listdir(tmp_path / "search")) == ["data", "g0-m2", "g1-m1", "g1-m2", "population.json"]

    state = population(tmp_path)
    assert state["generation"] == 1 and len(state["members"]) == 3 and len(state["past"]) == 2
    everyone = state["past"] + state["members"]
    assert sorted(m["id"] for m in everyone) == ["g0-m0", "g0-m1", "g0-m2", "g1-m1", "g1-m2"]
    for m in everyone[-3:]:  # g0-m2 and the children: trained on 2 x 1024 tokens, scored by eval.py
        assert m["status"] == "done" and m["train"]["max_iters"] == 2
        # its vocabulary: the corpus prepared with it, once, in the search's folder
        assert m["train"]["dataset"] == f"vocab{m['config']['vocab_size']}"
        with open(tmp_path / "search" / "data" / m["train"]["dataset"] / "meta.json") as f:
            assert json.load(f)["vocab_size"] == m["config"]["vocab_size"]
        with open(tmp_path / "search" / m["id"] / "eval.json") as f:
            assert next(iter(json.load(f).values()))["bits_per_byte"] == m["bits_per_byte"] < 9
    best = min(everyone, key=lambda m: m["bits_per_byte"])
    assert state["members"][0] == min(state["past"] + state["members"][:1], key=lambda m: m["bits_per_byte"])
    assert state["members"][0]["id"].startswith("g0-")  # the elite, the best of generation 0, goes on
    for m in state["members"][1:]:
        assert m["parents"] and set(m["parents"]) <= {"g0-m0", "g0-m1", "g0-m2"}
        assert m["config"] not in [other["config"] for other in everyone if other is not m]
        assert 1e-3 <= m["config"]["learning_rate"] <= 1e-2 and m["config"]["n_embd"] in (16, 32)
    board = done.stdout[done.stdout.index("rank"):done.stdout.index("wrote")].splitlines()
    assert len(board) == 1 + 5 and best["id"] in board[1] and f"{best['bits_per_byte']:.4f}" in board[1]
    assert "g0-m0" in board[-1] and "9.5000" in board[-1]

    written = (tmp_path / "best.py").read_text()
    assert f"val bits per byte {best['bits_per_byte']:.4f}" in written and "max_iters = 2" in written
    settings = {}
    exec(written, settings)
    assert {k: settings[k] for k in best["config"] if k != "vocab_size"} == {
        k: v for k, v in best["config"].items() if k != "vocab_size"}
    assert settings["dataset"] == f"vocab{best['config']['vocab_size']}"


def test_bad_search_settings_are_one_clear_line(tmp_path):
    (tmp_path / "space.py").write_text("learning_rate = (1e-3, 1e-2)\nlearning_speed = (1, 2)\n")
    done = run_in_process("evolve.py", f"--space={tmp_path / 'space.py'}", f"--out_dir={tmp_path / 'search'}")
    assert_clear_error(done, "space.py:2", "'learning_speed' is not a train.py setting")
    assert not (tmp_path / "search").exists()

    (tmp_path / "space.py").write_text("n_layer = (4, 2)\n")
    done = run_in_process("evolve.py", f"--space={tmp_path / 'space.py'}", f"--out_dir={tmp_path / 'search'}")
    assert_clear_error(done, "space.py:1", "low < high")

    (tmp_path / "space.py").write_text("n_layer = (2, 4)\nn_embd = [64, 96.5]\n")
    done = run_in_process("evolve.py", f"--space={tmp_path / 'space.py'}", f"--out_dir={tmp_path / 'search'}")
    assert_clear_error(done, "space.py:2", "n_embd takes int values", "96.5")

    done = run_in_process("evolve.py", f"--space={tmp_path / 'space.py'}", "--elite=6", "--population=6")
    assert_clear_error(done, "elite=6")

    done = run_in_process("evolve.py", "--help")
    assert done.returncode == 0 and "--space=" in done.stdout
