//! Reading a chat answer as it streams: `<think>…</think>` reasoning apart from the content,
//! and Qwen's tool calls (`<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n
//! </function>\n</tool_call>`, or the older JSON body `{"name": …, "arguments": {…}}`) turned
//! into OpenAI `tool_calls` with arguments typed by the tool's JSON schema. Text that could be
//! the start of a tag is held back until it is known not to be; a call cut short or malformed
//! comes back as content, never as a call with made-up arguments.

use serde_json::{Map, Value};

use crate::stop::longest_suffix_prefix;

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// The tools a request offers: names and their parameter schemas.
#[derive(Debug, Clone, Default)]
pub struct ToolSet {
    tools: Vec<(String, Value)>,
}

impl ToolSet {
    /// From OpenAI `tools` entries (`{"type": "function", "function": {"name", "parameters"}}`).
    pub fn from_openai(tools: &[Value]) -> Self {
        let tools = tools
            .iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                let name = f.get("name")?.as_str()?.to_string();
                let parameters = f.get("parameters").cloned().unwrap_or(Value::Null);
                Some((name, parameters))
            })
            .collect();
        ToolSet { tools }
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    fn parameters(&self, name: &str) -> Option<&Value> {
        self.tools.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }
}

/// A tool call read from the answer, arguments as OpenAI sends them (JSON text).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Position among this answer's calls.
    pub index: usize,
    pub name: String,
    pub arguments: String,
}

/// What one piece of the answer adds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ChatDelta {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl ChatDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }

    pub fn append(&mut self, other: ChatDelta) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.tool_calls.extend(other.tool_calls);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Section {
    Reasoning,
    /// `fresh`: nothing of the content sent yet (leading newlines after `</think>` are
    /// dropped, as the template drops them when the turn comes back).
    Content {
        fresh: bool,
    },
    /// Inside `<tool_call>`: the body collects until its end tag.
    Call,
}

/// Splits an answer's text into reasoning, content and tool calls, piece by piece.
#[derive(Debug)]
pub struct ChatOutputReader {
    section: Section,
    tools: ToolSet,
    parallel: bool,
    /// Text not yet assigned (a possible tag start, or a call body).
    held: String,
    calls: usize,
    opens_reasoning: bool,
}

impl ChatOutputReader {
    /// `opens_reasoning`: the prompt left a `<think>` block open. `tools` empty: tool-call
    /// syntax is content. `parallel` false: only the first call is kept.
    pub fn new(opens_reasoning: bool, tools: ToolSet, parallel: bool) -> Self {
        ChatOutputReader {
            section: if opens_reasoning {
                Section::Reasoning
            } else {
                Section::Content { fresh: true }
            },
            tools,
            parallel,
            held: String::new(),
            calls: 0,
            opens_reasoning,
        }
    }

    /// Whether the answer begins inside a reasoning block.
    pub fn opens_reasoning(&self) -> bool {
        self.opens_reasoning
    }

    /// Whether any tool call was read (the answer's finish reason is then `tool_calls`).
    pub fn called_tools(&self) -> bool {
        self.calls > 0
    }

    /// Adds newly generated text.
    pub fn push(&mut self, text: &str) -> ChatDelta {
        self.held.push_str(text);
        let mut out = ChatDelta::default();
        while self.step(&mut out) {}
        out
    }

    /// The end of the answer: what is held goes out as it stands (an unfinished call as
    /// content).
    pub fn finish(&mut self) -> ChatDelta {
        let mut out = self.push("");
        let rest = std::mem::take(&mut self.held);
        match self.section {
            Section::Reasoning => out.reasoning.push_str(&rest),
            // Whitespace after the last call is the format's.
            Section::Content { .. } if self.calls > 0 && rest.trim().is_empty() => {}
            Section::Content { .. } => out.content.push_str(&rest),
            Section::Call => {
                out.content.push_str(CALL_OPEN);
                out.content.push_str(&rest);
            }
        }
        out
    }

    /// One move through `held`; false when it must wait for more text.
    fn step(&mut self, out: &mut ChatDelta) -> bool {
        match self.section {
            Section::Reasoning => {
                if let Some(at) = self.held.find(THINK_CLOSE) {
                    out.reasoning.push_str(&self.held[..at]);
                    self.held.drain(..at + THINK_CLOSE.len());
                    self.section = Section::Content { fresh: true };
                    return true;
                }
                self.release(
                    longest_suffix_prefix(&self.held, THINK_CLOSE),
                    |o| &mut o.reasoning,
                    out,
                );
                false
            }
            Section::Content { fresh } => {
                if fresh {
                    let trimmed = self.held.trim_start_matches('\n').len();
                    self.held.drain(..self.held.len() - trimmed);
                    if self.held.is_empty() {
                        return false;
                    }
                    // A model may open its own reasoning block at the start of its turn.
                    if let Some(rest) = self.held.strip_prefix(THINK_OPEN) {
                        self.held = rest.to_string();
                        self.section = Section::Reasoning;
                        return true;
                    }
                    if THINK_OPEN.starts_with(self.held.as_str()) {
                        return false;
                    }
                    self.section = Section::Content { fresh: false };
                }
                if self.tools.is_empty() {
                    let all = std::mem::take(&mut self.held);
                    out.content.push_str(&all);
                    return false;
                }
                if let Some(at) = self.held.find(CALL_OPEN) {
                    let before = &self.held[..at];
                    // Whitespace between calls (or before the first) is the format's, not text.
                    if !(self.calls > 0 && before.trim().is_empty()) {
                        out.content.push_str(before);
                    }
                    self.held.drain(..at + CALL_OPEN.len());
                    self.section = Section::Call;
                    return true;
                }
                let keep = longest_suffix_prefix(&self.held, CALL_OPEN);
                // After a call, whitespace waits: it is dropped if another call follows.
                if self.calls > 0 && self.held[..self.held.len() - keep].trim().is_empty() {
                    return false;
                }
                self.release(keep, |o| &mut o.content, out);
                false
            }
            Section::Call => {
                let Some(at) = self.held.find(CALL_CLOSE) else {
                    return false;
                };
                let body = self.held[..at].to_string();
                self.held.drain(..at + CALL_CLOSE.len());
                self.section = Section::Content { fresh: false };
                match parse_call(&body, &self.tools) {
                    Some((name, arguments)) => {
                        if self.parallel || self.calls == 0 {
                            out.tool_calls.push(ToolCall {
                                index: self.calls,
                                name,
                                arguments,
                            });
                        }
                        self.calls += 1;
                    }
                    None => {
                        out.content.push_str(CALL_OPEN);
                        out.content.push_str(&body);
                        out.content.push_str(CALL_CLOSE);
                    }
                }
                true
            }
        }
    }

    /// Sends all of `held` but its last `keep` bytes to the field `to` picks.
    fn release(
        &mut self,
        keep: usize,
        to: impl FnOnce(&mut ChatDelta) -> &mut String,
        out: &mut ChatDelta,
    ) {
        let cut = self.held.len() - keep;
        to(out).push_str(&self.held[..cut]);
        self.held.drain(..cut);
    }
}

/// `(name, arguments as JSON text)` of one call body, or `None` if it is not a call to one of
/// `tools`.
fn parse_call(body: &str, tools: &ToolSet) -> Option<(String, String)> {
    let body = body.trim();
    let (name, arguments) = if body.starts_with('{') {
        let v: Value = serde_json::from_str(body).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = match v.get("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(_) => return None,
        };
        (name, arguments)
    } else {
        parse_xml_call(body, tools)?
    };
    tools.parameters(&name)?;
    Some((name, Value::Object(arguments).to_string()))
}

/// `<function=NAME>` then `<parameter=P>\nVALUE\n</parameter>`s then `</function>`.
fn parse_xml_call(body: &str, tools: &ToolSet) -> Option<(String, Map<String, Value>)> {
    let rest = body.strip_prefix("<function=")?;
    let (name, mut rest) = rest.split_once('>')?;
    let name = name.trim().to_string();
    let schema = tools.parameters(&name);
    let mut arguments = Map::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("</function>") {
            return after.trim().is_empty().then_some((name, arguments));
        }
        let after = rest.strip_prefix("<parameter=")?;
        let (param, after) = after.split_once('>')?;
        let (raw, after) = after.split_once("</parameter>")?;
        // The format puts the value on its own lines.
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let param = param.trim();
        let kind = schema
            .and_then(|s| s.get("properties"))
            .and_then(|p| p.get(param))
            .and_then(|p| p.get("type"));
        arguments.insert(param.to_string(), typed_value(raw, kind));
        rest = after;
    }
}

/// A parameter's text as the JSON value its schema type asks for: strings stay text; other
/// types parse as JSON (the template writes booleans and None the Python way, so those too);
/// text that does not parse stays text.
fn typed_value(raw: &str, kind: Option<&Value>) -> Value {
    let is_string = match kind {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => ts.iter().all(|t| t == "string"),
        _ => false,
    };
    if is_string {
        return Value::String(raw.to_string());
    }
    match raw.trim() {
        "True" => return Value::Bool(true),
        "False" => return Value::Bool(false),
        "None" => return Value::Null,
        _ => {}
    }
    serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> ToolSet {
        ToolSet::from_openai(&[
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {
                    "city": {"type": "string"}, "days": {"type": "integer"},
                    "zip": {"type": "string"}}}}}),
            json!({"type": "function", "function": {"name": "book", "parameters": {
                "type": "object", "properties": {
                    "first_class": {"type": "boolean"}, "riders": {"type": "array"},
                    "price": {"type": "number"}, "note": {"type": ["string", "null"]}}}}}),
        ])
    }

    /// Feeds `pieces` one by one; returns the merged output.
    fn read(opens_reasoning: bool, tools: ToolSet, pieces: &[&str]) -> (ChatDelta, bool) {
        let mut r = ChatOutputReader::new(opens_reasoning, tools, true);
        let mut all = ChatDelta::default();
        for p in pieces {
            all.append(r.push(p));
        }
        all.append(r.finish());
        (all, r.called_tools())
    }

    /// Every split of `text` into two pieces, and one character at a time, read alike.
    fn read_any_split(opens_reasoning: bool, text: &str) -> ChatDelta {
        let whole = read(opens_reasoning, tools(), &[text]).0;
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            read(opens_reasoning, tools(), &refs).0,
            whole,
            "char by char"
        );
        for (i, _) in text.char_indices() {
            let (a, b) = text.split_at(i);
            assert_eq!(
                read(opens_reasoning, tools(), &[a, b]).0,
                whole,
                "split at {i}"
            );
        }
        whole
    }

    #[test]
    fn reasoning_then_content() {
        let d = read_any_split(true, "I think.\nYes.</think>\n\nThe answer is 4.");
        assert_eq!(d.reasoning, "I think.\nYes.");
        assert_eq!(d.content, "The answer is 4.");
        // Thinking off (the prompt closed the block), and a model opening its own.
        assert_eq!(
            read_any_split(false, "Plain <b>text</b>").content,
            "Plain <b>text</b>"
        );
        let d = read_any_split(false, "<think>hm</think>ok");
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("hm", "ok"));
        // Cut short inside reasoning: all of it is reasoning.
        let d = read_any_split(true, "still thinking </thi");
        assert_eq!(
            (d.reasoning.as_str(), d.content.as_str()),
            ("still thinking </thi", "")
        );
    }

    #[test]
    fn well_formed_calls_are_typed_by_their_schema() {
        let text = "</think>\n\nLet me check.\n\n<tool_call>\n<function=get_weather>\n\
            <parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n\
            <parameter=zip>\n02139\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n\
            <function=book>\n<parameter=first_class>\nFalse\n</parameter>\n\
            <parameter=riders>\n[{\"name\": \"Ana\"}]\n</parameter>\n<parameter=price>\n89.5\n\
            </parameter>\n<parameter=note>\ntwo\nlines\n</parameter>\n</function>\n</tool_call>";
        let d = read_any_split(true, text);
        assert_eq!(d.content, "Let me check.\n\n");
        assert_eq!(d.tool_calls.len(), 2);
        assert_eq!(d.tool_calls[0].name, "get_weather");
        let a: Value = serde_json::from_str(&d.tool_calls[0].arguments).unwrap();
        assert_eq!(
            a,
            json!({"city": "San Francisco", "days": 3, "zip": "02139"})
        );
        assert_eq!(d.tool_calls[1].index, 1);
        let b: Value = serde_json::from_str(&d.tool_calls[1].arguments).unwrap();
        assert_eq!(
            b,
            json!({"first_class": false, "riders": [{"name": "Ana"}], "price": 89.5,
                   "note": "two\nlines"})
        );
        // The older JSON body.
        let d = read_any_split(
            false,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
        );
        assert_eq!(d.tool_calls[0].arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(d.content, "");
    }

    #[test]
    fn truncated_and_malformed_calls_stay_content() {
        let cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar";
        let (d, called) = read(false, tools(), &[cut]);
        assert!(!called);
        assert_eq!(d.content, cut);
        for bad in [
            "<tool_call>\n<function=unknown_tool>\n</function>\n</tool_call>",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nx\n</function>\n</tool_call>",
            "<tool_call>\nnot a call\n</tool_call>",
            "<tool_call>{\"name\": 3}</tool_call>",
        ] {
            let (d, called) = read(false, tools(), &[bad]);
            assert!(!called, "{bad}");
            assert_eq!(d.content, bad);
        }
        // Without tools offered, call syntax is only text.
        let (d, called) = read(false, ToolSet::default(), &["<tool_call>x</tool_call>"]);
        assert!(!called);
        assert_eq!(d.content, "<tool_call>x</tool_call>");
    }

    #[test]
    fn parallel_off_keeps_the_first_call() {
        let call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n\
            </function>\n</tool_call>";
        let mut r = ChatOutputReader::new(false, tools(), false);
        let mut d = r.push(&format!("{call}\n{call}"));
        d.append(r.finish());
        assert_eq!(d.tool_calls.len(), 1);
        assert!(r.called_tools());
    }
}
