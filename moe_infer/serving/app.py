"""The OpenAI-compatible HTTP API of `moe-infer serve` (FastAPI).

Owns the endpoints (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/metrics``), the request fields and their validation, the OpenAI error shape
(``{"error": {"message", "type", "param", "code"}}``, 4xx for a bad request, 503 when the queue is
full or the server is shutting down), the response and server-sent-event chunk shapes, and the
link between a client's connection and its engine requests: a client that disconnects cancels
them, which frees their slots and KV caches. Handlers never run the model: they hand requests to
the `Engine` thread and read each one's events from an asyncio queue that the engine feeds with
``loop.call_soon_threadsafe``.

Sampling follows the OpenAI API: ``temperature`` 0 is greedy, any other value samples (1 by
default); unset fields take the model's generation config where it sets them (``top_k`` only
then: OpenAI has none). ``top_k``, ``min_p``, ``repetition_penalty`` and ``return_token_ids``
(the token ids of each choice) are extensions, as in vLLM. ``logprobs`` are the model's
(log-softmax of the logits, before temperature and the other processors). Refused with a clear
400: ``presence_penalty`` / ``frequency_penalty`` other than 0, ``best_of`` other than ``n``,
``suffix``, ``echo`` with ``logprobs``, tools and non-text response formats.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_infer.models import encode_text
from moe_infer.serving.engine import Delta, Engine, EngineClosed, Failed, Finished, Overloaded
from moe_infer.serving.sampling import sampling_params
from moe_infer.serving.text import token_text

__all__ = ["ApiError", "ServedModel", "create_app"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- request bodies

class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_token_ids: bool = False


class CompletionBody(_Fields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Fields):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


def _validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {location}", param=location)
    got = f" (got {json.dumps(first['input'])})" if "input" in first and first["type"] != "missing" else ""
    return ApiError(400, f"{location}: {first['msg']}{got}", param=location)


@dataclass
class ServedModel:
    """What the API serves: the engine and its model's name, tokenizer and context length."""

    engine: Engine
    name: str
    tokenizer: Any
    context_length: int
    metrics: Any = None  # ServingMetrics
    created: int = 0


# ----------------------------------------------------------------------------- the app

def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI application of ``served`` (its engine must be started)."""
    app = FastAPI(title="moe_infer", docs_url=None, redoc_url=None, openapi_url=None)
    served.created = served.created or int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), code=str(error.status_code)).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if served.engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from moe_infer.serving.metrics import CONTENT_TYPE

        return Response(served.metrics.render() if served.metrics is not None else b"", media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "moe_infer",
                "max_model_len": served.context_length}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        _check_model(served, name)
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionBody, await _json(request))
        _check_model(served, body.model)
        _refuse_unsupported(body)
        if body.best_of not in (None, body.n):
            raise ApiError(400, f"best_of={body.best_of}: only best_of equal to n is supported", param="best_of")
        if body.suffix:
            raise ApiError(400, "suffix is not supported (no insertion mode)", param="suffix")
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs would need the prompt's logprobs, which are not computed; "
                                "use one or the other", param="echo")
        prompts = _completion_prompts(served, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        call = _Call(served, "text_completion", body, prompts, max_tokens, logprobs=body.logprobs)
        return await call.run(request, echo=body.echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatBody, await _json(request))
        _check_model(served, body.model)
        _refuse_unsupported(body)
        if body.tools or body.tool_choice not in (None, "none"):
            raise ApiError(400, "tools and tool_choice are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, f"response_format type {body.response_format.get('type')!r} is not supported; "
                                f"only 'text'", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = _chat_prompt(served, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        call = _Call(served, "chat.completion", body, [prompt], max_tokens,
                     logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        return await call.run(request)

    return app


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


def _parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        raise ApiError(404, f"The model {name!r} does not exist; this server serves {served.name!r}",
                       param="model", code="model_not_found")


def _refuse_unsupported(body: _Fields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported (only 0); repetition_penalty (an extension) is", param=name)
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")


def _completion_prompts(served: ServedModel, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt of a completions request (a string, strings, ids, or lists of ids)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt: at least one prompt", param="prompt")
    ids = [encode_text(served.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not p for p in ids):
        raise ApiError(400, "prompt: a prompt is empty (it must have at least one token)", param="prompt")
    return ids


def _chat_prompt(served: ServedModel, messages: list[_Message]) -> list[int]:
    tokenizer = served.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"the model {served.name!r} has no chat template, so /v1/chat/completions cannot format "
                            f"messages; use /v1/completions, or start the server with --chat-template FILE",
                       param="messages", code="no_chat_template")
    conversation = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, f"messages.{index}.content: only text parts are supported",
                               param=f"messages.{index}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        conversation.append({"role": message.role, "content": content or ""})
    try:
        encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # a template's own raise_exception(), or a malformed template
        raise ApiError(400, f"the chat template refused the messages: {error}", param="messages") from None
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


# ----------------------------------------------------------------------------- one API call

class _Call:
    """The engine requests of one API call (its prompts x n choices) and their answer."""

    def __init__(self, served: ServedModel, kind: str, body: _Fields, prompts: list[list[int]],
                 max_tokens: int | None, *, logprobs: int | None):
        self.served, self.kind, self.body, self.prompts = served, kind, body, prompts
        self.chat = kind == "chat.completion"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.logprobs = logprobs
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        limit = served.context_length
        longest = max(len(p) for p in prompts)
        if max_tokens is None:  # chat: as much as the context leaves
            max_tokens = limit - longest
        if max_tokens < 1 or longest + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has {longest} "
                                f"tokens and max_tokens asks for {max_tokens} more. Shorten the prompt or lower "
                                f"max_tokens", param="messages" if self.chat else "prompt",
                           code="context_length_exceeded")
        params = self._sampling_params(max_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        self.requests = []
        try:
            for prompt in prompts:
                for choice in range(body.n):
                    index = len(self.requests)
                    self.requests.append(served.engine.make_request(
                        prompt, params, seed=seed + choice, stop=stop, logprobs=logprobs,
                        sink=lambda event, index=index: self._deliver(index, event)))
        except ValueError as error:
            raise ApiError(400, str(error)) from None

    def _sampling_params(self, max_tokens: int):
        body, model = self.body, self.served.engine.model
        fields: dict[str, Any] = {"max_new_tokens": max_tokens}
        if body.temperature == 0:
            fields["do_sample"] = False
        else:
            fields.update(do_sample=True, temperature=1.0 if body.temperature is None else body.temperature)
            if body.top_p is not None:
                fields["top_p"] = body.top_p
            # OpenAI has no top-k: off unless the request (extension) or the model's own config sets it
            fields["top_k"] = body.top_k if body.top_k is not None else (model.generation_config.top_k or 0)
            if body.min_p is not None:
                fields["min_p"] = body.min_p
        if body.repetition_penalty is not None:
            fields["repetition_penalty"] = body.repetition_penalty
        if body.logit_bias:
            vocab = self.served.engine.vocab_size
            bias = {}
            for key, value in body.logit_bias.items():
                if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab or not -100 <= value <= 100:
                    raise ApiError(400, f"logit_bias: {key!r}: {value}: expected token ids in [0, {vocab}) mapped to "
                                        f"biases in [-100, 100]", param="logit_bias")
                bias[(int(key),)] = float(value)
            fields["sequence_bias"] = bias
        try:
            return sampling_params(model, **fields)
        except (TypeError, ValueError) as error:
            raise ApiError(400, str(error)) from None

    def _deliver(self, index: int, event: Any) -> None:
        """Called on the engine thread: hand the event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:
            pass  # the event loop is closed: the server is gone, nobody is waiting

    def _cancel_unfinished(self) -> None:
        for request in self.requests:
            self.served.engine.cancel(request)

    async def run(self, request: Request, *, echo: bool = False) -> Response:
        try:
            self.served.engine.submit(self.requests)
        except (Overloaded, EngineClosed) as error:
            if self.served.metrics is not None:
                self.served.metrics.rejected()
            raise ApiError(503, f"server unavailable: {error}", kind="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        echoed = [self._prompt_text(i) if echo else "" for i in range(len(self.requests))]
        if self.body.stream:
            return StreamingResponse(self._stream(echoed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collector = asyncio.ensure_future(self._collect())
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collector, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collector.done():
                collector.cancel()
                self._cancel_unfinished()  # the client went away: free the slots
        if not collector.done() or collector.cancelled():
            return Response(status_code=499)
        return JSONResponse(self._response(collector.result(), echoed))

    def _prompt_text(self, index: int) -> str:
        from moe_infer.serving.text import TextAssembler

        assembler = TextAssembler(self.served.tokenizer)
        return "".join(assembler.add(t) for t in self.requests[index].prompt) + assembler.finish()

    async def _collect(self) -> list[dict]:
        choices = [{"text": "", "tokens": [], "logprobs": [], "finish": None} for _ in self.requests]
        remaining = len(self.requests)
        while remaining:
            index, event = await self.queue.get()
            choice = choices[index]
            if isinstance(event, Delta):
                choice["text"] += event.text
                choice["tokens"] += event.tokens
                choice["logprobs"] += event.logprobs or []
            elif isinstance(event, Finished):
                choice["finish"] = event
                remaining -= 1
            elif isinstance(event, Failed):
                self._cancel_unfinished()
                raise ApiError(event.status, event.message, kind="server_error")
        return choices

    def _usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _response(self, choices: list[dict], echoed: list[str]) -> dict:
        out = []
        for index, choice in enumerate(choices):
            entry: dict[str, Any] = {"index": index, "finish_reason": choice["finish"].reason,
                                     "logprobs": self._logprobs(choice["logprobs"], offset=len(echoed[index]))
                                     if self.logprobs is not None else None}
            text = echoed[index] + choice["text"]
            if self.chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            if self.body.return_token_ids:
                entry["token_ids"] = choice["tokens"]
            out.append(entry)
        completion_tokens = sum(c["finish"].completion_tokens for c in choices)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.served.name,
                "choices": out, "usage": self._usage(completion_tokens)}

    def _logprobs(self, entries: list, *, offset: int = 0) -> dict:
        tokenizer = self.served.tokenizer
        if self.chat:
            def item(token: int, logprob: float) -> dict:
                text = token_text(tokenizer, token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(t, lp) for t, lp in e.top])
                                for e in entries]}
        tokens = [token_text(tokenizer, e.token) for e in entries]
        offsets, position = [], offset
        for text in tokens:
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.served.name, "choices": choices}
        if self.body.stream_options and self.body.stream_options.get("include_usage"):
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def _delta(self, index: int, text: str, tokens: list[int], logprobs: list | None, offset: int,
               finish: str | None = None, role: bool = False) -> dict:
        entry: dict[str, Any] = {"index": index, "finish_reason": finish,
                                 "logprobs": self._logprobs(logprobs, offset=offset) if logprobs else None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text or role:
                delta["content"] = text
            entry["delta"] = delta
        else:
            entry["text"] = text
        if self.body.return_token_ids:
            entry["token_ids"] = tokens
        return entry

    async def _stream(self, echoed: list[str]):
        completion_tokens = 0
        finished = 0
        offsets = [len(e) for e in echoed]
        try:
            if self.chat:
                yield self._chunk([self._delta(i, "", [], None, 0, role=True) for i in range(len(self.requests))])
            for index, text in enumerate(echoed):
                if text:
                    yield self._chunk([self._delta(index, text, [], None, 0)])
            while finished < len(self.requests):
                index, event = await self.queue.get()
                if isinstance(event, Delta):
                    yield self._chunk([self._delta(index, event.text, event.tokens, event.logprobs, offsets[index])])
                    offsets[index] += sum(len(token_text(self.served.tokenizer, e.token)) for e in event.logprobs or [])
                elif isinstance(event, Finished):
                    finished += 1
                    completion_tokens += event.completion_tokens
                    yield self._chunk([self._delta(index, "", [], None, 0, finish=event.reason)])
                elif isinstance(event, Failed):
                    body = ApiError(event.status, event.message, kind="server_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                    return
            if self.body.stream_options and self.body.stream_options.get("include_usage"):
                yield self._chunk([], usage=self._usage(completion_tokens))
            yield "data: [DONE]\n\n"
        finally:  # done, failed, or the client disconnected (the server cancels this generator)
            self._cancel_unfinished()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
