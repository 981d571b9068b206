#!/usr/bin/env python3
"""Chat-template fixtures from the reference: HF transformers' `apply_chat_template` with the
real Qwen3.5 tokenizer and chat template (`../shared/fixtures/qwen3_5-tokenizer/`).

Each conversation is written in OpenAI's wire form (what a client sends to
/v1/chat/completions: tool-call `arguments` as a JSON string, `tools`, `chat_template_kwargs`);
this script turns it into what HF templates read (arguments parsed into a mapping, as vLLM and
SGLang do) and records the rendered text and its token ids. The router's test sends the wire
form through its own conversion and must produce the same ids.

Usage (outside the repo, once; torch is not needed):
    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install transformers jinja2
    /tmp/hfvenv/bin/python tests/oracle/make_chat_fixtures.py
Writes tests/fixtures/chat_template/conversations.json.
"""

import copy
import json
import os

from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOKENIZER = os.path.join(REPO, "..", "shared", "fixtures", "qwen3_5-tokenizer")
OUT = os.path.join(REPO, "tests", "fixtures", "chat_template", "conversations.json")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — température, vent.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 東京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
        },
    },
}
BOOK = {
    "type": "function",
    "function": {
        "name": "book_train",
        "description": "Books a train ticket.",
        "parameters": {
            "type": "object",
            "properties": {
                "from": {"type": "string"},
                "to": {"type": "string"},
                "passengers": {"type": "array", "items": {"type": "object"}},
                "first_class": {"type": "boolean"},
                "max_price": {"type": "number"},
            },
            "required": ["from", "to"],
        },
    },
}


def call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = [
    {"name": "one_user_turn", "messages": [{"role": "user", "content": "Tell me about rivers"}]},
    {
        "name": "system_and_user",
        "messages": [
            {"role": "system", "content": "You are a travel assistant.\n"},
            {"role": "user", "content": "Plan a day in Lyon."},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Order a green tea, please."},
        ],
    },
    {
        "name": "tools_offered",
        "tools": [WEATHER, BOOK],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What's the weather in Paris?"},
        ],
    },
    {
        "name": "tool_call_and_result",
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in 東京 for 3 days, in celsius?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_1", "get_weather", {"city": "東京", "days": 3, "unit": "celsius"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
        ],
    },
    {
        "name": "parallel_calls_typed_arguments",
        "tools": [WEATHER, BOOK],
        "messages": [
            {"role": "user", "content": "Book Paris to Lyon for two and check Lyon's weather."},
            {
                "role": "assistant",
                "content": "I'll do both.",
                "tool_calls": [
                    call(
                        "call_a",
                        "book_train",
                        {
                            "from": "Paris",
                            "to": "Lyon",
                            "passengers": [{"name": "Ana", "age": 31}, {"name": "Bo"}],
                            "first_class": False,
                            "max_price": 89.5,
                        },
                    ),
                    call("call_b", "get_weather", {"city": "Lyon"}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "booked: seat 42"},
            {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
        ],
    },
    {
        "name": "reasoning_after_last_query",
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Is it warm in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I should look up Rome.\n",
                "tool_calls": [call("c1", "get_weather", {"city": "Rome"})],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "28C"},
            {"role": "assistant", "content": "Yes, 28 °C.", "reasoning_content": "28 is warm."},
        ],
        "add_generation_prompt": False,
    },
    {
        "name": "reasoning_of_earlier_turns_dropped",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "again a sum"},
            {"role": "user", "content": "Thanks. Now 5+5?"},
        ],
    },
    {
        "name": "thinking_off",
        "messages": [{"role": "user", "content": "Quick: capital of Spain?"}],
        "chat_template_kwargs": {"enable_thinking": False},
    },
    {
        "name": "multi_part_content",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "a river."}],
            },
        ],
    },
    {
        "name": "unicode_and_whitespace",
        "messages": [
            {"role": "user", "content": "  你好，世界 🙂 👩‍👩‍👧 e\u0301\n\ttabs\n\n"},
            {"role": "assistant", "content": "\n再见！\n"},
            {"role": "user", "content": "Ünïcödé?"},
        ],
        "chat_template_kwargs": {"enable_thinking": True},
    },
    {
        "name": "tool_result_then_new_question_thinking_off",
        "tools": [BOOK],
        "messages": [
            {"role": "system", "content": "You book trains."},
            {"role": "user", "content": "Book Nice to Monaco, first class."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("x", "book_train", {"from": "Nice", "to": "Monaco", "first_class": True})],
            },
            {"role": "tool", "tool_call_id": "x", "content": "done"},
            {"role": "assistant", "content": "Booked."},
            {"role": "user", "content": "Cancel it."},
        ],
        "chat_template_kwargs": {"enable_thinking": False},
    },
]


def to_hf(messages):
    """OpenAI wire messages → what HF templates read: tool-call arguments as mappings."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def main():
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(TOKENIZER, "tokenizer.json"))
    with open(os.path.join(TOKENIZER, "chat_template.jinja")) as f:
        tok.chat_template = f.read()
    cases = []
    for conv in CONVERSATIONS:
        kwargs = dict(conv.get("chat_template_kwargs") or {})
        add = conv.get("add_generation_prompt", True)
        args = dict(tools=conv.get("tools"), add_generation_prompt=add, **kwargs)
        text = tok.apply_chat_template(to_hf(conv["messages"]), tokenize=False, **args)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        case = dict(conv)
        case["add_generation_prompt"] = add
        case["text"] = text
        case["ids"] = ids
        cases.append(case)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} conversations to {OUT}")


if __name__ == "__main__":
    main()
