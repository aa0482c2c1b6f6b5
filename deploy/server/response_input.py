"""The Responses API's input items, and the chat messages they become for the harmony renderer.

A client continues a conversation by sending back the items of an earlier response (its reasoning,
messages and function calls, with the ids and statuses they came with) followed by the results of
the calls (`function_call_output`), as the OpenAI SDK's tool-calling loop does. Each item maps to
one chat message: reasoning and function calls to assistant messages, call outputs to tool
messages, which model_shards/chat.py renders as harmony's analysis, commentary and tool messages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["in_progress", "completed", "incomplete"]


class _Item(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class InputText(_Item):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # on output_text sent back; not used


class InputMessage(_Item):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: Status | None = None


class ReasoningPart(_Item):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningInput(_Item):
    type: Literal["reasoning"]
    content: list[ReasoningPart] | None = None
    summary: list[ReasoningPart] = Field(default_factory=list)
    id: str | None = None
    status: Status | None = None


class FunctionCallInput(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = None
    status: Status | None = None


class FunctionCallOutput(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str
    id: str | None = None
    status: Status | None = None


InputItem = Annotated[Union[InputMessage, ReasoningInput, FunctionCallInput, FunctionCallOutput],
                      Field(union_mode="left_to_right")]


def chat_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items -> chat messages (role, content, reasoning, tool_calls, tool_call_id), in order."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, InputMessage):
            content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            out.append({"role": item.role, "content": content})
        elif isinstance(item, ReasoningInput):
            text = "".join(p.text for p in (item.content or item.summary))
            if text:
                out.append({"role": "assistant", "reasoning": text, "content": ""})
        elif isinstance(item, FunctionCallInput):
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out
