"""The HTTP side of `llama-lora serve`: OpenAI's /v1/chat/completions, /v1/completions, /v1/models and
/v1/models/{id}, plus /health, the chat page at / and the admin routes /v1/adapters.

Two layers. `Api` answers each request without HTTP: it validates a parsed JSON body, builds and submits
the generation job, and returns what to send. The routes in `build_app` only do HTTP: the Host and
Content-Type checks, the API key, reading the body, waiting or streaming. Responses are built from the
`openai` package's own types (as `transformers serve` does), so the JSON is OpenAI's format by
construction; streamed completion chunks are plain dicts (see `Api.completion`). Every refusal, and any
unexpected error, is OpenAI's error shape {"error": {"message", "type", "param", "code"}}: no route
answers text/plain. A request's `model` only selects among the names the pool serves: nothing from a
request names a file, except the admin route's run directory, which needs the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_lora.config.schema import ServeConfig
from llama_lora.errors import LlamaLoraError
from llama_lora.generation import model_sampling
from llama_lora.infer import format_turn
from llama_lora.serve import NAME, HostRule, host_of, run_config
from llama_lora.serve.engine import Engine, Job, QueueFull, Stopping
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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------------
# Requests: the OpenAI fields we honour, strictly typed (a string "false" is not a boolean). Fields a
# client may send that do not change the answer (user, metadata, store, ...) are ignored; those that
# would change it in a way this server cannot are in REFUSED.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Request(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.manual_seed's range
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]


@dataclass(frozen=True)
class Refused:
    """An OpenAI (or vLLM) request field this server cannot honour: refused with a 400 unless it is absent,
    null or one of `accepted` (the values that ask for nothing more than what the server does)."""

    field: str
    what: str
    accepted: tuple = ()
    routes: tuple[str, ...] = ("chat", "completions")

    def honoured(self, value: Any) -> bool:
        return value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool)
                                    for a in self.accepted)


# The one table of what is refused (docs/serving.md lists the same; a test checks that it does).
REFUSED = (
    Refused("n", "more than one choice per request", (1,)),
    Refused("best_of", "best-of sampling", (1,), ("completions",)),
    Refused("stop", "stop strings (the run's own stop tokens always apply)", ("", [])),
    Refused("logprobs", "log-probabilities", (False,), ("chat",)),
    Refused("logprobs", "log-probabilities (even 0 returns the sampled tokens' own)", (), ("completions",)),
    Refused("top_logprobs", "log-probabilities", (0,)),
    Refused("echo", "echoing the prompt", (False,), ("completions",)),
    Refused("suffix", "a suffix (insertion)", ("",), ("completions",)),
    Refused("tools", "tool calls", ([],), ("chat",)),
    Refused("tool_choice", "tool calls", ("none", "auto"), ("chat",)),
    Refused("functions", "function calls", ([],), ("chat",)),
    Refused("function_call", "function calls", ("none", "auto"), ("chat",)),
    Refused("response_format", "constrained output (JSON mode, structured outputs)", ({"type": "text"},), ("chat",)),
    Refused("logit_bias", "logit bias", ({},)),
    Refused("frequency_penalty", "repetition penalties", (0,)),
    Refused("presence_penalty", "repetition penalties", (0,)),
    Refused("modalities", "output other than text", (["text"],), ("chat",)),
    Refused("audio", "audio output", (), ("chat",)),
    Refused("web_search_options", "web search", (), ("chat",)),
    # vLLM's sampling extensions (its ignore_eos is honoured):
    Refused("top_k", "top-k sampling", (-1, 0)),
    Refused("min_p", "min-p sampling", (0,)),
    Refused("repetition_penalty", "repetition penalties", (1,)),
    Refused("min_tokens", "a minimum length (use ignore_eos)", (0,)),
    Refused("stop_token_ids", "extra stop tokens", ([],)),
    Refused("use_beam_search", "beam search", (False,)),
)


def parse(model: type[BaseModel], body: Any, route: str) -> Any:
    """The request `body` (parsed JSON) as `model`, or ApiError: not an object, a text that is not valid
    Unicode, a refused field (REFUSED), or a field of the wrong type or value."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    check_text(body)
    for rule in REFUSED:
        if route in rule.routes and not rule.honoured(body.get(rule.field)):
            ok = " or ".join(json.dumps(a) for a in rule.accepted)
            raise ApiError(400, f"This server does not support {rule.what}: '{rule.field}' is "
                           f"{json.dumps(body[rule.field])[:100]}. Leave it out{' or send ' + ok if ok else ''} "
                           "(fields this server cannot honour are refused, not ignored).", param=rule.field,
                           code="unsupported_value" if rule.accepted else "unsupported_parameter")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the deepest: inside the union member that fits
        param = ".".join(str(x) for x in err["loc"] if not _union_tag(x)) or None
        raise ApiError(400, f"Invalid '{param}': {err['msg']}.", param=param, code="invalid_value") from None


def _union_tag(loc_item) -> bool:
    """pydantic names the union member in an error's loc ('str', 'list[_TextPart]'): not a field."""
    return isinstance(loc_item, str) and ("[" in loc_item or loc_item in ("str", "int", "float", "bool", "none"))


def check_text(value: Any, path: str = "") -> None:
    """Refuse a string with an unpaired UTF-16 surrogate (the JSON escape \\ud800 alone: valid JSON, not valid
    Unicode, e.g. a client that cut an emoji in half), anywhere in the body, naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"'{path or 'body'}' holds an unpaired UTF-16 surrogate (\\u{ord(value[e.start]):x} "
                           f"at character {e.start}), which is not valid Unicode text: send whole characters.",
                           param=path or None, code="invalid_value") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, path)
            check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_text(v, f"{path}.{i}")


# ----------------------------------------------------------------------------------------------------
# Answers, without HTTP.


@dataclass
class Answer:
    """A submitted request: `whole(text)` is the response once the answer is complete; `chunks(kind, value)`
    the streamed events for one engine event ("start", then "text", then "done")."""

    job: Job
    stream: bool
    whole: Callable[[str], dict]
    chunks: Callable[[str, Any], Iterable[BaseModel | dict]]


class Api:
    """What each route answers, given its parsed JSON: a dict to send, or an `Answer` to wait for or stream.
    Raises ApiError for anything the client must change."""

    def __init__(self, pool, engine: Engine, scfg: ServeConfig, overrides: list[str]):
        self.pool, self.engine, self.scfg, self.overrides = pool, engine, scfg, overrides

    def models(self) -> dict:
        return {"object": "list", "data": [self._model(e) for e in list(self.pool.entries.values())]}

    def model(self, model_id: str) -> dict:
        return self._model(self.entry(model_id))

    def chat(self, body: Any) -> Answer:
        req: ChatRequest = parse(ChatRequest, body, "chat")
        entry = self.entry(req.model)
        job = self._job(req, entry, _chat_prompt(entry, req.messages), req.max_completion_tokens or req.max_tokens,
                        "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def whole(text: str) -> dict:
            return ChatCompletion(
                id=rid, created=created, model=entry.name, object="chat.completion", usage=_usage(job),
                choices=[Choice(index=0, finish_reason=job.finish_reason,
                                message=ChatCompletionMessage(role="assistant", content=text))],
            ).model_dump(exclude_none=True)

        def chunk(delta: ChoiceDelta, finish=None, use=None) -> ChatCompletionChunk:
            choices = [] if use else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
            return ChatCompletionChunk(id=rid, created=created, model=entry.name, object="chat.completion.chunk",
                                       choices=choices, **({"usage": use} if use else {}))

        def chunks(kind: str, value: Any):
            if kind == "start":
                yield chunk(ChoiceDelta(role="assistant", content=""))
            elif kind == "text":
                yield chunk(ChoiceDelta(content=value))
            else:
                yield chunk(ChoiceDelta(), finish=value)
                if include_usage:
                    yield chunk(ChoiceDelta(), use=_usage(job))

        return Answer(job, req.stream, whole, chunks)

    def completion(self, body: Any) -> Answer:
        """The prompt is the instruction, rendered in the run's prompt format (as `llama-lora infer PROMPT`)."""
        req: CompletionRequest = parse(CompletionRequest, body, "completions")
        entry = self.entry(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "Send one prompt per request.", param="prompt", code="unsupported_value")
        if not prompts[0].strip():
            raise ApiError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        job = self._job(req, entry, entry.loaded.fmt.prompt(entry.loaded.tokenizer, prompts[0]), req.max_tokens,
                        "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def whole(text: str) -> dict:
            return Completion(id=rid, created=created, model=entry.name, object="text_completion", usage=_usage(job),
                              choices=[CompletionChoice(index=0, text=text, finish_reason=job.finish_reason)],
                              ).model_dump(exclude_none=True)

        def chunk(text: str, finish: str | None) -> dict:
            # OpenAI's streamed completion chunks carry "finish_reason": null until the last one, which the
            # openai package's Completion type (a whole answer) does not allow: a plain dict of its fields.
            return {"id": rid, "object": "text_completion", "created": created, "model": entry.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def chunks(kind: str, value: Any):
            if kind == "text":
                yield chunk(value, None)
            elif kind == "done":
                yield chunk("", value)
                if include_usage:
                    yield {**chunk("", None), "choices": [], "usage": _usage(job).model_dump(exclude_none=True)}

        return Answer(job, req.stream, whole, chunks)

    async def add_adapter(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        check_text(body)
        run, name = body.get("run"), body.get("name")
        if not isinstance(run, str) or not run:
            raise ApiError(400, "Give the run directory to serve: {\"run\": \"outputs/<run>\"}.", param="run")
        if name is not None and not (isinstance(name, str) and NAME.match(name)):
            raise ApiError(400, "'name' must be 1-64 letters, digits, '.', '_' or '-'.", param="name")
        try:
            entry = await asyncio.wrap_future(self.engine.call(
                lambda: self.pool.add(run_config(run, self.overrides), name)))
        except RunBusy as e:
            raise ApiError(409, str(e), code="run_in_use") from None
        except Stopping:
            raise _stopping() from None
        except LlamaLoraError as e:
            raise ApiError(400, str(e), param="run", code="run_not_servable") from None
        except Exception as e:  # loading a run the request named: its files, not the server, are at fault
            log.exception("Could not load %s", run)
            raise ApiError(400, f"Could not load the run {run} ({type(e).__name__}: {' '.join(str(e).split())[:300]}).",
                           param="run", code="run_not_servable") from None
        return {"id": entry.name, "object": "model", "kind": entry.kind, "run": str(entry.loaded.target)}

    async def remove_adapter(self, name: str) -> dict:
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self.pool.remove(name)))
        except Stopping:
            raise _stopping() from None
        except LlamaLoraError as e:
            raise ApiError(404, str(e), param="name", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    # ------------------------------------------------------------------------------------------------

    def entry(self, name: str) -> Entry:
        entry = self.pool.entries.get(name)
        if entry is None:
            served = ", ".join(self.pool.entries) or "none"
            raise ApiError(404, f"The model '{name}' is not served here (served: {served}).", param="model",
                           code="model_not_found")
        return entry

    def _model(self, e: Entry) -> dict:
        return Model(id=e.name, created=e.created, object="model", owned_by="llama-lora", kind=e.kind,
                     root=self.pool.base or e.name).model_dump(exclude_none=True)

    def _job(self, req: _Request, entry: Entry, prompt: str, max_tokens: int | None, prompt_param: str) -> Job:
        """The request's generation job, checked against the server's limits and submitted."""
        scfg, pool = self.scfg, self.pool
        n_prompt = len(entry.counter(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt > scfg.max_prompt_tokens:
            raise ApiError(400, f"The prompt is {n_prompt} tokens; this server accepts at most "
                           f"{scfg.max_prompt_tokens}.", param=prompt_param, code="context_length_exceeded")
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
                           f"{pool.context_length} tokens.", param=prompt_param, code="context_length_exceeded")
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
        job = Job(entry=entry, prompt=prompt, prompt_tokens=n_prompt,
                  max_tokens=max_tokens or min(ic.max_new_tokens, scfg.max_tokens, room),
                  do_sample=do_sample, temperature=temperature, top_p=top_p, ignore_eos=req.ignore_eos,
                  deadline=time.monotonic() + scfg.request_timeout_s, seed=req.seed if do_sample else None,
                  loop=asyncio.get_running_loop(), events=asyncio.Queue())
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"The server is busy ({self.engine.queue_size} requests already wait). Retry in "
                           f"{e.retry_after} s.", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Stopping:
            raise _stopping() from None
        return job


def _usage(job: Job) -> CompletionUsage:
    n = len(job.ids)
    return CompletionUsage(prompt_tokens=job.prompt_tokens, completion_tokens=n, total_tokens=job.prompt_tokens + n)


def _stopping(started: bool = False) -> ApiError:
    what = "this request was stopped before its answer was complete" if started else "it takes no new request"
    return ApiError(503, f"The server is shutting down: {what}. Retry on another server, or once it is back.",
                    type="server_error", code="server_shutting_down", headers={"Retry-After": "5"})


def _unfinished(kind: str, value: str, timeout_s: float) -> ApiError | None:
    """The error for a job that ended without an answer (None: it ended with one)."""
    if kind == "error":
        return ApiError(500, f"Generation failed: {value}", type="server_error", code="generation_failed")
    if value == "timeout":
        return ApiError(504, f"The request ran past {timeout_s:g} s and was stopped.", type="server_error",
                        code="timeout")
    if value == "cancelled":
        return _stopping(started=True)
    return None


async def collect(job: Job, is_disconnected: Callable[[], Awaitable[bool]], timeout_s: float) -> str:
    """Wait for a whole answer. A client that goes away, or a request task that is cancelled (the server's
    drain timeout passed), stops its generation."""
    text = ""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await is_disconnected():
                    raise ApiError(499, "Client disconnected.") from None
                continue
            if kind == "text":
                text += value
                continue
            err = _unfinished(kind, value, timeout_s)
            if err:
                raise err
            return text
    finally:
        if not job.done:
            job.cancelled.set()


async def sse(answer: Answer, timeout_s: float) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, then [DONE]; an unfinished job ends with an error
    event (the status line was sent already). A client that disconnects, or a cancelled request task,
    closes this generator: `finally` then stops the generation."""
    job = answer.job
    try:
        for c in answer.chunks("start", None):
            yield _sse(c)
        while True:
            kind, value = await job.events.get()
            err = None if kind == "text" else _unfinished(kind, value, timeout_s)
            if err:
                yield _sse(err.body())
                break
            for c in answer.chunks(kind, value):
                yield _sse(c)
            if kind == "done":
                break
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 -- after the headers, an error can only be an event
        log.exception("Streaming failed")
        yield _sse(ApiError(500, f"Streaming failed ({type(e).__name__}).", type="server_error").body())
    finally:
        if not job.done:
            job.cancelled.set()


def _sse(chunk: BaseModel | dict) -> str:
    # exclude_unset: the fields given when the chunk was built (finish_reason: null included), no others
    data = chunk.model_dump_json(exclude_unset=True) if isinstance(chunk, BaseModel) else \
        json.dumps(chunk, separators=(",", ":"))
    return f"data: {data}\n\n"


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


# ----------------------------------------------------------------------------------------------------
# HTTP.


class HostCheck:
    """ASGI middleware: refuse a request whose Host header is not one of the server's (`HostRule`), in
    OpenAI's error shape. (Starlette's TrustedHostMiddleware answers text/plain, and matches names only.)"""

    def __init__(self, app, rule: HostRule):
        self.app, self.rule = app, rule

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if not self.rule.allows(host):
                await ApiError(
                    400, f"This server does not answer to the Host '{host_of(host)}'; it answers to "
                    f"{self.rule.describe()}. A web page that reaches a local server through its own domain name "
                    "(DNS rebinding) is refused this way. If you reach the server by that name (a proxy, a LAN "
                    "name), start it with --allowed-hosts NAME.", code="host_not_allowed"
                ).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(pool, engine: Engine, scfg: ServeConfig, api_key: str | None, overrides: list[str],
              hosts: HostRule | None = None) -> FastAPI:
    """The FastAPI app: routes that check the request's HTTP side and hand its JSON to `Api`."""
    api = Api(pool, engine, scfg, overrides)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # The requests have been drained (or, past --drain-timeout-s, halted: serve.run): whatever is still
        # queued or generating has nobody waiting. Off the event loop, so that request tasks cancelled by
        # uvicorn can run their clean-up meanwhile.
        await asyncio.to_thread(engine.stop)
        log.info("Server stopped after %s", engine.stats)

    app = FastAPI(title="llama-lora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostCheck, rule=hosts or HostRule("127.0.0.1"))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"No route {request.method} {request.url.path}.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # logged with its traceback by the server as well
        return ApiError(500, f"Internal error ({type(e).__name__}); the server's log has the details.",
                        type="server_error", code="internal_error").response()

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
        """The body as JSON. Only `Content-Type: application/json`: a web page can send another site a
        text/plain POST without asking (no CORS preflight), never an application/json one."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"Send the body as JSON with 'Content-Type: application/json' (got "
                           f"'{ctype or 'none'}').", code="unsupported_media_type")
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

    async def respond(request: Request, answer: Answer):
        if answer.stream:
            return StreamingResponse(sse(answer, scfg.request_timeout_s), media_type="text/event-stream")
        return answer.whole(await collect(answer.job, request.is_disconnected, scfg.request_timeout_s))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return (importlib.resources.files("llama_lora.serve") / "static" / "chat.html").read_text()

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queued, "active": engine.active, "stats": engine.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return api.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        return api.model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await respond(request, api.chat(await read_json(request)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await respond(request, api.completion(await read_json(request)))

    # ---- admin: adapters added and removed without a restart (the API key is required)

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        authorize(request, admin=True)
        return await api.add_adapter(await read_json(request))

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str, request: Request):
        authorize(request, admin=True)
        return await api.remove_adapter(name)

    return app
