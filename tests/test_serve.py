"""serve.py: most requests go through httpx's ASGI transport into an app in this process; one real
server (the command line, on a loopback port) takes the OpenAI client, concurrent clients, a
client that disconnects, and a real browser on its page."""
import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import serve
from conftest import ROOT, assert_clear_error, run_in_process
from engine import Engine
from model import ModelConfig, build_model
from tokenizer import SPECIAL_TOKENS, load_tokenizer

LICENSEE = "The Licensee shall"
GREEDY = dict(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(trained_run):
    return Engine.load(trained_run, device="cpu", dtype="float32")


class Client:
    """httpx's ASGI transport into an app in this process, for plain (not async) tests."""

    def __init__(self, app):
        self.app, self.loop = app, asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test")

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def get(self, path, **kwargs):
        return self.run(self.http.get(path, **kwargs))

    def post(self, path, body=None, **kwargs):
        return self.run(self.http.post(path, json=body, **kwargs))

    def close(self):
        self.run(self.http.aclose())
        self.app.state.worker.stop()
        self.loop.close()


@pytest.fixture
def connect(engine):
    """connect(engine=, name=, **settings): a Client of an app over engine (the trained run's)."""
    clients = []

    def make(served=engine, name="tiny", **settings):
        clients.append(Client(serve.create_app(served, name, **settings)))
        return clients[-1]
    yield make
    for client in clients:
        client.close()


def events(text):
    """The data of each server-sent event: JSON objects, and "[DONE]" as it is."""
    found = [line[len("data: "):] for line in text.split("\n\n") if line]
    return [d if d == "[DONE]" else json.loads(d) for d in found]


def assert_error(response, status, param, *fragments):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error


def random_engine(arch, tokenizer):
    """An untrained model of arch with the run's tokenizer: enough to see what each endpoint does with it."""
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32,
                         n_labels=2 if arch == "conditional" else 0)
    return Engine(build_model(config).eval(), tokenizer, labels=("lease", "license") if arch == "conditional" else ())


# ---- OpenAI's endpoints ------------------------------------------------------------------

def test_completions_answer_in_openai_schema_with_what_the_engine_writes(connect, engine):
    client = connect()
    prompts = [LICENSEE, "WHEREAS"]
    body = client.post("/v1/completions", {"model": "tiny", "prompt": prompts, "n": 2, "temperature": 0,
                                           "max_tokens": 12, "echo": True}).json()
    alone = [engine.generate(p, **GREEDY) for p in prompts]
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # n choices of each prompt in turn
    assert [c["text"] for c in body["choices"]] == [p + a.text for p, a in zip(prompts, alone) for _ in range(2)]
    assert [c["finish_reason"] for c in body["choices"]] == [a.finish_reason for a in alone for _ in range(2)]
    completion = 2 * sum(a.completion_tokens for a in alone)
    prompt = sum(a.prompt_tokens for a in alone)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    default = client.post("/v1/completions", {"model": "tiny", "prompt": LICENSEE, "temperature": 0}).json()
    assert default["choices"][0]["text"] == engine.generate(LICENSEE, temperature=0, max_new_tokens=16).text


def test_a_streamed_completion_is_events_that_join_to_the_same_text_then_usage_then_done(connect, engine):
    response = connect().post("/v1/completions", {"model": "tiny", "prompt": LICENSEE, "temperature": 0,
                                                   "max_tokens": 12, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, done = events(response.text)
    want = engine.generate(LICENSEE, **GREEDY)
    assert done == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want.text
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [want.finish_reason]
    assert all(c["usage"] is None for c in chunks[:-1])  # the usage comes last, alone
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == want.completion_tokens


def test_chat_completions_answer_the_conversation_as_the_engine_does_and_stream_it(connect, engine):
    client = connect()
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who repairs the roof?"}]
    want = engine.chat(messages, temperature=0, max_new_tokens=10)
    body = client.post("/v1/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0,
                                                "max_tokens": 10}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    streamed = client.post("/v1/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0,
                                                    "max_completion_tokens": 10, "stream": True, "n": 2})
    *chunks, done = events(streamed.text)
    for k in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == want.text
        assert mine[-1]["finish_reason"] == want.finish_reason
    assert done == "[DONE]"


def test_a_run_without_the_chat_template_answers_chat_with_400_saying_so(connect, engine, trained_run):
    tok = load_tokenizer(trained_run)
    old = Engine(engine.model, type(tok)(tok.ranks, tok.pattern, SPECIAL_TOKENS[:4]))  # made before the role tokens
    messages = [{"role": "user", "content": "Hi"}]
    response = connect(old).post("/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert_error(response, 400, "messages", "no role tokens")


# ---- the native endpoints ------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(num_beams=3, no_repeat_ngram_size=2, length_penalty=0.5, max_new_tokens=10),
    dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, stop=["e"], max_new_tokens=20),
    dict(seed=7, top_k=20, top_p=0.9, min_p=0.05, presence_penalty=0.3, ignore_eos=True, max_new_tokens=10),
    dict(choices=[" pay", " not assign"]),
    dict(regex="[a-z ]+", temperature=0, max_new_tokens=8),
    dict(temperature=0, max_new_tokens=8, use_cache=False),
], ids=["beams", "penalties-stop", "seeded-sampling", "choices", "regex", "no-cache"])
def test_generate_takes_every_option_of_the_generation_api(connect, engine, options):
    prompts = [LICENSEE, "WHEREAS"]
    body = connect().post("/generate", {"prompt": prompts, **options}).json()
    want = engine.generate(prompts, **options)
    assert [c["text"] for c in body["completions"]] == [w.text for w in want]
    assert [(c["finish_reason"], c["completion_tokens"]) for c in body["completions"]] == \
        [(w.finish_reason, w.completion_tokens) for w in want]
    assert [c.get("choice_scores") for c in body["completions"]] == [w.choice_scores for w in want]


def test_generate_streams_each_prompts_pieces_and_then_its_details(connect, engine):
    response = connect().post("/generate", {"prompt": [LICENSEE, "WHEREAS"], "stream": True, **GREEDY})
    *chunks, done = events(response.text)
    for k, want in enumerate(engine.generate([LICENSEE, "WHEREAS"], **GREEDY)):
        mine = [c for c in chunks if c["index"] == k]
        assert "".join(c.get("text", "") for c in mine) == want.text
        assert mine[-1] == {"index": k, "finish_reason": want.finish_reason, "prompt_tokens": want.prompt_tokens,
                            "completion_tokens": want.completion_tokens}
    assert done == "[DONE]"


def test_a_draft_run_decodes_speculatively_to_the_same_greedy_text(connect, engine, trained_run):
    drafted = Engine.load(trained_run, device="cpu", dtype="float32", draft_out_dir=trained_run)
    client = connect(drafted)
    body = client.post("/generate", {"prompt": LICENSEE, "draft_tokens": 3, **GREEDY}).json()
    assert body["completions"][0]["text"] == engine.generate(LICENSEE, **GREEDY).text
    assert body["completions"][0]["draft_acceptance"] == 1.0  # the run drafting for itself: every token kept
    assert client.get("/model-info").json()["draft"]["parameters"] == engine.model.num_params()


def test_model_info_tells_int8_weights_and_counts_the_same_parameters(connect, engine, trained_run):
    quantized = Engine.load(trained_run, device="cpu", quantize="int8")
    info = connect(quantized).get("/model-info").json()
    assert (info["quantization"], info["dtype"], info["parameters"]) == ("int8", "float32", engine.model.num_params())


def test_embed_score_model_info_models_and_health_describe_the_run(connect, engine):
    client = connect()
    texts = ["The Licensee shall pay.", "WHEREAS the parties"]
    vectors = client.post("/embed", {"texts": texts}).json()
    assert torch.allclose(torch.tensor(vectors["embeddings"]), engine.embed(texts).float(), atol=1e-5)
    assert vectors["dim"] == engine.model.config.n_embd
    assert client.post("/score", {"text": texts[0]}).json() == pytest.approx(engine.score(texts[0]))
    info = client.get("/model-info").json()
    assert {k: info[k] for k in ("model", "architecture", "context", "tokenizer", "dtype", "device", "quantization",
                                 "chat")} == {"model": "tiny", "architecture": "gpt", "context": 64, "tokenizer": "bpe",
                                              "dtype": "float32", "device": "cpu", "quantization": None, "chat": True}
    assert info["parameters"] == engine.model.num_params() and info["vocab_size"] == engine.tokenizer.vocab_size
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["jobs"] == 0 and health["generated_tokens"] == 0


def test_each_architecture_serves_what_it_can_and_answers_400_to_the_rest(connect, trained_run):
    tok = load_tokenizer(trained_run)
    encoder = connect(random_engine("encoder", tok))
    filled = encoder.post("/fill", {"text": "The <|mask|> shall pay", "top_k": 3}).json()
    fillers = filled["masks"][0]
    assert len(filled["masks"]) == 1 and len(fillers) == 3
    assert [f["probability"] for f in fillers] == sorted((f["probability"] for f in fillers), reverse=True)
    assert not any(f["text"] in SPECIAL_TOKENS for f in fillers)
    assert filled["text"].startswith("The") and "<|mask|>" not in filled["text"]
    assert_error(encoder.post("/v1/completions", {"model": "tiny", "prompt": "x"}), 400, None, "does not generate")
    assert_error(encoder.post("/fill", {"text": "no mask here"}), 400, "text", "<|mask|>")
    assert_error(encoder.post("/score", {"text": "x"}), 400, None, "next-token model")
    assert len(encoder.post("/embed", {"texts": ["x"]}).json()["embeddings"]) == 1
    for arch in ("lstm", "encdec"):
        served = random_engine(arch, tok)
        body = connect(served).post("/v1/completions", {"model": "tiny", "prompt": LICENSEE, "temperature": 0}).json()
        assert body["choices"][0]["text"] == served.generate(LICENSEE, temperature=0, max_new_tokens=16).text
    conditional = random_engine("conditional", tok)
    client = connect(conditional)
    assert_error(client.post("/generate", {"prompt": "x"}), 400, "condition", "lease, license")
    body = client.post("/generate", {"prompt": LICENSEE, "condition": "lease", **GREEDY}).json()
    assert body["completions"][0]["text"] == conditional.generate(LICENSEE, condition="lease", **GREEDY).text
    gpt = connect()
    assert_error(gpt.post("/fill", {"text": "The <|mask|>"}), 400, "text", "needs an encoder run")
    assert_error(gpt.post("/generate", {"prompt": "x", "condition": "lease"}), 400, "condition", "conditional runs")


# ---- what a request may not do ------------------------------------------------------------------

BAD = [  # (path, body as sent, status, the field to blame, in the message)
    ("/generate", b'{"prompt": "x", ', 400, None, "not valid JSON"),
    ("/generate", b'["x"]', 400, None, "must be a JSON object"),
    ("/generate", b'{"prompt": "\\ud800"}', 400, None, "not valid JSON"),  # half a character
    ("/generate", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/generate", {"prompt": "x", "max_new_tokens": 5.0}, 400, "max_new_tokens", "valid integer"),
    ("/generate", {"prompt": [1, 2]}, 400, "prompt", "str or list[str]"),
    ("/generate", {"prompt": "x", "temperature": -1}, 400, "temperature", "from 0"),
    ("/generate", {"prompt": "x", "top_p": 0}, 400, "top_p", "above 0"),
    ("/generate", {"prompt": "x", "num_beams": 2, "temperature": 0.5}, 400, "num_beams", "would sample"),
    ("/generate", {"prompt": "x", "num_beams": 2, "stream": True}, 400, "stream", "does not stream"),
    ("/generate", {"prompt": "x", "regex": "("}, 400, "regex", "does not compile"),
    ("/generate", {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ("/generate", {"prompt": "x", "temprature": 0}, 400, "temprature", "did you mean 'temperature'"),
    ("/generate", {"temperature": 0}, 400, "prompt", "required"),
    ("/generate", {"prompt": []}, 400, "prompt", "at least one prompt"),
    ("/generate", {"prompt": "x", "max_new_tokens": 21}, 400, "max_new_tokens", "max_tokens_limit=20"),
    ("/generate", {"prompt": ["x"] * 4}, 400, "prompt", "max_n=3"),
    ("/generate", {"prompt": "<|endoftext|>" * 40}, 400, "prompt",
     "40 tokens, more than this server's max_prompt_tokens=30"),
    ("/generate", {"prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("/generate", b'{"prompt": "x", "max_new_tokens": 1e400}', 400, "max_new_tokens", "valid integer"),
    ("/generate", b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite number"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "serves 'tiny'"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "required"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2, "max_tokens": 1}, 200, None, ""),
    ("/v1/completions", {"model": "tiny", "prompt": ["x", "y"], "n": 2}, 400, "n", "4 choices"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 50}, 400, "max_tokens", "max_tokens_limit=20"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", "less than or equal"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 3}, 400, "logprobs", "not a field"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only with stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "condition": "lease"}, 400, "condition", "conditional runs"),
    ("/v1/completions", {"model": "tiny", "prompt": "<|endoftext|>" * 65}, 400, "prompt", "context of 64"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages.0.role", "'user'"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": ["x"]}]}, 400,
     "messages.0.content", "valid string"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "non-empty list"),
    ("/embed", {"texts": []}, 400, "texts", "at least 1"),
    ("/score", {"text": ""}, 400, "text", "at least 1"),
    ("/fill", {"text": "x", "top_k": 0}, 400, "top_k", "greater than or equal to 1"),
    ("/generate", b"x" * 2001, 413, None, "max_body_bytes"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_a_4xx_naming_what_is_wrong_and_the_server_stays_up(connect, path, body, status, param,
                                                                             fragment):
    client = connect(max_tokens_limit=20, max_n=3, max_prompt_tokens=30, max_body_bytes=2000)
    sent = dict(content=body) if isinstance(body, bytes) else dict(json=body)
    response = client.run(client.http.post(path, headers={"Content-Type": "application/json"}, **sent))
    if status == 200:  # the limits are limits, not a cut below them
        assert response.status_code == 200, response.text
    else:
        assert_error(response, status, param, fragment)
    assert client.get("/health").json()["status"] == "ok"


def test_the_body_limit_holds_for_a_body_sent_in_pieces_without_its_length(connect):
    client = connect(max_body_bytes=1000)

    async def pieces():
        for _ in range(20):
            yield b'{"prompt": "' + b"x" * 100

    assert_error(client.run(client.http.post("/generate", content=pieces())), 413, None, "1000 bytes")


def test_an_unknown_path_or_method_is_a_json_404_or_405(connect):
    client = connect()
    assert_error(client.get("/v2/anything"), 404, None, "no endpoint /v2/anything")
    assert_error(client.get("/generate"), 405, None, "does not take GET")


def test_with_an_api_key_every_model_endpoint_asks_for_it_and_health_and_the_page_do_not(connect, monkeypatch):
    client = connect(api_key="s3cret")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert_error(client.post("/v1/completions", body), 401, None, "needs an API key")
    response = client.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"})
    assert_error(response, 401, None, "wrong")
    assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/model-info"):
        assert client.get(path).status_code == 401
    assert client.post("/v1/completions", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    monkeypatch.setenv("NANOLEX_API_KEY", "from-the-environment")
    client = connect()
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer from-the-environment"}).status_code == 200


def test_a_client_over_its_rate_gets_429_with_when_to_retry(connect):
    client = connect(rate_limit=2)
    assert [client.get("/v1/models").status_code for _ in range(2)] == [200, 200]
    response = client.get("/v1/models")
    assert_error(response, 429, None, "2 a minute")
    assert int(response.headers["retry-after"]) == 30  # one request comes back every 30 s
    assert client.get("/health").status_code == 200  # the health check is not counted


def test_a_full_queue_answers_503_at_once_and_a_client_that_leaves_frees_its_place(connect):
    client = connect(max_queue=1, max_tokens_limit=100_000)

    async def scene():
        long = asyncio.ensure_future(client.http.post("/generate", json={"prompt": "x", "max_new_tokens": 100_000,
                                                                         "ignore_eos": True}))
        while (await client.http.get("/health")).json()["running_rows"] == 0:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        busy = await client.http.post("/generate", json={"prompt": "y", "max_new_tokens": 1})
        waited = time.perf_counter() - t0
        long.cancel()  # the client goes away
        for _ in range(500):
            health = (await client.http.get("/health")).json()
            if health["jobs"] == 0:
                break
            await asyncio.sleep(0.01)
        return busy, waited, health
    busy, waited, health = client.run(scene())
    assert_error(busy, 503, None, "max_queue")
    assert busy.headers["retry-after"] == "1" and waited < 1
    assert health["jobs"] == 0 and health["cancelled_rows"] == 1 and health["generated_tokens"] < 50_000


def test_requests_that_arrive_together_share_a_batch_and_each_gets_what_it_gets_alone(connect, engine):
    client = connect(max_wait_ms=300)  # long enough for all four to arrive
    prompts = [LICENSEE, "WHEREAS", "IN NO EVENT SHALL", "x"]

    async def together():
        return await asyncio.gather(*[client.http.post("/generate", json={"prompt": p, "ignore_eos": True, **GREEDY})
                                      for p in prompts])
    replies = client.run(together())
    assert [r.json()["completions"][0]["text"] for r in replies] == \
        [engine.generate(p, ignore_eos=True, **GREEDY).text for p in prompts]
    health = client.get("/health").json()
    assert (health["batches"], health["largest_batch"]) == (1, 4)


# ---- the page ------------------------------------------------------------------

def test_the_page_runs_only_its_own_script_and_writes_text_never_html(connect):
    response = connect(name="<b>run</b>").get("/")
    page, policy = response.text, response.headers["content-security-policy"]
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "&lt;b&gt;run&lt;/b&gt;" in page and "<b>run</b>" not in page
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy and "connect-src 'self'" in policy
    assert "textContent" in page and "innerHTML" not in page


def test_no_other_site_may_call_it_from_a_browser_unless_named_and_never_with_credentials(connect):
    preflight = {"Origin": "https://tools.example", "Access-Control-Request-Method": "POST"}
    closed = connect().run(connect().http.options("/v1/completions", headers=preflight))
    assert "access-control-allow-origin" not in closed.headers
    client = connect(cors_origins="https://tools.example")
    opened = client.run(client.http.options("/v1/completions", headers=preflight))
    assert opened.headers["access-control-allow-origin"] == "https://tools.example"
    assert "access-control-allow-credentials" not in opened.headers


# ---- the command line, and one real server ------------------------------------------------------

def test_the_command_line_says_in_one_line_what_it_cannot_use(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for args, fragment in [([f"--out_dir={tmp_path / 'missing'}", "--port=0"], "no checkpoint"),
                               (["--port=70000"], "port must be in [0, 65535]"),
                               (["--port=http"], "port must be int"),
                               (["--host=192.0.2.1", "--port=0"], "cannot listen on 192.0.2.1:0"),
                               ([f"--port={port}"], f"cannot listen on 127.0.0.1:{port}"),
                               (["--max_batch_size=0"], "max_batch_size must be >= 1")]:
            assert_clear_error(run_in_process("serve.py", *args), fragment)
    done = run_in_process("serve.py", "--help")
    assert done.returncode == 0 and "--max_wait_ms=50.0" in done.stdout


@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_a_web_package_that_is_missing_is_named(tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if an install had missed it
    done = run_in_process("serve.py", f"--out_dir={tmp_path / 'missing'}", "--port=0")
    assert_clear_error(done, f"serve.py needs the {package} package: pip install -r requirements.txt")


@pytest.fixture(scope="module")
def server(trained_run):
    """serve.py on a free loopback port: its URL, once it says it is ready."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={trained_run}", "--port=0",
                                "--dtype=float32", "--max_tokens_limit=5000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("serving "):
        process.kill()
        pytest.fail(f"serve.py did not start: {line}{process.stderr.read()}")
    yield re.search(r"http://\S+/", line).group(0).rstrip("/")
    process.terminate()  # uvicorn shuts down, then ends by the signal itself
    assert process.wait(timeout=30) in (0, -signal.SIGTERM) and "Traceback" not in process.stderr.read()


def test_the_openai_client_works_against_it_plainly_and_streaming(server, engine):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["out"]
    want = engine.generate(LICENSEE, **GREEDY)
    plain = client.completions.create(model="out", prompt=LICENSEE, max_tokens=12, temperature=0)
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert plain.usage.completion_tokens == want.completion_tokens
    chunks = list(client.completions.create(model="out", prompt=LICENSEE, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    messages = [{"role": "user", "content": "Who repairs the roof?"}]
    reply = engine.chat(messages, temperature=0, max_new_tokens=8)
    chat = client.chat.completions.create(model="out", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == reply.text
    pieces = client.chat.completions.create(model="out", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == reply.text
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="out", prompt="x", temperature=5)


def test_sixteen_clients_at_once_each_get_their_own_answer_and_the_server_stays_healthy(server, engine):
    prompts = [f"SECTION {i}. {LICENSEE}" for i in range(16)]

    async def clients():
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            replies = await asyncio.gather(*[http.post("/v1/completions", json={
                "model": "out", "prompt": p, "temperature": 0, "max_tokens": 24}) for p in prompts])
            return replies, (await http.get("/health")).json()
    replies, health = asyncio.run(clients())
    assert [r.json()["choices"][0]["text"] for r in replies] == \
        [engine.generate(p, temperature=0, max_new_tokens=24).text for p in prompts]
    assert health["status"] == "ok" and health["jobs"] == 0 and health["largest_batch"] > 1


def test_a_client_that_disconnects_stops_costing_compute(server):
    def health():
        return httpx.get(server + "/health").json()
    before = health()
    with httpx.Client(base_url=server, timeout=30) as http:
        body = {"prompt": "WHEREAS", "max_new_tokens": 5000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/generate", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
    for _ in range(500):
        after = health()
        if after["jobs"] == 0:
            break
        time.sleep(0.01)
    assert after["jobs"] == 0 and after["cancelled_rows"] == before["cancelled_rows"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 2500


def test_the_page_streams_a_completion_in_a_real_browser(server, engine, tmp_path):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        webdriver = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        for _ in range(200):
            try:
                if webdriver.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        options = {"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}"]}
        session = webdriver.post("/session", json={"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        at = f"/session/{session.json()['value']['sessionId']}"

        def element(css):
            found = webdriver.post(f"{at}/element", json={"using": "css selector", "value": css}).json()["value"]
            return f"{at}/element/{next(iter(found.values()))}"

        def page_text(id):
            return webdriver.post(f"{at}/execute/sync", json={
                "script": "return document.getElementById(arguments[0]).textContent", "args": [id]}).json()["value"]

        webdriver.post(f"{at}/url", json={"url": server + "/"})
        for field, value in (("#prompt", LICENSEE), ("#temperature", "0"), ("#max_tokens", "30")):
            webdriver.post(f"{element(field)}/clear", json={})
            webdriver.post(f"{element(field)}/value", json={"text": value})
        webdriver.post(f"{element('#generate')}/click", json={})
        for _ in range(600):
            if page_text("status").startswith(("done", "error")):
                break
            time.sleep(0.05)
        want = engine.generate(LICENSEE, temperature=0, max_new_tokens=30)
        assert page_text("status") == "done: " + ("max tokens reached" if want.finish_reason == "length"
                                                   else "the model ended it")
        assert (page_text("prompt_echo"), page_text("text")) == (LICENSEE, want.text)
        webdriver.delete(at)
    finally:
        driver.terminate()
        driver.wait(timeout=30)
