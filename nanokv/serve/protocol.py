"""The OpenAI API's shapes: request bodies read into nanokv's terms, and the JSON sent back.

Only what nanokv does is accepted; a field it cannot honour (n > 1, logprobs, tools) is refused
with a 400 that names it, rather than silently ignored. Two extension fields, as vLLM has
its own: `kv_compression` ({"method": "snapkv", "compression": 0.5, ...}: this request's KV-cache
method, see engine/request_methods.py) and `top_k` / `ignore_eos`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from nanokv.sampling import SamplingParams


class APIError(Exception):
    """An error the client caused, in the OpenAI shape: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# fields of the OpenAI API nanokv reads; any other is refused (a typo would otherwise pass unnoticed)
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
          "top_k", "ignore_eos", "kv_compression"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
ROLES = ("system", "user", "assistant")


@dataclass
class GenerationRequest:
    """A request body read into what LLM.add_request takes."""
    prompt: object                 # text, or token ids
    chat: bool                     # messages through the chat template (ids already are)
    params: SamplingParams
    method: dict | None            # kv_compression
    stream: bool
    include_usage: bool            # stream_options.include_usage: a last chunk with the token counts
    max_tokens_given: bool         # else: up to the model's context


def read_completion(body: dict) -> GenerationRequest:
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    else:
        raise APIError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")
    return read_common(body, prompt, chat=False, default_max_tokens=16)  # OpenAI's default for completions


def read_chat(body: dict) -> GenerationRequest:
    check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be {{role: one of {', '.join(ROLES)}, content: a string}}, "
                                f"got {m!r}", "messages")
    if "max_completion_tokens" in body:  # OpenAI's newer name
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return read_common(body, [{"role": m["role"], "content": m["content"]} for m in messages], chat=True,
                       default_max_tokens=None)


def read_common(body: dict, prompt, chat: bool, default_max_tokens: int | None) -> GenerationRequest:
    if body.get("n", 1) != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body['n']!r}", "n")
    max_tokens = body.get("max_tokens", default_max_tokens)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    method = body.get("kv_compression")
    if method is not None and (not isinstance(method, dict) or not isinstance(method.get("method"), str)):
        raise APIError(400, 'kv_compression must be an object such as {"method": "snapkv", "compression": 0.5}, '
                            f"got {method!r}", "kv_compression")
    try:
        params = SamplingParams(max_tokens=max_tokens or 1, temperature=number(body, "temperature", 1.0),
                                top_p=number(body, "top_p", 1.0), top_k=body.get("top_k", 0), seed=body.get("seed"),
                                stop=body.get("stop") or [], ignore_eos=bool(body.get("ignore_eos", False)))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return GenerationRequest(prompt, chat, params, method, stream, bool(options.get("include_usage")),
                             max_tokens is not None)


def number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise APIError(400, f"{name} must be a number, got {value!r}", name)
    return float(value)


def check_fields(body, known: set[str]):
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unsupported field {unknown[0]!r}; nanokv reads: {', '.join(sorted(known))}", unknown[0])


# --- responses ------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str, finish_reason: str | None, chat: bool,
               usage_: dict | None = None, chunk: bool = False, first: bool = False) -> dict:
    """A whole response, or (chunk) one server-sent event's: `text` is then the new piece."""
    if chat:
        if chunk:
            choice = {"index": 0, "delta": ({"role": "assistant", "content": text} if first else {"content": text})
                      if text or first else {}, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage_ is not None:
        body["usage"] = usage_
    return body
