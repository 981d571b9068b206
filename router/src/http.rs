//! The router's HTTP side (axum): OpenAI-compatible `/v1/completions`,
//! `/v1/chat/completions`, `/v1/responses` (SSE with `stream: true`) and `/v1/models`, plus `/health` and
//! `/metrics`. Requests go through the same [`Frontend`] as gRPC: same validation, admission
//! and relay; errors come in OpenAI's JSON shape with the matching HTTP status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Extension, Json, Router};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use sluice_proto::v1 as pb;
use sluice_runtime::{Role, WorkerDirectory};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::api_keys::{HeldKey, KeyGuard};
use crate::chat::ToolCallIds;
use crate::chat_output::ChatDelta;
use crate::error::RouterError;
use crate::openai::{self, ChatRequest, CompletionRequest, ErrorBody, ErrorDetail, WireRequest};
use crate::responses::{ResponseBuilder, ResponsesRequest, StreamEvent};
use crate::service::{ChunkRx, Frontend};

#[derive(Clone)]
struct AppState {
    frontend: Arc<Frontend>,
    directory: Arc<WorkerDirectory>,
}

/// The HTTP routes over `frontend`; with API keys in `guard`, every `/v1` route needs one
/// (`/health` and, when `metrics`, `/metrics` stay open).
pub fn app(
    frontend: Arc<Frontend>,
    directory: Arc<WorkerDirectory>,
    guard: KeyGuard,
    metrics: bool,
) -> Router {
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(guard, require_key))
        .route("/health", get(health));
    let router = if metrics {
        router.route("/metrics", get(sluice_runtime::metrics::metrics_response))
    } else {
        router
    };
    router.with_state(AppState {
        frontend,
        directory,
    })
}

/// Serves `app` on `listener` until `shutdown`, letting responses in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    // Each SSE event leaves at once rather than waiting on Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| RouterError::Internal(format!("HTTP server: {e}")))
}

/// Refuses a request without a valid key before anything reads its body (401, OpenAI's
/// `invalid_api_key`).
async fn require_key(
    State(guard): State<KeyGuard>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match guard.admit(header) {
        Ok(held) => {
            let mut request = request;
            if let Some(held) = held {
                request.extensions_mut().insert(held);
            }
            next.run(request).await
        }
        Err(e) => {
            let mut response = ApiError::from(e).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// An error as OpenAI clients expect it.
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// Seconds for `Retry-After` (overload and missing workers are transient).
    retry_after: Option<u64>,
}

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        let (status, kind, code) = match e.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Code::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("overloaded"),
            ),
            Code::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("no_workers"),
            ),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None),
        };
        let param = match &e {
            RouterError::InvalidArgument { field, .. } => Some(field.to_string()),
            RouterError::Runtime(sluice_runtime::RuntimeError::InvalidArgument {
                field, ..
            }) => Some(field.clone()),
            RouterError::Runtime(sluice_runtime::RuntimeError::Engine(
                sluice_engine::EngineError::InvalidSampling { field, .. },
            )) => Some(field.to_string()),
            _ => None,
        };
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Some(e.retry_after().map_or(1, crate::error::retry_after_secs))
            }
            _ => None,
        };
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: e.to_string(),
                    kind,
                    param,
                    code,
                },
            },
            retry_after,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: ErrorDetail {
                    message: format!("invalid JSON body: {}", e.body_text()),
                    kind: "invalid_request_error",
                    param: None,
                    code: None,
                },
            },
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(after) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(after));
        }
        response
    }
}

/// `Json` whose rejections are OpenAI-shaped errors, and whose fields are all known.
struct Body<T>(T);

impl<S: Send + Sync, T: WireRequest> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<serde_json::Map<String, Value>>::from_request(req, state).await?;
        let body = T::from_body(value)?;
        Ok(Body(body))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the request's `model` against the one served.
fn check_model(frontend: &Frontend, model: Option<&str>) -> Result<String, ApiError> {
    let served = &frontend.model().name;
    match model {
        None | Some("") => Ok(served.clone()),
        Some(m) if m == served => Ok(served.clone()),
        Some(m) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody {
                error: ErrorDetail {
                    message: format!(
                        "the model `{m}` does not exist; this server serves `{served}`"
                    ),
                    kind: "invalid_request_error",
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                },
            },
            retry_after: None,
        }),
    }
}

/// Validates and admits `request`.
async fn start(
    frontend: &Frontend,
    request: pb::GenerateRequest,
    headers: HeaderMap,
    key: Option<HeldKey>,
) -> Result<(String, ChunkRx), ApiError> {
    let valid = frontend
        .model()
        .validate(request)
        .inspect_err(|e| frontend.refused(e))?;
    let id = valid.request_id.clone();
    let metadata = MetadataMap::from_headers(headers);
    Ok((id, frontend.start(valid, None, &metadata, key).await?))
}

/// Collects a whole generation.
async fn collect(mut rx: ChunkRx) -> Result<pb::GenerateResponse, ApiError> {
    let mut out = pb::GenerateResponse::default();
    while let Some(chunk) = rx.recv().await {
        let chunk =
            chunk.map_err(|s| RouterError::Runtime(sluice_runtime::RuntimeError::Rpc(s)))?;
        out.token_ids.extend(chunk.token_ids);
        out.text.push_str(&chunk.text);
        out.logprobs.extend(chunk.logprobs);
        if chunk.finish_reason != pb::FinishReason::Unspecified as i32 {
            out.finish_reason = chunk.finish_reason;
            out.usage = chunk.usage;
            return Ok(out);
        }
    }
    Err(RouterError::Internal("the generation ended without a finish reason".into()).into())
}

/// `data: {json}` events from chunks, then `data: [DONE]`. An error after the stream began
/// becomes an `{"error": ...}` event.
fn sse(
    rx: ChunkRx,
    mut event: impl FnMut(pb::GenerateChunk) -> Vec<Value> + Send + 'static,
    first: Option<Value>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let head = futures::stream::iter(first.map(|v| Event::default().data(v.to_string())));
    let body = ReceiverStream::new(rx).flat_map(move |chunk| {
        let events: Vec<Event> = match chunk {
            Ok(c) => event(c)
                .into_iter()
                .map(|v| Event::default().data(v.to_string()))
                .collect(),
            Err(s) => vec![Event::default().data(json!(stream_error(s).body).to_string())],
        };
        futures::stream::iter(events)
    });
    let done = futures::stream::iter([Event::default().data("[DONE]")]);
    Sse::new(head.chain(body).chain(done).map(Ok))
}

/// An error from the relay after a stream began, as the client sees it.
fn stream_error(status: tonic::Status) -> ApiError {
    ApiError::from(RouterError::Runtime(sluice_runtime::RuntimeError::Rpc(
        status,
    )))
}

async fn completions(
    State(app): State<AppState>,
    key: Option<Extension<HeldKey>>,
    headers: HeaderMap,
    Body(request): Body<CompletionRequest>,
) -> Result<Response, ApiError> {
    let frontend = &app.frontend;
    let model = check_model(frontend, request.sampling.model.as_deref())?;
    let stream = request.sampling.stream;
    let include_usage = request.sampling.include_usage();
    let logprobs = request.logprobs.is_some();
    let wire = request.to_pb().inspect_err(|e| frontend.refused(e))?;
    let (id, rx) = start(frontend, wire, headers, key.map(|Extension(k)| k)).await?;
    let id = format!("cmpl-{id}");
    let created = unix_now();
    let f = frontend.clone();
    if stream {
        let mut offset = 0;
        let event = move |c: pb::GenerateChunk| {
            let tokenizer = &f.model().tokenizer;
            let lp = logprobs.then(|| openai::completion_logprobs(tokenizer, &c.logprobs, offset));
            offset += c.text.len();
            let mut events = vec![json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{
                    "index": 0, "text": c.text, "logprobs": lp,
                    "finish_reason": openai::finish_reason(c.finish_reason),
                }],
            })];
            if include_usage && c.usage.is_some() {
                events.push(json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": openai::usage(c.usage.as_ref()),
                }));
            }
            events
        };
        return Ok(sse(rx, event, None).into_response());
    }
    let out = collect(rx).await?;
    let tokenizer = &frontend.model().tokenizer;
    let lp = logprobs.then(|| openai::completion_logprobs(tokenizer, &out.logprobs, 0));
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "text": out.text, "logprobs": lp,
            "finish_reason": openai::finish_reason(out.finish_reason),
        }],
        "usage": openai::usage(out.usage.as_ref()),
    }))
    .into_response())
}

async fn chat_completions(
    State(app): State<AppState>,
    key: Option<Extension<HeldKey>>,
    headers: HeaderMap,
    Body(request): Body<ChatRequest>,
) -> Result<Response, ApiError> {
    let frontend = &app.frontend;
    let model = check_model(frontend, request.sampling.model.as_deref())?;
    let stream = request.sampling.stream;
    let include_usage = request.sampling.include_usage();
    let logprobs = request.logprobs;
    let (wire, mut reader) = request
        .to_pb(&frontend.model().tokenizer)
        .inspect_err(|e| frontend.refused(e))?;
    let (id, rx) = start(frontend, wire, headers, key.map(|Extension(k)| k)).await?;
    let call_ids = ToolCallIds(id.clone());
    let id = format!("chatcmpl-{id}");
    let created = unix_now();
    let f = frontend.clone();
    if stream {
        let chunk = move |choices: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices,
            })
        };
        // The first chunk names the role, as OpenAI's does.
        let first = chunk(json!([{
            "index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null,
        }]));
        let event = move |c: pb::GenerateChunk| {
            let tokenizer = &f.model().tokenizer;
            let lp = logprobs.then(|| openai::chat_logprobs(tokenizer, &c.logprobs));
            let mut delta = reader.push(&c.text);
            let finish = if c.finish_reason == pb::FinishReason::Unspecified as i32 {
                None
            } else {
                delta.append(reader.finish());
                openai::chat_finish_reason(c.finish_reason, reader.called_tools())
            };
            let mut events = Vec::new();
            if !delta.is_empty() || finish.is_some() || lp.is_some() {
                events.push(chunk(json!([{
                    "index": 0, "delta": delta_json(&delta, &call_ids, true),
                    "logprobs": lp, "finish_reason": finish,
                }])));
            }
            if include_usage && c.usage.is_some() {
                let mut last = chunk(json!([]));
                last["usage"] = openai::usage(c.usage.as_ref());
                events.push(last);
            }
            events
        };
        return Ok(sse(rx, event, Some(first)).into_response());
    }
    let out = collect(rx).await?;
    let mut answer = reader.push(&out.text);
    answer.append(reader.finish());
    let lp = logprobs.then(|| openai::chat_logprobs(&frontend.model().tokenizer, &out.logprobs));
    let mut message = delta_json(&answer, &call_ids, false);
    message["role"] = json!("assistant");
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": lp,
            "finish_reason": openai::chat_finish_reason(out.finish_reason, reader.called_tools()),
        }],
        "usage": openai::usage(out.usage.as_ref()),
    }))
    .into_response())
}

/// A message (`streamed`: false) or a streamed delta: `content`, `reasoning_content` (the field
/// vLLM and SGLang use) and `tool_calls`, each only when it has something (a whole message
/// always has `content`, `null` when it only calls tools).
fn delta_json(d: &ChatDelta, ids: &ToolCallIds, streamed: bool) -> Value {
    let mut v = json!({});
    if !d.content.is_empty() {
        v["content"] = json!(d.content);
    } else if !streamed {
        v["content"] = Value::Null;
    }
    if !d.reasoning.is_empty() {
        v["reasoning_content"] = json!(d.reasoning);
    }
    if !d.tool_calls.is_empty() {
        let calls: Vec<Value> = d
            .tool_calls
            .iter()
            .map(|c| {
                let mut call = json!({
                    "id": ids.id(c.index), "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if streamed {
                    call["index"] = json!(c.index);
                }
                call
            })
            .collect();
        v["tool_calls"] = Value::Array(calls);
    }
    v
}

/// `POST /v1/responses`: the same conversation path as chat, answered as output items; with
/// `stream: true`, the Responses API's named events (no `[DONE]`: `response.completed`,
/// `response.incomplete` or `response.failed` ends it).
async fn responses(
    State(app): State<AppState>,
    key: Option<Extension<HeldKey>>,
    headers: HeaderMap,
    Body(request): Body<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let frontend = &app.frontend;
    let model = check_model(frontend, request.sampling.model.as_deref())?;
    let stream = request.sampling.stream;
    let prepared = request
        .prepare(&frontend.model().tokenizer, model)
        .inspect_err(|e| frontend.refused(e))?;
    let (id, mut rx) = start(
        frontend,
        prepared.request,
        headers,
        key.map(|Extension(k)| k),
    )
    .await?;
    let mut builder = ResponseBuilder::new(&id, unix_now(), prepared.echo);
    let head = builder.start();
    let mut reader = prepared.reader;
    let mut reasoning = prepared.reasoning;
    // One step of the relay: a chunk's events, and whether the response has ended.
    let mut step = move |chunk: Result<pb::GenerateChunk, tonic::Status>| match chunk {
        Ok(c) => {
            reasoning.push(&c.token_ids);
            let mut delta = reader.push(&c.text);
            if c.finish_reason == pb::FinishReason::Unspecified as i32 {
                return (builder.push(delta), None);
            }
            delta.append(reader.finish());
            let mut events = builder.push(delta);
            let (end, response) =
                builder.finish(c.finish_reason, c.usage.as_ref(), reasoning.count());
            events.extend(end);
            (events, Some(Ok(response)))
        }
        Err(s) => {
            let e = stream_error(s);
            let d = &e.body.error;
            let events = builder.fail(d.code.unwrap_or(d.kind), &d.message, d.param.as_deref());
            (events, Some(Err(e)))
        }
    };
    if !stream {
        while let Some(chunk) = rx.recv().await {
            match step(chunk).1 {
                Some(Ok(response)) => return Ok(Json(response).into_response()),
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        return Err(
            RouterError::Internal("the generation ended without a finish reason".into()).into(),
        );
    }
    let named = |(kind, body): StreamEvent| Event::default().event(kind).data(body.to_string());
    let head: Vec<Event> = head.into_iter().map(named).collect();
    let body = ReceiverStream::new(rx)
        .flat_map(move |chunk| futures::stream::iter(step(chunk).0.into_iter().map(named)));
    Ok(Sse::new(
        futures::stream::iter(head)
            .chain(body)
            .map(Ok::<_, Infallible>),
    )
    .into_response())
}

async fn models(State(app): State<AppState>) -> Json<Value> {
    let m = app.frontend.model();
    Json(json!({
        "object": "list",
        "data": [{
            "id": m.name, "object": "model", "created": 0, "owned_by": "sluice",
            "max_model_len": m.max_context, "vocab_size": m.vocab,
        }],
    }))
}

/// Ready only while at least one prefill and one decode worker are registered.
async fn health(State(app): State<AppState>) -> Response {
    let prefill = app.directory.workers(Role::Prefill).len();
    let decode = app.directory.workers(Role::Decode).len();
    let body = json!({"prefill_workers": prefill, "decode_workers": decode});
    if prefill > 0 && decode > 0 {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}
