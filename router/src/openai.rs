//! OpenAI wire types (the fields Sluice honours) and their mapping to and from the public
//! `sluice.v1` messages. A field Sluice does not know, or cannot honour (`n > 1`, image
//! parts), is refused by name: a client asking for something never gets a 200 without it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sluice_engine::{ChatMessage, MessageContent, TextPart, Tokenizer, ToolCallTurn};
use sluice_proto::v1::{self as pb, FinishReason};

use crate::chat::{Conversation, RenderedChat, call_arguments, template_role};
use crate::chat_output::ChatOutputReader;
use crate::error::RouterError;
use crate::tool_grammar::ForcedCalls;

/// A string or a list of strings (`stop`, a completion `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion prompt: text, or token ids, or a batch of one of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints (OpenAI's plus vLLM's common extensions).
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Top alternatives per token (0 = only the sampled token's).
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Message content: a string or a list of parts (only text parts are accepted).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// An earlier assistant turn's tool call, as OpenAI sends it back: `arguments` is JSON text.
#[derive(Debug, Deserialize)]
pub struct ToolCallWire {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionWire,
}

#[derive(Debug, Deserialize)]
pub struct FunctionWire {
    pub name: String,
    #[serde(default)]
    pub arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Vec<ToolCallWire>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    /// An earlier turn's reasoning (`reasoning` is the newer name some clients send).
    #[serde(alias = "reasoning")]
    pub reasoning_content: Option<String>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or `{"type": "function", "function":
/// {"name": ...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceWire {
    Mode(String),
    Named { function: NamedFunction },
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// `response_format`: `text`, `json_object`, or `json_schema` with its schema.
#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// Absent: any JSON value.
    pub schema: Option<Value>,
    /// Guided decoding always holds the output to the schema, strict or not.
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The constraint this format asks for (`None`: free text).
    fn constraint(&self) -> Result<Option<pb::Constraint>, RouterError> {
        let schema = match self.kind.as_str() {
            "text" => return Ok(None),
            // OpenAI's JSON mode: some JSON object.
            "json_object" => json!({ "type": "object" }),
            "json_schema" => {
                let format = self.json_schema.as_ref().ok_or_else(|| {
                    RouterError::invalid(
                        "response_format.json_schema",
                        "`json_schema` needs its `name` and `schema`",
                    )
                })?;
                format.schema.clone().unwrap_or_else(|| json!({}))
            }
            other => {
                return Err(RouterError::invalid(
                    "response_format.type",
                    format!("`{other}` is not one of text, json_object, json_schema"),
                ));
            }
        };
        Ok(Some(json_constraint(schema)))
    }
}

/// Guided decoding to `schema`.
pub fn json_constraint(schema: Value) -> pb::Constraint {
    pb::Constraint {
        kind: Some(pb::constraint::Kind::JsonSchema(schema.to_string())),
        after_token: None,
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    /// OpenAI `tools`, kept as sent: the template renders them as JSON, key order included.
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<ToolChoiceWire>,
    pub parallel_tool_calls: Option<bool>,
    /// Template variables (`enable_thinking`, ...), as vLLM and SGLang take them.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub add_generation_prompt: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Fields shared by both endpoints' bodies (`Sampling`'s).
const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
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
    "n",
    "stream",
    "stream_options",
    // Accepted and not acted on: they change nothing a response contains.
    "user",
    "metadata",
];

/// A request body whose every field Sluice honours: any other field is refused by name
/// rather than dropped (a client asking for something must not get a 200 without it).
pub trait WireRequest: serde::de::DeserializeOwned {
    /// Fields of this body beyond the sampling ones.
    const FIELDS: &'static [&'static str];
    /// The sampling fields it takes.
    const SHARED_FIELDS: &'static [&'static str] = SAMPLING_FIELDS;

    /// Refuses the first field of `body` that is not known.
    fn check_fields(body: &Map<String, Value>) -> Result<(), RouterError> {
        match body.keys().find(|k| {
            !Self::FIELDS.contains(&k.as_str()) && !Self::SHARED_FIELDS.contains(&k.as_str())
        }) {
            Some(k) => Err(RouterError::invalid(
                k.clone(),
                format!("`{k}` is not supported by this server"),
            )),
            None => Ok(()),
        }
    }

    /// The request in a parsed JSON body: fields checked, then typed.
    fn from_body(body: Map<String, Value>) -> Result<Self, RouterError> {
        Self::check_fields(&body)?;
        serde_json::from_value(Value::Object(body))
            .map_err(|e| RouterError::invalid("body", format!("invalid request body: {e}")))
    }
}

impl WireRequest for ChatRequest {
    const FIELDS: &'static [&'static str] = &[
        "messages",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template_kwargs",
        "add_generation_prompt",
        "response_format",
        "logit_bias",
    ];
}

impl WireRequest for CompletionRequest {
    const FIELDS: &'static [&'static str] = &["prompt", "logprobs", "echo", "logit_bias"];
}

impl Sampling {
    /// The public sampling message, with `logprobs` top alternatives when asked for.
    pub fn to_pb(&self, logprobs: Option<u32>) -> Result<pb::SamplingParams, RouterError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(RouterError::invalid("n", "only n = 1 is supported"));
        }
        let top_k = match self.top_k {
            None => 0,
            // vLLM's convention: -1 disables top-k.
            Some(k) if k <= 0 => 0,
            Some(k) => u32::try_from(k).map_err(|_| RouterError::invalid("top_k", "too large"))?,
        };
        Ok(pb::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k,
            min_p: self.min_p.unwrap_or(0.0),
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            stop: self
                .stop
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
            logprobs,
            echo: false,
            logit_bias: Default::default(),
            constraint: None,
        })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    pub fn to_pb(self) -> Result<pb::GenerateRequest, RouterError> {
        let mut sampling = self.sampling.to_pb(self.logprobs)?;
        sampling.echo = self.echo;
        sampling.logit_bias = logit_bias(self.logit_bias.as_ref())?;
        let mut request = pb::GenerateRequest {
            sampling: Some(sampling),
            ..Default::default()
        };
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(RouterError::invalid(
                    "prompt",
                    "exactly one prompt per request is supported",
                ))
            }
        };
        match self.prompt {
            Prompt::Text(t) => request.prompt = t,
            Prompt::Tokens(ids) => request.prompt_token_ids = ids,
            Prompt::Texts(mut v) => {
                one(v.len())?;
                request.prompt = v.remove(0);
            }
            Prompt::TokenLists(mut v) => {
                one(v.len())?;
                request.prompt_token_ids = v.remove(0);
            }
        }
        Ok(request)
    }
}

/// OpenAI's `logit_bias` (token ids as JSON keys) as the public message carries it. Its
/// ranges are checked where every request's are (the router's validation).
fn logit_bias(
    bias: Option<&Map<String, Value>>,
) -> Result<std::collections::HashMap<u32, f32>, RouterError> {
    let mut out = std::collections::HashMap::new();
    for (key, value) in bias.into_iter().flatten() {
        let token: u32 = key.parse().map_err(|_| {
            RouterError::invalid("logit_bias", format!("key `{key}` is not a token id"))
        })?;
        let bias = value.as_f64().ok_or_else(|| {
            RouterError::invalid(format!("logit_bias.{key}"), "the bias must be a number")
        })?;
        out.insert(token, bias as f32);
    }
    Ok(out)
}

impl ChatRequest {
    /// Which tools the model is offered and its answer is read for (`tool_choice: none`
    /// offers none).
    fn offered_tools(&self) -> Result<Option<&[Value]>, RouterError> {
        let tools = match self.tools.as_deref() {
            None | Some([]) => None,
            Some(t) => Some(t),
        };
        match &self.tool_choice {
            Some(ToolChoiceWire::Mode(m)) if m == "none" => Ok(None),
            // `auto`, `required` and a named function all offer every tool (OpenAI's rule);
            // the last two also force the answer (`forced_calls`).
            Some(ToolChoiceWire::Mode(m)) if !matches!(m.as_str(), "auto" | "required") => {
                Err(RouterError::invalid(
                    "tool_choice",
                    format!("`{m}` is not one of none, auto, required or a named function"),
                ))
            }
            _ => Ok(tools),
        }
    }

    /// The calls `tool_choice` forces (`None`: the model chooses).
    fn forced_calls(&self) -> Option<ForcedCalls<'_>> {
        match &self.tool_choice {
            Some(ToolChoiceWire::Mode(m)) if m == "required" => Some(ForcedCalls::Any),
            Some(ToolChoiceWire::Named { function }) => Some(ForcedCalls::Named(&function.name)),
            _ => None,
        }
    }

    /// The conversation in the shape templates read.
    fn template_messages(&self) -> Result<Vec<ChatMessage>, RouterError> {
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = template_role(&m.role, format!("messages[{i}].role"))?;
            let content = match &m.content {
                None => MessageContent::Text(String::new()),
                Some(Content::Text(t)) => MessageContent::Text(t.clone()),
                Some(Content::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        if p.kind != "text" {
                            return Err(RouterError::invalid(
                                format!("messages[{i}].content[{j}].type"),
                                format!("content parts of type `{}` are not supported", p.kind),
                            ));
                        }
                        texts.push(TextPart::new(p.text.clone().unwrap_or_default()));
                    }
                    MessageContent::Parts(texts)
                }
            };
            let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
            for (j, c) in m.tool_calls.iter().enumerate() {
                if c.kind.as_deref().is_some_and(|k| k != "function") {
                    return Err(RouterError::invalid(
                        format!("messages[{i}].tool_calls[{j}].type"),
                        "only `function` tool calls are supported",
                    ));
                }
                // Templates iterate the arguments' items: parse the JSON text once here.
                let arguments = call_arguments(
                    c.function.arguments.as_deref(),
                    format!("messages[{i}].tool_calls[{j}].function.arguments"),
                )?;
                tool_calls.push(ToolCallTurn::function(
                    c.id.clone(),
                    c.function.name.clone(),
                    arguments,
                ));
            }
            messages.push(ChatMessage {
                role: role.to_string(),
                content,
                reasoning_content: m.reasoning_content.clone(),
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            });
        }
        Ok(messages)
    }

    /// The conversation, validated.
    pub fn conversation(&self) -> Result<Conversation<'_>, RouterError> {
        Ok(Conversation {
            messages: self.template_messages()?,
            tools: self.offered_tools()?,
            forced: self.forced_calls(),
            parallel: self.parallel_tool_calls.unwrap_or(true),
            kwargs: self.chat_template_kwargs.as_ref(),
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
        })
    }

    /// Renders the conversation with the model's chat template (compiled at load).
    pub fn render(&self, tokenizer: &Tokenizer) -> Result<RenderedChat, RouterError> {
        self.conversation()?.render(tokenizer)
    }

    /// The public request for this conversation and the reader of its answer.
    pub fn to_pb(
        self,
        tokenizer: &Tokenizer,
    ) -> Result<(pb::GenerateRequest, ChatOutputReader), RouterError> {
        let bias = logit_bias(self.logit_bias.as_ref())?;
        let mut constraint = match &self.response_format {
            Some(f) => f.constraint()?,
            None => None,
        };
        let (prompt, reader) =
            self.conversation()?
                .prepare(tokenizer, &mut constraint, "response_format")?;
        let logprobs = if self.logprobs {
            Some(self.top_logprobs.unwrap_or(0))
        } else if self.top_logprobs.is_some() {
            return Err(RouterError::invalid(
                "top_logprobs",
                "needs `logprobs: true`",
            ));
        } else {
            None
        };
        let mut sampling = self.sampling.to_pb(logprobs)?;
        sampling.logit_bias = bias;
        sampling.constraint = constraint;
        let request = pb::GenerateRequest {
            prompt,
            sampling: Some(sampling),
            ..Default::default()
        };
        Ok((request, reader))
    }
}

/// OpenAI's finish reasons: end-of-sequence and stop rules are both `stop`. Requests end
/// in no other way on the client's stream (a failure is an error, not a finish).
pub fn finish_reason(reason: i32) -> Option<&'static str> {
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Unspecified | FinishReason::Cancelled | FinishReason::Error => None,
    }
}

/// A chat answer's finish reason: `tool_calls` when it ended by itself after calling tools.
pub fn chat_finish_reason(reason: i32, called_tools: bool) -> Option<&'static str> {
    match finish_reason(reason) {
        Some("stop") if called_tools => Some("tool_calls"),
        other => other,
    }
}

pub fn usage(u: Option<&pb::Usage>) -> Value {
    let u = u.cloned().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The text of one token, as OpenAI lists it in log-probabilities.
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Completions' legacy log-probability object for `logprobs` (tokens of one chunk or of the
/// whole answer); `offset` is the text offset of the first token.
pub fn completion_logprobs(
    tokenizer: &Tokenizer,
    logprobs: &[pb::TokenLogprobs],
    mut offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for l in logprobs {
        let text = token_text(tokenizer, l.token_id);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        token_logprobs.push(l.logprob);
        let alternatives: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|t| (token_text(tokenizer, t.token_id), json!(t.logprob)))
            .collect();
        top.push(Value::Object(alternatives));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// Chat's log-probability object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokenizer: &Tokenizer, logprobs: &[pb::TokenLogprobs]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        let bytes: Vec<u8> = token.as_bytes().to_vec();
        json!({"token": token, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = logprobs
        .iter()
        .map(|l| {
            let mut e = entry(l.token_id, l.logprob);
            e["top_logprobs"] =
                Value::Array(l.top.iter().map(|t| entry(t.token_id, t.logprob)).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

/// The body of an error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}
