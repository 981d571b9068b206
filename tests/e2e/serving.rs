//! Serving under real traffic, as separate processes against a real etcd: continuous batching
//! with preemption, conditional disaggregation, the generation rules, the OpenAI-compatible
//! HTTP API, overload control and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use opentelemetry_proto::tonic as otlp;
use otlp::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use otlp::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::{Value, json};
use sluice_client::{
    ClientError, Constraint, FinishReason, GenerateChunk, GenerateRequest, SamplingParams,
    constraint,
};
use sluice_harness::http::{metric, request};
use sluice_harness::{Cluster, ClusterSpec, local_greedy, synth};

fn greedy(tokens: &[u32], max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: tokens.to_vec(),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn seeded(tokens: &[u32], seed: u64) -> GenerateRequest {
    let mut r = greedy(tokens, 16);
    let s = r.sampling.as_mut().unwrap();
    s.temperature = Some(0.9);
    s.top_p = Some(0.95);
    s.seed = Some(seed);
    r
}

/// Sum of every series of `name` (whatever its labels) in a `/metrics` text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn worker_metrics(cluster: &Cluster, prefix: &str) -> String {
    cluster
        .metrics
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, url)| {
            let address = url.trim_start_matches("http://");
            request(address, "GET", "/metrics", None).body
        })
        .collect()
}

fn prompt(i: usize) -> Vec<u32> {
    let len = 3 + (i * 7) % 38;
    (0..len)
        .map(|j| ((i * 131 + j * 17 + 5) % 1000) as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_batching_preemption_and_local_prefill_keep_every_token_exact() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    // 16 KV blocks of 16 tokens per decode worker, for 16 sequences of up to 60 tokens each:
    // the workers must preempt. Prompts under 12 tokens are prefilled on the decode worker.
    let running = ClusterSpec::new(1, 2)
        .decode_args(&["--kv-blocks", "16", "--max-sequences", "16"])
        .router_args(&["--disagg-min-tokens", "12"])
        .start(model);
    let cluster = &running.cluster;
    cluster.wait_ready(3).await;

    let prompts: Vec<Vec<u32>> = (0..32).map(prompt).collect();
    assert!(prompts.iter().any(|p| p.len() < 12) && prompts.iter().any(|p| p.len() >= 12));
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| local_greedy(model, p, 20, true))
        .collect();
    let client = cluster.client().await;
    let answers = futures::future::join_all(prompts.iter().map(|p| {
        let mut c = client.clone();
        let req = greedy(p, 20);
        async move { c.generate(req).await.unwrap() }
    }))
    .await;
    for (i, (answer, want)) in answers.iter().zip(&expected).enumerate() {
        assert_eq!(
            &answer.token_ids,
            want,
            "request {i}, prompt of {} tokens",
            prompts[i].len()
        );
        assert_eq!(answer.finish_reason, FinishReason::Length as i32);
    }
    let decode_metrics = worker_metrics(cluster, "decode");
    assert!(
        metric_sum(&decode_metrics, "sluice_preemptions_total") > 0.0,
        "the KV budget must have forced preemption:\n{decode_metrics}"
    );

    // --- A seeded request samples the same tokens alone and in a busy batch, whether its
    // prompt is prefilled on a prefill worker or on the decode worker.
    let mut c = client.clone();
    for p in [prompt(1), prompt(3)] {
        let alone = c.generate(seeded(&p, 7)).await.unwrap().token_ids;
        let mut batch: Vec<GenerateRequest> = (10..18).map(|i| greedy(&prompt(i), 20)).collect();
        batch.insert(4, seeded(&p, 7));
        let answers = futures::future::join_all(batch.into_iter().map(|r| {
            let mut c = client.clone();
            async move { c.generate(r).await.unwrap() }
        }))
        .await;
        assert_eq!(answers[4].token_ids, alone, "prompt of {} tokens", p.len());
        let other = c.generate(seeded(&p, 8)).await.unwrap().token_ids;
        assert_ne!(other, alone, "another seed should sample differently");
    }

    // --- Nothing leaks: every sequence and block is back.
    cluster.wait_idle().await;

    // --- Metrics exist with values after traffic.
    let router = request(&cluster.http, "GET", "/metrics", None).body;
    for series in [
        "sluice_time_to_first_token_seconds_count",
        "sluice_inter_token_latency_seconds_count",
        "sluice_request_duration_seconds_count",
        "sluice_requests_total{outcome=\"length\"}",
        "sluice_generated_tokens_total",
        "sluice_prompt_tokens_total",
    ] {
        let v = metric(&router, series).unwrap_or_else(|| panic!("{series} missing:\n{router}"));
        assert!(v > 0.0, "{series} = {v}");
    }
    assert!(metric(&router, "sluice_queue_depth").is_some(), "{router}");
    for name in [
        "sluice_kv_blocks_total",
        "sluice_decode_tokens_total",
        "sluice_decode_step_seconds_count",
    ] {
        assert!(
            metric_sum(&decode_metrics, name) > 0.0,
            "{name}:\n{decode_metrics}"
        );
    }
    let prefill_metrics = worker_metrics(cluster, "prefill");
    for name in [
        "sluice_prefill_tokens_total",
        "sluice_cache_transfer_bytes_total",
        "sluice_cache_transfer_seconds_count",
    ] {
        assert!(
            metric_sum(&prefill_metrics, name) > 0.0,
            "{name}:\n{prefill_metrics}"
        );
    }
}

async fn stream_chunks(c: &mut sluice_client::Client, req: GenerateRequest) -> Vec<GenerateChunk> {
    let mut stream = c.generate_stream(req).await.unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    chunks
}

/// `log_softmax(row)[token]`, in f64.
fn log_softmax_at(row: &[f64], token: usize) -> f64 {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    row[token] - lse
}

/// Every position's logits of one forward over `tokens`, from `sluice logits` in one process.
fn local_logits(model: &Path, tokens: &[u32]) -> Vec<Vec<f64>> {
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let out = std::process::Command::new(sluice_harness::bin("sluice"))
        .arg("logits")
        .arg("--model")
        .arg(model)
        .arg("--tokens")
        .arg(ids.join(","))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generation_rules_and_the_openai_api() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let running = ClusterSpec::new(1, 1).start(model);
    let cluster = &running.cluster;
    cluster.wait_ready(2).await;
    let mut c = cluster.client().await;
    let base_prompt: Vec<u32> = vec![17, 401, 33, 902, 5, 250, 77];

    // --- The reference: 24 greedy tokens, one chunk each.
    let chunks = stream_chunks(&mut c, greedy(&base_prompt, 24)).await;
    let tokens: Vec<u32> = chunks.iter().flat_map(|c| c.token_ids.clone()).collect();
    let full: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(tokens.len(), 24);

    // --- A stop string made of the end of one token's text and the start of the next.
    let k = (2..chunks.len() - 1)
        .find(|&k| !chunks[k].text.is_empty() && !chunks[k + 1].text.is_empty())
        .expect("two consecutive tokens with text");
    let tail: String = chunks[k].text.chars().last().into_iter().collect();
    let head: String = chunks[k + 1].text.chars().next().into_iter().collect();
    let stop = format!("{tail}{head}");
    let mut req = greedy(&base_prompt, 24);
    req.sampling.as_mut().unwrap().stop = vec![stop.clone()];
    let stopped = c.generate(req).await.unwrap();
    let at = full.find(&stop).unwrap();
    assert_eq!(stopped.text, full[..at], "stop {stop:?}");
    assert_eq!(stopped.finish_reason, FinishReason::Stop as i32);

    // --- A stop token id ends generation after its first occurrence, without its text.
    let stop_id = tokens[5];
    let first = tokens.iter().position(|&t| t == stop_id).unwrap();
    let mut req = greedy(&base_prompt, 24);
    req.sampling.as_mut().unwrap().stop_token_ids = vec![stop_id];
    let stopped = c.generate(req).await.unwrap();
    assert_eq!(stopped.token_ids, tokens[..=first]);
    assert_eq!(stopped.finish_reason, FinishReason::Stop as i32);
    assert!(
        full.starts_with(&stopped.text),
        "{:?} vs {full:?}",
        stopped.text
    );
    // The first token (sampled by the prefill worker, which then decides its finish) as a
    // stop token: one token, no text, finish `stop`.
    let mut req = greedy(&base_prompt, 24);
    req.sampling.as_mut().unwrap().stop_token_ids = vec![tokens[0]];
    let stopped = c.generate(req).await.unwrap();
    assert_eq!(stopped.token_ids, tokens[..1]);
    assert_eq!(stopped.finish_reason, FinishReason::Stop as i32);
    assert_eq!(stopped.text, "");

    // --- Guided decoding across the handoff: the prefill worker samples the first token
    // under the regex, the decode worker replays it into its own guide and goes on. The
    // text matches (checked by hand here) and ends where the regex is complete.
    let regex = |rx: &str| {
        Some(Constraint {
            kind: Some(constraint::Kind::Regex(rx.into())),
            after_token: None,
        })
    };
    let mut req = greedy(&base_prompt, 40);
    req.sampling.as_mut().unwrap().constraint = regex("[a-z]{3}-[0-9]{4}");
    let guided = c.generate(req).await.unwrap();
    let b = guided.text.as_bytes();
    assert_eq!(b.len(), 8, "{:?}", guided.text);
    assert!(
        b[..3].iter().all(u8::is_ascii_lowercase),
        "{:?}",
        guided.text
    );
    assert_eq!(b[3], b'-');
    assert!(b[4..].iter().all(u8::is_ascii_digit), "{:?}", guided.text);
    assert_eq!(guided.finish_reason, FinishReason::Stop as i32);
    // A constraint that cannot compile is refused before any work, naming the field.
    let mut req = greedy(&base_prompt, 4);
    req.sampling.as_mut().unwrap().constraint = regex("(");
    match c.generate(req).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("constraint.regex"), "{m}"),
        other => panic!("{other:?}"),
    }
    // --- logit_bias: +100 on one token makes greedy pick it at every step (the first one at
    // the prefill worker, the rest at the decode worker); -100 on the unbiased first token
    // makes greedy pick another.
    let favoured = tokens[3];
    let mut req = greedy(&base_prompt, 6);
    req.sampling.as_mut().unwrap().logit_bias = [(favoured, 100.0)].into();
    assert_eq!(c.generate(req).await.unwrap().token_ids, vec![favoured; 6]);
    let mut req = greedy(&base_prompt, 1);
    req.sampling.as_mut().unwrap().logit_bias = [(tokens[0], -100.0)].into();
    assert_ne!(c.generate(req).await.unwrap().token_ids, tokens[..1]);

    // --- gRPC chat: `messages` and a forced tool choice; the call comes back typed (unary
    // and streamed alike), its arguments valid for the tool's schema.
    let chat = GenerateRequest {
        messages: vec![sluice_client::ChatMessage {
            role: "user".into(),
            content: "Weather?".into(),
            ..Default::default()
        }],
        tools: vec![sluice_client::Tool {
            name: "get_weather".into(),
            description: "Weather by city".into(),
            parameters: json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"]})
            .to_string(),
        }],
        tool_choice: Some(sluice_client::ToolChoice {
            mode: sluice_client::ToolChoiceMode::Required as i32,
            function: String::new(),
        }),
        parallel_tool_calls: Some(false),
        sampling: Some(SamplingParams {
            temperature: Some(1.0),
            seed: Some(3),
            max_tokens: Some(200),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = c.generate(chat.clone()).await.unwrap();
    assert_eq!(answer.tool_calls.len(), 1, "{answer:?}");
    let call = &answer.tool_calls[0];
    assert_eq!(call.name, "get_weather");
    let args: Value = serde_json::from_str(&call.arguments).unwrap();
    assert!(
        args["city"].as_str().unwrap().chars().count() <= 8,
        "{args}"
    );
    assert!((1..=7).contains(&args["days"].as_i64().unwrap()), "{args}");
    assert_eq!(answer.text.trim(), "", "{answer:?}");
    let streamed = stream_chunks(&mut c, chat).await;
    let calls: Vec<_> = streamed.iter().flat_map(|c| c.tool_calls.clone()).collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (&calls[0].name, &calls[0].arguments),
        (&call.name, &call.arguments)
    );

    // --- Log-probabilities: one per token, the sampled token first among the top ones, and
    // equal to the log-softmax of the same step's logits computed in one local process.
    let mut req = greedy(&base_prompt, 8);
    req.sampling.as_mut().unwrap().logprobs = Some(3);
    let with_lp = c.generate(req).await.unwrap();
    assert_eq!(with_lp.token_ids, tokens[..8]);
    assert_eq!(with_lp.logprobs.len(), 8);
    let mut context = base_prompt.clone();
    context.extend(&tokens[..7]);
    let rows = local_logits(model, &context);
    for (i, lp) in with_lp.logprobs.iter().enumerate() {
        assert_eq!(lp.token_id, tokens[i]);
        assert!(lp.logprob.is_finite() && lp.logprob <= 0.0, "{lp:?}");
        assert_eq!(lp.top.len(), 3);
        assert_eq!(
            lp.top[0].token_id, lp.token_id,
            "greedy picks the most likely"
        );
        assert!(
            lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "{lp:?}"
        );
        let mass: f32 = lp.top.iter().map(|t| t.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
        let row = &rows[base_prompt.len() - 1 + i];
        for t in std::iter::once((lp.token_id, lp.logprob))
            .chain(lp.top.iter().map(|t| (t.token_id, t.logprob)))
        {
            let want = log_softmax_at(row, t.0 as usize);
            assert!(
                (t.1 as f64 - want).abs() < 2e-3,
                "step {i} token {}: {} vs {want}",
                t.0,
                t.1
            );
        }
    }

    // --- Echo puts the prompt's text first.
    let mut req = greedy(&[], 4);
    req.prompt = "Tell me about rivers".into();
    req.sampling.as_mut().unwrap().echo = true;
    let echoed = c.generate(req.clone()).await.unwrap();
    req.sampling.as_mut().unwrap().echo = false;
    let plain = c.generate(req).await.unwrap();
    assert_eq!(echoed.text, format!("Tell me about rivers{}", plain.text));

    // --- OpenAI-compatible HTTP: the same answers, in OpenAI's shapes.
    let name = c.list_models().await.unwrap()[0].id.clone();
    let http = &cluster.http;
    let mut grpc_chat = greedy(&[], 8);
    grpc_chat.prompt = "Tell me about rivers".into();
    grpc_chat.chat = true;
    let grpc_chat = c.generate(grpc_chat).await.unwrap();
    let mut grpc_text = greedy(&[], 8);
    grpc_text.prompt = "Tell me about rivers".into();
    let grpc_text = c.generate(grpc_text).await.unwrap();

    let body = json!({"model": name, "prompt": "Tell me about rivers", "max_tokens": 8,
        "temperature": 0, "ignore_eos": true, "logprobs": 2});
    let r = request(http, "POST", "/v1/completions", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert!(v["created"].as_u64().unwrap() > 0);
    assert_eq!(v["model"], name.as_str());
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["text"], grpc_text.text.as_str());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(
        choice["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    // Two alternatives (fewer keys only if both decode to the same text).
    let top = choice["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .len();
    assert!((1..=2).contains(&top), "{choice}");
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 8
    );

    // Streaming completions: SSE chunks whose texts add up, usage last, then [DONE].
    let body = json!({"prompt": "Tell me about rivers", "max_tokens": 8, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let r = request(http, "POST", "/v1/completions", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let data = r.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (usage_event, choice_events) = events.split_last().unwrap();
    assert_eq!(usage_event["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_event["usage"]["completion_tokens"], 8);
    let text: String = choice_events
        .iter()
        .map(|e| {
            assert_eq!(e["object"], "text_completion");
            e["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, grpc_text.text);
    assert_eq!(
        choice_events.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        choice_events[..choice_events.len() - 1]
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null())
    );

    // Chat, unary and streamed.
    let messages = json!([{"role": "user", "content": "Tell me about rivers"}]);
    let body = json!({"model": name, "messages": messages, "max_tokens": 8, "temperature": 0,
        "ignore_eos": true});
    let r = request(
        http,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        grpc_chat.text.as_str()
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
        "logprobs": true, "top_logprobs": 1});
    let r = request(
        http,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage_event, rest) = events.split_last().unwrap();
    assert_eq!(usage_event["usage"]["completion_tokens"], 8);
    let mut content = String::new();
    let mut logprob_entries = 0;
    for e in rest {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], events[0]["id"]);
        if let Some(t) = e["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(lp) = e["choices"][0]["logprobs"]["content"].as_array() {
            for entry in lp {
                assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
                assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 1);
                logprob_entries += 1;
            }
        }
    }
    assert_eq!(content, grpc_chat.text);
    assert_eq!(logprob_entries, 8);
    assert_eq!(
        rest.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    let r = request(http, "GET", "/v1/models", None);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], name.as_str());
    assert_eq!(v["data"][0]["object"], "model");

    // Errors: OpenAI's shape, the right status, the offending parameter named.
    let cases = [
        (
            json!({"prompt": "x", "temperature": -1}).to_string(),
            400,
            Some("temperature"),
        ),
        (json!({"prompt": "x", "n": 2}).to_string(), 400, Some("n")),
        (
            json!({"prompt": "x", "logprobs": 50}).to_string(),
            400,
            Some("logprobs"),
        ),
        (
            json!({"prompt": "x", "model": "nope"}).to_string(),
            404,
            Some("model"),
        ),
        ("{not json".to_string(), 400, None),
    ];
    for (body, status, param) in cases {
        let r = request(http, "POST", "/v1/completions", Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let e = &r.json()["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["type"].is_string(), "{e}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{e}");
        }
    }
    let r = request(http, "GET", "/health", None);
    assert_eq!(r.status, 200, "{}", r.body);
    cluster.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_at_once_and_nothing_leaks() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let running = ClusterSpec::new(1, 1)
        .router_args(&["--max-in-flight", "2", "--max-queue", "2"])
        .start(model);
    let cluster = &running.cluster;
    cluster.wait_ready(2).await;
    let p: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
    let want = local_greedy(model, &p, 24, true);

    // A gRPC burst far over the limits: the excess is refused, the rest is exact.
    let client = cluster.client().await;
    let burst = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join_all((0..24).map(|_| {
            let mut c = client.clone();
            let req = greedy(&p, 24);
            async move { c.generate(req).await }
        })),
    )
    .await
    .expect("nothing hangs");
    let mut ok = 0;
    let mut refused = 0;
    for r in burst {
        match r {
            Ok(answer) => {
                assert_eq!(answer.token_ids, want);
                ok += 1;
            }
            Err(ClientError::Overloaded(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok >= 2 && refused >= 1, "{ok} answered, {refused} refused");

    // The same over HTTP: 429 with Retry-After in OpenAI's error shape.
    let http = cluster.http.clone();
    let body =
        json!({"prompt": "Tell me about rivers", "max_tokens": 24, "ignore_eos": true}).to_string();
    let statuses: Vec<_> = (0..16)
        .map(|_| {
            let (http, body) = (http.clone(), body.clone());
            std::thread::spawn(move || request(&http, "POST", "/v1/completions", Some(&body)))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let too_many: Vec<_> = statuses.iter().filter(|r| r.status == 429).collect();
    assert!(
        !too_many.is_empty(),
        "no 429 in {:?}",
        statuses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(statuses.iter().all(|r| r.status == 200 || r.status == 429));
    for r in too_many {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    }

    cluster.wait_idle().await;
    let http = cluster.http.clone();
    let metrics = sluice_harness::eventually(
        Duration::from_secs(10),
        "the router's queue and in-flight gauges back at zero",
        || {
            let http = http.clone();
            async move {
                let m = request(&http, "GET", "/metrics", None).body;
                let idle = metric(&m, "sluice_queue_depth") == Some(0.0)
                    && metric(&m, "sluice_requests_in_flight") == Some(0.0);
                idle.then_some(m)
            }
        },
    )
    .await;
    assert!(metric(&metrics, "sluice_requests_total{outcome=\"overloaded\"}").unwrap() > 0.0);

    // A router without workers: not ready, and requests are 503 with Retry-After.
    let lonely = ClusterSpec::new(0, 0).start(model);
    let address = lonely.cluster.http.clone();
    let health =
        sluice_harness::eventually(Duration::from_secs(30), "the router's HTTP port", || {
            let address = address.clone();
            async move {
                std::net::TcpStream::connect(&address).ok()?;
                Some(request(&address, "GET", "/health", None))
            }
        })
        .await;
    assert_eq!(health.status, 503);
    let r = request(&address, "POST", "/v1/completions", Some(&body));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("decode")
    );
}

/// An OTLP/gRPC collector that keeps every span it receives with its `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, otlp::trace::v1::Span)>>>,
}

fn string_attribute(attributes: &[otlp::common::v1::KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|a| a.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        otlp::common::v1::any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| string_attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_of_one_request_form_one_trace_across_processes() {
    let model_dir = tempfile::tempdir().unwrap();
    let model = model_dir.path();
    synth("tiny", model);
    let collector = Collector::default();
    let port = sluice_harness::free_port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve(([127, 0, 0, 1], port).into()),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let running = ClusterSpec::new(1, 1)
        .all_args(&["--otlp-endpoint", &endpoint])
        .start(model);
    let cluster = &running.cluster;
    cluster.wait_ready(2).await;

    // The caller's own trace: the router's span must continue it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(GenerateRequest {
        request_id: "traced-1".into(),
        ..greedy(&[1, 2, 3, 4, 5], 4)
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let mut raw =
        sluice_proto::v1::inference_client::InferenceClient::connect(cluster.router.clone())
            .await
            .unwrap();
    let answer = raw.generate(request).await.unwrap().into_inner();
    assert_eq!(answer.token_ids.len(), 4);

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    // Batches leave each process within the SDK's 5 s schedule.
    let spans = sluice_harness::eventually(
        Duration::from_secs(30),
        "the request's spans from the router, the prefill and the decode worker",
        || {
            let collector = collector.clone();
            async move {
                let spans: Vec<_> = collector
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, s)| hex(&s.trace_id) == trace_id)
                    .cloned()
                    .collect();
                let services: std::collections::BTreeSet<_> =
                    spans.iter().map(|(service, _)| service.as_str()).collect();
                let all = ["sluice-decode", "sluice-prefill", "sluice-router"];
                (services.into_iter().collect::<Vec<_>>() == all).then_some(spans)
            }
        },
    )
    .await;
    let of = |service: &str| {
        spans
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, span)| span.clone())
            .unwrap()
    };
    let router = of("sluice-router");
    assert_eq!(hex(&router.parent_span_id), caller_span);
    for worker in ["sluice-prefill", "sluice-decode"] {
        let span = of(worker);
        assert_eq!(span.parent_span_id, router.span_id, "{worker}'s parent");
    }
    for (service, span) in &spans {
        assert_eq!(span.name, "request", "{service}");
        assert_eq!(
            string_attribute(&span.attributes, "id").as_deref(),
            Some("traced-1"),
            "{service}"
        );
    }
    server.abort();
}
