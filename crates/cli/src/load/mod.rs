//! `sluice load`: a load generator for Sluice's gRPC API (or the OpenAI-compatible HTTP API
//! with `--http`). Closed loop (`-c` streams, `-n` requests or `--duration`) or open loop
//! (`--rps`, Poisson arrivals). Every request is streamed, so it reports what ghz cannot for
//! streams: TTFT, inter-token latency, TPOT and end-to-end latency from HDR histograms, request
//! and token throughput, errors by status, and goodput under `--slo-ttft` / `--slo-tpot`.

mod http;
mod report;
mod workload;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::json;
use sluice_client::{Client, GenerateRequest, RetryPolicy, SamplingParams};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::progress::Progress;
use report::{Outcome, Sample, Slo, Stats};
use workload::{Length, Phases, Prompt, PromptSource, Rng};

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// The router's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Drive the OpenAI-compatible HTTP API at this address (`http://HOST:PORT`) instead of
    /// gRPC: streamed `POST /v1/completions`.
    #[arg(long)]
    pub http: Option<String>,
    /// Closed loop: requests in flight at once (each starts when the previous one ends).
    #[arg(short = 'c', long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests to measure (default 100 unless --duration is given).
    #[arg(short = 'n', long)]
    pub requests: Option<usize>,
    /// Open loop: requests per second, Poisson arrivals, whatever is still in flight.
    #[arg(long)]
    pub rps: Option<f64>,
    /// Open loop whose rate changes: RPS:SECONDS,... in turn (e.g. `100:10,1000:10,100:20`
    /// for a tenfold flash crowd); the run lasts their sum unless --duration says otherwise.
    #[arg(long, conflicts_with = "rps")]
    pub phases: Option<Phases>,
    /// Stop issuing requests after this many seconds (those in flight finish and count).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Prompt length in tokens of random-token prompts: N or MIN..MAX (uniform).
    #[arg(long, default_value = "128")]
    pub prompt_tokens: Length,
    /// Output length in tokens (generated with ignore_eos): N or MIN..MAX (uniform).
    #[arg(long, default_value = "64")]
    pub output_tokens: Length,
    /// Prompts from a file, one per line (plain text or a JSON string), used in turn
    /// instead of random tokens.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Requests sent (closed loop, at -c) and discarded before measuring.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// TTFT objective in milliseconds (goodput counts requests meeting every objective).
    #[arg(long)]
    pub slo_ttft: Option<f64>,
    /// TPOT objective in milliseconds.
    #[arg(long)]
    pub slo_tpot: Option<f64>,
    /// Separate HTTP/2 connections to spread gRPC requests over.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Seed of prompt and length draws and of the arrival process.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What one request asks for.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub prompt: Prompt,
    pub max_tokens: u32,
}

impl RequestSpec {
    fn prompt_tokens(&self) -> u32 {
        match &self.prompt {
            Prompt::Tokens(t) => t.len() as u32,
            Prompt::Text(_) => 0,
        }
    }
}

/// Times the tokens of one request as they arrive.
pub struct Clock {
    start: Instant,
    first: Option<Instant>,
    last: Instant,
    itl: Vec<Duration>,
    tokens: u32,
}

impl Clock {
    pub fn start() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            first: None,
            last: now,
            itl: Vec::new(),
            tokens: 0,
        }
    }

    /// `n` tokens arrived `at`: the gap since the previous arrival is shared among them.
    pub fn tokens(&mut self, at: Instant, n: u32) {
        if n == 0 {
            return;
        }
        let gaps = match self.first {
            None => {
                self.first = Some(at);
                n - 1
            }
            Some(_) => n,
        };
        if gaps > 0 {
            let share = at.saturating_duration_since(self.last) / n;
            self.itl.extend(std::iter::repeat_n(share, gaps as usize));
        }
        self.last = at;
        self.tokens += n;
    }

    /// The outcome; `usage` (the server's count of output tokens) wins over the chunks seen.
    pub fn finish(self, usage: Option<u32>) -> Outcome {
        match self.first {
            Some(first) => Outcome::Done {
                ttft: first - self.start,
                e2e: self.last - self.start,
                itl: self.itl,
                output_tokens: usage.unwrap_or(self.tokens),
            },
            None => Outcome::Failed {
                status: "NO TOKENS".into(),
                message: "the request ended without a token".into(),
            },
        }
    }
}

/// Where requests go.
enum Target {
    Grpc(Vec<Client>),
    Http { api: http::HttpApi, model: String },
}

impl Target {
    async fn send(&self, index: usize, spec: &RequestSpec) -> Outcome {
        match self {
            Target::Grpc(clients) => {
                let mut client = clients[index % clients.len()].clone();
                grpc_request(&mut client, spec).await
            }
            Target::Http { api, model } => http::completion(api, model, spec).await,
        }
    }
}

fn status_name(code: Option<tonic::Code>) -> String {
    use tonic::Code::*;
    match code {
        None => "CONNECTION".into(),
        Some(code) => match code {
            InvalidArgument => "INVALID_ARGUMENT",
            DeadlineExceeded => "DEADLINE_EXCEEDED",
            NotFound => "NOT_FOUND",
            ResourceExhausted => "RESOURCE_EXHAUSTED",
            FailedPrecondition => "FAILED_PRECONDITION",
            Cancelled => "CANCELLED",
            Unavailable => "UNAVAILABLE",
            Internal => "INTERNAL",
            Unknown => "UNKNOWN",
            other => return format!("{other:?}"),
        }
        .into(),
    }
}

async fn grpc_request(client: &mut Client, spec: &RequestSpec) -> Outcome {
    let mut request = GenerateRequest {
        sampling: Some(SamplingParams {
            max_tokens: Some(spec.max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    match &spec.prompt {
        Prompt::Tokens(t) => request.prompt_token_ids = t.clone(),
        Prompt::Text(t) => request.prompt = t.clone(),
    }
    let failed = |e: sluice_client::ClientError| Outcome::Failed {
        status: status_name(e.code()),
        message: e.message(),
    };
    let mut clock = Clock::start();
    let mut stream = match client.generate_stream(request).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let mut usage = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                clock.tokens(Instant::now(), chunk.token_ids.len() as u32);
                if let Some(u) = chunk.usage {
                    usage = Some(u.completion_tokens);
                }
            }
            Err(e) => return failed(e),
        }
    }
    clock.finish(usage)
}

/// How requests are issued.
#[derive(Debug, Clone)]
enum Pace {
    Closed { concurrency: usize },
    Open { phases: Phases },
}

/// When to stop issuing.
#[derive(Debug, Clone, Copy)]
struct Limit {
    requests: Option<usize>,
    until: Option<Instant>,
}

impl Limit {
    fn allows(&self, index: usize) -> bool {
        self.requests.is_none_or(|n| index < n) && self.until.is_none_or(|t| Instant::now() < t)
    }
}

struct Workload {
    target: Target,
    source: PromptSource,
    output: Length,
    seed: u64,
}

impl Workload {
    /// Request `index`'s draw depends only on the seed and the index, not on timing.
    fn spec(&self, index: usize) -> RequestSpec {
        let mut rng = Rng::new(self.seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        RequestSpec {
            prompt: self.source.prompt(index, &mut rng),
            max_tokens: rng.length(self.output),
        }
    }

    async fn one(self: &Arc<Self>, index: usize) -> Sample {
        let spec = self.spec(index);
        let issued = Instant::now();
        let outcome = self.target.send(index, &spec).await;
        Sample {
            prompt_tokens: spec.prompt_tokens(),
            outcome,
            issued,
            latency: issued.elapsed(),
        }
    }
}

/// Issues requests per `pace` within `limit`; every sample goes to `samples`.
async fn drive(
    workload: Arc<Workload>,
    pace: Pace,
    limit: Limit,
    samples: mpsc::UnboundedSender<Sample>,
) {
    let mut tasks = JoinSet::new();
    match pace {
        Pace::Closed { concurrency } => {
            let issued = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency.max(1) {
                let (w, issued, samples) = (workload.clone(), issued.clone(), samples.clone());
                tasks.spawn(async move {
                    loop {
                        let index = issued.fetch_add(1, Ordering::Relaxed);
                        if !limit.allows(index) {
                            break;
                        }
                        let _ = samples.send(w.one(index).await);
                    }
                });
            }
        }
        Pace::Open { phases } => {
            let mut rng = Rng::new(workload.seed.wrapping_add(1));
            // Arrivals follow an absolute schedule, so a slow send never delays the next.
            let start = tokio::time::Instant::now();
            let mut next = start;
            let mut index = 0;
            while limit.allows(index) {
                tokio::time::sleep_until(next).await;
                let (w, samples) = (workload.clone(), samples.clone());
                tasks.spawn(async move {
                    let _ = samples.send(w.one(index).await);
                });
                index += 1;
                next += rng.exponential_gap(phases.rate_at((next - start).as_secs_f64()));
                // Reap finished tasks as we go; the set holds only those in flight.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// CPU time this process has used (user + system).
fn cpu_time() -> Duration {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole `rusage` into the pointer it is given.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        if rc == 0 {
            // SAFETY: rc == 0 means the struct was filled in.
            let u = unsafe { usage.assume_init() };
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            return tv(u.ru_utime) + tv(u.ru_stime);
        }
    }
    Duration::ZERO
}

async fn connect(args: &LoadArgs) -> Result<(Target, u32)> {
    if let Some(address) = &args.http {
        let api = http::HttpApi {
            authority: http::authority(address)?,
            authorization: crate::api_key().map(|k| format!("Bearer {k}")),
        };
        let (model, vocab) = http::model(&api).await?;
        return Ok((Target::Http { api, model }, vocab));
    }
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        // No retries: a refusal is a measurement, not something to hide.
        let mut builder = Client::builder(&args.endpoint).retry(RetryPolicy::none());
        if let Some(key) = crate::api_key() {
            builder = builder.api_key(key);
        }
        let client = builder.connect().await?;
        clients.push(client);
    }
    let models = clients[0]
        .list_models()
        .await
        .context("asking the router for its model")?;
    let vocab = models.first().map_or(32_000, |m| m.vocab_size);
    Ok((Target::Grpc(clients), vocab))
}

pub fn run(args: LoadArgs) -> Result<()> {
    if args.rps.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rps must be a positive number of requests per second");
    }
    if args.duration.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
        bail!("--duration must be a positive number of seconds");
    }
    if args.concurrency == 0 {
        bail!("-c/--concurrency must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let (target, vocab) = connect(&args).await?;
        let source = match &args.prompts {
            Some(path) => PromptSource::from_file(path)?,
            None => PromptSource::Random {
                vocab,
                length: args.prompt_tokens,
            },
        };
        let workload = Arc::new(Workload {
            target,
            source,
            output: args.output_tokens,
            seed: args.seed,
        });
        let pace = match (&args.phases, args.rps) {
            (Some(phases), _) => Pace::Open { phases: phases.clone() },
            (None, Some(rps)) => Pace::Open { phases: Phases(vec![(rps, f64::INFINITY)]) },
            (None, None) => Pace::Closed {
                concurrency: args.concurrency,
            },
        };
        let duration = args.duration.or(args.phases.as_ref().map(Phases::seconds));
        if args.warmup > 0 {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let limit = Limit { requests: Some(args.warmup), until: None };
            let closed = Pace::Closed { concurrency: args.concurrency };
            drive(workload.clone(), closed, limit, tx).await;
            while rx.try_recv().is_ok() {}
        }
        let requests = match (args.requests, duration) {
            (None, None) => Some(100),
            (n, _) => n,
        };
        let ms = |v: Option<f64>| v.map(|m| Duration::from_secs_f64(m / 1000.0));
        let cpu_before = cpu_time();
        let started = Instant::now();
        let mut stats =
            Stats::new(Slo { ttft: ms(args.slo_ttft), tpot: ms(args.slo_tpot) }, started);
        let limit = Limit {
            requests,
            until: duration.map(|d| started + Duration::from_secs_f64(d)),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(workload.clone(), pace.clone(), limit, tx));
        let mut progress = Progress::new("load");
        let mut last_draw = Instant::now();
        let mut finished = started;
        while let Some(sample) = rx.recv().await {
            stats.record(sample);
            finished = Instant::now();
            if finished - last_draw > Duration::from_millis(200) {
                last_draw = finished;
                match (requests, duration) {
                    (Some(n), _) => progress.update(stats.completed() as usize + stats.failed() as usize, n),
                    (None, Some(d)) => progress.update(
                        (started.elapsed().as_secs_f64() * 10.0).min(d * 10.0) as usize,
                        (d * 10.0) as usize,
                    ),
                    (None, None) => {}
                }
            }
        }
        driver.await.context("the load driver")?;
        let elapsed = finished - started;
        let cpu = cpu_time().saturating_sub(cpu_before);
        let api = if args.http.is_some() { "http" } else { "grpc" };
        let address = args.http.as_deref().unwrap_or(&args.endpoint);
        let pace_text = match &pace {
            Pace::Closed { concurrency } => format!("closed loop, {concurrency} concurrent"),
            Pace::Open { .. } if args.phases.is_some() => {
                format!("open loop, phases {} (req/s:s) Poisson", args.phases.as_ref().map(|p| p.to_string()).unwrap_or_default())
            }
            Pace::Open { .. } => format!("open loop, {} req/s Poisson", args.rps.unwrap_or(0.0)),
        };
        let prompts = match &args.prompts {
            Some(p) => format!("prompts from {}", p.display()),
            None => format!("prompts {} tokens", args.prompt_tokens),
        };
        let setup = json!({
            "summary": format!("{api} {address} · {pace_text} · {prompts} · outputs {} tokens", args.output_tokens),
            "api": api,
            "address": address,
            "concurrency": matches!(pace, Pace::Closed { .. }).then_some(args.concurrency),
            "rps": args.rps,
            "phases": args.phases.as_ref().map(|p| p.to_string()),
            "requests": requests,
            "duration_limit_s": duration,
            "prompt_tokens": args.prompt_tokens.to_string(),
            "output_tokens": args.output_tokens.to_string(),
            "warmup": args.warmup,
            "seed": args.seed,
        });
        let report = stats.report(elapsed, setup, cpu);
        let mut stdout = std::io::stdout().lock();
        if args.json {
            writeln!(stdout, "{report}")?;
        } else {
            report::human(&report, &mut stdout)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_times_first_token_gaps_and_shared_chunks() {
        let mut c = Clock::start();
        let t0 = c.start;
        c.tokens(t0 + Duration::from_millis(100), 1);
        c.tokens(t0 + Duration::from_millis(110), 1);
        c.tokens(t0 + Duration::from_millis(130), 2);
        match c.finish(None) {
            Outcome::Done {
                ttft,
                e2e,
                itl,
                output_tokens,
            } => {
                assert_eq!(ttft, Duration::from_millis(100));
                assert_eq!(e2e, Duration::from_millis(130));
                assert_eq!(output_tokens, 4);
                let ms: Vec<u128> = itl.iter().map(|d| d.as_millis()).collect();
                assert_eq!(ms, [10, 10, 10]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Clock::start().finish(None),
            Outcome::Failed { .. }
        ));
    }

    #[test]
    fn request_draws_depend_on_seed_and_index_only() {
        let w = |seed| Workload {
            target: Target::Http {
                api: http::HttpApi::default(),
                model: String::new(),
            },
            source: PromptSource::Random {
                vocab: 1000,
                length: Length { min: 5, max: 50 },
            },
            output: Length { min: 1, max: 100 },
            seed,
        };
        let (a, b) = (w(3), w(3));
        for i in [0, 1, 7, 1000] {
            assert_eq!(a.spec(i).prompt, b.spec(i).prompt);
            assert_eq!(a.spec(i).max_tokens, b.spec(i).max_tokens);
        }
        assert_ne!(a.spec(0).prompt, a.spec(1).prompt);
        assert_ne!(a.spec(0).prompt, w(4).spec(0).prompt);
    }
}
