"""`mtnlg serve`: the OpenAI API over the engine (completions, chat, embeddings), with the tokenizer routes
lm-evaluation-harness uses, health, Prometheus metrics and a playground page.

Every error is the OpenAI envelope with a 4xx (5xx only for a fault of the server itself); no request
body, however malformed, reaches the engine unchecked, and a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mtnlg import LanguageModel
from mtnlg.errors import MtnlgError
from mtnlg.inference.embed import embed
from mtnlg.inference.engine import Engine, Request
from mtnlg.inference.sampling import Sampling, seeded_generators
from mtnlg.serve.metrics import Metrics
from mtnlg.serve.protocol import (
    APIError, ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, Prompt, TokenizeRequest,
)
from mtnlg.serve.runner import EngineRunner, Listener, QueueFull

PLAYGROUND = Path(__file__).with_name("playground.html")
OPEN_PATHS = {"/", "/health", "/metrics"}  # no API key asked
# Prompt tokens a server step reads besides its decode rows: inter-token p99 stayed under 3x p50 at 16
# streaming clients with 128, not with 256 (GPT-2 shape on 2 CPU cores, docs/benchmarks.md).
SERVE_PREFILL_TOKENS = 128
DISCONNECT_CHECK_S = 0.25  # how often a non-streaming request looks for its client
GENERATION_FAILED = "generation failed inside the server (its log has the details); retry the request"


@dataclass
class Settings:
    name: str  # the model id clients pass
    max_num_seqs: int = 16  # KV-cache slots: sequences decoded together
    max_queue: int = 64  # sequences that may wait for a slot; past it a request is refused (503)
    token_budget: int | None = None  # tokens per engine step (decode rows + prompt chunks); None: SERVE_PREFILL_TOKENS
                                     # beyond one per slot. It bounds a step's time, so streams stay smooth
    api_key: str | None = None
    pooling: str = "mean"  # embeddings: mean of the final hidden states, or the last token's
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 1


class Server:
    """The loaded model, its engine thread and metrics; `None` until loading finishes (/health says 503)."""

    def __init__(self, settings: Settings):
        self.settings, self.metrics = settings, Metrics()
        self.lm: LanguageModel | None = None
        self.runner: EngineRunner | None = None

    def start(self, lm: LanguageModel) -> None:
        s = self.settings
        engine = Engine(lm.model, lm.tokenizer, s.max_num_seqs, token_budget=s.token_budget or s.max_num_seqs + SERVE_PREFILL_TOKENS)
        self.runner = EngineRunner(engine, self.metrics, s.max_queue)
        self.runner.start()
        self.lm = lm
        cfg = lm.model.cfg
        print(f"mtnlg serve: {s.name} ready; {s.max_num_seqs} slots x {engine.max_len} tokens, KV cache "
              f"{s.max_num_seqs * engine.cache.bytes_per_row(cfg.n_kv_head, cfg.head_dim) / 2**20:.0f} MiB",
              file=sys.stderr, flush=True)

    @property
    def context(self) -> int:
        return self.lm.model.cfg.max_seq_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.settings.name!r}", "model",
                           "model_not_found")

    def encode(self, prompt: Prompt, param: str) -> list[list[int]]:
        """str, [str], [int] or [[int]] -> token id lists, each non-empty and inside the vocabulary."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, f"{param} is empty; pass text or token ids", param)
        prompts = [prompt] if isinstance(prompt[0], int) else prompt
        ids = [self.lm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        vocab = self.lm.model.cfg.vocab_size
        for tokens in ids:
            if not tokens:
                raise APIError(400, f"{param} holds an empty prompt; every prompt needs at least one token", param)
            if min(tokens) < 0 or max(tokens) >= vocab:
                raise APIError(400, f"{param} holds a token id outside the vocabulary [0, {vocab})", param)
        return ids

    def check_length(self, tokens: list[int], max_tokens: int, field: str) -> None:
        if len(tokens) + max_tokens > self.context:
            raise APIError(400, f"the prompt has {len(tokens)} tokens and {field} is {max_tokens}: together "
                           f"{len(tokens) + max_tokens}, over the model's context of {self.context}; shorten the "
                           f"prompt or lower {field}", field, "context_length_exceeded")

    def requests(self, prompts: list[list[int]], params: Sampling) -> list[Request]:
        return [Request(ids, params, g, index=i) for i, ids in enumerate(prompts)
                for g in seeded_generators(self.lm.model, params, params.n)]

    def submit(self, seqs: list[Request]) -> Listener:
        most = self.settings.max_num_seqs + self.settings.max_queue
        if len(seqs) > most:
            raise APIError(400, f"this request needs {len(seqs)} sequences (prompts x n) but the server holds at most "
                           f"{most} (--max-num-seqs + --max-queue); send fewer prompts or a smaller n", "n")
        listener = Listener(asyncio.get_running_loop())
        try:
            self.runner.submit(seqs, listener)
        except QueueFull:
            raise APIError(503, "the server is busy: every slot is taken and the queue is full; retry shortly",
                           code="queue_full", headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        return listener


def create_app(settings: Settings, load: Callable[[], LanguageModel]) -> FastAPI:
    """The app; `load` runs in a thread once the server is up, so /health answers 503 while it loads."""
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load_and_start() -> None:
            server.start(await asyncio.to_thread(load))

        task = asyncio.create_task(load_and_start())
        yield
        task.cancel()
        if task.done() and not task.cancelled():
            task.exception()  # a failed load: whoever passed `load` reports it
        if server.runner is not None:
            server.runner.stop()

    app = FastAPI(title="mtnlg", lifespan=lifespan, docs_url=None, redoc_url=None)
    _install_error_handlers(app)

    app.add_middleware(Guard, server=server)

    @app.get("/health")
    async def health() -> Response:
        ready = server.lm is not None
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground() -> Response:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "mtnlg", "max_model_len": server.context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest) -> Response:
        server.check_model(body.model)
        prompts = server.encode(body.prompt, "prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else max(1, server.context - max(map(len, prompts)))
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens is 0 without echo: nothing would come back; raise it or set echo", "max_tokens")
        for tokens in prompts:
            server.check_length(tokens, max_tokens, "max_tokens")
        seqs = server.requests(prompts, body.sampling(max_tokens, body.logprobs, body.echo))
        listener = server.submit(seqs)
        reply = _Reply("cmpl", settings.name, server, seqs, body, prompts)
        if body.stream:
            return _sse(reply.completion_chunks(listener), server, seqs)
        if not await _wait(listener, seqs, server, request):
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(reply.completion())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest) -> Response:
        server.check_model(body.model)
        tokenizer = server.lm.tokenizer
        text = tokenizer.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        prompt = server.encode(text, "messages")[0]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, server.context - len(prompt))
        server.check_length(prompt, max_tokens, field)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        seqs = server.requests([prompt], body.sampling(max_tokens, logprobs, stop=tokenizer.chat_stop))
        listener = server.submit(seqs)
        reply = _Reply("chatcmpl", settings.name, server, seqs, body, [prompt])
        if body.stream:
            return _sse(reply.chat_chunks(listener), server, seqs)
        if not await _wait(listener, seqs, server, request):
            return Response(status_code=499)
        return JSONResponse(reply.chat())

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        server.check_model(body.model)
        inputs = server.encode(body.input, "input")
        for tokens in inputs:
            server.check_length(tokens, 0, "input")
        vectors = await asyncio.wrap_future(server.runner.call(lambda: embed(server.lm.model, inputs, settings.pooling)))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        used = sum(map(len, inputs))
        return {"object": "list", "data": data, "model": settings.name, "usage": {"prompt_tokens": used, "total_tokens": used}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        server.check_model(body.model)
        tokenizer = server.lm.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "pass exactly one of prompt and messages", "prompt")
        text = body.prompt if body.prompt is not None else tokenizer.render_chat(
            [{"role": m.role, "content": m.text()} for m in body.messages], body.add_generation_prompt)
        tokens = tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        server.check_model(body.model)
        vocab = server.lm.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"tokens holds an id outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": server.lm.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tokenizer = server.lm.tokenizer
        eod = tokenizer.eod_id
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.decode([eod]), "eos_token_id": eod,
                "bos_token": tokenizer.bos_token, "bos_token_id": tokenizer.bos_id,  # lm-eval's prefix for scoring
                "vocab_size": tokenizer.vocab_size, "model_max_length": server.context,
                "chat_template": tokenizer.chat_template}

    return app


class Guard:
    """Before any route: the body size limit (413), the API key (401) and loading (503) — as plain ASGI, so
    streaming responses and disconnects pass through untouched."""

    def __init__(self, app: Callable, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, error = self.server.settings, None
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > settings.max_body_bytes:
            error = APIError(413, f"the request body is over {settings.max_body_bytes} bytes; send less", code="body_too_large")
        elif scope["path"] not in OPEN_PATHS:
            if settings.api_key is not None and not _key_matches(scope, settings.api_key):
                error = APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
            elif self.server.lm is None:
                error = APIError(503, "the model is still loading; retry shortly", code="loading", headers={"Retry-After": "1"})
        if error is not None:
            return await _error(error)(scope, receive, send)
        self.server.metrics.running.inc()
        try:
            await self.app(scope, _limited(receive, settings.max_body_bytes), send)
        finally:
            self.server.metrics.running.dec()


def _limited(receive: Callable, limit: int) -> Callable:
    """A body sent without (or beyond) its Content-Length still stops at the limit."""
    seen = 0

    async def receive_limited() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise APIError(413, f"the request body is over {limit} bytes; send less", code="body_too_large")
        return message

    return receive_limited


async def _wait(listener: Listener, seqs: list[Request], server: Server, request: HTTPRequest) -> bool:
    """Until every sequence has finished (True); a client that disconnects meanwhile cancels them (False)."""
    left, checked = len(seqs), time.monotonic()
    while left:
        try:
            _, event = await asyncio.wait_for(listener.queue.get(), timeout=DISCONNECT_CHECK_S)
            left -= event.finish is not None
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            pass
        if time.monotonic() - checked >= DISCONNECT_CHECK_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                server.runner.cancel(seqs)
                return False
    if any(s.finish == "error" for s in seqs):
        raise APIError(500, GENERATION_FAILED)
    return True


def _sse(events: AsyncIterator[dict], server: Server, seqs: list[Request]) -> StreamingResponse:
    """Server-sent events as OpenAI sends them, ending with [DONE]; an error after the stream started is one
    error event; a client that goes away cancels the sequences."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in events:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except _GenerationFailed:
            yield f"data: {json.dumps(APIError(500, GENERATION_FAILED).body())}\n\n"
        finally:
            if not all(s.finish for s in seqs):
                server.runner.cancel(seqs)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Reply:
    """The response bodies of one completions or chat request, whole or as stream chunks."""

    def __init__(self, prefix: str, model: str, server: Server, seqs: list[Request], body: Any, prompts: list[list[int]]):
        self.id, self.model = f"{prefix}-{uuid.uuid4().hex}", model
        self.created, self.tokenizer, self.seqs, self.body, self.prompts = int(time.time()), server.lm.tokenizer, seqs, body, prompts

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt = sum(map(len, self.prompts))
        completion = sum(len(s.ids) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion(self) -> dict:
        choices = []
        for i, seq in enumerate(self.seqs):
            prompt_text = self.tokenizer.decode(seq.prompt) if seq.params.echo else ""
            choices.append({"index": i, "text": prompt_text + seq.output(self.tokenizer),
                            "logprobs": self._legacy_logprobs(seq), "finish_reason": _finish(seq)})
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage()}

    def chat(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": seq.output(self.tokenizer)},
                    "logprobs": self._chat_logprobs(seq.ids, seq.logprobs, seq.top) if seq.params.logprobs is not None else None,
                    "finish_reason": _finish(seq)} for i, seq in enumerate(self.seqs)]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}

    async def completion_chunks(self, listener: Listener) -> AsyncIterator[dict]:
        head = self._head("text_completion")
        for i, seq in enumerate(self.seqs):
            if seq.params.echo:
                yield {**head, "choices": [{"index": i, "text": self.tokenizer.decode(seq.prompt), "logprobs": None,
                                            "finish_reason": None}]}
        offsets = [len(self.tokenizer.decode(s.prompt)) if s.params.echo else 0 for s in self.seqs]
        async for i, event in self._events(listener):
            logprobs = None
            if self.body.logprobs is not None and event.tokens:
                logprobs = self._legacy(event.tokens, event.logprobs, event.top if self.body.logprobs else None, offsets[i])
                offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            if event.text or logprobs or event.finish:
                yield {**head, "choices": [{"index": i, "text": event.text, "logprobs": logprobs,
                                            "finish_reason": _finish(self.seqs[i]) if event.finish else None}]}
        if self.body.include_usage:
            yield {**head, "choices": [], "usage": self.usage()}

    async def chat_chunks(self, listener: Listener) -> AsyncIterator[dict]:
        head = self._head("chat.completion.chunk")
        for i in range(len(self.seqs)):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]}
        async for i, event in self._events(listener):
            logprobs = None
            if self.body.logprobs and event.tokens:
                logprobs = self._chat_logprobs(event.tokens, event.logprobs, event.top)
            if event.text or logprobs:
                yield {**head, "choices": [{"index": i, "delta": {"content": event.text}, "logprobs": logprobs,
                                            "finish_reason": None}]}
            if event.finish:
                yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": _finish(self.seqs[i])}]}
        if self.body.include_usage:
            yield {**head, "choices": [], "usage": self.usage()}

    async def _events(self, listener: Listener) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, event) until every sequence has finished; a failed one ends the stream with an
        error event (the status line has gone out already)."""
        index = {id(s): i for i, s in enumerate(self.seqs)}
        left = len(self.seqs)
        while left:
            seq, event = await listener.queue.get()
            if event.finish == "error":
                raise _GenerationFailed
            left -= event.finish is not None
            yield index[id(seq)], event

    def _legacy_logprobs(self, seq: Request) -> dict | None:
        if seq.params.logprobs is None:
            return None
        ids, logprobs, top = seq.ids, seq.logprobs, seq.top
        if seq.params.echo:
            ids, logprobs, top = seq.prompt + ids, seq.prompt_logprobs + logprobs, seq.prompt_top + top
        return self._legacy(ids, logprobs, top if seq.params.logprobs else None)

    def _legacy(self, ids: list[int], logprobs: list, top: list | None, start: int = 0) -> dict:
        """The completions API's logprobs: token strings, their log-probabilities (None for a first prompt
        token), the top alternatives, and each token's character offset in the text (from `start`)."""
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets = (start + np.cumsum([0] + [len(t) for t in tokens[:-1]])).tolist() if tokens else []
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}

    def _chat_logprobs(self, ids: list[int], logprobs: list[float], top: list[dict]) -> dict:
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        content = []
        for k, (t, lp) in enumerate(zip(ids, logprobs)):
            alternatives = [entry(s, v) for s, v in top[k].items()] if k < len(top) else []
            content.append({**entry(self.tokenizer.decode([t]), lp), "top_logprobs": alternatives})
        return {"content": content}


class _GenerationFailed(Exception):
    """A step failed while this request ran (the engine logged why and went on)."""


def _finish(seq: Request) -> str:
    return "length" if seq.finish == "length" else "stop"


def _key_matches(scope: dict, key: str) -> bool:
    given = dict(scope["headers"]).get(b"authorization", b"")
    token = given[7:] if given.lower().startswith(b"bearer ") else b""
    return hmac.compare_digest(token, key.encode())


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(MtnlgError)
    async def mtnlg_error(_: HTTPRequest, e: MtnlgError) -> JSONResponse:
        return _error(APIError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            return _error(APIError(400, "the request body is not valid JSON; send a JSON object"))
        return _error(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param))

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, e: HTTPException) -> JSONResponse:
        return _error(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def crashed(_: HTTPRequest, e: Exception) -> JSONResponse:
        return _error(APIError(500, f"internal error ({type(e).__name__}); the server's log has the details"))
