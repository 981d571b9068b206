"""What agent frameworks send, through the official `openai` package: tools offered and
tool results given back (unary and streamed), and fields Sluice does not honour refused by
name with a 400 (never a 200 that ignores them). The synthetic model's weights are random, so
these check the API's shape and refusals; what its answers contain is checked by the router's
unit tests (tool-call and reasoning reader) and against HF (the template). Guided decoding is
the exception: whatever the weights, an answer under a JSON schema must parse and satisfy it."""

import json

import jsonschema
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
        (dict(tool_choice="sometimes", tools=[WEATHER]), "tool_choice"),
        (dict(tool_choice="required"), "tools"),
        (dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=[WEATHER]),
         "tool_choice.function.name"),
        (dict(response_format={"type": "xml"}), "response_format.type"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}),
         "constraint.json_schema"),
        (dict(logit_bias={"five": 10}), "logit_bias"),
        (dict(logit_bias={"5": 101}), "logit_bias"),
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


BOOKING = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "nights": {"type": "integer", "minimum": 1, "maximum": 14},
        "refundable": {"type": "boolean"},
    },
    "required": ["city", "nights", "refundable"],
    "additionalProperties": False,
}

# Varied, and bounded: a random-weight model under a schema with no end (a free string, extra
# properties) may write until max_tokens.
SCHEMAS = {
    "booking": BOOKING,
    "enum_and_const": {
        "type": "object",
        "properties": {"status": {"enum": ["ok", "fail", "retry"]}, "code": {"const": 7}},
        "required": ["status", "code"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 4},
    "any_of": {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"enum": ["maybe"]}]},
    "refs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
                            "required": ["x"], "additionalProperties": False}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"},
                       "b": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    "nested_required": {
        "type": "object",
        "properties": {
            "order": {"type": "object", "properties": {"item": {"enum": ["tea", "coffee"]},
                                                       "qty": {"type": "integer", "minimum": 1, "maximum": 3}},
                      "required": ["item", "qty"], "additionalProperties": False},
            "express": {"type": "boolean"},
        },
        "required": ["order"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_answers_satisfy_their_schema(client, model, name, seed):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    args = dict(model=model, messages=[{"role": "user", "content": "Answer in JSON"}], max_tokens=300,
                seed=seed, temperature=1, response_format=fmt)
    r = client.chat.completions.create(**args)
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # Streamed: the same answer, piece by piece.
    chunks = list(client.chat.completions.create(stream=True, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content


def test_json_object_mode_gives_an_object_when_it_ends(client, model):
    # Any object: with random weights it may not close within max_tokens (finish `length`).
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON"}],
                                           max_tokens=200, seed=seed, temperature=1,
                                           response_format={"type": "json_object"})
        choice = r.choices[0]
        assert choice.message.content.startswith("{"), choice
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def test_logit_bias_forces_a_token(client, model):
    free = client.completions.create(model=model, prompt="hello", max_tokens=1, temperature=0)
    forced = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0,
                                       logit_bias={"300": 100})
    text = forced.choices[0].text
    assert forced.usage.completion_tokens == 6
    # Six times the same token: the text is one piece repeated.
    assert text and text == text[: len(text) // 6] * 6, repr(text)
    banned = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0,
                                       logit_bias={"300": -100})
    assert banned.choices[0].text != text
    assert free.choices[0].finish_reason in OPENAI_FINISH


BOUNDED_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_choice_always_calls_with_valid_arguments(client, model, choice):
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Weather?"}], tools=[BOUNDED_WEATHER, CLOCK],
            tool_choice=choice, parallel_tool_calls=False, max_tokens=300, temperature=1, seed=seed)
        choice_out = r.choices[0]
        assert choice_out.finish_reason == "tool_calls", choice_out
        (call,) = choice_out.message.tool_calls
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert set(args) == {"city", "days"}, args
            assert isinstance(args["city"], str) and len(args["city"]) <= 8, args
            assert isinstance(args["days"], int) and 1 <= args["days"] <= 7, args
        else:
            assert call.function.name == "get_time" and args == {}, args
