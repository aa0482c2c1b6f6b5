"""OpenAI API request and response bodies (pydantic).

Requests are strict (no "10" for 10, no true for 1) and forbid unknown fields: a parameter we do not
support is a clear 400, never silently ignored. Bounds live in the schema, so /openapi.json tells
clients (and schemathesis) what is valid. Vendor extensions: `ignore_eos`, `return_token_ids`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from model_shards.requests import InvalidRequest

INT64 = 2**63 - 1
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64  # prompts in one completions request
MAX_MESSAGES = 2048
MAX_TOOLS = 128
MAX_COMPLETION_LOGPROBS = 5
MAX_CHOICES = 16  # n; the prompt's KV is shared, each choice costs its own decode


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(Strict):
    include_usage: bool = False


Stop = Union[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)],
             Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                       Field(max_length=MAX_STOP)], None]
LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=300)]


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """JSON's string keys -> (token id, bias) pairs; names every key that is not a token id."""
    if not bias:
        return ()
    pairs, bad = [], []
    for key, value in bias.items():
        token = int(key) if key.lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab_size:
            bad.append(key)
        else:
            pairs.append((token, float(value)))
    if bad:
        raise InvalidRequest(f"logit_bias keys must be token ids in [0, {vocab_size}); invalid: {bad}", "logit_bias",
                             "invalid_logit_bias")
    return tuple(pairs)


class SamplingControls(Strict):
    """Sampling controls beyond temperature and top_p, on every generating route (on /v1/responses as
    vLLM's extensions)."""

    seed: int | None = Field(default=None, ge=-INT64 - 1, le=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=2.0,
                                      description="extension (vLLM): 1 is none; from 0.01 (a smaller one overflows fp32)")
    top_k: int = Field(default=0, ge=-1, le=INT64, description="extension (vLLM): 0 or -1 is all")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="extension (vLLM)")
    min_tokens: int = Field(default=0, ge=0, le=INT64, description="extension (vLLM): no stop before this many")
    logit_bias: LogitBias | None = None
    ignore_eos: bool = Field(default=False, description="extension: keep generating past stop tokens")

    def controls(self) -> dict[str, float | int]:
        """The sampling controls beyond temperature and top_p, as SamplingParams names them."""
        return {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty, "top_k": max(self.top_k, 0), "min_p": self.min_p,
                "min_tokens": self.min_tokens}


class SamplingFields(SamplingControls):
    """Fields shared by chat and completions."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices per prompt; choice i samples with seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    user: str | None = Field(default=None, max_length=256)

    def check(self) -> None:
        """What the schema cannot say: combinations of fields (InvalidRequest names the field)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")


# -- chat ------------------------------------------------------------------------------------------

class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = "{}"


class ToolCallIn(Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)
    reasoning: str | None = None  # an assistant turn's chain of thought, as this API returns it
    reasoning_content: str | None = None


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str = Field(default="response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=8192)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's extension: exactly one of these constrains the output (JSON is always compact here)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1, max_length=16384)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1, max_length=1024)
    grammar: str | None = Field(default=None, min_length=1, max_length=65536, description="Lark, or GBNF")
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


# Bounds on a schema a request carries (response_format, structured_outputs, tool parameters), checked
# before anything recursive reads it: the meta-schema check, the grammar compiler and harmony's tool
# rendering all recurse per level. Far above what real schemas use (OpenAI's strict mode allows 10
# levels of nesting and 5000 properties).
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays of the JSON text
MAX_SCHEMA_NODES = 20_000  # values of the JSON text


def check_schema_size(schema: object, param: str) -> None:
    """InvalidRequest when `schema` nests deeper than MAX_SCHEMA_DEPTH or holds more than
    MAX_SCHEMA_NODES values (walked without recursion, so any depth is measured safely)."""
    stack: list[tuple[object, int]] = [(schema, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidRequest(f"{param} is too large: more than {MAX_SCHEMA_NODES} values", param)
        if isinstance(value, (dict, list)):
            if depth > MAX_SCHEMA_DEPTH:
                raise InvalidRequest(f"{param} nests too deeply: more than {MAX_SCHEMA_DEPTH} levels of objects "
                                     "and arrays", param)
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """A JSON Schema of bounded size that its own meta-schema accepts (InvalidRequest otherwise)."""
    check_schema_size(schema, param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"{param} is not a valid JSON schema: {exc.message}", param) from None
    except RecursionError:  # a $ref cycle the meta-schema check follows
        raise InvalidRequest(f"{param} cannot be checked: its references recurse without end", param) from None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=INT64)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(default=None, description="extension (vLLM)")
    metadata: dict[str, str] | None = None

    def check(self) -> None:
        super().check()
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidRequest("tool_choice needs tools: none were given", "tool_choice")
        for i, tool in enumerate(self.tools or []):
            if tool.function.parameters is not None:
                check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        for i, m in enumerate(self.messages):
            if m.content is None and not (m.role == "assistant" and (m.tool_calls or m.reasoning or
                                                                     m.reasoning_content)):
                raise InvalidRequest(f"messages[{i}] ({m.role}) has no content", "messages")


# -- completions -----------------------------------------------------------------------------------

TokenIds = Annotated[list[Annotated[int, Field(ge=-INT64 - 1, le=INT64)]], Field(min_length=1)]
PromptText = Annotated[str, Field(min_length=1)]
Prompt = Union[PromptText, Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
               Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int = Field(default=16, ge=1, le=INT64)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = None
    response_format: ResponseFormat | None = Field(default=None, description="extension (vLLM)")
    structured_outputs: StructuredOutputs | None = Field(default=None, description="extension (vLLM)")
    return_token_ids: bool = Field(default=False, description="extension: add prompt_token_ids and token_ids")


# -- responses out ---------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# -- stream chunks ---------------------------------------------------------------------------------

class Sparse(BaseModel):
    """Serialized without its None fields, except those in KEEP_NULL: a delta carries only what
    changed, while OpenAI's chunks always say `"finish_reason": null`."""

    KEEP_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k in self.KEEP_NULL}


class ToolCallFunctionDelta(Sparse):
    name: str | None = None
    arguments: str


class ToolCallDelta(Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta


class ChatDelta(Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Sparse):
    KEEP_NULL = frozenset({"finish_reason"})
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Sparse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(Sparse):
    KEEP_NULL = frozenset({"logprobs", "finish_reason"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionChunk(Sparse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptoss-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
        (408, "request timeout"), (413, "body too large"), (429, "overloaded; retry after Retry-After"),
        (500, "internal error"), (503, "engine unavailable; retry after Retry-After"))
}
