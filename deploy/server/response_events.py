"""The Responses API's output, built once from the parser's deltas for both ways of answering: as the
event stream the OpenAI SDK parses (`response.created`, `response.in_progress`, then per output item
`output_item.added`, `content_part.added`, text or argument deltas and their `.done` events,
`output_item.done`, and last `response.completed` or `response.incomplete`), and as the whole response
object, which is what the last event carries.

Items follow the order the model wrote them: a reasoning item for analysis, a message for the final
channel, a function_call item per tool call; a new item starts whenever the kind (or the tool call)
changes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal, Union

from pydantic import BaseModel

from deploy.server.response_protocol import (FunctionCallItem, OutputItem, OutputMessage, OutputText,
                                             ReasoningItem, ReasoningText, ResponseObject)
from model_shards.chat import Delta


class StreamEvent(BaseModel):
    type: str
    sequence_number: int


class ResponseEvent(StreamEvent):  # response.created / in_progress / completed / incomplete
    response: ResponseObject


class ItemEvent(StreamEvent):  # response.output_item.added / done
    output_index: int
    item: OutputItem


class InItem(StreamEvent):  # every event about one output item's content
    item_id: str
    output_index: int


class InPart(InItem):  # ... and one content part of it
    content_index: int = 0


class PartEvent(InPart):  # response.content_part.added / done
    part: Union[OutputText, ReasoningText]


class TextDelta(InPart):  # response.output_text.delta (logprobs: not offered on this route)
    delta: str
    logprobs: list[dict[str, object]] = []


class TextDone(InPart):  # response.output_text.done
    text: str
    logprobs: list[dict[str, object]] = []


class ReasoningDelta(InPart):  # response.reasoning_text.delta
    delta: str


class ReasoningDone(InPart):  # response.reasoning_text.done
    text: str


class ArgumentsDelta(InItem):  # response.function_call_arguments.delta
    delta: str


class ArgumentsDone(InItem):  # response.function_call_arguments.done
    name: str
    arguments: str


class ErrorEvent(StreamEvent):  # "error": the request failed after the stream started
    type: Literal["error"] = "error"
    message: str
    code: str | None = None
    param: str | None = None


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Open:
    """The output item being written: its kind, its index in `output`, and its text so far."""

    kind: str  # "reasoning" | "content" | "tool_call"
    index: int
    item_id: str
    tool_index: int | None = None
    name: str = ""
    call_id: str = ""
    text: list[str] = field(default_factory=list)


class ResponseBuilder:
    """Turns deltas into events and output items. `response` is the response as it stands (status
    in_progress, no output): the first and last events carry it."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.output: list[OutputItem] = []
        self._open: _Open | None = None
        self._sequence = 0

    def _event(self, cls: type[StreamEvent], type_: str, **fields: object) -> StreamEvent:
        event = cls(type=type_, sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def start(self) -> list[StreamEvent]:
        snapshot = self.response.model_copy(update={"output": []})
        return [self._event(ResponseEvent, "response.created", response=snapshot),
                self._event(ResponseEvent, "response.in_progress", response=snapshot)]

    def feed(self, deltas: list[Delta]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for d in deltas:
            if not d.text and d.tool_name is None:
                continue
            current = self._open
            if current is None or current.kind != d.kind or (d.kind == "tool_call" and current.tool_index != d.tool_index):
                events += self._close()
                events += self._begin(d)
            events += self._append(d.text)
        return events

    def finish(self, response: ResponseObject) -> list[StreamEvent]:
        """Closes the open item; the last event carries `response` (status, usage) with the output.
        Output with no item at all gets an empty message, as the non-streamed response always had one."""
        events = self._close()
        if not self.output:
            events += self._begin(Delta("content", ""))
            events += self._close()
        self.response = response.model_copy(update={"output": list(self.output)})
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        return events + [self._event(ResponseEvent, kind, response=self.response)]

    def error(self, message: str, code: str | None, param: str | None) -> StreamEvent:
        return self._event(ErrorEvent, "error", message=message, code=code, param=param)

    # -- one item ----------------------------------------------------------------------------------

    def _begin(self, d: Delta) -> list[StreamEvent]:
        index = len(self.output)
        if d.kind == "tool_call":
            name = d.tool_name or ""
            self._open = _Open(d.kind, index, _id("fc"), d.tool_index, name, d.tool_id or _id("call"))
            item: OutputItem = FunctionCallItem(id=self._open.item_id, call_id=self._open.call_id, name=name,
                                                arguments="", status="in_progress")
            self.output.append(item)
            return [self._event(ItemEvent, "response.output_item.added", output_index=index, item=item)]
        if d.kind == "reasoning":
            self._open = _Open(d.kind, index, _id("rs"))
            item, part = ReasoningItem(id=self._open.item_id, content=[]), ReasoningText(text="")
        else:
            self._open = _Open(d.kind, index, _id("msg"))
            item, part = OutputMessage(id=self._open.item_id, status="in_progress", content=[]), OutputText(text="")
        self.output.append(item)
        return [self._event(ItemEvent, "response.output_item.added", output_index=index, item=item),
                self._event(PartEvent, "response.content_part.added", item_id=self._open.item_id,
                            output_index=index, content_index=0, part=part)]

    def _append(self, text: str) -> list[StreamEvent]:
        current = self._open
        assert current is not None
        if not text:
            return []
        current.text.append(text)
        where = {"item_id": current.item_id, "output_index": current.index}
        if current.kind == "tool_call":
            return [self._event(ArgumentsDelta, "response.function_call_arguments.delta", delta=text, **where)]
        if current.kind == "reasoning":
            return [self._event(ReasoningDelta, "response.reasoning_text.delta", delta=text, **where)]
        return [self._event(TextDelta, "response.output_text.delta", delta=text, **where)]

    def _close(self) -> list[StreamEvent]:
        current, self._open = self._open, None
        if current is None:
            return []
        text = "".join(current.text)
        where = {"item_id": current.item_id, "output_index": current.index}
        events: list[StreamEvent] = []
        item: OutputItem
        if current.kind == "tool_call":
            item = FunctionCallItem(id=current.item_id, call_id=current.call_id, name=current.name, arguments=text)
            events.append(self._event(ArgumentsDone, "response.function_call_arguments.done", name=current.name,
                                      arguments=text, **where))
        elif current.kind == "reasoning":
            part: OutputText | ReasoningText = ReasoningText(text=text)
            item = ReasoningItem(id=current.item_id, content=[part])
            events += [self._event(ReasoningDone, "response.reasoning_text.done", text=text, **where),
                       self._event(PartEvent, "response.content_part.done", content_index=0, part=part, **where)]
        else:
            part = OutputText(text=text)
            item = OutputMessage(id=current.item_id, content=[part])
            events += [self._event(TextDone, "response.output_text.done", text=text, **where),
                       self._event(PartEvent, "response.content_part.done", content_index=0, part=part, **where)]
        self.output[current.index] = item
        return events + [self._event(ItemEvent, "response.output_item.done", output_index=current.index, item=item)]
