//! `tool_choice` `required` and named, against Qwen3.5's real tokenizer: noise sampled under
//! the tool-call grammar, read back by the chat reader (the same code that reads free
//! answers), is always the calls asked for, with arguments that satisfy each tool's schema
//! (checked field by field here, not by the constraint engine).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use sluice_engine::{Sampler, SamplingParams, Tokenizer};
use sluice_harness::noise_logits;
use sluice_router::chat_output::{ChatOutputReader, ToolSet};
use sluice_router::openai::{ChatRequest, WireRequest};
use sluice_router::tool_grammar::{CallTags, ForcedCalls, tool_call_grammar};
use sluice_runtime::grammar::{Constraint, Grammar, GrammarCompiler, GuidedSampler};

const VOCAB: usize = 248_320;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_5-tokenizer")
}

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"enum": ["celsius", "fahrenheit"]}
            },
            "required": ["city", "days"]}}}),
        json!({"type": "function", "function": {"name": "book", "parameters": {
            "type": "object",
            "properties": {
                "first_class": {"type": "boolean"},
                "riders": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}
            },
            "required": ["first_class", "riders"]}}}),
    ]
}

fn check_arguments(name: &str, arguments: &str) {
    let v: Map<String, Value> = serde_json::from_str(arguments).unwrap();
    match name {
        "get_weather" => {
            assert!(
                v["city"].as_str().unwrap().chars().count() <= 12,
                "{arguments}"
            );
            let days = v["days"].as_i64().unwrap();
            assert!((1..=7).contains(&days), "{arguments}");
            if let Some(u) = v.get("units") {
                assert!(["celsius", "fahrenheit"].contains(&u.as_str().unwrap()));
            }
            assert!(
                v.keys()
                    .all(|k| ["city", "days", "units"].contains(&k.as_str()))
            );
        }
        "book" => {
            assert!(v["first_class"].is_boolean(), "{arguments}");
            let riders = v["riders"].as_array().unwrap();
            assert!(riders.len() <= 2, "{arguments}");
            assert!(
                riders
                    .iter()
                    .all(|r| r.as_str().unwrap().chars().count() <= 8)
            );
            assert_eq!(v.len(), 2, "{arguments}");
        }
        other => panic!("call to {other}"),
    }
}

#[test]
fn forced_calls_are_always_the_calls_asked_for_with_valid_arguments() {
    let tokenizer = Tokenizer::from_dir(&fixture()).unwrap();
    let eos = tokenizer.token_id("<|im_end|>").unwrap();
    let compiler = GrammarCompiler::new(&fixture(), VOCAB, &[eos]);
    let tags = CallTags {
        open: tokenizer.token_id("<tool_call>"),
        close: tokenizer.token_id("</tool_call>"),
    };
    let tools = tools();
    let cases = [
        (ForcedCalls::Any, false),
        (ForcedCalls::Any, true),
        (ForcedCalls::Named("book"), false),
    ];
    for (case, (forced, parallel)) in cases.into_iter().enumerate() {
        let lark = tool_call_grammar(&tools, forced, parallel, tags).unwrap();
        let constraint = Constraint {
            grammar: Grammar::Lark(lark.clone()),
            after_token: None,
        };
        compiler
            .check(&constraint, "constraint")
            .unwrap_or_else(|e| panic!("{e}\n{lark}"));
        for seed in 1..=3u64 {
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            let guide = compiler.guide(&constraint, &[]).unwrap();
            let mut s = GuidedSampler::new(Sampler::new(params, &[]).unwrap(), Some(guide));
            let mut tokens = Vec::new();
            for step in 0..600 {
                let t = s
                    .sample(&noise_logits(seed + 10 * case as u64, step, VOCAB))
                    .unwrap()
                    .token;
                if t == eos {
                    break;
                }
                tokens.push(t);
                if s.grammar_complete() {
                    break;
                }
            }
            let text = tokenizer.decode(&tokens, false).unwrap();
            let mut reader = ChatOutputReader::new(false, ToolSet::from_openai(&tools), parallel);
            let mut delta = reader.push(&text);
            delta.append(reader.finish());
            assert!(!delta.tool_calls.is_empty(), "{text:?}");
            assert!(delta.content.trim().is_empty(), "{text:?} → {delta:?}");
            if !parallel {
                assert_eq!(delta.tool_calls.len(), 1, "{text:?}");
            }
            for call in &delta.tool_calls {
                if let ForcedCalls::Named(n) = forced {
                    assert_eq!(call.name, n);
                }
                check_arguments(&call.name, &call.arguments);
            }
        }
    }
}

#[test]
fn a_forced_tool_choice_becomes_the_request_constraint() {
    let tokenizer = Tokenizer::from_dir(&fixture()).unwrap();
    let body = json!({
        "messages": [{"role": "user", "content": "Book it"}],
        "tools": tools(),
        "tool_choice": {"type": "function", "function": {"name": "book"}},
        "chat_template_kwargs": {"enable_thinking": false},
    });
    let Value::Object(body) = body else {
        unreachable!()
    };
    let (req, _) = ChatRequest::from_body(body)
        .unwrap()
        .to_pb(&tokenizer)
        .unwrap();
    let c = req.sampling.unwrap().constraint.unwrap();
    let Some(sluice_proto::v1::constraint::Kind::Lark(lark)) = c.kind else {
        panic!("{c:?}")
    };
    assert!(lark.contains("<function=book>"), "{lark}");
    assert!(!lark.contains("get_weather"), "{lark}");
    // Every tool is still offered to the model: the prompt lists both.
    assert!(req.prompt.contains("get_weather") && req.prompt.contains("\"book\""));
}

#[test]
fn grpc_messages_render_as_the_openai_body_does_and_answers_come_back_typed() {
    use sluice_proto::v1 as pb;
    use sluice_router::chat::{GrpcChat, GrpcChatReader, ToolCallIds};
    let tokenizer = Tokenizer::from_dir(&fixture()).unwrap();
    let weather = &tools()[0]["function"];
    // The same conversation through both edges: a tool offered, an earlier call and its
    // result, reasoning in history, thinking off.
    let body = json!({
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 2}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 4}"},
        ],
        "tools": [tools()[0].clone()],
        "tool_choice": "required",
        "chat_template_kwargs": {"enable_thinking": false},
    });
    let Value::Object(body) = body else {
        unreachable!()
    };
    let (openai, _) = ChatRequest::from_body(body)
        .unwrap()
        .to_pb(&tokenizer)
        .unwrap();
    let message = |role: &str, content: &str| pb::ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    };
    let mut assistant = message("assistant", "");
    assistant.reasoning_content = "Need the tool.".into();
    assistant.tool_calls = vec![pb::ToolCall {
        id: "c1".into(),
        name: "get_weather".into(),
        arguments: r#"{"city": "Oslo", "days": 2}"#.into(),
    }];
    let mut tool = message("tool", r#"{"temp": 4}"#);
    tool.tool_call_id = "c1".into();
    let grpc = pb::GenerateRequest {
        messages: vec![
            message("developer", "Be brief."),
            message("user", "Weather in Oslo?"),
            assistant,
            tool,
        ],
        tools: vec![pb::Tool {
            name: "get_weather".into(),
            description: String::new(),
            parameters: weather["parameters"].to_string(),
        }],
        tool_choice: Some(pb::ToolChoice {
            mode: pb::ToolChoiceMode::Required as i32,
            function: String::new(),
        }),
        chat_template_kwargs: r#"{"enable_thinking": false}"#.into(),
        ..Default::default()
    };
    let chat = GrpcChat::read(&grpc).unwrap();
    let mut constraint = None;
    let (prompt, reader) = chat
        .conversation(&grpc)
        .unwrap()
        .prepare(&tokenizer, &mut constraint, "sampling.constraint")
        .unwrap();
    assert_eq!(prompt, openai.prompt);
    assert_eq!(constraint, openai.sampling.unwrap().constraint);
    // The answer, split over chunks, comes back as typed calls with router-minted ids.
    let answer = "<tool_call>\n<function=get_weather>\n<parameter=city>\nBergen\n</parameter>\n\
                  <parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
    let mut reader = GrpcChatReader::new(reader, ToolCallIds("req-1".into()));
    let (mut text, mut calls) = (String::new(), Vec::new());
    let pieces: Vec<&str> = answer.split_inclusive('>').collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mut chunk = pb::GenerateChunk {
            text: piece.to_string(),
            ..Default::default()
        };
        if i + 1 == pieces.len() {
            chunk.finish_reason = pb::FinishReason::Stop as i32;
        }
        reader.read(&mut chunk);
        text.push_str(&chunk.text);
        calls.extend(chunk.tool_calls);
    }
    assert_eq!(text.trim(), "");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].id, "call_req-1_0");
    assert_eq!(calls[0].name, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert_eq!(args, json!({"city": "Bergen", "days": 3}));
    // Both a prompt and messages: refused, naming `messages`.
    let both = pb::GenerateRequest {
        prompt: "x".into(),
        ..grpc
    };
    let err = GrpcChat::read(&both).err().unwrap().to_string();
    assert!(err.contains("`messages`"), "{err}");
}
