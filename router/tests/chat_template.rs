//! The router's chat conversion against HF: each conversation of
//! `tests/fixtures/chat_template/conversations.json` (OpenAI wire form; ids and text from
//! transformers' `apply_chat_template` with the real Qwen3.5 tokenizer and template, made by
//! `tests/oracle/make_chat_fixtures.py`) goes through the HTTP edge's parsing and the
//! compiled template, and must give exactly HF's token ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::{Map, Value};
use sluice_engine::Tokenizer;
use sluice_router::openai::{ChatRequest, WireRequest};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn qwen35_template_gives_hf_token_ids() {
    let tokenizer =
        Tokenizer::from_dir(&repo().join("../shared/fixtures/qwen3_5-tokenizer")).unwrap();
    let text =
        std::fs::read_to_string(repo().join("tests/fixtures/chat_template/conversations.json"))
            .unwrap();
    let cases: Vec<Map<String, Value>> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 10, "{} conversations", cases.len());
    for mut case in cases {
        let name = case.remove("name").unwrap();
        let expected_text = case.remove("text").unwrap();
        let ids: Vec<u32> = serde_json::from_value(case.remove("ids").unwrap()).unwrap();
        let request = ChatRequest::from_body(case).unwrap();
        let rendered = request.render(&tokenizer).unwrap();
        assert_eq!(
            rendered.prompt,
            expected_text.as_str().unwrap(),
            "{name}: text"
        );
        assert_eq!(
            tokenizer.encode(&rendered.prompt).unwrap(),
            ids,
            "{name}: ids"
        );
        // Thinking on leaves the block open; off (or a finished turn) closes it.
        let thinking_off = request_kwarg_false(&expected_text);
        if thinking_off {
            assert!(!rendered.opens_reasoning, "{name}");
        }
    }
}

/// Whether the rendered prompt ends with the closed empty think block of `enable_thinking:
/// false`.
fn request_kwarg_false(text: &Value) -> bool {
    text.as_str().unwrap().ends_with("<think>\n\n</think>\n\n")
}

#[test]
fn template_refusals_name_the_messages() {
    let tokenizer =
        Tokenizer::from_dir(&repo().join("../shared/fixtures/qwen3_5-tokenizer")).unwrap();
    // The template itself refuses a conversation with no user turn.
    let body: Map<String, Value> =
        serde_json::from_str(r#"{"messages": [{"role": "system", "content": "x"}]}"#).unwrap();
    let err = ChatRequest::from_body(body)
        .unwrap()
        .render(&tokenizer)
        .unwrap_err();
    assert!(err.to_string().contains("No user query"), "{err}");
    // Unknown fields and a forced tool choice are refused by name, not dropped.
    for (body, field) in [
        (r#"{"messages": [], "frobnicate": 1}"#, "frobnicate"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#,
            "tools",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}"#,
            "tool_choice",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}"#,
            "tool_choice.function.name",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}"#,
            "response_format.type",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}"#,
            "response_format.json_schema",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}"#,
            "logit_bias",
        ),
        (
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            "messages[0].role",
        ),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            "messages[0].content[0].type",
        ),
    ] {
        let body: Map<String, Value> = serde_json::from_str(body).unwrap();
        let err = ChatRequest::from_body(body)
            .and_then(|r| r.to_pb(&tokenizer).map(|_| ()))
            .unwrap_err();
        assert!(
            err.to_string().contains(&format!("`{field}`")),
            "{field}: {err}"
        );
    }
}

#[test]
fn a_response_format_holds_from_the_end_of_reasoning() {
    let tokenizer =
        Tokenizer::from_dir(&repo().join("../shared/fixtures/qwen3_5-tokenizer")).unwrap();
    let think_close = tokenizer.token_id("</think>").unwrap();
    let constraint_of = |thinking: bool| {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}},
            "chat_template_kwargs": {"enable_thinking": thinking},
            "logit_bias": {"7": -100},
        });
        let Value::Object(body) = body else {
            unreachable!()
        };
        let (req, _) = ChatRequest::from_body(body)
            .unwrap()
            .to_pb(&tokenizer)
            .unwrap();
        let sampling = req.sampling.unwrap();
        assert_eq!(sampling.logit_bias.get(&7), Some(&-100.0));
        sampling.constraint.unwrap()
    };
    // Thinking on: the template opens `<think>`, and the schema holds after `</think>`.
    let on = constraint_of(true);
    assert_eq!(on.after_token, Some(think_close));
    assert_eq!(
        on.kind,
        Some(sluice_proto::v1::constraint::Kind::JsonSchema(
            r#"{"type":"integer"}"#.into()
        ))
    );
    // Thinking off: the reasoning block is closed in the prompt; the schema holds at once.
    assert_eq!(constraint_of(false).after_token, None);
}

/// A chat completions conversation as the Responses API's `input` items (and flat tools), the
/// way a client moving between the two writes it.
fn as_responses_body(case: &Map<String, Value>) -> Map<String, Value> {
    let mut items = Vec::new();
    for m in case["messages"].as_array().unwrap() {
        let text_parts = |c: &Value, kind: &str| match c {
            Value::Array(parts) => Value::Array(
                parts
                    .iter()
                    .map(|p| serde_json::json!({"type": kind, "text": p["text"]}))
                    .collect(),
            ),
            other => other.clone(),
        };
        match m["role"].as_str().unwrap() {
            "tool" => items.push(serde_json::json!({
                "type": "function_call_output", "call_id": m["tool_call_id"],
                "output": text_parts(&m["content"], "input_text"),
            })),
            role => {
                if let Some(r) = m.get("reasoning_content") {
                    items.push(serde_json::json!({"type": "reasoning", "summary": [],
                        "content": [{"type": "reasoning_text", "text": r}]}));
                }
                let kind = if role == "assistant" {
                    "output_text"
                } else {
                    "input_text"
                };
                let content = m.get("content").cloned().unwrap_or(Value::Null);
                let empty = content.is_null() || content == "";
                if !(empty && m.get("tool_calls").is_some()) {
                    items.push(serde_json::json!({"type": "message", "role": role,
                        "content": text_parts(&content, kind)}));
                }
                for c in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    items.push(
                        serde_json::json!({"type": "function_call", "call_id": c["id"],
                        "name": c["function"]["name"], "arguments": c["function"]["arguments"]}),
                    );
                }
            }
        }
    }
    let mut body = Map::new();
    body.insert("input".into(), Value::Array(items));
    if let Some(Value::Array(tools)) = case.get("tools") {
        let flat = tools
            .iter()
            .map(|t| {
                let mut f = t["function"].as_object().unwrap().clone();
                f.insert("type".into(), "function".into());
                Value::Object(f)
            })
            .collect();
        body.insert("tools".into(), Value::Array(flat));
    }
    if let Some(k) = case.get("chat_template_kwargs") {
        body.insert("chat_template_kwargs".into(), k.clone());
    }
    body
}

#[test]
fn responses_input_gives_hf_token_ids_too() {
    use sluice_router::responses::ResponsesRequest;
    let tokenizer =
        Tokenizer::from_dir(&repo().join("../shared/fixtures/qwen3_5-tokenizer")).unwrap();
    let text =
        std::fs::read_to_string(repo().join("tests/fixtures/chat_template/conversations.json"))
            .unwrap();
    let cases: Vec<Map<String, Value>> = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for case in cases {
        // The Responses API always asks for the assistant's turn.
        if case.get("add_generation_prompt") == Some(&Value::Bool(false)) {
            continue;
        }
        let name = &case["name"];
        let body = as_responses_body(&case);
        let prepared = ResponsesRequest::from_body(body)
            .unwrap()
            .prepare(&tokenizer, "m".into())
            .unwrap();
        assert_eq!(
            prepared.request.prompt,
            case["text"].as_str().unwrap(),
            "{name}: text"
        );
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tokenizer.encode(&prepared.request.prompt).unwrap(),
            ids,
            "{name}: ids"
        );
        checked += 1;
    }
    assert!(checked >= 10, "{checked} conversations");
}
