"""OpenAI's completion requests and responses: what expertflow-serve reads and writes.

``parse`` checks a request body field by field (a one-line message naming the field, OpenAI's
error shape and status) and turns it into token ids and a ``Sampling``; the ``*_body`` and
``*_chunk`` functions build the responses and stream chunks OpenAI's clients read. Defaults
follow the model: without ``temperature`` a model whose generation config samples samples with
its temperature, top-p and top-k, any other decodes greedily (as ``generate`` would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...runtime.generate.engine import Sampling
from ...runtime.store.chat import render_chat
from ...runtime.store.tokenizer import encode_text

#: Fields of OpenAI's API this server does not implement: a request that uses one is refused,
#: never silently answered without it.
UNSUPPORTED = {"logprobs": "log probabilities", "top_logprobs": "log probabilities", "tools": "tool calls",
               "tool_choice": "tool calls", "functions": "function calls", "function_call": "function calls",
               "logit_bias": "logit_bias", "echo": "echo", "suffix": "suffix", "audio": "audio output",
               "modalities": "other modalities", "prediction": "predicted outputs"}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_STOP_CHARS = 1000  # a stop string is searched for at every token


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Parsed:
    chat: bool
    ids: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse(body: Any, chat: bool, served: str, tokenizer: Any, context: int, vocab: int, defaults: Any) -> Parsed:
    """``body`` of a chat (``chat``) or text completion; ApiError for anything wrong with it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the name GET /v1/models lists", "model")
    if model != served:
        raise ApiError(404, f"the model '{model}' does not exist here; this server serves '{served}'", "model",
                       "model_not_found")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}, 0):
            raise ApiError(400, f"'{name}' is not supported by this server ({what}); leave it out", name)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "'response_format' other than text is not supported; leave it out", "response_format")
    for name in ("n", "best_of"):
        if _number(body, name, 1, 1, 2**31, integer=True) != 1:
            raise ApiError(400, f"only {name}=1 is supported: one completion per request", name)
    ids = _chat_ids(body, tokenizer) if chat else _prompt_ids(body, tokenizer, vocab)
    room = context - len(ids)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ApiError(400, f"'{param}' must be a positive integer, got {limit!r}", param)
    if room < 1 or (limit is not None and limit > room):
        raise ApiError(400, f"this request needs {len(ids)} prompt tokens + {limit or 1} completion tokens, over "
                       f"the server's context of {context} tokens; shorten the prompt or lower {param}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return Parsed(chat, ids, _sampling(body, limit or room, defaults), _stops(body), stream,
                  bool(options.get("include_usage", False)))


def _sampling(body: dict[str, Any], limit: int, defaults: Any) -> Sampling:
    sampled = bool(getattr(defaults, "do_sample", False))
    temperature = _number(body, "temperature", (defaults.temperature or 1.0) if sampled else 0.0, 0.0, 2.0)
    return Sampling(
        max_new_tokens=limit, temperature=temperature,
        top_p=_number(body, "top_p", (defaults.top_p or 1.0) if sampled else 1.0, 0.0, 1.0, open_low=True),
        top_k=_number(body, "top_k", (defaults.top_k or 0) if sampled else 0, 0, 2**31, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", defaults.repetition_penalty or 1.0, 0.0, 100.0,
                                   open_low=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True))


def _number(body: dict[str, Any], name: str, default: Any, low: float, high: float, integer: bool = False,
            open_low: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)) or value > high \
            or value < low or (open_low and value <= low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'} in {bound}, got {value!r}",
                       name)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops) \
            or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters or a list "
                       f"of at most {MAX_STOPS} of them", "stop")
    return tuple(stops)


def _chat_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a 'role' among {', '.join(ROLES)}", "messages")
        plain.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions with a prompt", "messages")
    try:
        text = render_chat(tokenizer, plain)
    except Exception as exc:  # a template that fails or runs past its bounds (runtime/store/chat.py)
        raise ApiError(400, f"the chat template could not render these messages: {exc}", "messages") from None
    return encode_text(tokenizer, text, add_special_tokens=False)["input_ids"]


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts (images and audio are not supported)",
                   "messages")


def _prompt_ids(body: dict[str, Any], tokenizer: Any, vocab: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str) and prompt:
        return encode_text(tokenizer, prompt)["input_ids"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside this model's vocabulary [0, {vocab})", "prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be one non-empty string or one list of token ids (one prompt per request)",
                   "prompt")


# ----- responses -----

def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason: str) -> str:
    """The engine's end ("stop", "length", "cancelled", "error: ...") as OpenAI's finish_reason."""
    return reason if reason in ("stop", "length") else "stop"


def body_of(p: Parsed, ident: str, created: int, model: str, text: str, reason: str, n: int) -> dict[str, Any]:
    if p.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        return {"id": ident, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": usage(len(p.ids), n)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(len(p.ids), n)}


def chunk_of(p: Parsed, ident: str, created: int, model: str, text: str | None, reason: str | None,
             first: bool = False) -> dict[str, Any]:
    if p.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
            ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(p: Parsed, ident: str, created: int, model: str, n: int) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion.chunk" if p.chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(len(p.ids), n)}


class TextStream:
    """Tokens to text as they come: held back while the text ends inside a UTF-8 character or
    could still be the start of a stop string; cut at the first stop string. Each token decodes
    only a few tokens (the window since the last stable point, as TGI and vLLM detokenize), so a
    long completion costs linear time, not quadratic."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decoded to text already taken; ids[read:] not yet
        self.sent = 0
        self.text = ""  # the completion's text so far (stable part)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _settle(self, final: bool = False) -> None:
        """Appends the text of ``ids[read:]`` once it is whole (not ending inside a character)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> tuple[str, bool]:
        """The new text to send, and whether a stop string ended the completion."""
        self.ids.append(token)
        self._settle()
        start = max(self.sent - max((len(s) for s in self.stops), default=0), 0)
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            cut = min(cuts)
            out, self.sent, self.text = self.text[self.sent:cut], cut, self.text[:cut]
            self.ids = self.ids[:self.read]  # nothing past the stop is sent at flush
            return out, True
        safe = len(self.text)
        for s in self.stops:  # the longest tail that could still grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:n]):
                    safe = min(safe, len(self.text) - n)
                    break
        out = self.text[self.sent:max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out, False

    def flush(self) -> str:
        """The rest: held-back text, and a last character left incomplete."""
        if self.read < len(self.ids):
            self._settle(final=True)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
