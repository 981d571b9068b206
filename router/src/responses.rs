//! OpenAI's Responses API (`POST /v1/responses`): `input` (text, or items — messages,
//! `function_call`, `function_call_output`, `reasoning`), `instructions`, flat function
//! `tools`, `tool_choice`, `text.format`, `max_output_tokens`; the answer as output items
//! (`reasoning`, `message`, `function_call`), unary or as the API's typed stream events.
//!
//! The conversation goes through the same [`Conversation`] as chat completions (one
//! template, one tool-call grammar, one answer reader). Sluice keeps no responses: `store`
//! must be false or absent, and `previous_response_id` is refused by name.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_engine::{ChatMessage, MessageContent, TextPart, Tokenizer, ToolCallTurn};
use sluice_proto::v1 as pb;

use crate::chat::{Conversation, ToolCallIds, call_arguments, template_role};
use crate::chat_output::{ChatDelta, ChatOutputReader, THINK_CLOSE, THINK_OPEN};
use crate::error::RouterError;
use crate::openai::{Sampling, WireRequest, json_constraint};
use crate::tool_grammar::ForcedCalls;

/// A Responses request body. Tools, tool choice, text format and metadata stay as sent: the
/// response echoes them, and they are read (with errors naming their fields) in `prepare`.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub input: Input,
    pub instructions: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub max_output_tokens: Option<u32>,
    pub text: Option<Value>,
    pub store: Option<bool>,
    pub truncation: Option<String>,
    #[serde(default)]
    pub include: Vec<String>,
    /// Template variables (`enable_thinking`, ...), as vLLM and SGLang take them.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub metadata: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `input`: one user message's text, or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// The sampling fields a Responses body may carry: OpenAI's and the extensions chat
/// completions take (`max_tokens`, `n` and `stream_options` are not the Responses API's).
const RESPONSES_SAMPLING_FIELDS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "stream",
    "user",
];

impl WireRequest for ResponsesRequest {
    const FIELDS: &'static [&'static str] = &[
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "text",
        "store",
        "truncation",
        "include",
        "chat_template_kwargs",
        "metadata",
    ];
    const SHARED_FIELDS: &'static [&'static str] = RESPONSES_SAMPLING_FIELDS;
}

/// A request ready to start: the public request, the reader of its answer, and what its
/// response echoes.
pub struct PreparedResponse {
    pub request: pb::GenerateRequest,
    pub reader: ChatOutputReader,
    pub echo: ResponseEcho,
    pub reasoning: ReasoningTokens,
}

/// The request's settings as every response object repeats them.
#[derive(Debug, Clone)]
pub struct ResponseEcho {
    pub model: String,
    fields: Map<String, Value>,
}

impl ResponsesRequest {
    /// Checks the request and makes it the public request for `model`.
    pub fn prepare(
        self,
        tokenizer: &Tokenizer,
        model: String,
    ) -> Result<PreparedResponse, RouterError> {
        if self.store == Some(true) {
            return Err(RouterError::invalid(
                "store",
                "this server keeps no responses: set `store` to false",
            ));
        }
        if let Some(t) = self.truncation.as_deref()
            && t != "disabled"
        {
            return Err(RouterError::invalid(
                "truncation",
                format!("`{t}` is not supported; only `disabled`"),
            ));
        }
        if let Some(first) = self.include.first() {
            return Err(RouterError::invalid(
                "include",
                format!("`{first}` is not supported"),
            ));
        }
        let tools = chat_tools(self.tools.as_deref().unwrap_or_default())?;
        let choice = ToolChoice::read(self.tool_choice.as_ref(), &tools)?;
        let mut constraint = text_constraint(self.text.as_ref())?;
        let conversation = Conversation {
            messages: input_messages(self.instructions.as_deref(), &self.input)?,
            tools: (!tools.is_empty() && choice != ToolChoice::None).then_some(&tools[..]),
            forced: choice.forced(),
            parallel: self.parallel_tool_calls.unwrap_or(true),
            kwargs: self.chat_template_kwargs.as_ref(),
            add_generation_prompt: true,
        };
        let (prompt, reader) = conversation.prepare(tokenizer, &mut constraint, "text.format")?;
        let reasoning = ReasoningTokens::new(tokenizer, reader.opens_reasoning());
        let mut sampling = self.sampling.to_pb(None)?;
        sampling.max_tokens = self.max_output_tokens;
        sampling.constraint = constraint;
        let echo = ResponseEcho {
            model,
            fields: Map::from_iter([
                ("instructions".into(), json!(self.instructions)),
                ("tools".into(), json!(self.tools.unwrap_or_default())),
                (
                    "tool_choice".into(),
                    self.tool_choice.unwrap_or_else(|| json!("auto")),
                ),
                (
                    "parallel_tool_calls".into(),
                    json!(self.parallel_tool_calls.unwrap_or(true)),
                ),
                ("temperature".into(), json!(sampling.temperature)),
                ("top_p".into(), json!(sampling.top_p)),
                ("max_output_tokens".into(), json!(self.max_output_tokens)),
                (
                    "text".into(),
                    self.text
                        .unwrap_or_else(|| json!({"format": {"type": "text"}})),
                ),
                (
                    "metadata".into(),
                    self.metadata.unwrap_or_else(|| json!({})),
                ),
                ("store".into(), json!(false)),
                ("truncation".into(), json!("disabled")),
                ("previous_response_id".into(), Value::Null),
                ("reasoning".into(), json!({"effort": null, "summary": null})),
            ]),
        };
        let request = pb::GenerateRequest {
            prompt,
            sampling: Some(sampling),
            ..Default::default()
        };
        Ok(PreparedResponse {
            request,
            reader,
            echo,
            reasoning,
        })
    }
}

/// The Responses API's flat function tools (`{"type": "function", "name", "description",
/// "parameters", "strict"}`) in chat completions' shape, the one templates and the
/// tool-call grammar read.
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, RouterError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            return Err(RouterError::invalid(
                format!("tools[{i}].type"),
                format!("`{kind}` tools are not supported; only `function`"),
            ));
        }
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return Err(RouterError::invalid(
                format!("tools[{i}].name"),
                "every tool needs a name",
            ));
        };
        let mut function = Map::new();
        function.insert("name".into(), json!(name));
        for key in ["description", "parameters"] {
            if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                function.insert(key.into(), v.clone());
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out)
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or `{"type": "function", "name": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolChoice<'a> {
    None,
    Auto,
    Required,
    Named(&'a str),
}

impl<'a> ToolChoice<'a> {
    fn read(choice: Option<&'a Value>, tools: &[Value]) -> Result<Self, RouterError> {
        let choice = match choice {
            None => return Ok(ToolChoice::Auto),
            Some(Value::String(mode)) => match mode.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(RouterError::invalid(
                        "tool_choice",
                        format!("`{other}` is not one of none, auto, required or a function"),
                    ));
                }
            },
            Some(v) if v.get("type").and_then(Value::as_str) == Some("function") => {
                let Some(name) = v.get("name").and_then(Value::as_str) else {
                    return Err(RouterError::invalid(
                        "tool_choice.name",
                        "names the tool every call must be to",
                    ));
                };
                let offered = tools.iter().any(|t| t["function"]["name"] == name);
                if !offered {
                    return Err(RouterError::invalid(
                        "tool_choice.name",
                        format!("`{name}` is not one of the tools offered"),
                    ));
                }
                ToolChoice::Named(name)
            }
            Some(_) => {
                return Err(RouterError::invalid(
                    "tool_choice",
                    "only none, auto, required or {\"type\": \"function\", \"name\": ...}",
                ));
            }
        };
        Ok(choice)
    }

    fn forced(self) -> Option<ForcedCalls<'a>> {
        match self {
            ToolChoice::Required => Some(ForcedCalls::Any),
            ToolChoice::Named(name) => Some(ForcedCalls::Named(name)),
            ToolChoice::None | ToolChoice::Auto => None,
        }
    }
}

/// `text.format` as guided decoding: `text` (none), `json_object`, or `json_schema` with its
/// `schema` beside `name` (flat, unlike chat completions' `response_format`).
fn text_constraint(text: Option<&Value>) -> Result<Option<pb::Constraint>, RouterError> {
    let Some(format) = text.and_then(|t| t.get("format")) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json_constraint(json!({"type": "object"})))),
        Some("json_schema") => {
            let schema = format.get("schema").cloned().unwrap_or_else(|| json!({}));
            Ok(Some(json_constraint(schema)))
        }
        other => Err(RouterError::invalid(
            "text.format.type",
            format!(
                "`{}` is not one of text, json_object, json_schema",
                other.unwrap_or("")
            ),
        )),
    }
}

/// The conversation `instructions` and `input` describe, in the shape templates read. A
/// `reasoning` item belongs to the assistant turn after it; `function_call` items join the
/// assistant turn they follow (or open one); `function_call_output` items are tool turns.
fn input_messages(
    instructions: Option<&str>,
    input: &Input,
) -> Result<Vec<ChatMessage>, RouterError> {
    let mut messages = Vec::new();
    if let Some(text) = instructions {
        messages.push(ChatMessage::new("system", text));
    }
    let items = match input {
        Input::Text(text) => {
            messages.push(ChatMessage::user(text.as_str()));
            return Ok(messages);
        }
        Input::Items(items) => items,
    };
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let field = |name: &str| format!("input[{i}].{name}");
        let text_field = |item: &Value, name: &str| -> Result<String, RouterError> {
            match item.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(RouterError::invalid(field(name), "must be a string")),
            }
        };
        let kind = match item.get("type") {
            None if item.get("role").is_some() => "message",
            Some(Value::String(kind)) => kind.as_str(),
            _ => {
                return Err(RouterError::invalid(
                    field("type"),
                    "every item needs a type",
                ));
            }
        };
        match kind {
            "message" => {
                let role = text_field(item, "role")?;
                let role = template_role(&role, field("role"))?.to_string();
                let content = message_content(item.get("content"), &field("content"))?;
                let mut message = ChatMessage::new(role, "");
                message.content = content;
                if message.role == "assistant" {
                    message.reasoning_content = reasoning.take();
                }
                messages.push(message);
            }
            "function_call" => {
                let call_id = text_field(item, "call_id")?;
                let name = text_field(item, "name")?;
                let arguments = item.get("arguments").and_then(Value::as_str);
                let arguments = call_arguments(arguments, field("arguments"))?;
                let call = ToolCallTurn::function(Some(call_id), name, arguments);
                match messages.last_mut() {
                    Some(m) if m.role == "assistant" && reasoning.is_none() => {
                        m.tool_calls.push(call)
                    }
                    _ => {
                        let mut m = ChatMessage::new("assistant", "");
                        m.reasoning_content = reasoning.take();
                        m.tool_calls.push(call);
                        messages.push(m);
                    }
                }
            }
            "function_call_output" => {
                let call_id = text_field(item, "call_id")?;
                let mut m = ChatMessage::new("tool", "");
                m.content = message_content(item.get("output"), &field("output"))?;
                m.tool_call_id = Some(call_id);
                messages.push(m);
            }
            "reasoning" => {
                if item.get("encrypted_content").is_some_and(|v| !v.is_null()) {
                    return Err(RouterError::invalid(
                        field("encrypted_content"),
                        "encrypted reasoning is not supported; send its text in `content`",
                    ));
                }
                // Its text: `content`'s reasoning text, else the summary's.
                let parts = item
                    .get("content")
                    .and_then(Value::as_array)
                    .filter(|c| !c.is_empty())
                    .or_else(|| item.get("summary").and_then(Value::as_array));
                let text: String = parts
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n");
                reasoning.get_or_insert_default().push_str(&text);
            }
            other => {
                return Err(RouterError::invalid(
                    field("type"),
                    format!("`{other}` items are not supported"),
                ));
            }
        }
    }
    Ok(messages)
}

/// A message's (or a call output's) content: text, or text parts (`input_text`,
/// `output_text`); anything else is refused naming its part.
fn message_content(content: Option<&Value>, field: &str) -> Result<MessageContent, RouterError> {
    match content {
        None | Some(Value::Null) => Ok(MessageContent::Text(String::new())),
        Some(Value::String(text)) => Ok(MessageContent::Text(text.clone())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                if !matches!(kind, "input_text" | "output_text") {
                    return Err(RouterError::invalid(
                        format!("{field}[{j}].type"),
                        format!("content parts of type `{kind}` are not supported"),
                    ));
                }
                let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                texts.push(TextPart::new(text));
            }
            Ok(MessageContent::Parts(texts))
        }
        Some(_) => Err(RouterError::invalid(
            field.to_string(),
            "must be a string or a list of text parts",
        )),
    }
}

/// Counts the answer's reasoning tokens (for `usage.output_tokens_details`) by token id: all
/// tokens up to and including `</think>`, from the start of the answer when the prompt left
/// a block open or the answer opens one itself.
#[derive(Debug, Clone)]
pub struct ReasoningTokens {
    open: Option<u32>,
    close: Option<u32>,
    inside: bool,
    started: bool,
    count: u32,
}

impl ReasoningTokens {
    pub fn new(tokenizer: &Tokenizer, opens_reasoning: bool) -> Self {
        ReasoningTokens {
            open: tokenizer.token_id(THINK_OPEN),
            close: tokenizer.token_id(THINK_CLOSE),
            inside: opens_reasoning,
            started: false,
            count: 0,
        }
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn push(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.started && Some(id) == self.open {
                self.inside = true;
            }
            self.started = true;
            if self.inside {
                self.count += 1;
                if Some(id) == self.close {
                    self.inside = false;
                }
            }
        }
    }
}

/// One server-sent event of the stream: its `type` and its body (which repeats it).
pub type StreamEvent = (&'static str, Value);

/// The item text is streaming into.
#[derive(Debug)]
enum OpenItem {
    Reasoning { index: usize, text: String },
    Message { index: usize, text: String },
}

/// The answer as output items and the events that build them: the one owner of a
/// response's shape, fed the reader's deltas. A unary response is the final object of the
/// same run, so it always equals what the stream ends with.
pub struct ResponseBuilder {
    id: String,
    created_at: u64,
    echo: ResponseEcho,
    call_ids: ToolCallIds,
    sequence: u64,
    items: Vec<Value>,
    open: Option<OpenItem>,
}

impl ResponseBuilder {
    /// `request_id`: the router's own (never the client's).
    pub fn new(request_id: &str, created_at: u64, echo: ResponseEcho) -> Self {
        ResponseBuilder {
            id: format!("resp_{request_id}"),
            created_at,
            echo,
            call_ids: ToolCallIds(request_id.to_string()),
            sequence: 0,
            items: Vec::new(),
            open: None,
        }
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<StreamEvent> {
        let response = self.response("in_progress", Value::Null, Value::Null, Value::Null);
        let mut events = Vec::new();
        self.emit(
            &mut events,
            "response.created",
            json!({"response": response}),
        );
        let response = self.response("in_progress", Value::Null, Value::Null, Value::Null);
        self.emit(
            &mut events,
            "response.in_progress",
            json!({"response": response}),
        );
        events
    }

    /// What one piece of the answer adds.
    pub fn push(&mut self, delta: ChatDelta) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if !delta.reasoning.is_empty() {
            self.text(&mut events, true, &delta.reasoning);
        }
        if !delta.content.is_empty() {
            self.text(&mut events, false, &delta.content);
        }
        for call in delta.tool_calls {
            self.close(&mut events, "completed");
            let index = self.items.len();
            let item_id = format!("fc_{}_{}", self.id_suffix(), call.index);
            let mut item = json!({
                "type": "function_call", "id": item_id, "call_id": self.call_ids.id(call.index),
                "name": call.name, "arguments": "", "status": "in_progress",
            });
            self.emit(
                &mut events,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.emit(
                &mut events,
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": index, "delta": call.arguments}),
            );
            self.emit(
                &mut events,
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "name": call.name,
                       "arguments": call.arguments}),
            );
            item["arguments"] = json!(call.arguments);
            item["status"] = json!("completed");
            self.emit(
                &mut events,
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            self.items.push(item);
        }
        events
    }

    /// The end of the answer: open items close, and `response.completed` (or
    /// `response.incomplete`, cut by `max_output_tokens`) carries the whole response.
    pub fn finish(
        &mut self,
        reason: i32,
        usage: Option<&pb::Usage>,
        reasoning_tokens: u32,
    ) -> (Vec<StreamEvent>, Value) {
        let cut = reason == pb::FinishReason::Length as i32;
        let mut events = Vec::new();
        if self.items.is_empty() && self.open.is_none() {
            // An answer with nothing in it is still one (empty) message.
            self.open_item(&mut events, false);
        }
        self.close(&mut events, if cut { "incomplete" } else { "completed" });
        let u = usage.cloned().unwrap_or_default();
        let usage = json!({
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        });
        let (status, details, kind) = if cut {
            (
                "incomplete",
                json!({"reason": "max_output_tokens"}),
                "response.incomplete",
            )
        } else {
            ("completed", Value::Null, "response.completed")
        };
        let response = self.response(status, details, usage, Value::Null);
        self.emit(&mut events, kind, json!({"response": response}));
        (events, response)
    }

    /// A failure after the stream began: an `error` event, then `response.failed`.
    pub fn fail(&mut self, code: &str, message: &str, param: Option<&str>) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        self.close(&mut events, "incomplete");
        self.emit(
            &mut events,
            "error",
            json!({"code": code, "message": message, "param": param}),
        );
        let error = json!({"code": code, "message": message});
        let response = self.response("failed", Value::Null, Value::Null, error);
        self.emit(
            &mut events,
            "response.failed",
            json!({"response": response}),
        );
        events
    }

    /// The request id part of item ids.
    fn id_suffix(&self) -> &str {
        &self.id["resp_".len()..]
    }

    /// Appends `text` to the open reasoning item (`reasoning`) or message, opening it first.
    fn text(&mut self, events: &mut Vec<StreamEvent>, reasoning: bool, text: &str) {
        let matches = matches!(
            (&self.open, reasoning),
            (Some(OpenItem::Reasoning { .. }), true) | (Some(OpenItem::Message { .. }), false)
        );
        if !matches {
            self.close(events, "completed");
            self.open_item(events, reasoning);
        }
        let (index, kind) = match &mut self.open {
            Some(OpenItem::Reasoning { index, text: all }) => {
                all.push_str(text);
                (*index, "response.reasoning_text.delta")
            }
            Some(OpenItem::Message { index, text: all }) => {
                all.push_str(text);
                (*index, "response.output_text.delta")
            }
            None => return,
        };
        let mut body = json!({
            "item_id": self.item_id(reasoning), "output_index": index, "content_index": 0,
            "delta": text,
        });
        if !reasoning {
            body["logprobs"] = json!([]);
        }
        self.emit(events, kind, body);
    }

    fn item_id(&self, reasoning: bool) -> String {
        let prefix = if reasoning { "rs" } else { "msg" };
        format!("{prefix}_{}_{}", self.id_suffix(), self.items.len())
    }

    fn open_item(&mut self, events: &mut Vec<StreamEvent>, reasoning: bool) {
        let index = self.items.len();
        let id = self.item_id(reasoning);
        let (item, part) = if reasoning {
            (
                json!({"type": "reasoning", "id": id, "summary": [], "content": [],
                       "status": "in_progress"}),
                json!({"type": "reasoning_text", "text": ""}),
            )
        } else {
            (
                json!({"type": "message", "id": id, "status": "in_progress",
                       "role": "assistant", "content": []}),
                json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
            )
        };
        self.emit(
            events,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.emit(
            events,
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        let text = String::new();
        self.open = Some(if reasoning {
            OpenItem::Reasoning { index, text }
        } else {
            OpenItem::Message { index, text }
        });
    }

    /// Closes the open item, if any, with `status`.
    fn close(&mut self, events: &mut Vec<StreamEvent>, status: &str) {
        let Some(open) = self.open.take() else {
            return;
        };
        let (reasoning, index, text) = match open {
            OpenItem::Reasoning { index, text } => (true, index, text),
            OpenItem::Message { index, text } => (false, index, text),
        };
        let id = self.item_id(reasoning);
        let at = json!({"item_id": id, "output_index": index, "content_index": 0});
        let (done_kind, part, item) = if reasoning {
            let part = json!({"type": "reasoning_text", "text": text});
            let item = json!({"type": "reasoning", "id": id, "summary": [], "content": [part],
                              "status": status});
            ("response.reasoning_text.done", part, item)
        } else {
            let part = json!({"type": "output_text", "text": text, "annotations": [],
                              "logprobs": []});
            let item = json!({"type": "message", "id": id, "status": status,
                              "role": "assistant", "content": [part]});
            ("response.output_text.done", part, item)
        };
        let mut done = at.clone();
        done["text"] = json!(text);
        if !reasoning {
            done["logprobs"] = json!([]);
        }
        self.emit(events, done_kind, done);
        let mut part_done = at;
        part_done["part"] = part;
        self.emit(events, "response.content_part.done", part_done);
        self.emit(
            events,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.items.push(item);
    }

    fn emit(&mut self, events: &mut Vec<StreamEvent>, kind: &'static str, mut body: Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        events.push((kind, body));
    }

    /// The response object as it stands.
    fn response(&self, status: &str, incomplete: Value, usage: Value, error: Value) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": error, "incomplete_details": incomplete,
            "model": self.echo.model, "output": self.items, "usage": usage,
        });
        for (k, v) in &self.echo.fields {
            r[k] = v.clone();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: Value) -> Input {
        Input::Items(v.as_array().unwrap().clone())
    }

    #[test]
    fn input_items_become_the_chat_turns_they_describe() {
        let input = items(json!([
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "Use the tool."}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": "{\"city\": \"Oslo\"}"},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": ""},
            {"type": "function_call_output", "call_id": "c1", "output": "{\"temp\": 4}"},
            {"type": "function_call_output", "call_id": "c2",
             "output": [{"type": "input_text", "text": "noon"}]},
        ]));
        let m = input_messages(Some("Be brief."), &input).unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool"]);
        assert_eq!(m[2].reasoning_content.as_deref(), Some("Use the tool."));
        assert_eq!(
            m[2].content,
            MessageContent::Parts(vec![TextPart::new("Checking.")])
        );
        let calls: Vec<_> = m[2]
            .tool_calls
            .iter()
            .map(|c| (c.id.as_deref(), c.function.arguments.clone()))
            .collect();
        assert_eq!(
            calls,
            [
                (Some("c1"), json!({"city": "Oslo"})),
                (Some("c2"), json!({}))
            ]
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(
            m[4].content,
            MessageContent::Parts(vec![TextPart::new("noon")])
        );
        // A call with its reasoning and no message before it opens its own assistant turn.
        let m = input_messages(
            None,
            &items(json!([
                {"role": "user", "content": "hi"},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            ])),
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].reasoning_content.as_deref(), Some("think"));
        assert_eq!(m[1].tool_calls.len(), 1);
    }

    #[test]
    fn unsupported_input_is_refused_naming_its_field() {
        let field = |v: Value| match input_messages(None, &items(v)) {
            Err(RouterError::InvalidArgument { field, .. }) => field.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
            ),
            "input[0].content[0].type"
        );
        assert_eq!(
            field(json!([{"type": "item_reference", "id": "x"}])),
            "input[0].type"
        );
        assert_eq!(
            field(json!([{"type": "function_call", "name": "f"}])),
            "input[0].call_id"
        );
        assert_eq!(
            field(json!([{"role": "robot", "content": "x"}])),
            "input[0].role"
        );
        assert_eq!(
            field(json!([{"type": "reasoning", "encrypted_content": "zz"}])),
            "input[0].encrypted_content"
        );
        let tool = |t: Value| match chat_tools(&[t]) {
            Err(RouterError::InvalidArgument { field, .. }) => field.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(tool(json!({"type": "web_search"})), "tools[0].type");
        assert_eq!(tool(json!({"type": "function"})), "tools[0].name");
    }

    #[test]
    fn flat_tools_take_the_chat_shape_in_order() {
        let t = chat_tools(&[json!({"type": "function", "name": "f", "strict": true,
            "parameters": {"type": "object"}, "description": "d"})])
        .unwrap();
        assert_eq!(
            serde_json::to_string(&t[0]).unwrap(),
            r#"{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object"}}}"#
        );
    }

    fn echo() -> ResponseEcho {
        ResponseEcho {
            model: "m".into(),
            fields: Map::new(),
        }
    }

    /// Rebuilds the output from the events alone, as a client's accumulator does, checking
    /// every event's place in the item it names.
    fn replay(events: &[StreamEvent]) -> Vec<Value> {
        let mut output: Vec<Value> = Vec::new();
        let mut done = vec![];
        for (n, (kind, e)) in events.iter().enumerate() {
            assert_eq!(e["type"], *kind);
            assert_eq!(e["sequence_number"], n as u64, "{kind}");
            let at = e["output_index"].as_u64().map(|i| i as usize);
            match *kind {
                "response.output_item.added" => {
                    assert_eq!(at, Some(output.len()));
                    output.push(e["item"].clone());
                }
                "response.content_part.added" => {
                    let item = &mut output[at.unwrap()];
                    assert_eq!(item["id"], e["item_id"]);
                    item["content"]
                        .as_array_mut()
                        .unwrap()
                        .push(e["part"].clone());
                }
                "response.output_text.delta" | "response.reasoning_text.delta" => {
                    let item = &mut output[at.unwrap()];
                    assert_eq!(item["id"], e["item_id"]);
                    let part = &mut item["content"][0]["text"];
                    *part = json!(format!(
                        "{}{}",
                        part.as_str().unwrap(),
                        e["delta"].as_str().unwrap()
                    ));
                }
                "response.function_call_arguments.delta" => {
                    let item = &mut output[at.unwrap()];
                    let args = &mut item["arguments"];
                    *args = json!(format!(
                        "{}{}",
                        args.as_str().unwrap(),
                        e["delta"].as_str().unwrap()
                    ));
                }
                "response.output_item.done" => {
                    let i = at.unwrap();
                    let mut built = output[i].clone();
                    built["status"] = e["item"]["status"].clone();
                    assert_eq!(built, e["item"], "the deltas build the finished item");
                    output[i] = e["item"].clone();
                    done.push(i);
                }
                _ => {}
            }
        }
        assert_eq!(
            done,
            (0..output.len()).collect::<Vec<_>>(),
            "every item finished, in order"
        );
        output
    }

    #[test]
    fn the_stream_builds_exactly_the_final_response() {
        use crate::chat_output::ToolCall;
        let mut b = ResponseBuilder::new("r1", 7, echo());
        let mut events = b.start();
        let deltas = [
            ChatDelta {
                reasoning: "I should ".into(),
                ..Default::default()
            },
            ChatDelta {
                reasoning: "call.".into(),
                content: "Let me".into(),
                ..Default::default()
            },
            ChatDelta {
                content: " check.".into(),
                ..Default::default()
            },
            ChatDelta {
                tool_calls: vec![
                    ToolCall {
                        index: 0,
                        name: "f".into(),
                        arguments: "{\"a\":1}".into(),
                    },
                    ToolCall {
                        index: 1,
                        name: "g".into(),
                        arguments: "{}".into(),
                    },
                ],
                ..Default::default()
            },
        ];
        for d in deltas {
            events.extend(b.push(d));
        }
        let usage = pb::Usage {
            prompt_tokens: 5,
            completion_tokens: 9,
        };
        let (end, response) = b.finish(pb::FinishReason::Eos as i32, Some(&usage), 4);
        events.extend(end);
        assert_eq!(events[0].0, "response.created");
        assert_eq!(events.last().unwrap().0, "response.completed");
        assert_eq!(events.last().unwrap().1["response"], response);
        let output = replay(&events);
        assert_eq!(response["output"], json!(output));
        let kinds: Vec<&str> = output.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["reasoning", "message", "function_call", "function_call"]
        );
        assert_eq!(output[0]["content"][0]["text"], "I should call.");
        assert_eq!(output[1]["content"][0]["text"], "Let me check.");
        assert_eq!(output[2]["call_id"], "call_r1_0");
        assert_eq!(output[3]["arguments"], "{}");
        assert_eq!(response["status"], "completed");
        assert_eq!(response["usage"]["total_tokens"], 14);
        assert_eq!(
            response["usage"]["output_tokens_details"]["reasoning_tokens"],
            4
        );
        // Ids are unique.
        let ids: std::collections::HashSet<_> =
            output.iter().map(|i| i["id"].to_string()).collect();
        assert_eq!(ids.len(), output.len());
    }

    #[test]
    fn a_cut_answer_is_incomplete_and_an_empty_one_is_one_empty_message() {
        let mut b = ResponseBuilder::new("r2", 0, echo());
        let mut events = b.start();
        events.extend(b.push(ChatDelta {
            content: "abc".into(),
            ..Default::default()
        }));
        let (end, r) = b.finish(pb::FinishReason::Length as i32, None, 0);
        events.extend(end);
        replay(&events);
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["output"][0]["status"], "incomplete");

        let mut b = ResponseBuilder::new("r3", 0, echo());
        let mut events = b.start();
        let (end, r) = b.finish(pb::FinishReason::Stop as i32, None, 0);
        events.extend(end);
        replay(&events);
        assert_eq!(
            r["output"],
            json!([{"type": "message", "id": "msg_r3_0",
            "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}])
        );
    }

    #[test]
    fn reasoning_tokens_are_counted_by_id() {
        // `<think>` is 1, `</think>` 2; `inside`: the prompt left a block open.
        let count = |inside: bool, ids: &[&[u32]]| {
            let mut r = ReasoningTokens {
                open: Some(1),
                close: Some(2),
                inside,
                started: false,
                count: 0,
            };
            ids.iter().for_each(|c| r.push(c));
            r.count
        };
        assert_eq!(count(true, &[&[5, 6], &[2, 7, 8, 2]]), 3);
        // Thinking off, but the model opens a block itself.
        assert_eq!(count(false, &[&[1, 5, 2, 9]]), 3);
        assert_eq!(count(false, &[&[9, 1, 5, 2]]), 0);
    }
}
