"""`/v1/responses` through the official `openai` package: text, tools (a forced call always
made with valid arguments), a JSON schema, a cut answer, tool results given back as input
items, refusals naming their field; and streams checked by the package's own accumulator
(`client.responses.stream`), which refuses events that do not build a consistent response."""

import json

import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
    },
}
CLOCK = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def check_sequence(events):
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers))), numbers
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete"), events[-1].type


def test_text_unary_and_streamed_agree(client, model):
    args = dict(model=model, input="Tell me about rivers", max_output_tokens=12, temperature=0,
                extra_body=NO_THINKING)
    r = client.responses.create(**args)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete")
    assert r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.output and r.output[-1].type == "message"
    events = list(client.responses.create(stream=True, **args))
    check_sequence(events)
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == r.output_text
    assert events[-1].response.output_text == r.output_text


def test_a_cut_answer_is_incomplete(client, model):
    r = client.responses.create(model=model, input="hi", max_output_tokens=2,
                                extra_body={**NO_THINKING, "ignore_eos": True})
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_call_has_valid_arguments_unary_and_streamed(client, model, choice):
    args = dict(model=model, input="Weather?", instructions="You book trips.", tools=[WEATHER, CLOCK],
                tool_choice=choice, parallel_tool_calls=False, max_output_tokens=300, temperature=1,
                extra_body={"seed": 3})
    r = client.responses.create(**args)
    assert r.status == "completed", r
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1, r.output
    call = calls[0]
    if isinstance(choice, dict):
        assert call.name == "get_weather"
    arguments = json.loads(call.arguments)
    if call.name == "get_weather":
        jsonschema.validate(arguments, WEATHER["parameters"])
    else:
        assert arguments == {}
    # The package's accumulator rebuilds the same call from the events.
    with client.responses.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_sequence(events)
    (streamed,) = [o for o in final.output if o.type == "function_call"]
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    assert streamed.call_id.startswith("call_") and streamed.call_id != call.call_id


def test_tool_results_go_back_as_input_items(client, model):
    r = client.responses.create(
        model=model,
        tools=[WEATHER],
        max_output_tokens=8,
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": json.dumps({"city": "Oslo", "days": 2})},
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 4}'},
        ],
    )
    assert r.status in ("completed", "incomplete")
    assert r.usage.input_tokens > 20


BOOKING = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "nights": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "nights"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_output_satisfies_it(client, model, seed):
    args = dict(model=model, input="Book it, as JSON", max_output_tokens=200, temperature=1,
                text={"format": {"type": "json_schema", "name": "booking", "schema": BOOKING, "strict": True}},
                extra_body={"seed": seed})
    r = client.responses.create(**args)
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), BOOKING)
    with client.responses.stream(**args) as stream:
        final = stream.get_final_response()
    assert final.output_text == r.output_text


@pytest.mark.parametrize(
    "extra, param",
    [
        (dict(previous_response_id="resp_x"), "previous_response_id"),
        (dict(store=True), "store"),
        (dict(tools=[{"type": "web_search"}]), "tools[0].type"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
         "input[0].content[0].type"),
        (dict(tool_choice={"type": "function", "name": "nope"}, tools=[WEATHER]), "tool_choice.name"),
        (dict(text={"format": {"type": "xml"}}), "text.format.type"),
        (dict(include=["reasoning.encrypted_content"]), "include"),
        (dict(extra_body={"max_tokens": 5}), "max_tokens"),
    ],
)
def test_unsupported_fields_are_400s_naming_them(client, model, extra, param):
    args = dict(model=model, input="hi", max_output_tokens=4)
    args.update(extra)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**args)
    assert e.value.status_code == 400
    assert e.value.param == param, e.value.body
