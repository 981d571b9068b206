//! The router's Prometheus series: request latencies as clients see them, outcomes, and the
//! admission queue.

use std::sync::Arc;

use sluice_runtime::metrics::{
    Counter, CounterFamily, Gauge, Histogram, LATENCY_BUCKETS, registry,
};

pub struct RouterMetrics {
    pub ttft: Arc<Histogram>,
    pub itl: Arc<Histogram>,
    pub e2e: Arc<Histogram>,
    requests: CounterFamily,
    migrations: CounterFamily,
    ejections: CounterFamily,
    pub queue_depth: Arc<Gauge>,
    pub in_flight: Arc<Gauge>,
    /// The in-flight limit in force (fixed by flag, or what the decode workers hold).
    pub admission_limit: Arc<Gauge>,
    /// Each judged request's estimated start.
    pub estimated_start: Arc<Histogram>,
    refusals: CounterFamily,
    authenticated: CounterFamily,
    pub prompt_tokens: Arc<Counter>,
    pub generated_tokens: Arc<Counter>,
}

impl RouterMetrics {
    pub fn new() -> Self {
        let r = registry();
        RouterMetrics {
            ttft: r
                .histogram(
                    "sluice_time_to_first_token_seconds",
                    "From the request's arrival at the router to its first token.",
                    &[],
                    LATENCY_BUCKETS,
                )
                .with(&[]),
            itl: r
                .histogram(
                    "sluice_inter_token_latency_seconds",
                    "Between consecutive tokens of one request.",
                    &[],
                    LATENCY_BUCKETS,
                )
                .with(&[]),
            e2e: r
                .histogram(
                    "sluice_request_duration_seconds",
                    "From a request's arrival to its last token (admitted requests).",
                    &[],
                    LATENCY_BUCKETS,
                )
                .with(&[]),
            requests: r.counter(
                "sluice_requests_total",
                "Requests by outcome: stop, length, eos, cancelled, invalid, unauthenticated, overloaded, unavailable, deadline, error.",
                &["outcome"],
            ),
            migrations: r.counter(
                "sluice_router_migrations_total",
                "Requests moved to other workers after an attempt failed, by reason: prefill_unreachable, prefill_failed, prefill_refused (before the first token: paired again), decode_unreachable, decode_failed, decode_refused, decode_stalled, decode_stream_ended (after it: migrated).",
                &["reason"],
            ),
            ejections: r.counter(
                "sluice_router_worker_ejections_total",
                "Workers taken out of routing (connection failure, consecutive failures, load polls that cannot connect), by role.",
                &["role"],
            ),
            queue_depth: r
                .gauge(
                    "sluice_queue_depth",
                    "Requests waiting in the router's admission queue.",
                    &[],
                )
                .with(&[]),
            in_flight: r
                .gauge(
                    "sluice_requests_in_flight",
                    "Requests admitted and running.",
                    &[],
                )
                .with(&[]),
            admission_limit: r
                .gauge(
                    "sluice_router_admission_limit",
                    "Requests the router lets run at once: --max-in-flight, or the slots and waiting room the decode workers report.",
                    &[],
                )
                .with(&[]),
            estimated_start: r
                .histogram(
                    "sluice_router_estimated_start_seconds",
                    "Admission's estimate of when each request would start (first token out and its decode worker stepping it), from the workers' load reports.",
                    &[],
                    LATENCY_BUCKETS,
                )
                .with(&[]),
            refusals: r.counter(
                "sluice_router_refusals_total",
                "Requests refused for load, by reason: estimate (the queues would make it miss its targets or deadline), limit (in-flight limit and queue full), shed (queued past its time-to-first-token budget), key_limit (its API key over its in_flight or rps).",
                &["reason"],
            ),
            authenticated: r.counter(
                "sluice_router_authenticated_requests_total",
                "Public requests that presented a valid API key, by key id (with --api-keys-file or SLUICE_API_KEYS; the unauthenticated are sluice_requests_total{outcome=\"unauthenticated\"}).",
                &["key"],
            ),
            prompt_tokens: r
                .counter("sluice_prompt_tokens_total", "Prompt tokens of admitted requests.", &[])
                .with(&[]),
            generated_tokens: r
                .counter("sluice_generated_tokens_total", "Tokens sent to clients.", &[])
                .with(&[]),
        }
    }

    pub fn outcome(&self, outcome: &str) {
        self.requests.with(&[outcome]).inc();
    }

    pub fn refused(&self, reason: &str) {
        self.refusals.with(&[reason]).inc();
    }

    pub fn authenticated(&self, key: &str) {
        self.authenticated.with(&[key]).inc();
    }

    pub fn migrated(&self, reason: &str) {
        self.migrations.with(&[reason]).inc();
    }

    pub fn ejected(&self, role: &str) {
        self.ejections.with(&[role]).inc();
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}
