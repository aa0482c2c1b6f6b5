"""Harmony chat format: OpenAI-style messages -> prompt ids, and generated ids -> reasoning,
answer and tool calls.

Rendering goes through openai-harmony itself (a port of its renderer would drift, as the Hugging Face
chat template already has). Mapping of OpenAI roles: `system` and `developer` messages become
the harmony developer message's instructions (the model's system message carries identity, date and
reasoning effort); assistant history renders `reasoning` on the analysis channel, `content` on the
final channel and `tool_calls` as commentary messages to `functions.NAME`; `tool` messages come
from `functions.NAME` (the name found through `tool_call_id`).
"""

from __future__ import annotations

import codecs
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyError, Message, ReasoningEffort, Role,
                            StreamableParser, SystemContent, ToolDescription)

from model_shards.tokenizer import CHAT_STOP_TOKENS, decode_text, harmony, special_ids, tokenizer

REASONING_EFFORTS = ("low", "medium", "high")


class ChatFormatError(ValueError):
    """Messages or tools that cannot be rendered as a harmony conversation."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it


@dataclass
class ParsedCompletion:
    reasoning: str = ""  # analysis channel (and commentary without a recipient)
    content: str = ""  # final channel
    tool_calls: list[ToolCall] = field(default_factory=list)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError("message content must be a string or a list of text parts")


def _tool_descriptions(tools: list[dict[str, Any]]) -> list[ToolDescription]:
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError("each tool must be {'type': 'function', 'function': {'name': ...}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ChatFormatError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
        out.append(ToolDescription.new(fn["name"], fn.get("description") or "", parameters=params))
    return out


def _assistant_messages(message: dict[str, Any], call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, str(reasoning)).with_channel("analysis"))
    text = _text(message)
    if text:
        out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError("assistant tool_calls entries need function.name")
        arguments = fn.get("arguments", "{}")
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        call_names[str(call.get("id", ""))] = fn["name"]
        out.append(Message.from_role_and_content(Role.ASSISTANT, arguments).with_channel("commentary")
                   .with_recipient(f"functions.{fn['name']}").with_content_type("<|constrain|>json"))
    return out


def _check_unicode(value: Any, what: str) -> None:
    """Harmony's encoder refuses strings that are not valid Unicode (a lone surrogate such as \\ud800,
    which JSON can carry): say so as a request error instead."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ChatFormatError(f"{what} contain text that is not valid Unicode ({exc.reason}: "
                              f"{exc.object[exc.start:exc.end]!a})") from None


def build_conversation(messages: list[dict[str, Any]], reasoning_effort: str = "medium",
                       tools: list[dict[str, Any]] | None = None, date: str | None = None) -> Conversation:
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of {REASONING_EFFORTS}")
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    _check_unicode(messages, "messages")
    _check_unicode(tools, "tools")
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort[reasoning_effort.upper()])
    if date:
        system = system.with_conversation_start_date(date)
    instructions: list[str] = []
    body: list[Message] = []
    call_names: dict[str, str] = {}
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            instructions.append(_text(message))
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(message)))
        elif role == "assistant":
            body.extend(_assistant_messages(message, call_names))
        elif role == "tool":
            name = message.get("name") or call_names.get(str(message.get("tool_call_id", "")))
            if not name:
                raise ChatFormatError("a tool message needs a tool_call_id of an earlier assistant tool call")
            author = Author.new(Role.TOOL, f"functions.{name}")
            body.append(Message.from_author_and_content(author, _text(message))
                        .with_channel("commentary").with_recipient("assistant"))
        else:
            raise ChatFormatError(f"unsupported message role {role!r}")
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    developer = DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions("\n\n".join(instructions))
    if tools:
        developer = developer.with_function_tools(_tool_descriptions(tools))
    if instructions or tools:
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(head + body)


def render_chat(messages: list[dict[str, Any]], reasoning_effort: str = "medium",
                tools: list[dict[str, Any]] | None = None, date: str | None = None) -> list[int]:
    """Prompt ids ending in `<|start|>assistant`, ready for sampling."""
    conversation = build_conversation(messages, reasoning_effort, tools, date)
    return list(harmony().render_conversation_for_completion(conversation, Role.ASSISTANT))


@dataclass
class Delta:
    """What one generated token added, for streaming."""

    kind: str  # "reasoning" | "content" | "tool_call"
    text: str  # for tool calls: a piece of the arguments
    tool_index: int | None = None  # which tool call (0, 1, ...)
    tool_name: str | None = None  # on the first delta of a tool call
    tool_id: str | None = None


class CompletionParser:
    """Incremental parser of generated ids. Tolerant: output that breaks the harmony grammar (a
    random model) ends up as plain content instead of raising. Harmony's markup (special tokens) is
    never shown as text: an answer cut inside a header (by max_tokens, a stop, an abort) shows nothing
    of that header."""

    def __init__(self) -> None:
        self._parser = StreamableParser(harmony(), role=Role.ASSISTANT)
        self._broken: list[int] = []  # ids after the grammar broke
        self._all: list[int] = []
        self._calls: dict[int, ToolCall] = {}  # harmony message index -> the tool call it is
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> list[Delta]:
        stop = token_id in CHAT_STOP_TOKENS  # ends the answer; never shown as text, even when not harmony
        if not stop:
            self._all.append(token_id)
        if not self._broken:
            try:
                self._parser.process(token_id)
            except HarmonyError:
                if stop:
                    return []
                self._broken.append(token_id)
                return self._broken_delta(token_id)
            return self._delta()
        if stop:
            return []
        self._broken.append(token_id)
        return self._broken_delta(token_id)

    def _broken_delta(self, token_id: int) -> list[Delta]:
        """After the grammar broke, tokens are plain content; special tokens are markup, not text."""
        if token_id in special_ids():
            return []
        text = self._decoder.decode(tokenizer().decode_single_token_bytes(token_id))
        return [Delta("content", text)] if text else []

    def _delta(self) -> list[Delta]:
        text = self._parser.last_content_delta
        if not text:
            return []
        recipient = self._parser.current_recipient
        if recipient and recipient.startswith("functions."):
            message = len(self._parser.messages)
            first = message not in self._calls
            if first:
                self._calls[message] = ToolCall(f"call_{uuid.uuid4().hex[:24]}", recipient[len("functions."):], "")
            call = self._calls[message]
            index = list(self._calls).index(message)
            return [Delta("tool_call", text, index, call.name if first else None, call.id if first else None)]
        return [Delta("content" if self._parser.current_channel == "final" else "reasoning", text)]

    def finish(self) -> list[Delta]:
        """Deltas only known at the end: output that never was harmony at all."""
        if self._plain():
            return [Delta("content", decode_text(self._all))]
        return []

    def _plain(self) -> bool:
        """Output with no harmony message and no markup at all (a random model's text): shown as it came.
        With markup but no message, the answer was cut inside a header: nothing of it is content."""
        return (not self._broken and not self._parser.messages and not self._parser.current_content
                and bool(self._all) and not special_ids().intersection(self._all))

    def result(self) -> ParsedCompletion:
        out = ParsedCompletion()
        messages = [(m.channel, m.recipient, "".join(c.text for c in m.content if hasattr(c, "text")))
                    for m in self._parser.messages]
        if self._parser.current_content:
            messages.append((self._parser.current_channel, self._parser.current_recipient,
                             self._parser.current_content))
        reasoning, content = [], []
        for index, (channel, recipient, text) in enumerate(messages):
            if recipient and recipient.startswith("functions."):
                known = self._calls.get(index)
                call_id = known.id if known else f"call_{uuid.uuid4().hex[:24]}"
                out.tool_calls.append(ToolCall(call_id, recipient[len("functions."):], text))
            elif channel == "final":
                content.append(text)
            else:
                reasoning.append(text)
        if self._broken:
            content.append(decode_text(self._broken))
        elif not messages and self._plain():
            content.append(decode_text(self._all))
        out.reasoning, out.content = "\n".join(reasoning), "".join(content)
        return out


def parse_completion(token_ids: list[int]) -> ParsedCompletion:
    parser = CompletionParser()
    for token in token_ids:
        parser.feed(token)
    return parser.result()
