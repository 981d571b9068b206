//! `sluice generate --endpoint URL`: the client side, through the Rust SDK.

use std::io::Write;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::json;
use sluice_client::{Client, FinishReason, GenerateRequest, SamplingParams};

use crate::generate::GenerateArgs;

fn request(args: &GenerateArgs) -> GenerateRequest {
    let s = &args.sampling;
    GenerateRequest {
        request_id: String::new(),
        prompt: args.prompt.clone().unwrap_or_default(),
        prompt_token_ids: args.tokens.clone().unwrap_or_default(),
        chat: args.chat,
        sampling: Some(SamplingParams {
            temperature: Some(s.temperature),
            top_p: Some(s.top_p),
            top_k: s.top_k as u32,
            min_p: s.min_p,
            seed: s.seed,
            repetition_penalty: Some(s.repetition_penalty),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            max_tokens: Some(args.max_tokens.min(u32::MAX as usize) as u32),
            ignore_eos: args.ignore_eos,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn reason_name(code: i32) -> &'static str {
    FinishReason::try_from(code).map_or("unspecified", Into::into)
}

pub fn generate(endpoint: &str, args: &GenerateArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut builder = Client::builder(endpoint);
        if let Some(key) = crate::api_key() {
            builder = builder.api_key(key);
        }
        let mut client = builder.connect().await?;
        let req = request(args);
        let mut stdout = std::io::stdout().lock();
        if !args.stream {
            let r = client.generate(req).await?;
            if args.json {
                writeln!(
                    stdout,
                    "{}",
                    json!({"token_ids": r.token_ids, "text": r.text, "finish_reason": reason_name(r.finish_reason)})
                )?;
            } else {
                writeln!(stdout, "{}", r.text)?;
            }
            return Ok(());
        }
        let mut stream = client.generate_stream(req).await?;
        let mut ids = Vec::new();
        let mut text = String::new();
        let mut chunks = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            chunks += 1;
            ids.extend_from_slice(&chunk.token_ids);
            text.push_str(&chunk.text);
            if args.json {
                writeln!(
                    stdout,
                    "{}",
                    json!({"token_ids": chunk.token_ids, "text": chunk.text, "finish_reason": reason_name(chunk.finish_reason)})
                )?;
            } else {
                write!(stdout, "{}", chunk.text)?;
                stdout.flush()?;
            }
            if chunk.finish_reason != FinishReason::Unspecified as i32 {
                if !args.json {
                    writeln!(stdout)?;
                    eprintln!("{} tokens in {chunks} chunks ({})", ids.len(), reason_name(chunk.finish_reason));
                }
                return Ok(());
            }
        }
        bail!("the stream ended without a finish reason")
    })
}
