"""The HTTP side: an ASGI app (Starlette) with the OpenAI API's routes over one EngineLoop.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events, else one JSON body)
    GET  /v1/models, /health, /metrics

Handlers only read and check the request, tokenize it and wait on its pieces; the engine runs in
the loop's thread (engine_loop.py). A streaming client that goes away cancels its response, and
the request is aborted then: its blocks are back in the pool before the next engine step.
"""

from __future__ import annotations

import contextlib
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from nanokv.engine.scheduler import RequestTooLarge
from nanokv.serve import metrics
from nanokv.serve.engine_loop import EngineLoop, RequestStream
from nanokv.serve.protocol import APIError, GenerationRequest, completion, new_id, read_chat, read_completion, usage


def build_app(loop: EngineLoop, model_name: str) -> Starlette:
    llm = loop.llm
    context = llm.config.max_position_embeddings

    async def health(request: Request):
        if not loop.alive:
            return JSONResponse({"status": "error", "error": repr(loop.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        default = {"method": llm.method.name, "compression": llm.method.compression, "budget": llm.method.budget}
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(loop.counters.started), "owned_by": "nanokv",
             "max_model_len": context, "kv_compression": default}]})

    async def prometheus(request: Request):
        return PlainTextResponse(metrics.render(loop), media_type="text/plain; version=0.0.4")

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        req = read_chat(body) if chat else read_completion(body)
        if "model" not in body:
            raise APIError(400, f"model is required; this server serves {model_name!r}", "model")
        if body["model"] != model_name:
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        ids = encode(req)
        if len(ids) >= context:
            raise APIError(413, f"the prompt has {len(ids)} tokens; the model's context is {context}", "messages"
                           if chat else "prompt", "context_length_exceeded")
        if not req.max_tokens_given:  # as OpenAI: up to the end of the context
            req.params.max_tokens = context - len(ids)
        try:
            stream = await loop.add(ids, req.params, False, req.method)
        except RequestTooLarge as e:
            raise APIError(413, str(e), "max_tokens", "kv_cache_too_small") from None
        except ValueError as e:  # an unknown method, a bad budget or option
            raise APIError(400, str(e), "kv_compression" if req.method is not None else None) from None
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(events(stream, req, request_id, chat), media_type="text/event-stream")
        text, finish = [], None
        try:
            while finish is None:
                piece = await stream.pieces.get()
                text.append(piece.text)
                finish = piece.finish_reason
        finally:  # cancelled (the client went away): drop the request
            if finish is None:
                loop.abort(stream)
        if finish == "error":
            raise RuntimeError(f"the engine loop stopped: {loop.error!r}")
        seq = stream.seq
        return JSONResponse(completion(request_id, model_name, "".join(text), finish, chat,
                                       usage(len(seq.prompt_token_ids), len(seq.output_token_ids))))

    def encode(req: GenerationRequest) -> list[int]:
        try:
            if not req.chat:
                return llm.encode(req.prompt, chat=False)
            if not llm.tokenizer.has_chat_template:
                raise APIError(400, f"model {model_name!r} has no chat template; use /v1/completions", "messages")
            return llm.tokenizer.encode_chat(req.prompt)
        except ValueError as e:  # token ids out of the vocabulary
            raise APIError(400, str(e), "prompt") from None

    async def events(stream: RequestStream, req: GenerationRequest, request_id: str, chat: bool):
        finish = None
        try:
            if chat:  # the first chunk carries the role, as OpenAI's do
                yield sse(completion(request_id, model_name, "", None, chat, chunk=True, first=True))
            while finish is None:
                piece = await stream.pieces.get()
                finish = piece.finish_reason
                if finish == "error":
                    yield sse(APIError(500, f"the engine loop stopped: {loop.error!r}", kind="server_error").body())
                    return
                if piece.text or finish is not None:
                    yield sse(completion(request_id, model_name, piece.text, finish, chat, chunk=True))
            if req.include_usage:
                seq = stream.seq
                last = completion(request_id, model_name, "", None, chat, chunk=True,
                                  usage_=usage(len(seq.prompt_token_ids), len(seq.output_token_ids)))
                last["choices"] = []
                yield sse(last)
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (the response was cancelled): free its blocks now
            if finish is None:
                loop.abort(stream)

    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException):  # unknown route, wrong HTTP method
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     kind=kind).body(), status_code=e.status_code)

    async def server_error(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {e!r}", kind="server_error").body(), status_code=500)

    routes = [Route("/health", health), Route("/v1/models", models), Route("/metrics", prometheus),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):  # the engine loop lives as long as the server
        loop.start()
        yield
        loop.stop()

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})


def sse(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

