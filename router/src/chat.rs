//! A conversation as both front ends take it — OpenAI's chat body and gRPC's `messages` —
//! rendered with the model's chat template, the calls a `tool_choice` forces made into the
//! request's constraint, and the answer read back into content, reasoning and tool calls.

use serde_json::{Map, Value, json};
use sluice_engine::{ChatMessage, ChatPrompt, Tokenizer, ToolCallTurn};
use sluice_proto::v1 as pb;

use crate::chat_output::{ChatDelta, ChatOutputReader, THINK_CLOSE, THINK_OPEN, ToolSet};
use crate::error::RouterError;
use crate::tool_grammar::{CallTags, ForcedCalls, tool_call_grammar};

/// What a chat request asks of the template and of the answer, validated.
#[derive(Debug)]
pub struct Conversation<'a> {
    pub messages: Vec<ChatMessage>,
    /// The tools offered to the model (`None`: none, or `tool_choice: none`).
    pub tools: Option<&'a [Value]>,
    /// The calls `tool_choice` forces (`None`: the model chooses).
    pub forced: Option<ForcedCalls<'a>>,
    /// More than one call per answer.
    pub parallel: bool,
    pub kwargs: Option<&'a Map<String, Value>>,
    pub add_generation_prompt: bool,
}

/// A conversation's prompt as the template renders it.
#[derive(Debug)]
pub struct RenderedChat {
    pub prompt: String,
    /// The prompt leaves a `<think>` block open: the answer begins with reasoning.
    pub opens_reasoning: bool,
}

impl Conversation<'_> {
    /// Renders the conversation with the model's chat template (compiled at load).
    pub fn render(&self, tokenizer: &Tokenizer) -> Result<RenderedChat, RouterError> {
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
        let prompt = tokenizer
            .render_chat(&ChatPrompt {
                messages: &self.messages,
                tools: self.tools,
                add_generation_prompt: self.add_generation_prompt,
                kwargs: self.kwargs,
            })
            // A template refusing the conversation (`raise_exception`) is the client's to fix.
            .map_err(|e| RouterError::invalid("messages", e.to_string()))?;
        let opens_reasoning = match (prompt.rfind(THINK_OPEN), prompt.rfind(THINK_CLOSE)) {
            (Some(open), Some(close)) => open > close,
            (Some(_), None) => true,
            _ => false,
        };
        Ok(RenderedChat {
            prompt,
            opens_reasoning,
        })
    }

    /// The prompt and the reader of its answer. `constraint` is the request's own (a
    /// response format, from `format_field`); a forced `tool_choice` becomes it (both at once
    /// are refused), and with reasoning open it holds from `</think>` on.
    pub fn prepare(
        &self,
        tokenizer: &Tokenizer,
        constraint: &mut Option<pb::Constraint>,
        format_field: &str,
    ) -> Result<(String, ChatOutputReader), RouterError> {
        if let Some(forced) = self.forced {
            if constraint.is_some() {
                return Err(RouterError::invalid(
                    format_field.to_string(),
                    "a forced tool_choice already fixes the answer's format",
                ));
            }
            let tags = CallTags {
                open: tokenizer.token_id("<tool_call>"),
                close: tokenizer.token_id("</tool_call>"),
            };
            let tools = self.tools.unwrap_or_default();
            let lark = tool_call_grammar(tools, forced, self.parallel, tags)?;
            *constraint = Some(pb::Constraint {
                kind: Some(pb::constraint::Kind::Lark(lark)),
                after_token: None,
            });
        }
        let rendered = self.render(tokenizer)?;
        if let Some(c) = constraint.as_mut()
            && rendered.opens_reasoning
        {
            // The model reasons first: the format holds from the end of its reasoning on.
            c.after_token = tokenizer.token_id(THINK_CLOSE);
        }
        let tools = ToolSet::from_openai(self.tools.unwrap_or_default());
        let reader = ChatOutputReader::new(rendered.opens_reasoning, tools, self.parallel);
        Ok((rendered.prompt, reader))
    }
}

/// The template's name for `role` (OpenAI's `developer` is the system turn), or a refusal
/// naming `field`.
pub fn template_role(role: &str, field: String) -> Result<&str, RouterError> {
    let role = if role == "developer" { "system" } else { role };
    if matches!(role, "system" | "user" | "assistant" | "tool") {
        Ok(role)
    } else {
        Err(RouterError::invalid(
            field,
            format!("`{role}` is not one of system, developer, user, assistant, tool"),
        ))
    }
}

/// An earlier call's arguments (OpenAI's JSON text) as the mapping templates iterate.
pub fn call_arguments(text: Option<&str>, field: String) -> Result<Value, RouterError> {
    match text {
        None | Some("") => Ok(Value::Object(Map::new())),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| RouterError::invalid(field, format!("not JSON: {e}"))),
    }
}

/// Tool-call ids of one answer: a router-minted request id (never the client's) and the
/// call's position.
#[derive(Debug, Clone)]
pub struct ToolCallIds(pub String);

impl ToolCallIds {
    pub fn id(&self, index: usize) -> String {
        format!("call_{}_{index}", self.0)
    }
}

/// A gRPC request with `messages`, its conversation (the OpenAI-shaped tools it offers live
/// in `tools`, the template variables in `kwargs`: the conversation borrows them).
pub struct GrpcChat {
    tools: Vec<Value>,
    kwargs: Option<Map<String, Value>>,
}

impl GrpcChat {
    /// The tools and template variables of `req`, checked.
    pub fn read(req: &pb::GenerateRequest) -> Result<GrpcChat, RouterError> {
        if !req.prompt.is_empty() || !req.prompt_token_ids.is_empty() || req.chat {
            return Err(RouterError::invalid(
                "messages",
                "set either `messages` or `prompt` / `prompt_token_ids` (and `chat`), not both",
            ));
        }
        let mut tools = Vec::with_capacity(req.tools.len());
        for (i, t) in req.tools.iter().enumerate() {
            let parameters: Value = if t.parameters.is_empty() {
                json!({"type": "object", "properties": {}})
            } else {
                serde_json::from_str(&t.parameters).map_err(|e| {
                    RouterError::invalid(format!("tools[{i}].parameters"), format!("not JSON: {e}"))
                })?
            };
            if t.name.is_empty() {
                return Err(RouterError::invalid(
                    format!("tools[{i}].name"),
                    "every tool needs a name",
                ));
            }
            let mut function = json!({"name": t.name, "parameters": parameters});
            if !t.description.is_empty() {
                function["description"] = json!(t.description);
            }
            tools.push(json!({"type": "function", "function": function}));
        }
        let kwargs = match req.chat_template_kwargs.as_str() {
            "" => None,
            text => match serde_json::from_str(text) {
                Ok(Value::Object(m)) => Some(m),
                _ => {
                    return Err(RouterError::invalid(
                        "chat_template_kwargs",
                        "must be a JSON object",
                    ));
                }
            },
        };
        Ok(GrpcChat { tools, kwargs })
    }

    /// The conversation `req` (the request `read` was given) holds.
    pub fn conversation<'a>(
        &'a self,
        req: &'a pb::GenerateRequest,
    ) -> Result<Conversation<'a>, RouterError> {
        use pb::ToolChoiceMode as Mode;
        let mut messages = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            let role = template_role(&m.role, format!("messages[{i}].role"))?;
            let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
            for (j, c) in m.tool_calls.iter().enumerate() {
                let field = format!("messages[{i}].tool_calls[{j}].arguments");
                let arguments = call_arguments(Some(&c.arguments), field)?;
                let id = (!c.id.is_empty()).then(|| c.id.clone());
                tool_calls.push(ToolCallTurn::function(id, c.name.clone(), arguments));
            }
            let optional = |s: &str| (!s.is_empty()).then(|| s.to_string());
            messages.push(ChatMessage {
                role: role.to_string(),
                content: sluice_engine::MessageContent::Text(m.content.clone()),
                reasoning_content: optional(&m.reasoning_content),
                tool_calls,
                tool_call_id: optional(&m.tool_call_id),
                name: optional(&m.name),
            });
        }
        let (mode, function) = req
            .tool_choice
            .as_ref()
            .map_or((0, ""), |c| (c.mode, c.function.as_str()));
        let mode = Mode::try_from(mode).map_err(|_| {
            RouterError::invalid("tool_choice.mode", format!("unknown mode {mode}"))
        })?;
        let offered = (!self.tools.is_empty() && mode != Mode::None).then_some(&self.tools[..]);
        let forced = match mode {
            Mode::Auto | Mode::None => None,
            Mode::Required => Some(ForcedCalls::Any),
            Mode::Function if function.is_empty() => {
                return Err(RouterError::invalid(
                    "tool_choice.function",
                    "names the tool every call must be to",
                ));
            }
            Mode::Function => Some(ForcedCalls::Named(function)),
        };
        Ok(Conversation {
            messages,
            tools: offered,
            forced,
            parallel: req.parallel_tool_calls.unwrap_or(true),
            kwargs: self.kwargs.as_ref(),
            add_generation_prompt: true,
        })
    }
}

/// Reads a gRPC chat answer chunk by chunk into its typed fields.
pub struct GrpcChatReader {
    reader: ChatOutputReader,
    ids: ToolCallIds,
}

impl GrpcChatReader {
    pub fn new(reader: ChatOutputReader, ids: ToolCallIds) -> Self {
        GrpcChatReader { reader, ids }
    }

    /// Rewrites `chunk`'s text as what it adds to the content, with its reasoning and the
    /// calls completed in it.
    pub fn read(&mut self, chunk: &mut pb::GenerateChunk) {
        let mut delta = self.reader.push(&chunk.text);
        if chunk.finish_reason != pb::FinishReason::Unspecified as i32 {
            delta.append(self.reader.finish());
        }
        let ChatDelta {
            reasoning,
            content,
            tool_calls,
        } = delta;
        chunk.text = content;
        chunk.reasoning = reasoning;
        chunk.tool_calls = tool_calls
            .into_iter()
            .map(|c| pb::ToolCall {
                id: self.ids.id(c.index),
                name: c.name,
                arguments: c.arguments,
            })
            .collect();
    }
}
