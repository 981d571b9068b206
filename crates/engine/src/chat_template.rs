//! Chat templates as checkpoints ship them (`chat_template.jinja` or the `chat_template` field
//! of `tokenizer_config.json`), compiled once per model and rendered the way HF
//! `apply_chat_template` renders them: jinja2 with `trim_blocks` and `lstrip_blocks`, Python
//! string methods, and Python's `json.dumps` for `tojson` (`", "` and `": "` separators, keys in
//! the order given, non-ASCII kept) — minijinja's own `tojson` is compact and HTML-escaping,
//! which would change the prompt's tokens.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// One turn of a conversation, in the shape HF chat templates read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: MessageContent,
    /// An earlier assistant turn's reasoning (`<think>` content), given back by the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// An earlier assistant turn's tool calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallTurn>,
    /// On a `tool` turn: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: MessageContent::Text(content.into()),
            reasoning_content: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage::new("user", content)
    }
}

/// A string or a list of parts (text only: images are refused before here). An assistant
/// turn that only calls tools has empty text: templates that add strings to the content
/// (ChatML's) fail on `none`, and Qwen's renders both alike.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<TextPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextPart {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
}

impl TextPart {
    pub fn new(text: impl Into<String>) -> Self {
        TextPart {
            kind: "text",
            text: text.into(),
        }
    }
}

/// A tool call of an earlier assistant turn, as OpenAI's `tool_calls` entries give it, with
/// `arguments` already parsed from its JSON string (templates iterate its items).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallTurn {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolCallTurn {
    pub fn function(id: Option<String>, name: impl Into<String>, arguments: Value) -> Self {
        ToolCallTurn {
            id,
            kind: "function",
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

/// What one rendering takes besides the template.
#[derive(Debug, Clone, Default)]
pub struct ChatPrompt<'a> {
    pub messages: &'a [ChatMessage],
    /// OpenAI `tools` entries (`{"type": "function", "function": {...}}`), as the client sent
    /// them; `None` renders no tool section.
    pub tools: Option<&'a [Value]>,
    pub add_generation_prompt: bool,
    /// Extra template variables (`enable_thinking`, any `chat_template_kwargs`).
    pub kwargs: Option<&'a Map<String, Value>>,
}

/// A chat template compiled once.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from in errors.
    pub fn compile(
        source: String,
        origin: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // HF renders with jinja2's `trim_blocks` and `lstrip_blocks`.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", python_tojson);
        env.add_filter("string", python_string);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| EngineError::ChatTemplate(format!("{origin}: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    pub fn render(&self, prompt: &ChatPrompt<'_>) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        let mut vars: Map<String, Value> = prompt.kwargs.cloned().unwrap_or_default();
        let messages = serde_json::to_value(prompt.messages)
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        vars.insert("messages".into(), messages);
        if let Some(tools) = prompt.tools {
            vars.insert("tools".into(), Value::Array(tools.to_vec()));
        }
        vars.insert(
            "add_generation_prompt".into(),
            Value::Bool(prompt.add_generation_prompt),
        );
        vars.entry("bos_token")
            .or_insert_with(|| Value::String(self.bos_token.clone()));
        vars.entry("eos_token")
            .or_insert_with(|| Value::String(self.eos_token.clone()));
        template
            .render(minijinja::Value::from_serialize(&vars))
            .map_err(|e| EngineError::ChatTemplate(describe(&e)))
    }
}

/// The error with its template line, and the message a template's `raise_exception` gave.
fn describe(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("{e} (template line {line})"),
        None => e.to_string(),
    }
}

/// Python's `json.dumps(value, ensure_ascii=False)` (what HF's `tojson` calls), with jinja's
/// `indent` argument.
fn python_tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::BadSerialization, e.to_string())
    })?;
    Ok(minijinja::Value::from_safe_string(python_json(
        &json, indent,
    )))
}

/// `json.dumps` layout: `", "` / `": "` separators, or newlines and `indent` spaces.
pub fn python_json(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_python_json(value, indent, 0, &mut out);
    out
}

fn write_python_json(value: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        // Scalars and empty containers print alike; serde_json escapes strings as Python does
        // with ensure_ascii=False (quotes, backslashes, control characters).
        other => out.push_str(&other.to_string()),
    }
}

/// Python's `str()` for the scalars templates print: `True`, `False`, `None`.
fn python_string(value: minijinja::Value) -> minijinja::Value {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Bool => minijinja::Value::from(if value.is_true() { "True" } else { "False" }),
        ValueKind::None | ValueKind::Undefined => minijinja::Value::from("None"),
        ValueKind::String => value,
        _ => minijinja::Value::from(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_matches_json_dumps() {
        // Expected strings are what CPython 3.11's json.dumps prints for these values.
        let v = json!({"b": 1, "a": [1.5, "x\"y", null, true], "é": {}, "n": []});
        assert_eq!(
            python_json(&v, None),
            r#"{"b": 1, "a": [1.5, "x\"y", null, true], "é": {}, "n": []}"#
        );
        assert_eq!(
            python_json(&json!({"a": [1, 2]}), Some(2)),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
        assert_eq!(python_json(&json!("tab\there\n"), None), r#""tab\there\n""#);
    }
}
