"""Chat Completions bodies as pydantic models, named after the `openai` package's types.

The request model forbids unknown fields: a parameter we do not implement is a 400 naming it,
never silently ignored. Fields we accept but cannot honour for every value (`n`, `logprobs`,
penalties, `response_format`, ...) are declared so that chat_request.py can refuse the values it
cannot honour and accept the neutral ones (`n: 1`, `presence_penalty: 0`). `messages` and `tools`
stay plain JSON here: harmony/request.py validates them with field-naming errors of its own
(`messages[2].tool_calls[0].function.name: ...`), the one chat-request parser of the project.

Response models are dumped with `exclude_none`; the few fields OpenAI always sends, even as null,
are put back by their models' serializers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Strict(BaseModel):
    """Request parts: unknown fields refused, JSON types not coerced (`"1"` is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding field; we send no padding


class ReasoningOptions(_Strict):
    """OpenRouter's `reasoning` object, which several chat clients send."""

    effort: str | None = None
    exclude: bool | None = None  # leave the reasoning out of the answer
    enabled: bool | None = None
    max_tokens: int | None = None


class CompletionCreateParams(_Strict):
    """POST /v1/chat/completions (`openai.types.chat.CompletionCreateParams`)."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    reasoning: ReasoningOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM / llama.cpp extension
    min_p: float | None = None  # vLLM / llama.cpp extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # gptoss-mlx extension (engine/constraints): close the reasoning after N tokens and answer.
    max_reasoning_tokens: int | None = Field(default=None, ge=0)
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None


# ---------------------------------------------------------------------------- responses


class _Out(BaseModel):
    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Function(_Out):
    name: str
    arguments: str


class ChatCompletionMessageToolCall(_Out):
    id: str
    type: Literal["function"] = "function"
    function: Function


class ChatCompletionMessage(_Out):
    """The assistant's message. `reasoning` and `reasoning_content` carry the same chain of
    thought under the two names clients read (OpenAI's cookbook and vLLM; llama.cpp, Open WebUI
    and the Vercel AI SDK)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None

    @model_serializer(mode="wrap")
    def _keep_content(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out.setdefault("content", None)  # always present, null when the turn only calls tools
        return out


class PromptTokensDetails(_Out):
    cached_tokens: int = 0


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = 0


class CompletionUsage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class Choice(_Out):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ChoiceDeltaToolCallFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(_Out):
    """`index` always; `id`, `type` and `function.name` only in a call's first chunk."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: str | None = None

    @model_serializer(mode="wrap")
    def _keep_finish_reason(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out.setdefault("finish_reason", None)
        return out


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None
