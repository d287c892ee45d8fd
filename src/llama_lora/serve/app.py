"""The HTTP side of `llama-lora serve`: OpenAI's /v1/chat/completions, /v1/completions, /v1/models, plus
/health, the chat page at / and the admin routes /v1/adapters.

Responses are built from the `openai` package's own pydantic types (as `transformers serve` does), so the
JSON and the SSE chunks are OpenAI's format by construction. Requests are validated here against the
server's limits; every refusal is OpenAI's error shape {"error": {"message", "type", "param", "code"}}.
A request's `model` only selects among the names the pool serves: nothing from a request names a file,
except the admin route's run directory, which needs the API key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.resources
import json
import logging
import re
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_lora import runs
from llama_lora.config.schema import ServeConfig
from llama_lora.errors import LlamaLoraError
from llama_lora.generation import model_sampling
from llama_lora.infer import format_turn
from llama_lora.serve.engine import Engine, Job, QueueFull
from llama_lora.serve.pool import Entry, RunBusy

log = logging.getLogger("llama_lora.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------------
# Requests: the OpenAI fields we honour; unknown fields are ignored (clients send many), fields that
# would change the answer in a way we cannot do are refused.


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stop: Any = None
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list | None = None
    logprobs: bool | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None


_UNSUPPORTED = {"tools": "tool calls", "logprobs": "log-probabilities", "echo": "echo", "stop": "stop strings"}
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, f"Invalid '{param}': {err['msg']}.", param=param, code="invalid_value") from None
    for name, what in _UNSUPPORTED.items():
        if getattr(req, name, None) not in (None, False, [], 0):
            raise ApiError(400, f"This server does not support {what} ('{name}').", param=name, code="unsupported")
    if req.n not in (None, 1):
        raise ApiError(400, "This server answers with one choice per request (n=1).", param="n", code="unsupported")
    return req


# ----------------------------------------------------------------------------------------------------


def build_app(pool, engine: Engine, scfg: ServeConfig, api_key: str | None, overrides: list[str]) -> FastAPI:
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()  # uvicorn has already drained the in-flight requests
        log.info("Server stopped after %s", engine.stats)

    app = FastAPI(title="llama-lora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return JSONResponse(ApiError(404, f"No route {request.method} {request.url.path}.", code="not_found").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, e):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}.").body(),
                            status_code=405)

    def authorize(request: Request, admin: bool = False) -> None:
        if api_key is None:
            if admin:
                raise ApiError(403, "Adding or removing adapters needs an API key: start the server with "
                               "--api-key, --api-key-file or LLAMA_LORA_API_KEY.", type="permission_error")
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):  # constant time
            raise ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > scfg.max_body_bytes:
            # Read a moderately oversized body before answering: a reply sent while the client is still
            # writing ends in a closed connection (EPIPE on its side) instead of the 413 it should read.
            if int(length) <= 16 * scfg.max_body_bytes:
                async for _ in request.stream():
                    pass
            raise ApiError(413, f"The request body is {length} bytes; this server accepts at most "
                           f"{scfg.max_body_bytes}.", code="request_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > scfg.max_body_bytes:
                raise ApiError(413, f"The request body is larger than {scfg.max_body_bytes} bytes.",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON ({e}).", code="invalid_json") from None

    def entry_for(name: str) -> Entry:
        entry = pool.entries.get(name)
        if entry is None:
            served = ", ".join(pool.entries) or "none"
            raise ApiError(404, f"The model '{name}' is not served here (served: {served}).", param="model",
                           code="model_not_found")
        return entry

    def make_job(req: _Request, entry: Entry, prompt: str, max_tokens: int | None) -> Job:
        n_prompt = len(entry.counter(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt > scfg.max_prompt_tokens:
            raise ApiError(400, f"The prompt is {n_prompt} tokens; this server accepts at most "
                           f"{scfg.max_prompt_tokens}.", param="messages", code="context_length_exceeded")
        room = pool.context_length - n_prompt
        if max_tokens is not None and not 1 <= max_tokens <= scfg.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {scfg.max_tokens} (got {max_tokens}).",
                           param="max_tokens", code="invalid_value")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"The prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {pool.context_length} tokens.", param="max_tokens",
                           code="context_length_exceeded")
        if room < 1:
            raise ApiError(400, f"The prompt ({n_prompt} tokens) fills the model's context of "
                           f"{pool.context_length} tokens.", param="messages", code="context_length_exceeded")
        ic = entry.cfg.infer  # an omitted setting is what `llama-lora infer` would use for this run:
        model = model_sampling(pool.model)  # the run's infer.* where set, else the model's generation_config
        if req.temperature is None:
            do_sample = model["do_sample"] if ic.do_sample is None else ic.do_sample
            temperature = ic.temperature if ic.temperature is not None else model["temperature"] or 1.0
        else:
            do_sample, temperature = req.temperature > 0, req.temperature or 1.0
        default_top_p = ic.top_p if ic.top_p is not None else model["top_p"] or 1.0
        top_p = (req.top_p if req.top_p is not None else default_top_p) if do_sample else 1.0
        if not do_sample:
            temperature = 1.0
        loop = asyncio.get_running_loop()
        return Job(entry=entry, prompt=prompt, prompt_tokens=n_prompt,
                   max_tokens=max_tokens or min(ic.max_new_tokens, scfg.max_tokens, room),
                   do_sample=do_sample, temperature=temperature, top_p=top_p, ignore_eos=req.ignore_eos,
                   deadline=time.monotonic() + scfg.request_timeout_s, loop=loop, events=asyncio.Queue())

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"The server is busy ({engine.queue_size} requests already wait). Retry in "
                           f"{e.retry_after} s.", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None

    async def collect(request: Request, job: Job) -> str:
        """Wait for a non-streamed answer, stopping its generation if the client goes away."""
        text = ""
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise ApiError(499, "Client disconnected.") from None
                continue
            if kind == "text":
                text += value
            elif kind == "error":
                raise ApiError(500, f"Generation failed: {value}", type="server_error")
            else:
                _raise_unfinished(value)
                return text

    async def stream(job: Job, chunks) -> Any:
        """SSE: one `data:` line per chunk from `chunks(kind, value)`, then [DONE]. A client that disconnects
        cancels this generator (Starlette watches for it); `finally` then stops the generation."""
        try:
            for c in chunks("start", None):
                yield _sse(c)
            while True:
                kind, value = await job.events.get()
                if kind == "error" or (kind == "done" and value in ("timeout", "cancelled")):
                    msg = value if kind == "error" else f"The request ran past {scfg.request_timeout_s:g} s."
                    yield _sse(ApiError(504 if kind == "done" else 500, msg, type="server_error").body())
                    break
                for c in chunks(kind, value):
                    yield _sse(c)
                if kind == "done":
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:
                job.cancelled.set()

    def usage(job: Job) -> CompletionUsage:
        n = len(job.ids)
        return CompletionUsage(prompt_tokens=job.prompt_tokens, completion_tokens=n, total_tokens=job.prompt_tokens + n)

    # ------------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return (importlib.resources.files("llama_lora.serve") / "static" / "chat.html").read_text()

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queued, "active": engine.active, "stats": engine.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = [Model(id=e.name, created=e.created, object="model", owned_by="llama-lora",
                      kind=e.kind, root=pool.base or e.name).model_dump(exclude_none=True)
                for e in list(pool.entries.values())]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req: ChatRequest = _parse(ChatRequest, await read_json(request))
        entry = entry_for(req.model)
        job = make_job(req, entry, _chat_prompt(entry, req.messages), req.max_completion_tokens or req.max_tokens)
        submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            text = await collect(request, job)
            return ChatCompletion(
                id=rid, created=created, model=entry.name, object="chat.completion", usage=usage(job),
                choices=[Choice(index=0, finish_reason=job.finish_reason,
                                message=ChatCompletionMessage(role="assistant", content=text))],
            ).model_dump(exclude_none=True)
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: ChoiceDelta, finish=None, use=None) -> ChatCompletionChunk:
            choices = [] if use else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
            return ChatCompletionChunk(id=rid, created=created, model=entry.name, object="chat.completion.chunk",
                                       choices=choices, usage=use)

        def chunks(kind, value):
            if kind == "start":
                yield chunk(ChoiceDelta(role="assistant", content=""))
            elif kind == "text":
                yield chunk(ChoiceDelta(content=value))
            else:
                yield chunk(ChoiceDelta(), finish=value)
                if include_usage:
                    yield chunk(ChoiceDelta(), use=usage(job))

        return StreamingResponse(stream(job, chunks), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        """The prompt is the instruction, rendered in the run's prompt format (as `llama-lora infer PROMPT`)."""
        authorize(request)
        req: CompletionRequest = _parse(CompletionRequest, await read_json(request))
        entry = entry_for(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "Send one prompt per request.", param="prompt", code="unsupported")
        if not prompts[0].strip():
            raise ApiError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        job = make_job(req, entry, entry.loaded.fmt.prompt(entry.loaded.tokenizer, prompts[0]), req.max_tokens)
        submit(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion(text: str, finish, use=None) -> Completion:
            return Completion(id=rid, created=created, model=entry.name, object="text_completion", usage=use,
                              choices=[CompletionChoice(index=0, text=text, finish_reason=finish)])

        if not req.stream:
            text = await collect(request, job)
            return completion(text, job.finish_reason, usage(job)).model_dump(exclude_none=True)

        def chunks(kind, value):
            if kind == "text":
                yield completion(value, None)
            elif kind == "done":
                yield completion("", value, usage(job))

        return StreamingResponse(stream(job, chunks), media_type="text/event-stream")

    # ---- admin: adapters added and removed without a restart (the API key is required)

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        authorize(request, admin=True)
        body = await read_json(request)
        run = body.get("run") if isinstance(body, dict) else None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(run, str) or not run:
            raise ApiError(400, "Give the run directory to serve: {\"run\": \"outputs/<run>\"}.", param="run")
        if name is not None and not (isinstance(name, str) and _ADAPTER_NAME.match(name)):
            raise ApiError(400, "'name' must be 1-64 letters, digits, '.', '_' or '-'.", param="name")

        def load():
            return pool.add(runs.command_config("infer", overrides, run), name)

        try:
            entry = await asyncio.wrap_future(engine.call(load))
        except RunBusy as e:
            raise ApiError(409, str(e), code="run_in_use") from None
        except LlamaLoraError as e:
            raise ApiError(400, str(e), param="run", code="run_not_servable") from None
        return {"id": entry.name, "object": "model", "kind": entry.kind, "run": str(entry.loaded.target)}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str, request: Request):
        authorize(request, admin=True)
        try:
            await asyncio.wrap_future(engine.call(lambda: pool.remove(name)))
        except LlamaLoraError as e:
            raise ApiError(404, str(e), param="name", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def _sse(chunk) -> str:
    data = chunk.model_dump_json(exclude_none=True) if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {data}\n\n"


def _raise_unfinished(reason: str) -> None:
    if reason == "timeout":
        raise ApiError(504, "The request was not answered in time; it was stopped.", type="server_error",
                       code="timeout")


def _chat_prompt(entry: Entry, messages: list[_Message]) -> str:
    """The conversation in the run's prompt format, with infer's own code (infer.format_turn)."""
    system = None
    if messages[0].role in ("system", "developer"):
        system, messages = messages[0].text, messages[1:]
    roles = [m.role for m in messages]
    if not roles or roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant")
                                               for i, r in enumerate(roles)):
        raise ApiError(400, "messages must be an optional system message, then user and assistant turns "
                       "alternating, ending with a user turn.", param="messages")
    loaded = entry.loaded
    if system is not None:
        if loaded.fmt.kind != "chat":
            raise ApiError(400, f"'{entry.name}' was trained with the Alpaca prompt format, which has no system "
                           "message: leave it out.", param="messages")
        loaded = dataclasses.replace(loaded, fmt=dataclasses.replace(loaded.fmt, system_prompt=system))
    history = [{"role": m.role, "content": m.text} for m in messages[:-1]]
    return format_turn(loaded, messages[-1].text, history or None)
