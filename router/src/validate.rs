//! Wire requests → validated requests: the prompt tokenised (or its ids checked), sampling in
//! range, lengths within the limits. Every refusal names the field.

use std::path::Path;

use sluice_engine::{ChatMessage, ModelSpec, Tokenizer};
use sluice_proto::v1 as pb;
use sluice_runtime::grammar::GrammarCompiler;
use sluice_runtime::sampling::{self, RequestLimits, RequestSampling, SamplingDefaults};

use crate::error::RouterError;

#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: RequestSampling,
    /// End-of-sequence ids for this request (empty with `ignore_eos`).
    pub eos: Vec<u32>,
}

/// What the router knows of the model it fronts: enough to tokenise and validate.
pub struct ModelContext {
    pub name: String,
    pub model_type: String,
    pub tokenizer: Tokenizer,
    pub vocab: usize,
    pub eos: Vec<u32>,
    /// Prompt + output tokens accepted.
    pub max_context: usize,
    /// Most `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Special tokens whose text answers keep (`<think>`, `<tool_call>` and their ends):
    /// the chat reader splits reasoning and tool calls on them, and they would otherwise
    /// vanish with the other special tokens.
    pub markup: Vec<(u32, String)>,
    /// `generation_config.json`'s sampling, for requests that set none.
    pub sampling_defaults: SamplingDefaults,
    /// Checks constraints against the tokenizer (guided decoding). `load` leaves its trie
    /// unbuilt; `run` replaces it with `RouterConfig::grammars` if given, then warms it up.
    pub grammars: std::sync::Arc<GrammarCompiler>,
}

/// Tags of reasoning and tool calls, which Qwen3.5's tokenizer has as special tokens.
const MARKUP_TOKENS: &[&str] = &["<think>", "</think>", "<tool_call>", "</tool_call>"];

impl ModelContext {
    pub fn load(
        dir: &Path,
        max_context: usize,
        max_tokens_limit: usize,
    ) -> Result<Self, RouterError> {
        let spec: ModelSpec = sluice_engine::config::load_spec(dir).map_err(runtime)?;
        let eos = sluice_engine::generation::eos_token_ids(dir, &spec).map_err(runtime)?;
        let tokenizer = Tokenizer::from_dir(dir).map_err(runtime)?;
        let markup = MARKUP_TOKENS
            .iter()
            .filter_map(|t| tokenizer.token_id(t).map(|id| (id, t.to_string())))
            .collect();
        Ok(ModelContext {
            markup,
            grammars: GrammarCompiler::new(dir, spec.vocab, &eos),
            sampling_defaults: SamplingDefaults::load(dir)?,
            name: sluice_runtime::model_host::model_name(dir),
            model_type: spec.model_type.clone(),
            tokenizer,
            vocab: spec.vocab,
            eos,
            max_context,
            max_tokens_limit: max_tokens_limit.min(max_context.saturating_sub(1)).max(1),
        })
    }

    /// Text → token ids, through the chat template as one user turn with `chat`.
    pub fn tokenize(&self, text: &str, chat: bool) -> Result<Vec<u32>, RouterError> {
        if chat {
            if !self.tokenizer.has_chat_template() {
                return Err(RouterError::invalid(
                    "chat",
                    "this model has no chat template",
                ));
            }
            let rendered = self
                .tokenizer
                .apply_chat_template(&[ChatMessage::user(text)], true)
                .map_err(runtime)?;
            self.tokenizer.encode(&rendered).map_err(runtime)
        } else {
            self.tokenizer.encode(text).map_err(runtime)
        }
    }

    /// The text `token` keeps in answers, if it is a markup token.
    pub fn markup_text(&self, token: u32) -> Option<&str> {
        self.markup
            .iter()
            .find(|(id, _)| *id == token)
            .map(|(_, t)| t.as_str())
    }

    pub fn validate(&self, req: pb::GenerateRequest) -> Result<ValidRequest, RouterError> {
        let prompt = match (req.prompt.is_empty(), req.prompt_token_ids.is_empty()) {
            (true, true) => {
                return Err(RouterError::invalid(
                    "prompt",
                    "the prompt is empty: set `prompt` or `prompt_token_ids`",
                ));
            }
            (false, false) => {
                return Err(RouterError::invalid(
                    "prompt_token_ids",
                    "set either `prompt` or `prompt_token_ids`, not both",
                ));
            }
            (false, true) => {
                let ids = self.tokenize(&req.prompt, req.chat)?;
                if ids.is_empty() {
                    return Err(RouterError::invalid("prompt", "the prompt has no tokens"));
                }
                ids
            }
            (true, false) => {
                if req.chat {
                    return Err(RouterError::invalid("chat", "`chat` needs a text `prompt`"));
                }
                sampling::check_token_ids("prompt_token_ids", &req.prompt_token_ids, self.vocab)?;
                req.prompt_token_ids
            }
        };
        if prompt.len() >= self.max_context {
            return Err(RouterError::invalid(
                "prompt",
                format!(
                    "the prompt ({} tokens) leaves no room in the context limit of {}",
                    prompt.len(),
                    self.max_context
                ),
            ));
        }
        let limits = RequestLimits {
            max_tokens_limit: self.max_tokens_limit,
            default_max_tokens: self.max_context - prompt.len(),
            defaults: self.sampling_defaults,
        };
        let sampling = sampling::from_pb(req.sampling.as_ref(), &limits)?;
        sampling::check_token_ids("stop_token_ids", &sampling.stop_token_ids, self.vocab)?;
        let biased: Vec<u32> = sampling.params.logit_bias.iter().map(|b| b.0).collect();
        sampling::check_token_ids("logit_bias", &biased, self.vocab)?;
        if let Some(constraint) = &sampling.constraint {
            self.grammars.check(constraint, "constraint")?;
        }
        if prompt.len() + sampling.max_tokens > self.max_context {
            return Err(RouterError::invalid(
                "max_tokens",
                format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the context limit of {}",
                    prompt.len(),
                    sampling.max_tokens,
                    self.max_context
                ),
            ));
        }
        let eos = if sampling.ignore_eos {
            Vec::new()
        } else {
            self.eos.clone()
        };
        let request_id = if req.request_id.is_empty() {
            new_request_id()
        } else {
            req.request_id
        };
        Ok(ValidRequest {
            request_id,
            prompt,
            sampling,
            eos,
        })
    }
}

fn runtime(e: sluice_engine::EngineError) -> RouterError {
    RouterError::Runtime(e.into())
}

/// `req-{time}-{n}`: unique within a router without coordination.
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("req-{t:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
