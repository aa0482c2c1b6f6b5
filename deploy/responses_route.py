"""POST /v1/responses (which Ray Serve LLM lacks): non-streaming text, with the chain of thought as
reasoning items, the answer as an output_text message and tool calls as function_call items.
Responses are not stored, so `previous_response_id` and streaming are refused with a clear 400."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cluster.engine import EngineUnavailable
from deploy.api import Api
from deploy.errors import bad_request
from deploy.protocol import ERROR_RESPONSES, ResponsesRequest
from model_shards.chat import CompletionParser, render_chat
from model_shards.tokenizer import CHAT_STOP_TOKENS


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "developer", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    for item in req.input:
        content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
        messages.append({"role": item.role, "content": content})
    return messages


def install(app: FastAPI, api: Api) -> None:
    @app.post("/v1/responses", responses=ERROR_RESPONSES)
    async def responses(req: ResponsesRequest) -> JSONResponse:
        api.check_model(req.model)
        if req.stream:
            raise bad_request("streaming is not supported on /v1/responses yet; use stream: false or "
                              "/v1/chat/completions", "stream", "unsupported_parameter")
        effort = req.reasoning.effort if req.reasoning and req.reasoning.effort else "medium"
        prompt_ids = render_chat(_messages(req), reasoning_effort=effort)
        room = api.max_model_len - len(prompt_ids)
        max_tokens = req.max_output_tokens or max(1, min(api.settings.default_max_tokens, room))
        api.check_length(len(prompt_ids), max_tokens, "input")
        params = api.sampling(max_tokens, req.temperature, req.top_p, None, CHAT_STOP_TOKENS)
        response_id = f"resp_{uuid.uuid4().hex}"
        stream = api.submit(prompt_ids, params, response_id)
        parser, generated, reasoning_tokens, last = CompletionParser(), 0, 0, None
        async with aclosing(api.events(stream, len(prompt_ids), {})) as events:
            async for event in events:
                last = event
                if event.token is not None:
                    generated += 1
                    deltas = parser.feed(event.token)
                    reasoning_tokens += any(d.kind == "reasoning" for d in deltas)  # tokens that wrote reasoning
        if last is not None and last.finish_reason == "error":
            raise EngineUnavailable(last.error or "generation failed")
        parsed = parser.result()
        output: list[dict[str, Any]] = []
        if parsed.reasoning:
            output.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                           "content": [{"type": "reasoning_text", "text": parsed.reasoning}]})
        for call in parsed.tool_calls:
            output.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                           "name": call.name, "arguments": call.arguments, "status": "completed"})
        if parsed.content or not output:
            output.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                           "status": "completed",
                           "content": [{"type": "output_text", "text": parsed.content, "annotations": []}]})
        complete = last is not None and last.finish_reason == "stop"
        body = {
            "id": response_id, "object": "response", "created_at": int(time.time()), "model": req.model,
            "status": "completed" if complete else "incomplete",
            "incomplete_details": None if complete else {"reason": "max_output_tokens"},
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "output": output, "parallel_tool_calls": False, "tools": [],
            "reasoning": {"effort": effort, "summary": None},
            "temperature": params.temperature, "top_p": params.top_p,
            "usage": {"input_tokens": len(prompt_ids), "output_tokens": generated,
                      "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                      "total_tokens": len(prompt_ids) + generated},
        }
        return JSONResponse(body)
