"""Responses API bodies and stream events as pydantic models, named after the `openai` package's
types (`openai.types.responses`).

As in chat_types.py, the request forbids unknown fields and leaves `input` items and `tools` as
plain JSON for responses_request.py to validate with field-naming errors (`input[3].call_id: ...`).
Output items carry `status`; every event carries `type` and `sequence_number`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Reasoning(_Strict):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None  # the deprecated spelling of `summary`


class ResponseTextConfig(_Strict):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponseStreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponseCreateParams(_Strict):
    """POST /v1/responses (`openai.types.responses.ResponseCreateParams`)."""

    model: str
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    # gptoss-mlx extension (engine/constraints): close the reasoning after N tokens and answer.
    max_reasoning_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    text: ResponseTextConfig | None = None
    truncation: str | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None


# ---------------------------------------------------------------------------- output items


class _Out(BaseModel):
    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ResponseOutputText(_Out):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(_Out):
    """An assistant message. `phase` tells a commentary preamble (text the model writes to the
    user before calling a tool) from the final answer, as OpenAI's reasoning models do."""

    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: str = "in_progress"
    content: list[ResponseOutputText] = Field(default_factory=list)
    phase: Literal["commentary", "final_answer"] | None = None


class ReasoningText(_Out):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class ResponseReasoningItem(_Out):
    """The chain of thought: raw text in `content` (gpt-oss writes no summaries, so `summary`
    stays empty), and in `encrypted_content` when the request includes
    "reasoning.encrypted_content" (reasoning_blob.py)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    encrypted_content: str | None = None
    status: str = "in_progress"


class ResponseFunctionToolCall(_Out):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: str = "in_progress"


OutputItem = ResponseOutputMessage | ResponseReasoningItem | ResponseFunctionToolCall


class InputTokensDetails(_Out):
    cached_tokens: int = 0


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class ResponseUsage(_Out):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class ResponseError(_Out):
    code: str
    message: str


class IncompleteDetails(_Out):
    reason: str


class Response(_Out):
    """A response object, as returned, streamed in lifecycle events, and stored."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: str
    output: list[OutputItem] = Field(default_factory=list)
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=dict)
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


class ResponseDeleted(_Out):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# ---------------------------------------------------------------------------- stream events
# One generic model: the event's fields differ by `type`, and building them by keyword keeps each
# emission next to what OpenAI's client expects of it (responses.py).


class ResponseStreamEvent(BaseModel):
    """`{"type": ..., "sequence_number": n, ...fields}`: one server-sent event."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int

    def dump(self) -> dict[str, Any]:
        out = {"type": self.type, "sequence_number": self.sequence_number}
        for key, value in (self.model_extra or {}).items():
            out[key] = value.dump() if isinstance(value, _Out) else value
        return out
