//! `tool_choice` `required` or a named function as guided decoding: a Lark grammar (llguidance's
//! dialect) of Qwen3.5's own tool-call format, the one its template teaches and
//! `chat_output` reads back:
//!
//! ```text
//! <tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n…</function>\n</tool_call>
//! ```
//!
//! Each parameter's value follows its schema: string parameters are raw text (without `</`,
//! which would be read as the closing tag; with `maxLength`, at most that many characters
//! and no `<`), the others one compact JSON value held to the parameter's schema. Required
//! parameters come in the schema's order, optional ones may be left out. Holding the model
//! to its own format (rather than to JSON, as vLLM does for any model) keeps a forced call
//! as likely as a free one.

use serde_json::{Value, json};

use crate::error::RouterError;

/// How the grammar writes `<tool_call>` / `</tool_call>`: by token id where the tokenizer has
/// them as special tokens (Qwen3.5's; their text never comes out of ordinary tokens), else
/// as text.
#[derive(Debug, Clone, Copy)]
pub struct CallTags {
    pub open: Option<u32>,
    pub close: Option<u32>,
}

/// Which calls the answer must make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedCalls<'a> {
    /// At least one call, to any offered tool.
    Any,
    /// Calls to this tool only.
    Named(&'a str),
}

/// The grammar of an answer that is only tool calls (`parallel`: one or more, else exactly
/// one) to `tools` (OpenAI `tools` entries) as `forced` says.
pub fn tool_call_grammar(
    tools: &[Value],
    forced: ForcedCalls<'_>,
    parallel: bool,
    tags: CallTags,
) -> Result<String, RouterError> {
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let f = tool.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let Some(name) = name else {
            return Err(RouterError::invalid(
                format!("tools[{i}].function.name"),
                "every tool needs a name",
            ));
        };
        if matches!(forced, ForcedCalls::Named(n) if n != name) {
            continue;
        }
        let parameters = f.and_then(|f| f.get("parameters")).cloned();
        functions.push((name, parameters.unwrap_or(Value::Null)));
    }
    if functions.is_empty() {
        return Err(match forced {
            ForcedCalls::Any => RouterError::invalid("tools", "`required` needs at least one tool"),
            ForcedCalls::Named(n) => RouterError::invalid(
                "tool_choice.function.name",
                format!("`{n}` is not one of the tools offered"),
            ),
        });
    }
    let tag = |id: Option<u32>, text: &str| match id {
        Some(id) => format!("<[{id}]>"),
        None => literal(text),
    };
    let mut g = String::new();
    // Blank lines may come before a call (after `</think>`, between calls).
    let calls = if parallel {
        "NL? call (NL? call)*"
    } else {
        "NL? call"
    };
    g.push_str(&format!("start: {calls}\n"));
    g.push_str("NL: /\\n\\n?/\n");
    let alternatives: Vec<String> = (0..functions.len()).map(|i| format!("fn{i}")).collect();
    g.push_str(&format!(
        "call: {} ({}) {}\n",
        tag(tags.open, "<tool_call>"),
        alternatives.join(" | "),
        tag(tags.close, "</tool_call>")
    ));
    for (i, (name, parameters)) in functions.iter().enumerate() {
        let mut items = vec![literal(&format!("\n<function={name}>\n"))];
        let properties = parameters.get("properties").and_then(Value::as_object);
        let required: Vec<&str> = parameters
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (j, (param, schema)) in properties.into_iter().flatten().enumerate() {
            let rule = format!("fn{i}_p{j}");
            let value = if is_string(schema) {
                // Raw text up to the closing tag, the tag in the same lexeme: no ambiguity
                // about where the value ends. `maxLength` bounds it in characters (then
                // without any `<`, so that every repetition is one character).
                let text = match schema.get("maxLength").and_then(Value::as_u64) {
                    Some(n) => format!("[^<]{{0,{}}}", n.min(MAX_COUNTED)),
                    None => r"([^<]|<[^\/])*".to_string(),
                };
                format!(r"/{text}\n<\/parameter>\n/")
            } else {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.insert("x-guidance".into(), json!({"whitespace_flexible": false}));
                }
                format!("%json {schema} {}", literal("\n</parameter>\n"))
            };
            g.push_str(&format!(
                "{rule}: {} {value}\n",
                literal(&format!("<parameter={param}>\n"))
            ));
            if required.contains(&param.as_str()) {
                items.push(rule);
            } else {
                items.push(format!("{rule}?"));
            }
        }
        items.push(literal("</function>\n"));
        g.push_str(&format!("fn{i}: {}\n", items.join(" ")));
    }
    Ok(g)
}

/// The largest `maxLength` written as a counted repetition (longer ones are this).
const MAX_COUNTED: u64 = 4096;

/// A Lark string literal of `text` (JSON's escapes are Lark's).
fn literal(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

fn is_string(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => !ts.is_empty() && ts.iter().all(|t| t == "string"),
        _ => false,
    }
}
