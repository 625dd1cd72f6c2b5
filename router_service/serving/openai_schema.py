"""Requests of the OpenAI-compatible API -> a validated Plan: prompts as token ids, sampling settings, choices.

    JSON body -> known fields only (unknown refused by name; unsupported OpenAI fields accepted only at
    their neutral value) -> per prompt: a GenerateRequest -> MoEApi.validate_generate (the gRPC path's
    own check: HTTP and gRPC accept and refuse the same values) -> Plan

Sampling fields go through elasticmoe.v1.GenerateRequest on purpose, so an HTTP value reaches the
engine exactly as the same value sent over gRPC would (float32 temperature, int32 limits).
Extensions, as vLLM has them: `top_k`, `stop_token_ids`, `ignore_eos`, `return_tokens_as_token_ids`,
`add_generation_prompt` (chat), token-id prompts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elasticmoe.v1 import serving_pb2

from router_service.model.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingError, SamplingParams
from router_service.serving.api import ApiError, MoEApi
from router_service.serving.chat_template import ChatTemplate, ChatTemplateError
from router_service.serving.openai_errors import OpenAIError, bad_request, from_api_error

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request: each is a sequence in the engine
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # bounds the held-back text and the matching per token

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n", "stream",
          "stream_options", "user", "logprobs", "return_tokens_as_token_ids", "ignore_eos"}
FIELDS = {"completion": COMMON | {"prompt", "echo"},
          "chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt"}}
# OpenAI fields this server does not implement: accepted at the value that means "off", refused otherwise,
# so a client never believes a setting took effect.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "best_of": 1, "suffix": "",
           "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
           "parallel_tool_calls": True}
# http field -> (GenerateRequest field, what it must be: the message when the proto cannot hold the value)
SAMPLING = {"max_tokens": ("max_tokens", "an integer >= 1"), "max_completion_tokens": ("max_tokens", "an integer >= 1"),
            "temperature": ("temperature", "a finite number >= 0 (0 = greedy)"),
            "top_p": ("top_p", "a number in (0, 1]"), "top_k": ("top_k", "an integer >= 0 (0 = off)"),
            "seed": ("seed", "an integer in [0, 2**64)"), "stop_token_ids": ("stop_token_ids", "a list of token ids")}


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    params: SamplingParams
    text: str  # the prompt's text ("" without a tokenizer): what `echo` returns


@dataclass(frozen=True)
class Plan:
    kind: str  # "completion" | "chat"
    prompts: list[Prompt]
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool
    tokens_as_ids: bool  # return_tokens_as_token_ids: logprob tokens as "token_id:N"

    def choices(self):
        """(choice index, prompt index, its settings): n per prompt, in order; seeded choices get
        seed + j, so n choices differ and each equals a single request with that seed (vLLM's rule)."""
        for p, prompt in enumerate(self.prompts):
            for j in range(self.n):
                params = prompt.params
                if params.seed is not None and j:
                    params = dataclasses.replace(params, seed=(params.seed + j) % (MAX_SEED + 1))
                yield p * self.n + j, p, params


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model", f"model must be a string, got {model!r}")
    if model is not None and model != served:
        raise OpenAIError(404, f"the model {model!r} does not exist: this server serves {served!r} (GET /v1/models)",
                          param="model", code="model_not_found")


def parse(kind: str, body, api: MoEApi, template: ChatTemplate | None) -> Plan:
    """The Plan of a /v1/completions (kind "completion") or /v1/chat/completions ("chat") body. It renders
    and tokenizes: call it off the event loop (the sizes are bounded first, as gRPC's)."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    _known_fields(kind, body)
    n = _int(body, "n", 1, 1, MAX_N)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad_request("stream_options", "stream_options must be {\"include_usage\": bool}, and only with "
                                            "stream: true")
    include_usage = _bool(options or {}, "include_usage", False)
    if kind == "chat":
        logprobs, top = _bool(body, "logprobs", False), _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        texts, echo = [_chat_prompt(body, api, template)], False
    else:
        logprobs = body.get("logprobs") is not None  # an int: the alternatives per token (0: the token's own)
        top = _int(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
        texts, echo = _completion_prompts(body.get("prompt")), _bool(body, "echo", False)
    if len(texts) * n > MAX_CHOICES:
        raise bad_request("n", f"n x prompts must be <= {MAX_CHOICES}, got {n} x {len(texts)}")
    sampling, names = _sampling_fields(body)
    names.update(token_ids="prompt" if kind == "completion" else "messages", prompt="prompt")
    extra = {"top_logprobs": top, "ignore_eos": _bool(body, "ignore_eos", False)}  # settings gRPC lacks
    prompts = [_prompt(text, sampling, names, logprobs, extra, api) for text in texts]
    stop = _stop(body.get("stop"))
    if stop and api.tokenizer is None:
        raise bad_request("stop", "stop strings need a model with a tokenizer; this one takes stop_token_ids only")
    return Plan(kind, prompts, n, stop, stream, include_usage, logprobs, echo,
                _bool(body, "return_tokens_as_token_ids", False))


def _known_fields(kind: str, body: dict) -> None:
    unknown = sorted(set(body) - FIELDS[kind] - set(NEUTRAL))
    if unknown:
        raise bad_request(unknown[0], f"unknown field(s) {', '.join(unknown)}: this server implements the OpenAI "
                                      f"fields listed in its README (OpenAI-compatible API)")
    for name, off in NEUTRAL.items():
        if body.get(name) is not None and body[name] != off:
            raise bad_request(name, f"{name} is not supported by this server; only {off!r} (off) is accepted")


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(name, f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, f"{name} must be true or false, got {value!r}")
    return value


def _stop(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad_request("stop", f"stop must be a string or a list of at most {MAX_STOPS} strings of 1 to "
                                  f"{MAX_STOP_CHARS} characters, got {value!r}")
    return tuple(stops)


def _sampling_fields(body: dict) -> tuple[dict, dict]:
    """The GenerateRequest fields of the body's sampling settings (a value the proto cannot hold: 400),
    and GenerateRequest field -> the name this request used for it."""
    out, names = {}, {}
    for name, (proto, what) in SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if proto in out:
            raise bad_request(name, "give max_tokens or max_completion_tokens, not both")
        items = value if proto == "stop_token_ids" and isinstance(value, list) else [value]
        try:
            if any(isinstance(v, bool) for v in items):  # JSON true is not a number (the proto would take it as 1)
                raise TypeError
            serving_pb2.GenerateRequest(**{proto: value})
        except (TypeError, ValueError):
            raise bad_request(name, f"{name} must be {what}, got {value!r}") from None
        out[proto], names[proto] = value, name
    return out, names


def _completion_prompts(value) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids (as vLLM)."""
    is_id = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value) or all(isinstance(x, list) and all(map(is_id, x)) for x in value):
            return value
        if all(map(is_id, value)):
            return [value]
    raise bad_request("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of lists "
                                "of token ids, and not empty")


def _chat_prompt(body: dict, api: MoEApi, template: ChatTemplate | None) -> list[int]:
    if template is None or api.tokenizer is None:
        raise bad_request("messages", "this model has no chat template (tokenizer_config.json `chat_template` in its "
                                      "checkpoint): chat completions need one; use /v1/completions with the prompt "
                                      "format the model expects")
    messages = _messages(body.get("messages"))
    try:
        text = template.render(messages, _bool(body, "add_generation_prompt", True))
    except ChatTemplateError as e:
        raise bad_request("messages", str(e)) from None
    try:
        api.check_prompt_size(serving_pb2.GenerateRequest(prompt=text))  # before tokenizing, as gRPC's prompt
    except ApiError as e:
        raise from_api_error(e, {"prompt": "messages"}) from None
    return api.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(where, f"{where} must be an object with role and content")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported (role, content, name)")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise bad_request(f"{where}.role", f"{where}.role must be a non-empty string")
        if not isinstance(m.get("name", ""), str):
            raise bad_request(f"{where}.name", f"{where}.name must be a string")
        out.append({**m, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(value, where: str) -> str:
    """A string, null (an assistant turn without text), or a list of text parts, joined by newlines."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) and set(p) == {"type", "text"}
                                       for p in value):
        return "\n".join(p["text"] for p in value)
    raise bad_request(where, f"{where} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts "
                             f"(this model reads text only)")


def _prompt(text: str | list[int], sampling: dict, names: dict, logprobs: bool, extra: dict, api: MoEApi) -> Prompt:
    """One prompt (text, or token ids: a completion's ids or a rendered chat) through the gRPC path's validation."""
    fields = dict(sampling)
    if isinstance(text, list):
        fields["token_ids"] = text
    else:
        fields["prompt"] = text
    if names["token_ids"] == "messages" and "max_tokens" not in fields:  # chat: up to what the context leaves
        stats = api.engine.stats()
        room = min(api.engine.config.max_new_tokens, api.spec.max_position_embeddings - len(text),
                   stats.blocks_total * stats.block_size - len(text))
        if room >= 1:  # else the core's default refuses the prompt, naming its length
            fields["max_tokens"] = room
    try:
        request = serving_pb2.GenerateRequest(logprobs=logprobs, **fields)
    except (TypeError, ValueError):  # a token id outside int32: out of the vocabulary whatever it is
        raise bad_request("prompt", f"prompt token ids must be in [0, {api.spec.vocab_size - 1}]") from None
    try:
        ids, params = api.validate_generate(request)
        params = dataclasses.replace(params, **extra)  # validated there (top_logprobs: needs logprobs, <= 20)
    except ApiError as e:
        raise from_api_error(e, names) from None
    except SamplingError as e:
        raise bad_request(e.field, str(e)) from None
    chat = names["token_ids"] == "messages"  # no echo in chat: its prompt text is never returned
    decoded = text if isinstance(text, str) else api.tokenizer.decode(ids) if api.tokenizer and not chat else ""
    return Prompt(ids, params, decoded)
