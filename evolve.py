"""
Evolutionary search over train.py settings, scored by eval.py's exact val bits per byte.

    python evolve.py --space=config/evolve_space.py --base_config=config/legal_small.py --budget_tokens=1000000

A population of members, each a value for every key of the space file, is trained by
train.py (the base config, train_args, then the member's keys) on the same budget of
tokens (max_iters from each member's batch shape, the learning rate decaying over them) or
of seconds, and scored by eval.py on the val split. Each next generation keeps the `elite`
best and fills up with children: two parents each picked by a tournament (the best of
`tournament` members drawn at random), their keys mixed (crossover), some keys moved
(mutation). Generation 0 holds the base's own values as its first member, so the
leaderboard shows how the search compares with the base at the same budget.

The space file: Python lines `key = (low, high)` (an int or float between them; floats
that are positive on a log scale) or `key = [a, b, c]` (one of them), each key a train.py
setting, or vocab_size: the tokenizer's, a dataset prepared by prepare.py (with
prepare_args) for each value, once, into out_dir/data. out_dir/population.json holds the
search and is written after every member, so a search that was stopped goes on from it
when run again with the same out_dir. At the end it prints the leaderboard of every
member so far and writes the best as a train.py config file (best_config).
"""

import ast
import concurrent.futures
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time

# -----------------------------------------------------------------------------
out_dir = "out-evolve"      # the search's folder: population.json and a run folder per member
space = ""                  # a file of the keys to search: key = (low, high) or key = [choices], train.py settings
base_config = ""            # a train.py config file every member starts from ("": train.py's defaults)
train_args = ""             # more train.py settings for every member: --key=value ..., space-separated
prepare_args = ""           # searching vocab_size: prepare.py's settings of the text (--input=...); "": built-in corpus
population = 6              # members per generation
generations = 4             # generations in all, counting the first
elite = 1                   # the best this many go on to the next generation unchanged (not trained again)
tournament = 2              # a parent is the best of this many members drawn at random
crossover = 0.5             # chance that a child mixes two parents' keys, not copies one
mutation = 0.3              # chance that a child's key moves (at least one always does)
budget_tokens = 1_000_000   # tokens each member trains on; 0: budget_seconds instead
budget_seconds = 0.0        # > 0 (with budget_tokens=0): each member trains this long (train.py max_seconds)
eval_tokens = 0             # eval.py --max_tokens: score on the first this many val tokens; 0 = all of them
workers = 0                 # members trained at once; 0 = one per two cores
best_config = "config/evolved.py"  # where the best member is written as a train.py config
seed = 1337
# -----------------------------------------------------------------------------

from configurator import check_ranges, configure, fail, settings_of  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = "vocab_size"  # not a train.py setting: the search prepares the text with each value it tries
SET_BY_SEARCH = ("out_dir", "max_iters", "lr_decay_iters", "max_seconds", "eval_interval", "init_from")


def train_defaults():
    """train.py's settings and their defaults: its source up to where it reads the command line
    (its settings block, as in nanoGPT) run here, not a second process that imports torch to list them."""
    path = os.path.join(HERE, "train.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    end = next(i for i, stmt in enumerate(tree.body)
               if isinstance(stmt, ast.ImportFrom) and stmt.module == "configurator"
               and any(alias.name == "configure" for alias in stmt.names))
    scope = {"__file__": path, "__name__": "train_settings"}
    exec(compile(ast.Module(tree.body[:end], type_ignores=[]), path, "exec"), scope)
    return settings_of(scope)


def base_settings():
    """(every train.py setting as the base config and train_args leave it, the ones they change)."""
    defaults = train_defaults()
    settings = dict(defaults)
    configure(settings, ([base_config] if base_config else []) + train_args.split())  # its errors are ours
    return settings, {k for k in defaults if settings[k] != defaults[k] or type(settings[k]) is not type(defaults[k])}


def read_space(path, known):
    """{key: (low, high) or [choices]} from the space file; each key a train.py setting."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except OSError as e:
        fail(f"cannot read --space={path}: {e.strerror or e}")
    except SyntaxError as e:
        fail(f"--space={path}:{e.lineno} is not Python: {e.msg}")
    ranges = {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            fail(f"{path}:{stmt.lineno}: a line of the space is `key = (low, high)` or `key = [a, b, ...]`")
        key = stmt.targets[0].id
        if key not in known:
            fail(f"{path}:{stmt.lineno}: '{key}' is not a train.py setting (nor {VOCAB})")
        if key in SET_BY_SEARCH:
            fail(f"{path}:{stmt.lineno}: '{key}' is set by the search itself ({', '.join(SET_BY_SEARCH)})")
        try:
            value = ast.literal_eval(stmt.value)
        except ValueError:
            fail(f"{path}:{stmt.lineno}: {key}'s range is not a literal")
        numbers = isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not (numbers and value[0] < value[1] or isinstance(value, list) and value):
            fail(f"{path}:{stmt.lineno}: {key} = {value!r}: give (low, high) with low < high, or a list of values")
        default = known[key]
        wrong = [v for v in value if default is not None and type(v) is not type(default)
                 and not (type(default) is float and type(v) is int)]
        if wrong:
            fail(f"{path}:{stmt.lineno}: {key} takes {type(default).__name__} values, and {wrong[0]!r} is not one")
        ranges[key] = value
    if not ranges:
        fail(f"--space={path} names no key to search")
    return ranges


# ---- members: drawn, mixed, moved ---------------------------------------------------

def draw(rng, rule):
    if isinstance(rule, list):
        return rng.choice(rule)
    low, high = rule
    if isinstance(low, int) and isinstance(high, int):
        return rng.randint(low, high)
    if low > 0:
        return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")
    return float(f"{rng.uniform(low, high):.3g}")


def move(rng, rule, value):
    """A nearby value: another choice, a step of a quarter of the range for ints, a factor of
    about e^±0.5 for positive floats."""
    if isinstance(rule, list):
        others = [v for v in rule if v != value]
        return rng.choice(others) if others else value
    low, high = rule
    if isinstance(low, int) and isinstance(high, int):
        step = max(1, round((high - low) / 4))
        return min(high, max(low, value + rng.choice([s for s in range(-step, step + 1) if s])))
    moved = value * math.exp(rng.gauss(0, 0.5)) if low > 0 else value + rng.gauss(0, (high - low) / 4)
    return float(f"{min(high, max(low, moved)):.3g}")


def child(rng, parents, ranges):
    a, b = parents
    keys = {k: (a if rng.random() < 0.5 else b)["config"][k] for k in ranges} if rng.random() < crossover \
        else dict(a["config"])
    moving = [k for k in ranges if rng.random() < mutation] or [rng.choice(list(ranges))]
    for k in moving:
        keys[k] = move(rng, ranges[k], keys[k])
    return keys


def pick(rng, scored):
    return min(rng.sample(scored, min(tournament, len(scored))), key=lambda m: m["bits_per_byte"])


def first_generation(ranges, base):
    rng = random.Random(f"{seed}-0")
    members = [{"id": "g0-m0", "config": {k: base[k] for k in ranges}, "parents": ["base"]}]
    while len(members) < population:
        config = {k: draw(rng, rule) for k, rule in ranges.items()}
        if all(config != m["config"] for m in members):
            members.append({"id": f"g0-m{len(members)}", "config": config, "parents": []})
    return [{**m, "status": "pending"} for m in members]


def next_generation(state, ranges):
    g = state["generation"] + 1
    rng = random.Random(f"{seed}-{g}")
    scored = sorted((m for m in state["members"] if m["status"] == "done"), key=lambda m: m["bits_per_byte"])
    if not scored:
        fail(f"no member of generation {g - 1} trained: see the failures in {population_path()}")
    members = scored[:elite]
    seen = [m["config"] for m in state["past"] + state["members"]]
    while len(members) < population:
        parents = [pick(rng, scored), pick(rng, scored)]
        for _ in range(20):  # a child that repeats a member so far is moved again
            config = child(rng, parents, ranges)
            if config not in seen:
                break
        seen.append(config)
        members.append({"id": f"g{g}-m{len(members)}", "config": config, "status": "pending",
                        "parents": sorted({p["id"] for p in parents})})
    past = state["past"] + [m for m in state["members"] if m not in members[:elite]]  # the elite is still here
    return {**state, "generation": g, "past": past, "members": members}


# ---- training and scoring one member ---------------------------------------------------

def flag(key, value):
    return f"--{key}={value if isinstance(value, str) else repr(value)}"


def budget(settings):
    """The train.py settings that give a member with these settings the search's budget."""
    if not budget_tokens:
        return {"max_seconds": budget_seconds}
    per_step = settings["gradient_accumulation_steps"] * settings["batch_size"] * settings["block_size"]
    steps = max(1, math.ceil(budget_tokens / per_step))
    return {"max_iters": steps, "lr_decay_iters": steps, "eval_interval": steps, "max_seconds": 0.0}  # no time limit


def base_vocab(base):
    """The vocab_size of the base's dataset: the value a searched vocab_size starts from."""
    path = os.path.join(base["data_dir"], base["dataset"], "meta.json")
    try:
        with open(path) as f:
            return json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"a searched vocab_size starts from the base dataset's, and {path} cannot be read ({e}): "
             "prepare it first")


PREPARING = threading.Lock()  # one prepare.py at a time: two members may want the same vocabulary


def vocab_dataset(vocab):
    """(the data_dir and dataset of the text prepared with this vocab_size, prepared once; an error or None)."""
    data, name = os.path.join(out_dir, "data"), f"vocab{vocab}"
    with PREPARING:
        if os.path.exists(os.path.join(data, name, "meta.json")):
            return {"data_dir": data, "dataset": name}, None
        done = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), f"--data_dir={data}",
                               f"--dataset={name}", f"--vocab_size={vocab}", *prepare_args.split()],
                              capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"prepare.py: {(done.stderr.strip().splitlines() or ['(nothing on stderr)'])[-1]}"
    return {"data_dir": data, "dataset": name}, None


def train_and_score(member, base, threads):
    """Train the member in its own folder, score it with eval.py: the member with its status,
    bits_per_byte or error, and seconds."""
    folder = os.path.join(out_dir, member["id"])
    shutil.rmtree(folder, ignore_errors=True)  # what a stopped search left of it
    settings = {**base, **member["config"]}
    keys = {**member["config"], **budget(settings), "out_dir": folder}
    started = time.time()
    if VOCAB in keys:
        data, error = vocab_dataset(keys.pop(VOCAB))
        if error:
            return {**member, "status": "failed", "error": error, "seconds": round(time.time() - started, 1)}
        keys |= data
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    commands = [[os.path.join(HERE, "train.py"), *([base_config] if base_config else []), *train_args.split(),
                 *(flag(k, v) for k, v in keys.items())],
                [os.path.join(HERE, "eval.py"), f"--out_dir={folder}", f"--max_tokens={eval_tokens}"]]
    for command in commands:
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            return {**member, "status": "failed", "error": f"{os.path.basename(command[0])}: {last}",
                    "seconds": round(time.time() - started, 1)}
    with open(os.path.join(folder, "eval.json")) as f:
        numbers = next(v for k, v in json.load(f).items() if k.startswith("dataset "))
    return {**member, "status": "done", "bits_per_byte": numbers["bits_per_byte"], "train": keys,
            "seconds": round(time.time() - started, 1)}


# ---- the population file --------------------------------------------------------------

def population_path():
    return os.path.join(out_dir, "population.json")


def save(state):
    """population.json, whole or not at all: a temporary file, fsync, rename."""
    path = population_path()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(ranges):
    path = population_path()
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        members, past = state["members"], state["past"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path} is not a population file evolve.py wrote ({e}): move it away to start a new search")
    if state.get("space") != {k: list(v) if isinstance(v, tuple) else v for k, v in ranges.items()}:
        fail(f"{path} is a search over another space: give another --out_dir, or the space it was started with")
    return {**state, "members": members, "past": past}


# ---- the search ------------------------------------------------------------------------

def describe(config):
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def leaderboard(members):
    ranked = sorted(members, key=lambda m: (m["status"] != "done", m.get("bits_per_byte") or 0))
    lines = [f"{'rank':>4}  {'member':<8}  {'val bpb':>8}  settings"]
    for i, m in enumerate(ranked, 1):
        score = f"{m['bits_per_byte']:.4f}" if m["status"] == "done" else m["status"]
        lines.append(f"{i:>4}  {m['id']:<8}  {score:>8}  {describe(m['config'])}"
                     + (f"  ({m['error']})" if m["status"] == "failed" else ""))
    return "\n".join(lines), ranked[0]


def write_best(best, base, changed, ranges):
    """The best member as a train.py config: the base's changed settings, the member's keys, its budget."""
    keys = {k: base[k] for k in sorted(changed) if k not in SET_BY_SEARCH}
    keys |= {k: v for k, v in best["train"].items() if k not in ("out_dir", VOCAB)}
    lines = [f"# The best member of an evolve.py search ({best['id']}): val bits per byte {best['bits_per_byte']:.4f}",
             f"# (eval.py{f' --max_tokens={eval_tokens}' if eval_tokens else ''}), searched over "
             f"{', '.join(ranges)}, {generations} generation(s) of {population} members.",
             *([f"# on the text prepared with vocab_size {best['config'][VOCAB]} (in {keys['data_dir']}):"]
               if VOCAB in best["config"] else []),
             f"#   python train.py {best_config}",
             f"out_dir = {('out-' + os.path.splitext(os.path.basename(best_config))[0])!r}"]
    lines += [f"{k} = {v!r}" for k, v in keys.items()]
    folder = os.path.dirname(best_config) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{best_config}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, best_config)


def main():
    check_ranges(globals(), {"population": ">= 2", "generations": ">= 1", "elite": ">= 0", "tournament": ">= 1",
                             "crossover": "[0, 1]", "mutation": "[0, 1]", "budget_tokens": ">= 0",
                             "budget_seconds": ">= 0", "eval_tokens": ">= 0", "workers": ">= 0"})
    if elite >= population:
        fail(f"elite={elite} leaves no room for children in a population of {population}")
    if not budget_tokens and not budget_seconds:
        fail("give each member a budget: --budget_tokens= or --budget_seconds=")
    if not space:
        fail("--space= names no file of keys to search (key = (low, high) or key = [choices] a line)")
    base, changed = base_settings()
    ranges = read_space(space, {**base, VOCAB: 0})
    if VOCAB in ranges:
        base[VOCAB] = base_vocab(base)
    state = load_state(ranges)
    if state is None:
        os.makedirs(out_dir, exist_ok=True)
        state = {"space": ranges, "generation": 0, "members": first_generation(ranges, base), "past": []}
        save(state)
    else:
        print(f"resuming generation {state['generation']} from {population_path()}")
    cores = os.cpu_count() or 1
    at_once = workers or max(1, cores // 2)
    lock = threading.Lock()
    while True:
        pending = [i for i, m in enumerate(state["members"]) if m["status"] == "pending"]
        with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
            jobs = {pool.submit(train_and_score, state["members"][i], base, max(1, cores // at_once)): i
                    for i in pending}
            for job in concurrent.futures.as_completed(jobs):
                member = job.result()
                with lock:
                    state["members"][jobs[job]] = member
                    save(state)
                score = f"val bpb {member['bits_per_byte']:.4f}" if member["status"] == "done" else member["error"]
                print(f"generation {state['generation']}, {member['id']}: {score} in {member['seconds']:.0f}s "
                      f"({describe(member['config'])})", flush=True)
        if state["generation"] + 1 >= generations:
            break
        state = next_generation(state, ranges)
        save(state)
    board, best = leaderboard(state["past"] + state["members"])
    print(board)
    if best["status"] != "done":
        fail("no member trained: see the failures above")
    write_best(best, base, changed, ranges)
    print(f"wrote {best_config}: {best['id']}, val bpb {best['bits_per_byte']:.4f}")


if __name__ == "__main__":
    configure(globals())
    main()
