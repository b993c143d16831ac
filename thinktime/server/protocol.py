"""The OpenAI chat-completions wire format: request validation and OpenAI-style errors."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_STOP = 4
# reasoning_effort as OpenAI's clients send it, in thinktime's terms: no thinking prompt ("none", "minimal"),
# or the thinking prompt with this share of the server's default new tokens (when max_tokens is not given).
REASONING_EFFORT = {"none": None, "minimal": None, "low": 0.25, "medium": 1.0, "high": 2.0}


class APIError(Exception):
    """An error that becomes an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
    """OpenAI's API takes null for a parameter with a default as that default (clients send `"n": null`)."""
    return cls.model_fields[info.field_name].default if value is None else value


# Parameters of OpenAI's chat API this server does not implement: refused when set, never silently ignored.
UNSUPPORTED = {"tools": "tool calls",
               "tool_choice": "tool calls", "functions": "function calls", "function_call": "function calls",
               "response_format": "structured output (response_format)", "audio": "audio output",
               "modalities": "output modalities", "prediction": "predicted outputs", "logit_bias": "logit_bias",
               "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
               "repetition_penalty": "repetition_penalty", "top_k": "top_k", "min_p": "min_p",
               "best_of": "best_of", "echo": "echo", "reasoning_effort": "reasoning_effort"}
# What each of them may be set to and still mean "off" (then it is accepted: clients send the defaults).
UNSUPPORTED_OFF = {"repetition_penalty": (1, 1.0), "top_k": (0, -1), "best_of": (1,),
                   "response_format": ({"type": "text"},)}


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False

    _nulls = field_validator("include_usage", mode="before")(classmethod(_null_is_default))


class ThinktimeOptions(_Strict):
    """The extra body field `thinktime`: which strategy, how many chains, how many tokens in all."""

    strategy: Optional[str] = None
    n: Optional[int] = Field(None, ge=1, le=256)
    budget_tokens: Optional[int] = Field(None, ge=1)
    lang: Optional[Literal["auto", "en", "zh"]] = None


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    n: int = 1
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    thinktime: Optional[ThinktimeOptions] = None

    _nulls = field_validator("n", "stream", mode="before")(classmethod(_null_is_default))

    def refuse_unsupported(self) -> None:
        for name, what in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, [], {}, 0) and value not in UNSUPPORTED_OFF.get(name, ()):
                raise APIError(400, f"this server does not support {what}: remove '{name}' from the request",
                               param=name, code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                           code="invalid_value")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP:
            raise APIError(400, f"'stop' takes at most {MAX_STOP} strings", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "'stop' strings must not be empty", param="stop")
        return tuple(stops)


def parse_request(payload: Any) -> ChatRequest:
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object", param=None, code="invalid_json")
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{loc}: {first.get('msg', 'invalid value')}" if loc else first.get("msg", "invalid request")
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
        raise APIError(400, message, param=loc or None, code=code) from None
    request.refuse_unsupported()
    return request


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
            413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
            503: "server_error", 504: "timeout_error"}.get(status, "server_error" if status >= 500 else
                                                              "invalid_request_error")
