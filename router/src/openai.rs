//! OpenAI wire types (the fields Sluice honours) and their mapping to and from the public
//! `sluice.v1` messages. Unknown fields are ignored, as OpenAI-compatible servers do; fields
//! Sluice cannot honour (`n > 1`, tools) are refused by name.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_engine::{ChatMessage, Tokenizer};
use sluice_proto::v1::{self as pb, FinishReason};

use crate::error::RouterError;

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

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
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

impl ChatRequest {
    /// The conversation rendered with the model's chat template, as a text prompt.
    pub fn to_pb(self, tokenizer: &Tokenizer) -> Result<pb::GenerateRequest, RouterError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(RouterError::invalid(
                "tools",
                "tool calls are not supported",
            ));
        }
        if self.messages.is_empty() {
            return Err(RouterError::invalid(
                "messages",
                "at least one message is needed",
            ));
        }
        if !tokenizer.has_chat_template() {
            return Err(RouterError::invalid(
                "messages",
                "this model has no chat template",
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(RouterError::invalid(
                                "messages",
                                format!("content parts of type `{}` are not supported", p.kind),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or_default());
                    }
                    text
                }
            };
            messages.push(ChatMessage {
                role: m.role,
                content,
            });
        }
        let prompt = tokenizer
            .apply_chat_template(&messages, true)
            .map_err(|e| RouterError::Runtime(e.into()))?;
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
        Ok(pb::GenerateRequest {
            prompt,
            sampling: Some(self.sampling.to_pb(logprobs)?),
            ..Default::default()
        })
    }
}

/// OpenAI's finish reasons: end-of-sequence and stop rules are both `stop`.
pub fn finish_reason(reason: i32) -> Option<&'static str> {
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Unspecified => None,
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Cancelled => Some("cancelled"),
        FinishReason::Error => Some("error"),
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
