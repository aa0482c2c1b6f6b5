"""/v1/responses request and response bodies (pydantic), beside the chat and completions ones
(protocol.py, whose strictness and bounds they share). The input items are in response_input.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from deploy.server.protocol import (INT64, MAX_MESSAGES, MAX_TOOLS, FunctionDefinition, JsonSchemaFormat,
                                    ResponseFormat, SamplingControls, Strict, StructuredOutputs, Tool,
                                    check_json_schema)
from deploy.server.response_input import InputItem
from model_shards.requests import InvalidRequest


# -- responses -------------------------------------------------------------------------------------

class Reasoning(Strict):
    effort: Literal["low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(Strict):
    """The Responses API's `text.format` (flat: name and schema beside the type)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str = Field(default="response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=8192)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def as_response_format(self) -> ResponseFormat:
        return ResponseFormat(type=self.type, json_schema=JsonSchemaFormat(
            name=self.name, description=self.description, json_schema=self.json_schema, strict=self.strict)
            if self.type == "json_schema" else None)


class TextSettings(Strict):
    format: TextFormat | None = None


class ResponsesTool(Strict):
    """A function tool as the Responses API writes it (flat: no `function` wrapper)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> dict[str, Any]:
        return Tool(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters)).model_dump(exclude_none=True)


class ResponsesToolChoice(Strict):
    """tool_choice naming one function, as the Responses API writes it (flat: no `function` wrapper)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ResponsesRequest(SamplingControls):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]  # response_input.py
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    reasoning: Reasoning | None = None
    tools: list[ResponsesTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextSettings | None = None
    structured_outputs: StructuredOutputs | None = Field(default=None, description="extension (vLLM)")
    stream: bool = False
    store: bool | None = None  # default true, as OpenAI's
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    background: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)

    def check(self) -> None:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise InvalidRequest("tool_choice needs tools: none were given", "tool_choice")
        if self.background and self.store is False:
            raise InvalidRequest("background responses are stored: background needs store true", "background")
        if self.background and self.stream:
            raise InvalidRequest("a background response is polled with GET /v1/responses/{id}, not streamed",
                                 "background")
        for i, tool in enumerate(self.tools or []):
            if tool.parameters is not None:
                check_json_schema(tool.parameters, f"tools[{i}].parameters")

    def forced_choice(self) -> str | None:
        """The function name a named tool_choice forces, or the choice as given ("required", "auto"...)."""
        return self.tool_choice.name if isinstance(self.tool_choice, ResponsesToolChoice) else self.tool_choice

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the harmony renderer takes them; None when there are none or tool_choice is none."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.as_chat_tool() for t in self.tools]




# -- /v1/responses out -------------------------------------------------------------------------------

class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed"] = "completed"


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[str] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed"] = "completed"
    content: list[OutputText]


OutputItem = Union[ReasoningItem, FunctionCallItem, OutputMessage]


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ReasoningSettings(BaseModel):
    effort: str
    summary: str | None = None


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed"]
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    output: list[OutputItem]
    parallel_tool_calls: bool = False
    tool_choice: str | ResponsesToolChoice = "auto"
    tools: list[ResponsesTool] = Field(default_factory=list)
    reasoning: ReasoningSettings
    temperature: float
    top_p: float
    usage: ResponseUsage | None = None
