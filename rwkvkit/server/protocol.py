"""Request bodies of the OpenAI API as pydantic models (strict types: ``"0.5"`` is not a number,
unknown fields are refused by name), the RWKV extensions, and the OpenAI error object.

Mapping onto rwkvkit's options: ``presence_penalty`` / ``frequency_penalty`` are ChatRWKV's
``alpha_presence`` / ``alpha_frequency`` (subtracted from a token's logit once it occurred / per
decayed occurrence; the counts decay by ``alpha_decay`` each token); ``temperature=0`` is greedy.
Any option a request leaves out takes the server's ``sampling`` config value.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingParams(_Body):
    """What completions and chat share."""

    model: str
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = Field(None, max_length=4)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = None
    user: Optional[str] = None
    # RWKV extensions: ChatRWKV's options, and any registered sampler with its options
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    typical_p: Optional[float] = Field(None, ge=0, le=1)
    alpha_decay: Optional[float] = Field(None, ge=0, le=1)
    sampler: Optional[str] = None
    sampler_options: Optional[dict[str, Any]] = None
    state: Optional[str] = None  # the name of a tuned initial state of server.states
    # structured output: {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingParams):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[int] = Field(None, ge=0)
    echo: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)


class APIError(Exception):
    """An answer other than 200, as OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the first invalid field (FastAPI's RequestValidationError errors)."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg')}")
    where = ".".join(loc)
    got = f" (got {first['input']!r:.60})" if "input" in first and first.get("type") != "missing" else ""
    return APIError(400, f"{where}: {first.get('msg')}{got}", param=loc[0])
