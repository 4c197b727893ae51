"""
An HTTP API over a trained run: OpenAI-compatible completions and chat, the native form
with every option of the generation API, embeddings, scores, fill-mask, and a page at /
to try it in a browser.

    python serve.py --out_dir=out-legal-small                  # http://127.0.0.1:8000/
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "out-legal-small", "prompt": "The Licensee shall", "max_tokens": 40}'

Endpoints (docs/serving.md has them all, with examples):

    POST /v1/completions        OpenAI's completions; "stream": true sends server-sent events
    POST /v1/chat/completions   OpenAI's chat, for runs whose tokenizer has the chat template
    GET  /v1/models             the one model served: the run directory's name
    POST /generate              every generation option (beams, penalties, choices, regex, ...)
    POST /embed  /score  /fill  vectors of texts / a text's log-likelihood / an encoder's fill-mask
    GET  /health  /model-info   the worker's state and counters / what the run is
    GET  /                      the page

One model worker, a thread, owns the model. Requests queue for it; those that arrive within
max_wait_ms of each other with the same options share a batch (up to max_batch_size rows),
and every batch in flight advances in turn, each request getting its own text back as it is
made. Under greedy decoding a row's output is the same in a batch as alone (engine.py). A
request whose client goes away leaves its batch at the next step; a full queue answers 503
at once.

Safe by default: it listens on 127.0.0.1 unless --host says otherwise; --api_key (or the
NANOLEX_API_KEY environment variable) makes every model endpoint ask for it as a bearer token;
bodies, prompts, max_tokens and n are limited, and each client address has a request rate.
Nothing a request sends is evaluated or used as a path.
"""

import asyncio
import difflib
import hashlib
import hmac
import html
import ipaddress
import json
import math
import os
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
from base64 import b64encode
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

# -----------------------------------------------------------------------------
out_dir = "out"
host = "127.0.0.1"          # the address to listen on; 0.0.0.0 is every interface (set api_key then)
port = 8000                 # 0: any free port (the URL printed says which)
api_key = ""                # the bearer token clients must send; "" = $NANOLEX_API_KEY, or none when that is unset
cors_origins = ""           # other sites whose pages may call the API, comma-separated ("*": any); "" = none
# batching
max_batch_size = 16         # rows (prompts x n) in one batch at most
max_wait_ms = 50.0          # how long a request waits for others to share its batch
max_queue = 64              # requests waiting or running at once; more are answered 503 at once
# limits on what one request may ask
max_body_bytes = 1_000_000  # the request body
max_prompt_tokens = 4096    # each prompt, or conversation (the model's context limits it too)
max_tokens_limit = 1024     # max_tokens / max_new_tokens
max_n = 16                  # choices per request: n x the number of prompts
rate_limit = 600            # requests per minute from one client address (bursts up to that many); 0 = no limit
# system
device = "auto"
dtype = "auto"
threads = 0                 # torch's CPU threads for the model; 0 = all cores but one, which the HTTP side needs
quantize = ""               # int8: int8 weights for decoding on the CPU
draft_out_dir = ""          # a smaller run with the same tokenizer that drafts tokens (speculative decoding)
# -----------------------------------------------------------------------------
from configurator import check_ranges, configure, fail  # noqa: E402
settings = configure(globals(), None if __name__ == "__main__" else [])  # imported (tests): the defaults

# after the settings: --help needs neither torch nor the web stack
import torch  # noqa: E402
try:  # the web stack, which requirements.txt installs
    from fastapi import Depends, FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as e:
    fail(f"serve.py needs the {e.name} package: pip install -r requirements.txt")

from engine import DEFAULTS, Engine, check_options  # noqa: E402

check_ranges(globals(), {"port": "[0, 65535]", "max_batch_size": ">= 1", "max_wait_ms": ">= 0", "max_queue": ">= 1",
                         "max_body_bytes": ">= 1", "max_prompt_tokens": ">= 1", "max_tokens_limit": ">= 1",
                         "max_n": ">= 1", "rate_limit": ">= 0",
                         "threads": ">= 0"})


# ----------------------------------------------------------------------------------
# the model worker

class Job:
    """One request's work for the model worker: prompts (token-id lists) to continue with the same
    options, or call, a function of the engine. options are as the request gave them (beam search
    refuses a sampling option that is given, even at its default); checked has the defaults filled in.
    Its events go back to the request's event loop: ("piece", k, text) and ("finish", k, details)
    for each prompt k, then ("end",); or ("result", value); or ("error", status, message)."""

    def __init__(self, prompts=(), options=None, condition=None, use_cache=True, call=None):
        self.prompts, self.options, self.condition, self.use_cache = list(prompts), options, condition, use_cache
        self.checked = None if options is None else check_options(options)
        self.call = call
        self.loop, self.events, self.outbox = asyncio.get_running_loop(), asyncio.Queue(), []
        self.arrived, self.cancelled, self.open = time.monotonic(), False, len(self.prompts)

    def deliver(self):
        """Hand the events in the outbox to the request's event loop, all in one call."""
        events, self.outbox = self.outbox, []
        self.loop.call_soon_threadsafe(lambda: [self.events.put_nowait(event) for event in events])

    def batch_key(self, arch):
        """Jobs with equal keys can share a batch. A seeded sampling job goes alone, since row i of a
        batch samples with seed + i; so does an LSTM without its cache, which needs prompts of one length."""
        o = self.checked
        if (o["seed"] is not None and o["temperature"] > 0) or (arch == "lstm" and not self.use_cache):
            return id(self)
        return json.dumps([self.condition, self.use_cache, o], sort_keys=True)


class Batch:
    """Jobs sharing one batch of engine.steps(): each job's prompts are consecutive rows. rows are
    the engine's Row objects: finish_reason, generated and prompt tell how a row stands."""

    def __init__(self, engine, jobs):
        self.jobs = jobs
        self.owner = [(job, k) for job in jobs for k in range(len(job.prompts))]  # row -> (job, its prompt k)
        first = jobs[0]
        self.rows, self.steps = engine.steps([p for job in jobs for p in job.prompts], first.condition,
                                             first.use_cache, **first.options)
        self.reported = [False] * len(self.rows)  # the row's end is told (or it was cancelled)


SERVER_FAILED = "the server failed on this request (its log says why)"


class Worker:
    """The thread that owns the model. Generation jobs wait until the oldest has waited max_wait_ms
    or they fill a batch, then start as batches of equal options; every running batch advances
    one piece of text at a time, in turn, so a long request does not hold up a new one. Other
    jobs (embed, score, fill, beam search) run whole when they arrive, between two steps."""

    def __init__(self, engine, max_batch_size, max_wait_ms, max_queue):
        self.engine, self.max_batch_size, self.max_queue = engine, max_batch_size, max_queue
        self.max_wait = max_wait_ms / 1000
        self.inbox, self.lock, self.jobs = queue.SimpleQueue(), threading.Lock(), 0
        self.pending, self.batches, self.sent = [], [], set()  # sent: jobs with events to deliver
        self.counts = dict(batches=0, largest_batch=0, generated_tokens=0, cancelled_rows=0)
        self.thread = threading.Thread(target=self.run, name="model-worker", daemon=True)
        self.thread.start()

    def submit(self, job):
        """Queue job; False when max_queue jobs are already waiting or running."""
        with self.lock:
            if self.jobs >= self.max_queue:
                return False
            self.jobs += 1
        self.inbox.put(job)
        return True

    def stop(self):
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def state(self):
        return dict(alive=self.thread.is_alive(), jobs=self.jobs, running_rows=sum(len(b.rows) for b in self.batches),
                    **self.counts)

    @torch.no_grad()
    def run(self):
        # one autocast region for the thread's life: leaving it drops autocast's cache of the weights
        # cast to bf16, and casting them again at every step made bf16 decoding 4x slower
        with self.engine.autocast():
            while True:
                for job in self.arrivals():
                    if job is None:
                        return self.close()
                    self.take(job)
                if self.pending and (sum(len(j.prompts) for j in self.pending) >= self.max_batch_size
                                     or time.monotonic() - self.pending[0].arrived >= self.max_wait):
                    self.start_batches()
                for batch in list(self.batches):
                    self.advance(batch)
                self.deliver()

    def send(self, job, *event):
        job.outbox.append(event)
        self.sent.add(job)

    def deliver(self):
        """Events go to the requests once a round, not a piece at a time: each handing over wakes
        the event loop's thread, which then competes with this one for the GIL."""
        for job in self.sent:
            job.deliver()
        self.sent.clear()

    def arrivals(self):
        """The jobs queued since the last look. With nothing running it waits: for the first job, or
        until the oldest pending one has waited max_wait_ms."""
        if self.batches:
            wait = 0
        elif self.pending:
            wait = max(0.0, self.pending[0].arrived + self.max_wait - time.monotonic())
        else:
            wait = None
        jobs = []
        try:
            jobs.append(self.inbox.get(timeout=wait))
            while True:
                jobs.append(self.inbox.get_nowait())
        except queue.Empty:
            return jobs

    def take(self, job):
        """A new job: generation waits for its batch; the rest runs now."""
        if job.call is None and job.checked["num_beams"] == 1:
            self.pending.append(job)
            return
        try:
            if job.call is not None:
                self.send(job, "result", job.call(self.engine))
            else:  # beam search knows its text only at the end
                done = self.engine.generate(job.prompts, job.condition, job.use_cache, **job.options)
                for k, completion in enumerate(done):
                    self.send(job, "piece", k, completion.text)
                    self.send(job, "finish", k, details(completion.finish_reason, completion.prompt_tokens,
                                                        completion.completion_tokens))
                    self.counts["generated_tokens"] += completion.completion_tokens
                self.send(job, "end")
            self.release(job)
        except Exception as e:
            self.fail([job], e)

    def start_batches(self):
        """The pending jobs, grouped by batch_key, start as batches of up to max_batch_size rows."""
        groups = {}
        for job in self.pending:
            if job.cancelled:  # its client left while it waited
                self.release(job)
            else:
                groups.setdefault(job.batch_key(self.engine.model.config.arch), []).append(job)
        self.pending = []
        for jobs in groups.values():
            while jobs:
                n, size = 1, len(jobs[0].prompts)
                while n < len(jobs) and size + len(jobs[n].prompts) <= self.max_batch_size:
                    size += len(jobs[n].prompts)
                    n += 1
                taken, jobs = jobs[:n], jobs[n:]
                try:
                    self.batches.append(Batch(self.engine, taken))
                except Exception as e:
                    self.fail(taken, e)
                    continue
                self.counts["batches"] += 1
                self.counts["largest_batch"] = max(self.counts["largest_batch"], size)

    def advance(self, batch):
        """Run batch for a step's worth of text (a piece per row still going: a step of the model
        makes at most one each), and tell each job the end of its rows that ended."""
        self.drop_cancelled(batch)
        if all(batch.reported):
            batch.steps.close()
            self.batches.remove(batch)
            return
        try:
            for _ in range(batch.reported.count(False)):
                r, piece = next(batch.steps)
                job, k = batch.owner[r]
                if piece and not job.cancelled:
                    self.send(job, "piece", k, piece)
        except StopIteration:  # every row has ended
            self.batches.remove(batch)
        except Exception as e:
            self.fail([job for job in batch.jobs if job.open], e)
            self.batches.remove(batch)
            return
        for r, row in enumerate(batch.rows):
            if row.finish_reason is not None and not batch.reported[r]:
                batch.reported[r] = True
                job, k = batch.owner[r]
                self.counts["generated_tokens"] += row.generated
                self.send(job, "finish", k, details(row.finish_reason, len(row.prompt), row.generated, row.scores,
                                                    row.accepted / row.drafted if row.drafted else None))
                job.open -= 1
                if job.open == 0:
                    self.send(job, "end")
                    self.release(job)

    def drop_cancelled(self, batch):
        """The rows of jobs whose clients left end now (Row.cancel: the engine drops them at its next step)."""
        for r, (job, _) in enumerate(batch.owner):
            if job.cancelled and not batch.reported[r]:
                batch.rows[r].cancel()
                batch.reported[r] = True
                self.counts["cancelled_rows"] += 1
                self.counts["generated_tokens"] += batch.rows[r].generated
                job.open -= 1
                if job.open == 0:
                    self.release(job)

    def fail(self, jobs, error, status=400):
        """jobs end with error: a ValueError says what the request asked that this run cannot do (400);
        another exception is a bug (500; its traceback goes to the log); a string, a message of status."""
        if isinstance(error, Exception) and not isinstance(error, ValueError):
            traceback.print_exc()
            error, status = SERVER_FAILED, 500
        for job in jobs:
            self.send(job, "error", status, str(error))
            job.open = 0
            self.release(job)

    def release(self, job):
        """job no longer takes a place in the queue."""
        with self.lock:
            self.jobs -= 1

    def close(self):
        """Stopping: whatever is still queued or running ends with an error."""
        self.fail([job for batch in self.batches for job in batch.jobs if job.open] + self.pending,
                  "the server is shutting down", 503)
        self.batches, self.pending = [], []
        self.deliver()


def details(finish_reason, prompt_tokens, completion_tokens, choice_scores=None, draft_acceptance=None):
    """What a finished prompt reports besides its text (choices=: each one's log-likelihood; speculative
    decoding: the share of the draft's tokens kept)."""
    found = dict(finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 choice_scores=choice_scores, draft_acceptance=draft_acceptance)
    return {k: v for k, v in found.items() if v is not None}


# ----------------------------------------------------------------------------------
# requests, and what is wrong with them

class APIError(Exception):
    """A request the server does not serve: the HTTP status, a message, and the field to blame (param)."""

    def __init__(self, status, message, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 499: "client_closed_request",
         500: "server_error", 503: "overloaded_error"}


def error_body(status, message, param=None):
    """OpenAI's error object, which its clients read and raise."""
    kind = KINDS.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Strict(BaseModel):
    """A request body: exact JSON types (no "1" for 1), no NaN or infinity, and no field it does not know."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Seed = Optional[int]
SEED_RANGE = dict(ge=0, le=2**62)  # torch seeds are 64-bit, and row i of a batch samples with seed + i


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the token counts


class OpenAIRequest(Strict):
    """What OpenAI's completions and chat share (its presence and frequency penalties go down to -2;
    the engine's only discourage, from 0)."""
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Seed = Field(None, **SEED_RANGE)
    presence_penalty: float = Field(0.0, ge=0, le=2)
    frequency_penalty: float = Field(0.0, ge=0, le=2)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    condition: Optional[str] = None  # nanolex's own: a conditional run's label
    user: Optional[str] = None       # OpenAI's id of the end user: taken, not used


class CompletionRequest(OpenAIRequest):
    prompt: Union[str, list[str]] = ""  # "" begins a new document
    max_tokens: int = Field(16, ge=0)
    echo: bool = False


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(OpenAIRequest):
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=0)  # None: the server's max_tokens_limit
    max_completion_tokens: Optional[int] = Field(None, ge=0)  # OpenAI's newer name for max_tokens


class GenerateRequest(Strict):
    """The native form: the prompts and every option of the generation API, by engine.DEFAULTS' names
    (engine.check_options checks their values)."""
    prompt: Union[str, list[str]]
    condition: Optional[str] = None
    use_cache: bool = True
    stream: bool = False
    max_new_tokens: int = DEFAULTS["max_new_tokens"]  # at most the server's max_tokens_limit
    temperature: float = DEFAULTS["temperature"]
    top_k: int = DEFAULTS["top_k"]
    top_p: float = DEFAULTS["top_p"]
    min_p: float = DEFAULTS["min_p"]
    repetition_penalty: float = DEFAULTS["repetition_penalty"]
    frequency_penalty: float = DEFAULTS["frequency_penalty"]
    presence_penalty: float = DEFAULTS["presence_penalty"]
    stop: Union[str, list[str]] = []
    ignore_eos: bool = DEFAULTS["ignore_eos"]
    seed: Seed = Field(DEFAULTS["seed"], **SEED_RANGE)
    num_beams: int = Field(DEFAULTS["num_beams"], le=16)
    length_penalty: float = DEFAULTS["length_penalty"]
    no_repeat_ngram_size: int = DEFAULTS["no_repeat_ngram_size"]
    choices: Optional[list[str]] = Field(DEFAULTS["choices"], max_length=64)
    regex: Optional[str] = Field(DEFAULTS["regex"], max_length=256)
    draft_tokens: int = Field(DEFAULTS["draft_tokens"], le=16)


class EmbedRequest(Strict):
    texts: list[str] = Field(min_length=1)


class ScoreRequest(Strict):
    text: str = Field(min_length=1)


class FillRequest(Strict):
    text: str
    top_k: int = Field(5, ge=1, le=100)


FIELDS = {name for model in (CompletionRequest, ChatRequest, Message, StreamOptions, GenerateRequest, EmbedRequest,
                             ScoreRequest, FillRequest) for name in model.model_fields}


def parse(model, body):
    """The request model of a JSON body, or an APIError that names the first wrong field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
    error = errors[0]
    param = ".".join(str(p) for p in error["loc"] if isinstance(p, int) or p in FIELDS) or None
    got = json.dumps(error["input"], default=str)
    got = got[:60] + ("..." if len(got) > 60 else "")
    if error["type"] == "json_invalid":
        raise APIError(400, f"the body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})")
    if error["type"] == "model_type" and not error["loc"]:
        raise APIError(400, "the body must be a JSON object")
    if error["type"] == "extra_forbidden":
        field = str(error["loc"][-1])
        close = difflib.get_close_matches(field, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise APIError(400, f"{field!r} is not a field of this request{hint}", ".".join(map(str, error["loc"])))
    if error["type"] == "missing":
        raise APIError(400, f"{param} is required", param)
    # a value that is none of a union's types fails once per type, each named in its loc after the field
    field, *rest = error["loc"]
    types = [err["loc"][1] for err in errors if err["loc"][0] == field and len(err["loc"]) > 1
             and isinstance(err["loc"][1], str) and err["loc"][1] not in FIELDS]
    if rest and types and rest[0] == types[0]:
        raise APIError(400, f"{field} must be {' or '.join(dict.fromkeys(types))}, got {got}", field)
    raise APIError(400, f"{param}: {error['msg']}, got {got}", param)


def param_of(message):
    """The field an engine error is about: the name it begins with (engine's messages do)."""
    first = message.replace("=", " ").replace(":", " ").replace("[", " ").split(" ")[0]
    return first if first in FIELDS else None


def loopback(name):
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost"


class RateLimit:
    """A token bucket per client address: per_minute requests a minute, in bursts of up to per_minute."""

    def __init__(self, per_minute):
        self.capacity, self.rate, self.buckets = per_minute, per_minute / 60, {}

    def wait(self, client):
        """0 when client may go on now (and it is counted), else the seconds until it may."""
        now = time.monotonic()
        tokens, then = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1, now)
        if len(self.buckets) > 10_000:  # forget the clients whose buckets are full again
            self.buckets = {c: (t, at) for c, (t, at) in self.buckets.items()
                            if t + (now - at) * self.rate < self.capacity}
        return 0


class BodyLimit:
    """ASGI middleware: reads a request's whole body before the app does, and answers 413 to one of
    more than max_bytes (by its Content-Length, or as it arrives) without reading the rest."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = JSONResponse(error_body(413, f"the body is more than this server's limit of {self.max_bytes} bytes"
                                          " (max_body_bytes)"), 413)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():  # the body in one message, then what the client sends next (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}
        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------
# the app

def create_app(engine, name, **overrides):
    """The app that serves engine as the model called name. overrides: serve.py's settings for this
    app (tests, notebooks), by default the module's. Its model worker starts now and stops when the
    app shuts down."""
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"not settings of serve.py: {', '.join(sorted(unknown))}")
    s = {**settings, **overrides}
    key = s["api_key"] or os.environ.get("NANOLEX_API_KEY", "")
    arch = engine.model.config.arch
    worker = Worker(engine, s["max_batch_size"], s["max_wait_ms"], s["max_queue"])
    limiter = RateLimit(s["rate_limit"]) if s["rate_limit"] else None

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="nanolex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(BodyLimit, max_bytes=s["max_body_bytes"])
    origins = [o.strip() for o in s["cors_origins"].split(",") if o.strip()]
    if origins:  # a bearer token, never cookies: no credentials, so "*" cannot hand them to any site
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(error_body(e.status, e.message, e.param), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # Starlette's: a path that is not an endpoint, a method it does not take
        message = {404: f"there is no endpoint {request.url.path}",
                   405: f"{request.url.path} does not take {request.method}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, message), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug: the traceback goes to the log, the client gets JSON
        return JSONResponse(error_body(500, SERVER_FAILED), 500)

    def guard(request: Request):
        """The per-client rate, then the API key (compared in constant time)."""
        client = request.client.host if request.client else ""
        wait = math.ceil(limiter.wait(client)) if limiter else 0
        if wait:
            raise APIError(429, f"too many requests from {client}: this server takes {s['rate_limit']} a minute "
                                f"(rate_limit); retry in {wait} s", headers={"Retry-After": str(wait)})
        if key:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if not given:
                raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                raise APIError(401, "the API key is wrong", headers={"WWW-Authenticate": "Bearer"})

    api = [Depends(guard)]

    # -- what handlers share: checks, the job, its answer whole or streamed

    def check_model(model):
        if model != name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {name!r}", "model")

    def check_count(count, field):
        if count > s["max_n"]:
            raise APIError(400, f"{field}: {count} choices (n x prompts), more than this server's max_n={s['max_n']}",
                           field)

    def check_condition(condition):
        if condition is not None and arch != "conditional":
            raise APIError(400, f"condition is for conditional runs; this run is a {arch!r} run", "condition")

    def prompt_ids(prompt, field):
        """A prompt's token ids (a text, or chat_prompt's ids), within the context and max_prompt_tokens."""
        try:
            ids = engine.prompt_ids(prompt)
        except ValueError as e:
            raise APIError(400, f"{field}: {e}", field)
        if len(ids) > s["max_prompt_tokens"]:
            raise APIError(400, f"{field}: the prompt is {len(ids)} tokens, more than this server's "
                                f"max_prompt_tokens={s['max_prompt_tokens']}", field)
        return ids

    def prompt_list(prompt, n, field):
        """A request's prompt, a text or a list of them: (the texts, their ids). With n choices of each
        there are at most max_n choices in all (field: the one to blame)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts:
            raise APIError(400, "prompt: an empty list; give at least one prompt", "prompt")
        check_count(n * len(prompts), field)
        return prompts, [prompt_ids(p, "prompt") for p in prompts]

    def checked(options, tokens_field):
        """The generation options, checked by the engine, within max_tokens_limit."""
        try:
            options = check_options(options)
        except ValueError as e:
            field = param_of(str(e))
            raise APIError(400, str(e).replace("max_new_tokens", tokens_field),
                           tokens_field if field == "max_new_tokens" else field)
        if options["max_new_tokens"] > s["max_tokens_limit"]:
            raise APIError(400, f"{tokens_field}={options['max_new_tokens']} is more than this server's "
                                f"max_tokens_limit={s['max_tokens_limit']}", tokens_field)
        if len(options["stop"]) > 16:
            raise APIError(400, "stop: at most 16 strings", "stop")
        return options

    def openai_options(req, max_tokens, tokens_field):
        check_condition(req.condition)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options: only with stream: true", "stream_options")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        return checked(dict(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stop,
                            seed=req.seed, presence_penalty=req.presence_penalty,
                            frequency_penalty=req.frequency_penalty), tokens_field)

    def start(request, job):
        """Queue job (503 when the queue is full); returns the task that cancels it if the client leaves."""
        if not worker.submit(job):
            raise APIError(503, f"the server is busy: {s['max_queue']} requests are waiting or running "
                                "(max_queue); retry shortly", headers={"Retry-After": "1"})

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled = True
            job.events.put_nowait(("gone",))
        return asyncio.ensure_future(watch())

    def raise_for(event):
        if event[0] == "error":
            raise APIError(event[1], event[2], param_of(event[2]))
        if event[0] == "gone":
            raise APIError(499, "the client closed the request")

    async def collect(request, job):
        """Run job to its end: its result, or each prompt's text and details."""
        watcher = start(request, job)
        texts, finished = [""] * len(job.prompts), [None] * len(job.prompts)
        try:
            while True:
                event = await job.events.get()
                raise_for(event)
                if event[0] == "result":
                    return event[1]
                if event[0] == "end":
                    return texts, finished
                if event[0] == "piece":
                    texts[event[1]] += event[2]
                else:
                    finished[event[1]] = event[2]
        finally:
            watcher.cancel()
            job.cancelled = True  # nothing, when it has ended

    async def stream(request, job, chunks, opening=()):
        """Server-sent events: the opening chunks, then chunks(event, finished) of each of job's events
        (finished: each prompt's details, once it has finished), then [DONE]. An error before the first
        event is a plain JSON error; after it, an error chunk."""
        watcher = start(request, job)
        try:
            first = await job.events.get()
            raise_for(first)
        except BaseException:
            job.cancelled = True
            raise
        finally:
            watcher.cancel()

        async def events():
            event, finished = first, [None] * len(job.prompts)
            try:
                for chunk in opening:
                    yield f"data: {json.dumps(chunk)}\n\n"
                while event[0] != "gone":
                    if event[0] == "error":
                        yield f"data: {json.dumps(error_body(event[1], event[2], param_of(event[2])))}\n\n"
                        break
                    if event[0] == "finish":
                        finished[event[1]] = event[2]
                    for chunk in chunks(event, finished):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if event[0] == "end":
                        break
                    event = await job.events.get()
                yield "data: [DONE]\n\n"
            finally:  # the client left (Starlette cancels this), or it is over
                job.cancelled = True
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(ids, finished):
        prompt = sum(map(len, ids))
        completion = sum(f["completion_tokens"] for f in finished)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def header(kind):
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{secrets.token_hex(12)}", "object": kind,
                "created": int(time.time()), "model": name}

    def openai_stream(request, job, ids, req, head, choice, opening):
        """A completions or chat stream: choice(k, text, finish_reason) makes the chunk of one event;
        with stream_options.include_usage, every chunk has "usage": null but the last, which has only it."""
        with_usage = req.stream_options is not None and req.stream_options.include_usage

        def chunks(event, finished):
            if event[0] == "end":
                return [{**head, "choices": [], "usage": usage(ids, finished)}] if with_usage else []
            text, reason = (event[2], None) if event[0] == "piece" else ("", event[2]["finish_reason"])
            return [{**choice(event[1], text, reason), **({"usage": None} if with_usage else {})}]
        return stream(request, job, chunks, opening)

    # -- OpenAI's endpoints

    @app.post("/v1/completions", dependencies=api)
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        check_model(req.model)
        options = openai_options(req, req.max_tokens, "max_tokens")
        prompts, ids = prompt_list(req.prompt, req.n, "n")
        job = Job([i for i in ids for _ in range(req.n)], options, req.condition)
        echoed = [prompts[k // req.n] if req.echo else "" for k in range(len(job.prompts))]
        head = header("text_completion")

        def choice(k, text, finish_reason=None):
            return {**head, "choices": [{"index": k, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
        if req.stream:
            return await openai_stream(request, job, ids, req, head, choice,
                                       [choice(k, text) for k, text in enumerate(echoed) if text])
        texts, finished = await collect(request, job)
        return {**head, "usage": usage(ids, finished),
                "choices": [choice(k, echoed[k] + text, finished[k]["finish_reason"])["choices"][0]
                            for k, text in enumerate(texts)]}

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await request.body())
        check_model(req.model)
        check_count(req.n, "n")
        given = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(req, given)
        options = openai_options(req, s["max_tokens_limit"] if max_tokens is None else max_tokens, given)
        try:
            conversation = engine.chat_prompt([m.model_dump() for m in req.messages])
        except ValueError as e:  # among them: a run without the chat template
            raise APIError(400, str(e), "messages")
        ids = prompt_ids(conversation, "messages")
        job = Job([ids] * req.n, options, req.condition)
        if req.stream:
            head = header("chat.completion.chunk")

            def choice(k, text, finish_reason=None, delta=None):
                return {**head, "choices": [{"index": k, "delta": delta or ({"content": text} if text else {}),
                                             "logprobs": None, "finish_reason": finish_reason}]}
            opening = [choice(k, "", delta={"role": "assistant", "content": ""}) for k in range(req.n)]
            return await openai_stream(request, job, [ids], req, head, choice, opening)
        texts, finished = await collect(request, job)
        return {**header("chat.completion"), "usage": usage([ids], finished),
                "choices": [{"index": k, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finished[k]["finish_reason"]} for k, text in enumerate(texts)]}

    @app.get("/v1/models", dependencies=api)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "nanolex"}]}

    # -- the native endpoints

    @app.post("/generate", dependencies=api)
    async def generate(request: Request):
        req = parse(GenerateRequest, await request.body())
        check_condition(req.condition)
        options = req.model_dump(include=set(DEFAULTS) & req.model_fields_set)  # the engine's defaults for the rest
        options.setdefault("max_new_tokens", min(DEFAULTS["max_new_tokens"], s["max_tokens_limit"]))
        if checked(options, "max_new_tokens")["num_beams"] > 1 and req.stream:
            raise APIError(400, "beam search (num_beams > 1) knows its text only at the end: it does not stream",
                           "stream")
        _, ids = prompt_list(req.prompt, 1, "prompt")
        job = Job(ids, options, req.condition, req.use_cache)
        if req.stream:
            return await stream(request, job, lambda event, finished: [
                {"index": event[1], "text": event[2]} if event[0] == "piece" else {"index": event[1], **event[2]}
            ] if event[0] != "end" else [])
        texts, finished = await collect(request, job)
        return {"completions": [{"text": text, **f} for text, f in zip(texts, finished)],
                "usage": usage(ids, finished)}

    @app.post("/embed", dependencies=api)
    async def embed(request: Request):
        """Each text's vector: the mean of the model's final hidden states (sample.py's retrieval)."""
        req = parse(EmbedRequest, await request.body())
        vectors = await collect(request, Job(call=lambda e: e.embed(req.texts).float().cpu().tolist()))
        return {"embeddings": vectors, "dim": len(vectors[0])}

    @app.post("/score", dependencies=api)
    async def score(request: Request):
        """How likely the model finds a text: its log-likelihood (nats), tokens and bits per byte."""
        req = parse(ScoreRequest, await request.body())
        return await collect(request, Job(call=lambda e: e.score(req.text)))

    @app.post("/fill", dependencies=api)
    async def fill(request: Request):
        """An encoder's fill-mask: the likeliest fillers of each <|mask|> in the text."""
        req = parse(FillRequest, await request.body())
        if arch != "encoder":
            raise APIError(400, f"fill-mask needs an encoder run; this run is a {arch!r} run", "text")
        ids = prompt_ids(req.text, "text")
        if engine.tokenizer.mask_id not in ids:
            raise APIError(400, "text: put <|mask|> where a word is missing", "text")
        return await collect(request, Job(call=lambda e: e.fill(ids, req.top_k)))

    @app.get("/health")
    async def health():
        state = worker.state()
        return JSONResponse({"status": "ok" if state["alive"] else "down", **state}, 200 if state["alive"] else 503)

    @app.get("/model-info", dependencies=api)
    async def model_info():
        return describe(engine, name)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(render_page(engine, name, s), headers={"Content-Security-Policy": PAGE_POLICY})

    return app


def describe(engine, name):
    """What the run is, for /model-info and the page."""
    from runtime import Int8Linear
    model, config, tok = engine.model, engine.model.config, engine.tokenizer
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    tied_head = config.tie_embeddings and isinstance(getattr(model, "lm_head", None), Int8Linear)  # its own int8 copy
    parameters = model.num_params() + sum(m.qweight.numel() + (0 if m.bias is None else m.bias.numel())
                                          for m in int8 if not (tied_head and m is model.lm_head))
    return {"model": name, "architecture": config.arch, "parameters": parameters, "vocab_size": tok.vocab_size,
            "context": config.block_size, "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "tokenizer": tok.kind, "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
            "quantization": "int8" if int8 else None, "chat": engine.has_chat, "labels": engine.labels,
            "draft": describe(engine.draft, "draft") if engine.draft is not None else None}


# ----------------------------------------------------------------------------------
# the page: a prompt, temperature and length, and the text as it streams in. Model text goes
# in with textContent, never as HTML; the policy lets nothing run but this script.

PAGE_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: 0; } #about { color: #666; margin-top: 0.2rem; }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: 0.5rem; }
.controls { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: 0.6rem 0; }
input { width: 6rem; font: inherit; } #api_key { width: 12rem; }
button { font: inherit; padding: 0.3rem 1.2rem; }
#output { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f2; border: 1px solid #ddd;
          padding: 0.8rem; min-height: 8rem; }
#prompt_echo { color: #777; } #status { color: #666; }
"""

PAGE_SCRIPT = """
const $ = (id) => document.getElementById(id);
let controller = null;
$("generate").addEventListener("click", async () => {
  controller = new AbortController();
  $("prompt_echo").textContent = $("prompt").value;
  $("text").textContent = "";
  $("status").textContent = "writing...";
  $("generate").disabled = true;
  $("stop").disabled = false;
  const headers = {"Content-Type": "application/json"};
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
  let finish = "";
  try {
    const response = await fetch("v1/completions", {method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({model: document.body.dataset.model, prompt: $("prompt").value, stream: true,
                            temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value)})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\\n\\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.slice("data: ".length);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        $("text").textContent += chunk.choices[0].text;
        finish = chunk.choices[0].finish_reason || finish;
      }
    }
    $("status").textContent = "done: " + (finish === "length" ? "max tokens reached" : "the model ended it");
  } catch (error) {
    $("status").textContent = error.name === "AbortError" ? "stopped" : "error: " + error.message;
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
});
$("stop").addEventListener("click", () => controller.abort());
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nanolex: $name</title>
<style>$style</style>
</head>
<body data-model="$name">
<h1>nanolex: $name</h1>
<p id="about">$about</p>
<textarea id="prompt" rows="5" aria-label="prompt">The Licensee shall</textarea>
<div class="controls">
<label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
<label>max tokens <input id="max_tokens" type="number" min="1" max="$limit" value="100"></label>
<label $key_hidden>API key <input id="api_key" type="password" autocomplete="off"></label>
<button id="generate">Write</button>
<button id="stop" disabled>Stop</button>
</div>
<div id="output"><span id="prompt_echo"></span><span id="text"></span></div>
<p id="status"></p>
<script>$script</script>
</body>
</html>
"""


def csp_hash(source):
    return "'sha256-" + b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE_POLICY = (f"default-src 'none'; script-src {csp_hash(PAGE_SCRIPT)}; style-src {csp_hash(PAGE_STYLE)}; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render_page(engine, name, s):
    info = describe(engine, name)
    about = (f"{info['architecture']}, {info['parameters'] / 1e6:.2f}M parameters, a context of {info['context']} "
             f"tokens, {info['tokenizer']} tokenizer, on {info['device']}")
    values = {"name": html.escape(name), "about": html.escape(about), "limit": str(s["max_tokens_limit"]),
              "key_hidden": "" if (s["api_key"] or os.environ.get("NANOLEX_API_KEY")) else "hidden",
              "style": PAGE_STYLE, "script": PAGE_SCRIPT}
    page = PAGE
    for field, value in values.items():
        page = page.replace(f"${field}", value)
    return page


# ----------------------------------------------------------------------------------
# the command line: listen first (a taken port fails at once), then load the run, then serve

if __name__ == "__main__":
    try:
        import uvicorn
    except ImportError:
        fail("serve.py needs the uvicorn package: pip install -r requirements.txt")
    try:
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    if not (api_key or os.environ.get("NANOLEX_API_KEY")) and not loopback(host):
        print(f"warning: listening on {host} with no api_key: anyone who reaches this machine can use the model",
              file=sys.stderr)
    # the model's threads spin between operations; on every core they starve the event loop that talks HTTP
    torch.set_num_threads(threads or max(1, torch.get_num_threads() - 1))
    t0 = time.perf_counter()
    try:
        engine = Engine.load(out_dir, device, dtype, quantize, draft_out_dir)
    except ValueError as e:
        fail(str(e))
    loaded = time.perf_counter() - t0
    name = os.path.basename(os.path.normpath(out_dir))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), log_level="warning",
                                           timeout_graceful_shutdown=10))  # streams still open at Ctrl-C get 10 s

    async def serve():
        task = asyncio.ensure_future(server.serve(sockets=[listener]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            url_host = f"[{host}]" if ":" in host else host
            print(f"serving {name} ({engine.model.config.arch}) at http://{url_host}:{listener.getsockname()[1]}/ "
                  f"(loaded in {loaded:.1f} s)", flush=True)
        await task
    asyncio.run(serve())
