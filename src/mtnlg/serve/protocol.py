"""The OpenAI API's request bodies, as the server accepts them, and its error envelope.

Fields the server does not know are ignored, as OpenAI-compatible servers do; a known field with a bad
value is a 400 that names it. Sampling fields map one to one onto `Sampling`, whose defaults they share.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mtnlg.inference.sampling import Sampling

Prompt = str | list[str] | list[int] | list[list[int]]


class APIError(Exception):
    """An error answered in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_overloaded", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """What completions and chat share."""

    model: str | None = None
    temperature: float = Field(Sampling.temperature, ge=0, le=2)
    top_p: float = Field(Sampling.top_p, gt=0, le=1)
    top_k: int = Field(Sampling.top_k, ge=-1)  # -1 or 0: off (vLLM spells it -1)
    min_p: float = Field(Sampling.min_p, ge=0, lt=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = Field(Sampling.presence_penalty, ge=-2, le=2)
    frequency_penalty: float = Field(Sampling.frequency_penalty, ge=-2, le=2)
    repetition_penalty: float = Field(Sampling.repetition_penalty, gt=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    use_beam_search: bool = False
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None

    def sampling(self, max_new_tokens: int, logprobs: int | None, echo: bool = False, stop: tuple[str, ...] = ()) -> Sampling:
        if self.use_beam_search or (self.best_of or 1) > self.n:
            raise APIError(400, "beam search and best_of run offline only: use `mtnlg generate --num-beams`",
                           "use_beam_search" if self.use_beam_search else "best_of")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server; leave it out", "logit_bias")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=stops + stop, stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, seed=self.seed, n=self.n, logprobs=logprobs, echo=echo,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class Message(Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Text content; a list of parts keeps its text parts (images and audio are not for this model)."""
        if isinstance(self.content, list):
            if any(part.get("type") != "text" for part in self.content):
                raise APIError(400, "only text content parts are supported", "messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(Body):
    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]
