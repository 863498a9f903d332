"""`qlite serve`: an OpenAI-compatible HTTP server that decodes concurrent requests together.

Two halves meet at `Engine.submit`:
- the HTTP side (Starlette on uvicorn's event loop) checks a request, turns it into token ids
  and a `Job`, and streams the job's events back (server-sent events, or one JSON body);
- the engine (one thread, the only one touching the model) loops: admit waiting jobs into free
  cache rows (the lowest first) -> prefill each newcomer -> one decode step for the rows up to
  the last busy one -> sample each row with its own parameters and seed -> hand the text to
  its job's asyncio queue -> free the rows of finished or abandoned jobs at once (continuous
  batching).

The web stack is imported here only; the rest of qlite does not need it.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from qlite.errors import QliteError
from qlite.generate import SamplingParams, TextStream
from qlite.sampling import History, device_generator, sample as sample_rows

MAX_QUEUE = 64  # requests waiting for a row beyond those in the batch; more get a 503


# ---------------------------------------------------------------------------------------------
# The engine


class ServerBusy(Exception):
    """The waiting queue is full."""


class Job:
    """One request inside the engine. Its events, in order, on `events` (an asyncio.Queue of
    the loop that submitted it): ("text", piece)..., then ("done", finish_reason,
    prompt_tokens, completion_tokens) or ("error", message)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        self.prompt_ids = prompt_ids
        self.params = params  # max_new_tokens is the request's budget
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the HTTP side when the client goes away
        self.done = False
        # engine side
        self.row = -1
        self.pos = 0           # cache slots filled in its row
        self.next_token = 0    # sampled, not yet fed
        self.generated: list[int] = []
        self.text: TextStream | None = None
        self.generator = None

    def _send(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class EngineStats:
    requests: int = 0        # admitted into a row
    finished: int = 0        # ran to a stop, a stop string or max_tokens
    cancelled: int = 0       # freed because the client went away
    failed: int = 0          # ended by an error in the model
    rejected: int = 0        # answered 503 (queue full)
    prompt_tokens: int = 0   # prefilled
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0     # sum over decode steps of the rows each carried
    max_rows: int = 0        # most rows one decode step carried
    decode_seconds: float = 0.0  # in decode steps and their sampling


class Engine:
    """Owns the model: one thread runs the scheduler loop (see the module docstring)."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = MAX_QUEUE):
        if model.tokenizer is None:
            raise QliteError(f"{model.model_dir}: no tokenizer.json, cannot serve text")
        if max_batch < 1:
            raise QliteError(f"max_batch {max_batch}: need at least 1 row")
        if max_queue < 0:
            raise QliteError(f"max_queue {max_queue}: must be 0 or more")
        self.model = model
        self.tokenizer = model.tokenizer
        self.stop_ids = set(self.tokenizer.stop_ids)
        self.context = model.max_context
        self.device = model.model.norm.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        model.setup_cache(max_batch, self.context)
        self.history = History(max_batch, model.config.vocab_size, self.device)
        self.active: list[Job | None] = [None] * max_batch
        self.waiting: deque[Job] = deque()
        self.pending = 0  # submitted and not yet ended (waiting + active)
        self.cond = threading.Condition()
        self.step_lock = threading.Lock()  # held for each round of prefills and decode step
        self.stats = EngineStats()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="qlite-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.cond:
            self._stop = True
            self.cond.notify()
        self.thread.join()

    def submit(self, job: Job):
        """Queue a job (raises ServerBusy when max_batch + max_queue are already in)."""
        with self.cond:
            if self.pending >= self.max_batch + self.max_queue:
                self.stats.rejected += 1
                raise ServerBusy
            self.pending += 1
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job):
        """The client went away: a waiting job leaves the queue now, an active one frees its
        row before the next decode step."""
        job.cancelled = True
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self.pending -= 1
                job.done = True
            self.cond.notify()

    # -- the engine thread ------------------------------------------------------------------

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self._stop or self.waiting or any(self.active)):
                        self.cond.wait()
                    if self._stop:
                        break
                    newcomers = []
                    for row, job in enumerate(self.active):
                        if job is None and self.waiting:
                            job = self.waiting.popleft()
                            job.row, self.active[row] = row, job
                            newcomers.append(job)
                with self.step_lock:
                    for job in newcomers:
                        self._prefill(job)
                    self._decode()
        for job in [*self.active, *self.waiting]:
            if job is not None:
                job._send("error", "the server is shutting down")

    def _prefill(self, job: Job):
        if job.cancelled:
            return self._retire(job, "cancelled")
        self.stats.requests += 1
        self.stats.prompt_tokens += len(job.prompt_ids)
        job.generator = device_generator(job.params.seed, self.device)
        job.text = TextStream(self.tokenizer, job.params.stop)
        ids = torch.tensor(job.prompt_ids, device=self.device)
        self.history.reset(job.row, ids)
        t0 = time.perf_counter()
        try:
            logits = self.model.prefill_row(job.row, ids, start=0)
        except Exception as e:  # noqa: BLE001 - the job fails, the server goes on
            return self._fail([job], e)
        job.pos = len(job.prompt_ids)
        self._take(job, logits)
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _decode(self):
        for job in self.active:
            if job is not None and job.cancelled:
                self._retire(job, "cancelled")
        jobs = [job for job in self.active if job is not None]
        if not jobs:
            return
        t0 = time.perf_counter()
        # Only the rows up to the last busy one step (newcomers take the lowest free row),
        # rounded up to a power of two: few shapes for a compiled step.
        rows = min(self.max_batch, 1 << max(job.row for job in jobs).bit_length())
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for job in jobs:
            tokens[job.row], positions[job.row] = job.next_token, job.pos
        try:
            # length: attention reads the slots up to the furthest row, not the whole cache
            logits = self.model.decode_step(tokens.to(self.device), positions.to(self.device),
                                            length=max(job.pos for job in jobs) + 1)
        except Exception as e:  # noqa: BLE001
            return self._fail(jobs, e)
        s = self.stats
        s.decode_steps += 1
        s.decode_rows += len(jobs)
        s.max_rows = max(s.max_rows, len(jobs))
        for job in jobs:
            job.pos += 1
            self._take(job, logits[job.row])
        s.decode_seconds += time.perf_counter() - t0

    def _take(self, job: Job, logits: torch.Tensor):
        """Sample the job's next token from its logits [vocab], send its text, and retire the
        job if it is done."""
        if job.presence_penalty or job.frequency_penalty:
            logits = _penalize(logits, job.generated, job.presence_penalty,
                               job.frequency_penalty)
        p, row = job.params, job.row
        step = sample_rows(logits[None], p.temperature, p.top_k, p.top_p,
                               p.repetition_penalty, self.history.seen[row:row + 1], job.generator)
        token = int(step[0])
        if token in self.stop_ids:
            return self._retire(job, "stop")
        job.generated.append(token)
        piece = job.text.push(token)
        if piece:
            job._send("text", piece)
        if job.text.stopped:
            return self._retire(job, "stop")
        if len(job.generated) >= job.params.max_new_tokens or job.pos >= self.context:
            return self._retire(job, "length")
        job.next_token = token
        self.history.seen[row, token] = True

    def _retire(self, job: Job, reason: str):
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
            piece = job.text.flush()
            if piece:
                job._send("text", piece)
            job._send("done", reason, len(job.prompt_ids), len(job.generated))
        self._free(job)

    def _fail(self, jobs: list[Job], error: Exception):
        message = str(error) if isinstance(error, QliteError) else \
            f"{type(error).__name__}: {error}"
        for job in jobs:
            self.stats.failed += 1
            job._send("error", message)
            self._free(job)

    def _free(self, job: Job):
        with self.cond:
            if job.row >= 0 and self.active[job.row] is job:
                self.active[job.row] = None
            job.done = True
            self.pending -= 1


def _penalize(logits: torch.Tensor, generated: list[int], presence: float,
              frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the tokens generated so far:
    logit -= presence * [count > 0] + frequency * count."""
    if not generated:
        return logits
    ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    logits = logits.clone()
    logits[ids] -= presence + frequency * counts.to(logits.dtype)
    return logits


# ---------------------------------------------------------------------------------------------
# The HTTP side


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                        code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "an array", dict: "an object"}


def _get(body: dict, name: str, kind, default=None, check=None, why: str = ""):
    """body[name] if present and not null, checked to be of `kind` (float accepts integers;
    booleans are not numbers) and to pass `check`; else `default`."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, got {json.dumps(value)}",
                       param=name, code="invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' {why}, got {json.dumps(value)}", param=name,
                       code="invalid_value")
    return value


def _sampling(body: dict) -> tuple[SamplingParams, int | None, float, float]:
    """The sampling fields of a request -> (SamplingParams, max_tokens or None, presence and
    frequency penalty). Fields left out take qlite's defaults (those the model's authors
    publish, as `qlite chat` uses); top_k and repetition_penalty are accepted as vLLM does."""
    d = SamplingParams()
    if _get(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' must be 1: one choice per request", param="n")
    if body.get("logprobs") not in (None, False, 0):  # a boolean in chat, a count otherwise
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    max_tokens = _get(body, "max_completion_tokens", int, None, lambda v: v > 0,
                      "must be at least 1")
    max_tokens = _get(body, "max_tokens", int, max_tokens, lambda v: v > 0, "must be at least 1")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or an array of strings, got "
                       f"{json.dumps(stop)}", param="stop", code="invalid_type")
    try:  # SamplingParams has the last word on every value
        params = SamplingParams(
            max_new_tokens=max_tokens or d.max_new_tokens,  # the context's room when left out
            temperature=_get(body, "temperature", float, d.temperature, lambda v: 0 <= v <= 2,
                             "must be between 0 and 2"),
            top_p=_get(body, "top_p", float, d.top_p, lambda v: 0 < v <= 1,
                       "must be above 0 and at most 1"),
            top_k=_get(body, "top_k", int, d.top_k, lambda v: v >= 0, "must be 0 (off) or more"),
            repetition_penalty=_get(body, "repetition_penalty", float, d.repetition_penalty,
                                    lambda v: v > 0, "must be above 0"),
            seed=_get(body, "seed", int, None),
            stop=tuple(s for s in stop or () if s))
    except QliteError as e:  # its message names the parameter first
        raise ApiError(400, str(e), param=str(e).partition(" ")[0]) from None
    penalties = [_get(body, name, float, 0.0, lambda v: -2 <= v <= 2, "must be between -2 and 2")
                 for name in ("presence_penalty", "frequency_penalty")]
    return params, max_tokens, *penalties


def _chat_prompt(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages",
                       code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"'{where}' must be an object with a string 'role'",
                           param=where, code="invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"'{where}.content': only text parts are supported",
                               param=f"{where}.content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text "
                           "parts", param=f"{where}.content", code="invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


def _completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size
            for t in prompt):
        return prompt
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
    raise ApiError(400, "'prompt' must be a string or an array of token ids (one prompt per "
                   "request)", param="prompt", code="invalid_type")


class Api:
    """The routes, over one engine serving one model named `model_name`."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/stats", self.stats),
                  Route("/v1/models", self.models),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes)

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the API key (when the server has one)."""
        if self.api_key is None or \
                request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                        code="invalid_api_key").response()

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def stats(self, request: Request):
        if refused := self._refused(request):
            return refused
        e = self.engine
        with e.cond:
            state = {"waiting": len(e.waiting), "active": sum(j is not None for j in e.active),
                     "max_batch": e.max_batch, "max_queue": e.max_queue}
        return JSONResponse({**asdict(e.stats), **state})

    async def models(self, request: Request):
        if refused := self._refused(request):
            return refused
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created,
             "owned_by": "qlite"}]})

    async def chat(self, request: Request):
        return await self._complete(request, chat=True)

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool):
        if refused := self._refused(request):
            return refused
        try:
            job, stream, usage = await self._job(request, chat)
            self.engine.submit(job)
        except ApiError as e:
            return e.response()
        except ServerBusy:
            return ApiError(503, f"the server is busy: {self.engine.pending} requests in, "
                            "try again later", code="server_busy", type="server_error").response()
        out = _Chunks(self.model_name, chat)
        if stream:
            return StreamingResponse(self._events(job, out, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, job, out)

    async def _job(self, request: Request, chat: bool) -> tuple[Job, bool, bool]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = _get(body, "model", str)
        if model is None:
            raise ApiError(400, "'model' is required", param="model", code="missing_field")
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")
        stream = _get(body, "stream", bool, False)
        options = _get(body, "stream_options", dict, {})
        usage = options.get("include_usage") is True
        params, max_tokens, presence, frequency = _sampling(body)
        tokenizer = self.engine.tokenizer
        if chat:
            try:
                ids = tokenizer.encode_chat(_chat_prompt(body))  # contents stay text
            except QliteError as e:
                raise ApiError(400, str(e), param="messages") from None
        else:
            ids = _completion_prompt(body, tokenizer)
        n, context = len(ids), self.engine.context
        if n == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if n >= context or (max_tokens and n + max_tokens > context):
            asked = f" + {max_tokens} max_tokens = {n + max_tokens}" if max_tokens else ""
            raise ApiError(400, f"the context window is {context} tokens; the prompt has "
                           f"{n}{asked}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        params.max_new_tokens = max_tokens or context - n
        job = Job(ids, params, presence, frequency)
        return job, stream, usage

    async def _events(self, job: Job, out: "_Chunks", usage: bool):
        """The server-sent events of a streamed reply. If the client goes away Starlette
        cancels this generator: `finally` hands the row back."""
        try:
            if out.chat:
                yield out.sse(out.chunk(role=True), usage)
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield out.sse(out.chunk(text=event[1]), usage)
                elif event[0] == "done":
                    _, reason, prompt, completion = event
                    yield out.sse(out.chunk(finish=reason), usage)
                    if usage:
                        yield out.sse(out.usage_chunk(prompt, completion), False)
                    break
                else:
                    yield out.sse(ApiError(500, event[1], type="server_error").body(), False)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:
                self.engine.cancel(job)

    async def _whole(self, request: Request, job: Job, out: "_Chunks"):
        """A reply sent as one body; the job is cancelled if the client leaves first."""

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        watch = asyncio.ensure_future(disconnected())
        text = []
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait([get, watch], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.engine.cancel(job)
                    return JSONResponse({}, status_code=499)  # nobody reads it
                event = get.result()
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "done":
                    return JSONResponse(out.whole("".join(text), *event[1:]))
                else:
                    return ApiError(500, event[1], type="server_error").response()
        finally:
            watch.cancel()


class _Chunks:
    """The JSON objects of one reply, chat or text completion, streamed or whole."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        object = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(object), "choices": [], "usage": _usage(prompt, completion)}

    def whole(self, text: str, reason: str, prompt: int, completion: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": _usage(prompt, completion)}

    @staticmethod
    def sse(data: dict, usage: bool) -> str:
        if usage:  # with include_usage every chunk carries "usage": null but the last
            data = {**data, "usage": None}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------------
# Running it


def model_name(path) -> str:
    """The id /v1/models gives the model: 'demo', or the model directory's name."""
    from pathlib import Path
    return "demo" if str(path) == "demo" else Path(path).expanduser().resolve().name


class Server:
    """The engine and uvicorn together. `serve()` blocks (the CLI); `start()` runs uvicorn in a
    thread and returns once it listens (tests, benchmarks). port=0 takes a free port."""

    def __init__(self, model, name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_batch: int = 8, max_queue: int = MAX_QUEUE,
                 on_ready=None):
        import uvicorn

        self.engine = Engine(model, max_batch, max_queue)
        self.api = Api(self.engine, name, api_key)
        outer = self

        class _Uvicorn(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started and on_ready is not None:
                    on_ready(outer.url)

        config = uvicorn.Config(self.api.app(), host=host, port=port, log_level="warning",
                                lifespan="off")
        self.uvicorn = _Uvicorn(config)
        self.host = host
        self.thread = None

    @property
    def url(self) -> str:
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def serve(self):
        self.engine.start()
        try:
            self.uvicorn.run()
        except SystemExit:  # uvicorn's way of saying it could not bind (it logged why)
            pass
        finally:
            self.engine.stop()
        if not self.uvicorn.started:
            raise QliteError(f"host/port {self.host}:{self.uvicorn.config.port}: cannot listen "
                             "there (in use, or not this machine's address?)")

    def start(self, timeout: float = 30.0) -> "Server":
        self.engine.start()
        self.thread = threading.Thread(target=self.uvicorn.run, name="qlite-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise QliteError(f"{self.host}: the server did not start")
            time.sleep(0.01)
        return self

    def stop(self):
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join()
        self.engine.stop()
