"""What agent frameworks send, through the official `openai` package: tools offered and
tool results given back (unary and streamed), and fields Sluice does not honour refused by
name with a 400 (never a 200 that ignores them). The synthetic model's weights are random, so
these check the API's shape and refusals; what its answers contain is checked by the router's
unit tests (tool-call and reasoning reader) and against HF (the template)."""

import json

import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

ROUND_TRIP = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "days": 2})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 4}'},
]

OPENAI_FINISH = {"stop", "length", "tool_calls"}


def test_tool_round_trip_unary(client, model):
    r = client.chat.completions.create(
        model=model, messages=ROUND_TRIP, tools=[WEATHER], tool_choice="auto", max_tokens=8, seed=1
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in OPENAI_FINISH
    assert r.usage.completion_tokens <= 8
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather"
        json.loads(call.function.arguments)


def test_tool_round_trip_streamed_matches_unary(client, model):
    args = dict(model=model, messages=ROUND_TRIP, tools=[WEATHER], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **args))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == (whole.message.content or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.finish_reason]


def test_tool_choice_none_and_thinking_kwargs_are_accepted(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in OPENAI_FINISH


@pytest.mark.parametrize(
    "extra, param",
    [
        (dict(extra_body={"frobnicate": True}), "frobnicate"),
        (dict(tool_choice="required", tools=[WEATHER]), "tool_choice"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(logit_bias={"5": 10}), "logit_bias"),
        (dict(n=2), "n"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages[0].content[0].type"),
    ],
)
def test_unsupported_fields_are_400s_naming_them(client, model, extra, param):
    args = dict(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    args.update(extra)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.param == param, e.value.body


def test_a_prompt_past_the_context_is_a_400_not_a_retry(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="river " * 20000, max_tokens=4)
    assert e.value.status_code == 400
