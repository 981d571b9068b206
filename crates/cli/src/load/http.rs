//! One streamed completion over the OpenAI-compatible HTTP API (`POST /v1/completions`,
//! server-sent events), timed token by token.

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::report::Outcome;
use super::workload::Prompt;
use super::{Clock, RequestSpec};

/// The HTTP API a load run drives: its `host:port` and the `authorization` it sends.
#[derive(Clone, Default)]
pub struct HttpApi {
    pub authority: String,
    /// `Bearer KEY` (a router with API keys refuses requests without it).
    pub authorization: Option<String>,
}

/// `host:port` of an `http://host:port[/...]` address.
pub fn authority(address: &str) -> Result<String> {
    let rest = address
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--http takes http://HOST:PORT (got `{address}`)"))?;
    Ok(rest.split('/').next().unwrap_or(rest).to_string())
}

async fn send(
    api: &HttpApi,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let authority = api.authority.as_str();
    let stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json");
    if let Some(a) = &api.authorization {
        request = request.header("authorization", a);
    }
    let request = request.body(Full::new(Bytes::from(
        body.map(|b| b.to_string()).unwrap_or_default(),
    )))?;
    Ok(sender.send_request(request).await?)
}

/// The served model's id and vocabulary size, from `GET /v1/models`.
pub async fn model(api: &HttpApi) -> Result<(String, u32)> {
    let response = send(api, "GET", "/v1/models", None).await?;
    let body = response.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&body).context("GET /v1/models")?;
    let m = &v["data"][0];
    let id = m["id"]
        .as_str()
        .context("GET /v1/models: no model")?
        .to_string();
    let vocab = m["vocab_size"].as_u64().unwrap_or(32_000) as u32;
    Ok((id, vocab))
}

/// Sends one streamed completion and times each event that carries a token.
pub async fn completion(api: &HttpApi, model: &str, spec: &RequestSpec) -> Outcome {
    match stream_completion(api, model, spec).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Failed {
            status: "CONNECTION".into(),
            message: format!("{e:#}"),
        },
    }
}

async fn stream_completion(api: &HttpApi, model: &str, spec: &RequestSpec) -> Result<Outcome> {
    let prompt = match &spec.prompt {
        Prompt::Tokens(ids) => json!(ids),
        Prompt::Text(t) => json!(t),
    };
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": spec.max_tokens, "stream": true,
        "ignore_eos": true, "stream_options": {"include_usage": true},
    });
    let mut clock = Clock::start();
    let response = send(api, "POST", "/v1/completions", Some(body)).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return Ok(Outcome::Failed {
            status: format!("HTTP {}", status.as_u16()),
            message: v["error"]["message"].as_str().unwrap_or("").to_string(),
        });
    }
    let mut buffer = Vec::new();
    let mut usage = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let now = Instant::now();
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    return Ok(clock.finish(usage));
                }
                let v: Value = serde_json::from_str(data).context("a server-sent event")?;
                if let Some(e) = v.get("error") {
                    return Ok(Outcome::Failed {
                        status: "STREAM ERROR".into(),
                        message: e["message"].as_str().unwrap_or("").to_string(),
                    });
                }
                if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                    usage = Some(u as u32);
                }
                // Each event with a choice is one generated chunk (one token today).
                if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                    clock.tokens(now, 1);
                }
            }
        }
    }
    Ok(Outcome::Failed {
        status: "STREAM ERROR".into(),
        message: "the stream ended without [DONE]".into(),
    })
}
