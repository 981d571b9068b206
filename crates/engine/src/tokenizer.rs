//! Text ↔ tokens: HF `tokenizer.json` through the `tokenizers` crate, chat templates through
//! minijinja (with Python string methods, as HF templates use them), and incremental
//! detokenisation that never emits half a UTF-8 character.

use std::path::Path;

use serde_json::Value;

use crate::chat_template::{ChatMessage, ChatPrompt, ChatTemplate};
use crate::error::{EngineError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from `dir`; the chat template comes from `chat_template.jinja`
    /// or the `chat_template` field of `tokenizer_config.json`, if either is present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer(format!(
                "no tokenizer.json in {}",
                dir.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| EngineError::io(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| EngineError::MalformedJson {
                path: config_path.clone(),
                message: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?;
            Some((text, jinja.display().to_string()))
        } else {
            config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(|t| {
                    (
                        t.to_string(),
                        format!("{}: chat_template", config_path.display()),
                    )
                })
        };
        let chat_template = source
            .map(|(text, origin)| {
                ChatTemplate::compile(text, &origin, token("bos_token"), token("eos_token"))
            })
            .transpose()?;
        Ok(Tokenizer {
            inner,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids the tokenizer knows, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders one user-visible conversation with the model's chat template (no tools, no
    /// template variables).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat(&ChatPrompt {
            messages,
            add_generation_prompt,
            ..Default::default()
        })
    }

    /// Renders `prompt` with the model's chat template, compiled when the tokenizer loaded.
    pub fn render_chat(&self, prompt: &ChatPrompt<'_>) -> Result<String> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| EngineError::ChatTemplate("this model has no chat template".into()))?
            .render(prompt)
    }
}

/// Turns a growing token sequence into text increments. A token that ends inside a multi-byte
/// character yields nothing until the character is complete.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        IncrementalDecoder {
            skip_special,
            ..Default::default()
        }
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
