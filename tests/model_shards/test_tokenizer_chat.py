from __future__ import annotations

from pathlib import Path

import pytest
from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

from model_shards.chat import ChatFormatError, parse_completion, render_chat
from model_shards.tokenizer import CALL, CHAT_STOP_TOKENS, END, RETURN, decode, encode, harmony, tokenizer

# harmony's own test data: the default system message, then the developer and user turns.
EXPECTED = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n\nReasoning: high\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
            "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>"
            "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant")


def test_vocabulary_and_special_ids(vocab: Path) -> None:
    enc = tokenizer()
    assert enc.n_vocab == 201088
    assert encode("<|return|><|call|><|end|>") == [RETURN, CALL, END] == [200002, 200012, 200007]
    assert set(harmony().stop_tokens_for_assistant_actions()) == set(CHAT_STOP_TOKENS)
    assert decode(encode("Hello, world")) == "Hello, world"
    assert encode("assistant") == [173781] and encode("analysis") == [35644] and encode("final") == [17196]


def test_system_developer_user_prompt_equals_harmony(vocab: Path) -> None:
    ours = render_chat([{"role": "developer", "content": "Answer in French."},
                        {"role": "user", "content": "What is 2 + 2?"}], reasoning_effort="high")
    conversation = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.HIGH)),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Answer in French.")),
        Message.from_role_and_content(Role.USER, "What is 2 + 2?"),
    ])
    theirs = harmony().render_conversation_for_completion(conversation, Role.ASSISTANT)
    assert ours == list(theirs)
    assert ours == encode(EXPECTED)  # and tiktoken's o200k_harmony agrees with harmony's own ids


def test_system_message_becomes_developer_instructions(vocab: Path) -> None:
    ids = render_chat([{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use French."},
                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\nUse French.<|end|>" in decode(ids)
    assert decode(ids).endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_tools_and_tool_history(vocab: Path) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    text = decode(render_chat([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ], tools=tools, reasoning_effort="low"))
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "type get_weather = (_: {\ncity: string,\n}) => any;" in text
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city":"Paris"}<|call|>') in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>18C<|end|>" in text


def test_parse_separates_reasoning_answer_and_tool_calls(vocab: Path) -> None:
    answer = parse_completion(encode("<|channel|>analysis<|message|>2 plus 2 is 4.<|end|>"
                                     "<|start|>assistant<|channel|>final<|message|>4<|return|>"))
    assert (answer.reasoning, answer.content, answer.tool_calls) == ("2 plus 2 is 4.", "4", [])
    call = parse_completion(encode("<|channel|>analysis<|message|>Need data.<|end|><|start|>assistant<|channel|>"
                                   'commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
                                   "<|call|>"))
    assert call.reasoning == "Need data." and call.content == ""
    assert [(c.name, c.arguments) for c in call.tool_calls] == [("get_weather", '{"city":"Paris"}')]
    truncated = parse_completion(encode("<|channel|>analysis<|message|>Still thinking"))
    assert truncated.reasoning == "Still thinking" and truncated.content == ""
    garbage = parse_completion(encode("not harmony at all"))
    assert garbage.content == "not harmony at all"


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty"),
    ([{"role": "wizard", "content": "x"}], "unsupported message role"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content"),
    ([{"role": "tool", "content": "x", "tool_call_id": "nope"}], "tool_call_id"),
])
def test_bad_messages(vocab: Path, messages: list, message: str) -> None:
    with pytest.raises(ChatFormatError, match=message):
        render_chat(messages)


def test_bad_reasoning_effort(vocab: Path) -> None:
    with pytest.raises(ChatFormatError, match="reasoning_effort"):
        render_chat([{"role": "user", "content": "x"}], reasoning_effort="extreme")


ANSWERS = [
    "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>",
    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
    '<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"q":1}<|call|>',
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_no_harmony_markup_shows_however_generation_ends(vocab: Path, answer: str) -> None:
    """Cut after every token (max_tokens, a stop string, an abort): reasoning, content and tool arguments
    never hold harmony markup, and a cut inside the first header shows no content at all."""
    from model_shards.chat import CompletionParser

    ids = encode(answer)
    first_message = ids.index(encode("<|message|>")[0])
    for cut in range(1, len(ids) + 1):
        parser = CompletionParser()
        streamed = [d.text for t in ids[:cut] for d in parser.feed(t)] + [d.text for d in parser.finish()]
        out = parser.result()
        shown = [out.reasoning, out.content, *streamed, *(c.arguments for c in out.tool_calls),
                 *(c.name for c in out.tool_calls)]
        assert not [s for s in shown if "<|" in s], (cut, decode(ids[:cut]), shown)
        if cut <= first_message:
            assert out.content == "" and out.reasoning == "" and not out.tool_calls, (cut, out)


def test_plain_text_from_a_model_that_ignores_harmony_stays_content(vocab: Path) -> None:
    parsed = parse_completion(encode("hello world"))
    assert parsed.content == "hello world" and parsed.reasoning == ""
