"""OpenAI-compatible completions and chat completions: request validation, chat prompts, response
bodies and Server-Sent-Event framing. Pure (no torch, no FastAPI/starlette: an import-linter contract
checks it) so it is unit-tested directly; the routes are :mod:`tauon_serve.rest.openai` and the service
over the engine is :class:`tauon_serve.llm.LLMService`.

Every problem raises :class:`OpenAIError`, answered as OpenAI does:
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .detokenizer import MAX_STOP_STRINGS, stop_error

# A prompt of more characters than this per token of the model length is refused before it is
# tokenized: no tokenizer averages more (llm.CHARS_PER_TOKEN_BOUND is the same bound).
CHARS_PER_TOKEN_BOUND = 64
CHAT_ROLES = ("system", "developer", "user", "assistant")

# Accepted only with their neutral value; anything else is refused with 400 naming the parameter.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False),
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    *_NEUTRAL,
}
COMPLETION_KEYS = frozenset({*_COMMON, "prompt"})
CHAT_KEYS = frozenset({*_COMMON, "messages", "max_completion_tokens"})

# The chat prompt used when the tokenizer has no chat template (documented in SERVING.md).
DEFAULT_CHAT_TEMPLATE_DOC = "<|ROLE|>\\nCONTENT\\n per message, then <|assistant|>\\n"


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _error_type(status)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 413:
        return "invalid_request_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass(frozen=True)
class Defaults:
    served_name: str
    max_new_tokens: int


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # "completion" | "chat"
    prompt: str | list[int]  # text, or token ids (completions only)
    messages: tuple[tuple[str, str], ...]  # chat: (role, content)
    max_tokens: int | None  # None = the server default (bounded by the model length)
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(message: str, param: str, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _check_unicode(text: str, param: str) -> str:
    """``text`` unless it holds a lone surrogate (JSON's ``"\\ud800"``), which no tokenizer takes."""
    if not text.isascii():  # O(1) for an ASCII string
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _bad(
                f"{param} is not valid Unicode: a lone surrogate at character {exc.start}", param
            ) from None
    return text


# -- sizes, before any pass over the body ---------------------------------------------------------


def check_sizes(kind: str, body: Any, max_model_length: int) -> None:
    """Refuse a prompt that cannot fit the model length from its sizes alone: token ids, messages,
    content parts and characters are counted (``len``, no per-item validation, at most one look at each
    of ``max_model_length`` messages) before :func:`parse_completion` / :func:`parse_chat` walk it.
    Malformed bodies pass through to the parsers, which name what is wrong."""
    if not isinstance(body, dict):
        return
    max_chars = max_model_length * CHARS_PER_TOKEN_BOUND
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and len(prompt) > max_model_length:
            raise _too_long(max_model_length, f"{len(prompt)} tokens", "prompt")
        if isinstance(prompt, str) and len(prompt) > max_chars:
            raise _too_long(max_model_length, f"{len(prompt)} characters", "prompt")
        return
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > max_model_length:  # every message is at least one token of the prompt
        raise _too_long(max_model_length, f"{len(messages)} messages", "messages")
    parts = chars = 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            parts += len(content)
            if parts > max_model_length:
                raise _too_long(max_model_length, f"more than {max_model_length} content parts", "messages")
            chars += sum(
                len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        if chars > max_chars:
            raise _too_long(max_model_length, f"more than {max_chars} characters", "messages")


def _too_long(max_model_length: int, what: str, param: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"This model's maximum context length is {max_model_length} tokens; the prompt is {what} "
        "(--max-model-length)",
        param=param,
        code="context_length_exceeded",
    )


def _check_model(body: dict[str, Any], defaults: Defaults) -> None:
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("model must be a string", "model", "invalid_type")
    if model != defaults.served_name:
        raise OpenAIError(
            404,
            f"The model {model!r} does not exist; this server serves {defaults.served_name!r}",
            param="model",
            code="model_not_found",
        )


def _check_keys(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise _bad(f"unrecognized request argument: {unknown[0]}", unknown[0], "unsupported_parameter")
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        if value is None or any(value == v and type(value) is type(v) for v in neutral):
            continue
        raise _bad(
            f"{key}={json.dumps(value)[:40]} is not supported by this server", key, "unsupported_parameter"
        )


def _max_tokens(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise _bad(f"{key} must be an integer", key, "invalid_type")
    if value <= 0:
        raise _bad(f"{key} must be at least 1, got {value}", key)
    return int(value)


def _float_param(
    body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise _bad(f"{key} must be a number", key, "invalid_type")
    v = float(value)
    if v != v or v > hi or v < lo or (lo_open and v == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"{key} must be in {bound}, got {value}", key)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(value) > MAX_STOP_STRINGS:  # before any pass over the entries
        raise _bad(f"stop has {len(value)} entries; at most {MAX_STOP_STRINGS} are allowed", "stop")
    if not all(isinstance(s, str) for s in value):
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    problem = stop_error(value)  # the engine's bound: 1..MAX_STOP_CHARS characters each
    if problem:
        raise _bad(problem, "stop")
    return tuple(_check_unicode(s, "stop") for s in value)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or any(k != "include_usage" for k in options):
            raise _bad("stream_options must be an object with only include_usage", "stream_options")
        iu = options.get("include_usage", False)
        if not isinstance(iu, bool):
            raise _bad("stream_options.include_usage must be a boolean", "stream_options.include_usage")
        include_usage = iu
    return stream, include_usage


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not -(2**63) <= value < 2**64:
        raise _bad("seed must be a 64-bit integer", "seed", "invalid_type")
    return int(value) % (2**63)


def _common(body: Any, defaults: Defaults, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "body", "invalid_type")
    _check_model(body, defaults)
    _check_keys(body, allowed)
    stream, include_usage = _stream(body)
    return {
        "temperature": _float_param(body, "temperature", 1.0, 0.0, 2.0, lo_open=False),
        "top_p": _float_param(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "stop": _stop(body),
        "seed": _seed(body),
        "stream": stream,
        "include_usage": include_usage,
    }


def parse_completion(body: Any, defaults: Defaults) -> GenerationRequest:
    common = _common(body, defaults, COMPLETION_KEYS)
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("you must provide a prompt", "prompt", "missing_required_parameter")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        elif prompt and all(_is_int(t) for t in prompt):
            pass
        else:
            raise _bad(
                "prompt must be one string or one list of token ids (batches are not supported)", "prompt"
            )
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) and t >= 0 for t in prompt):
            raise _bad("prompt token ids must be non-negative integers", "prompt")
    elif not isinstance(prompt, str):
        raise _bad("prompt must be a string or a list of token ids", "prompt", "invalid_type")
    if prompt == "":
        raise _bad("prompt must not be empty", "prompt")
    if isinstance(prompt, str):
        _check_unicode(prompt, "prompt")
    return GenerationRequest(
        kind="completion",
        prompt=prompt,
        messages=(),
        max_tokens=_max_tokens(body, "max_tokens"),
        **common,
    )


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return _check_unicode(value, where)
    if isinstance(value, list):
        parts: list[str] = []
        for k, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise _bad(
                    f"{where}[{k}] must be {{'type': 'text', 'text': str}} (only text is supported)", where
                )
            parts.append(_check_unicode(part["text"], f"{where}[{k}].text"))
        return "".join(parts)
    raise _bad(f"{where} must be a string or a list of text parts", where, "invalid_type")


def parse_chat(body: Any, defaults: Defaults) -> GenerationRequest:
    common = _common(body, defaults, CHAT_KEYS)
    messages = body.get("messages")
    if messages is None:
        raise _bad("you must provide messages", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad("messages must be a list", "messages", "invalid_type")
    if not messages:
        raise _bad("messages must not be empty", "messages")
    parsed: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise _bad(
                f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)[:40]}",
                f"{where}.role",
            )
        if "content" not in msg or msg["content"] is None:
            raise _bad(f"{where}.content is required", f"{where}.content", "missing_required_parameter")
        extra = sorted(k for k in msg if k not in ("role", "content", "name"))
        if extra:
            raise _bad(f"{where}.{extra[0]} is not supported", f"{where}.{extra[0]}", "unsupported_parameter")
        parsed.append((str(role), _content(msg["content"], f"{where}.content")))
    limit = _max_tokens(body, "max_completion_tokens")
    if limit is None:
        limit = _max_tokens(body, "max_tokens")
    return GenerationRequest(kind="chat", prompt="", messages=tuple(parsed), max_tokens=limit, **common)


def default_chat_prompt(messages: tuple[tuple[str, str], ...]) -> str:
    """The chat prompt when the tokenizer has no chat template."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"


def chat_prompt(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> str:
    """The conversation as the model's chat template writes it (OpenAIError 400 when the template refuses
    the messages, e.g. roles that do not alternate), or :func:`default_chat_prompt` without one."""
    if not getattr(tokenizer, "chat_template", None):
        return default_chat_prompt(tuple(messages))
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja2's TemplateError, or whatever the template's raise_exception raises
        raise _bad(
            f"messages do not fit this model's chat template: {type(exc).__name__}: {str(exc)[:200]}",
            "messages",
            "invalid_chat_template",
        ) from None
    return str(rendered)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """The chat prompt's token ids, where a message's content is always text: a special token's text in
    it (``</s>``, ``<|im_start|>``) is tokenized as the characters it is, never as the control token, so
    a user cannot forge a turn. The template's own special tokens stay special. Without such text in any
    message the prompt is tokenized whole, exactly as before."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    special = _special_pattern(tokenizer)
    if special is None or not any(special.search(content) for _, content in messages):
        return list(
            tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=not templated)["input_ids"]
        )
    pieces = _prompt_pieces(tokenizer, messages) if templated else _default_pieces(messages)
    plain = _plain_tokenizer(tokenizer)
    ids: list[int] = []
    for text, is_content in pieces:
        if text:
            enc = plain if is_content else tokenizer
            ids += enc(text, add_special_tokens=False)["input_ids"]
    if not templated:  # the tokenizer's own BOS/EOS, as tokenizer(text) adds them
        prefix, suffix = _added_special_ids(tokenizer)
        ids = prefix + ids + suffix
    return ids


_PIECE = re.compile("\ue000([0-9a-f]{32}):([0-9]+)\ue001")  # a placeholder for message i's content


def _prompt_pieces(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The template rendered around placeholders: (text, is_content) pieces in prompt order."""
    nonce = uuid.uuid4().hex
    holders = [(role, f"\ue000{nonce}:{i}\ue001") for i, (role, _) in enumerate(messages)]
    rendered = chat_prompt(tokenizer, holders)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in _PIECE.finditer(rendered):
        if m.group(1) != nonce:
            continue
        pieces.append((rendered[pos : m.start()], False))
        pieces.append((messages[int(m.group(2))][1], True))
        pos = m.end()
    pieces.append((rendered[pos:], False))
    return pieces


def _default_pieces(messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = []
    for role, content in messages:
        pieces += [(f"<|{role}|>\n", False), (content, True), ("\n", False)]
    return [*pieces, ("<|assistant|>\n", False)]


_SPECIAL_PATTERNS: weakref.WeakKeyDictionary[Any, re.Pattern[str] | None] = weakref.WeakKeyDictionary()
_PLAIN: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """One regex matching the text of any of the tokenizer's special tokens (None: it has none)."""
    if tokenizer not in _SPECIAL_PATTERNS:
        texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        texts |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
        texts = {t for t in texts if t}
        alternatives = "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
        _SPECIAL_PATTERNS[tokenizer] = re.compile(alternatives) if texts else None
    return _SPECIAL_PATTERNS[tokenizer]


def _plain_tokenizer(tokenizer: Any) -> Any:
    """A copy of the tokenizer that reads special tokens' text as text (``split_special_tokens``). A copy:
    switching the shared tokenizer back and forth would race with other threads using it."""
    plain = _PLAIN.get(tokenizer)
    if plain is None:
        plain = copy.deepcopy(tokenizer)
        plain.split_special_tokens = True
        plain("", add_special_tokens=False)  # applies the setting now, before any other thread uses it
        _PLAIN[tokenizer] = plain
    return plain


def _added_special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer(text)`` puts before and after the text's own (BOS, EOS...)."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


# -- responses -----------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(
    kind: str, rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    choice: dict[str, Any]
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """Builds the SSE byte frames of one streamed answer."""

    def __init__(self, kind: str, rid: str, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.rid = rid
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self.role_sent = False

    def _chunk(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_
        return sse(body)

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if not self.role_sent:
                delta["role"] = "assistant"
                self.role_sent = True
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def delta(self, text: str) -> bytes:
        return self._chunk([self._choice(text, None)])

    def finish(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        frames = b""
        if text:
            frames += self.delta(text)
        frames += self._chunk([self._choice(None if self.kind == "chat" else "", finish_reason)])
        if self.include_usage:
            frames += self._chunk([], usage(prompt_tokens, completion_tokens))
        return frames + DONE

    def error(self, err: OpenAIError) -> bytes:
        return sse(err.body()) + DONE


def shutdown_frame(message: str) -> bytes:
    """The last frames of a stream the server ends at its shutdown deadline: an error, then [DONE]."""
    return sse(OpenAIError(503, message, code="unavailable").body()) + DONE


DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def models_list(name: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "tauon"}],
    }
