"""POST /v1/responses (which Ray Serve LLM lacks): non-streaming text, with the chain of thought as
reasoning items, the answer as an output_text message and tool calls as function_call items.
Responses are not stored, so `previous_response_id` and streaming are refused with a clear 400."""

from __future__ import annotations

import time
import uuid
from fastapi import APIRouter, Depends

from deploy.errors import bad_request
from deploy.protocol import (ERROR_RESPONSES, FunctionCallItem, IncompleteDetails, InputTokensDetails, OutputItem, OutputMessage,
                             OutputText, OutputTokensDetails, ReasoningItem, ReasoningSettings, ReasoningText,
                             ResponseObject, ResponsesRequest, ResponseUsage)
from deploy.service import ApiService, get_service
from model_shards.chat import ChatFormatError, CompletionParser, render_chat
from model_shards.tokenizer import CHAT_STOP_TOKENS

router = APIRouter()
PARAM_NAMES = {"prompt": "input", "max_tokens": "max_output_tokens"}


def _messages(req: ResponsesRequest) -> list[dict[str, str]]:
    """The input as chat messages (role, content), for the harmony renderer."""
    messages: list[dict[str, str]] = []
    if req.instructions:
        messages.append({"role": "developer", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    for item in req.input:
        content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
        messages.append({"role": item.role, "content": content})
    return messages


@router.post("/v1/responses", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def responses(req: ResponsesRequest, service: ApiService = Depends(get_service)) -> ResponseObject:
    service.check_model(req.model)
    if req.stream:
        raise bad_request("streaming is not supported on /v1/responses yet; use stream: false or "
                          "/v1/chat/completions", "stream", "unsupported_parameter")
    effort = req.reasoning.effort if req.reasoning and req.reasoning.effort else "medium"
    try:
        prompt_ids = render_chat(_messages(req), reasoning_effort=effort)
    except ChatFormatError as exc:  # the chat route's field is `messages`; this one's is `input`
        raise bad_request(str(exc), "input") from None
    max_tokens = req.max_output_tokens or service.default_max_tokens(len(prompt_ids))
    params = service.sampling(max_tokens, req.temperature, req.top_p, None, CHAT_STOP_TOKENS)
    response_id = f"resp_{uuid.uuid4().hex}"
    parser, reasoning_tokens = CompletionParser(), 0
    async with service.start(prompt_ids, params, response_id, PARAM_NAMES) as run:
        async for event in run:
            assert event.token is not None
            deltas = parser.feed(event.token)
            reasoning_tokens += any(d.kind == "reasoning" for d in deltas)  # tokens that wrote reasoning
    parsed = parser.result()
    output: list[OutputItem] = []
    if parsed.reasoning:
        output.append(ReasoningItem(id=f"rs_{uuid.uuid4().hex}", content=[ReasoningText(text=parsed.reasoning)]))
    for call in parsed.tool_calls:
        output.append(FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.name,
                                       arguments=call.arguments))
    if parsed.content or not output:
        output.append(OutputMessage(id=f"msg_{uuid.uuid4().hex}", content=[OutputText(text=parsed.content)]))
    complete = run.finish_reason == "stop"
    return ResponseObject(
        id=response_id, created_at=int(time.time()), model=req.model,
        status="completed" if complete else "incomplete",
        incomplete_details=None if complete else IncompleteDetails(reason="max_output_tokens"),
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, output=output,
        reasoning=ReasoningSettings(effort=effort), temperature=params.temperature, top_p=params.top_p,
        usage=ResponseUsage(input_tokens=run.prompt_tokens,
                            input_tokens_details=InputTokensDetails(cached_tokens=run.cached_tokens),
                            output_tokens=run.generated,
                            output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
                            total_tokens=run.prompt_tokens + run.generated))
