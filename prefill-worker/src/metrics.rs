//! The prefill worker's Prometheus series (labelled with its worker id).

use std::sync::Arc;

use sluice_runtime::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, WorkerGauges, registry};

pub struct PrefillMetrics {
    pub load: WorkerGauges,
    tokens: Arc<Counter>,
    tokens_per_second: Arc<Gauge>,
    transfer_bytes: Arc<Counter>,
    transfer_seconds: Arc<Histogram>,
    /// Prompts shed unrun (their queue budget passed).
    pub shed: Arc<Counter>,
}

impl PrefillMetrics {
    pub fn new(worker: &str) -> Self {
        let r = registry();
        let l = &["worker"];
        PrefillMetrics {
            load: WorkerGauges::new("prefill", worker),
            tokens: r
                .counter("sluice_prefill_tokens_total", "Prompt tokens prefilled.", l)
                .with(&[worker]),
            tokens_per_second: r
                .gauge(
                    "sluice_prefill_tokens_per_second",
                    "Prompt tokens per second of the prefill worker's last step.",
                    l,
                )
                .with(&[worker]),
            transfer_bytes: r
                .counter(
                    "sluice_cache_transfer_bytes_total",
                    "Cache bytes pushed to decode workers.",
                    l,
                )
                .with(&[worker]),
            transfer_seconds: r
                .histogram(
                    "sluice_cache_transfer_seconds",
                    "Duration of one cache push to a decode worker.",
                    l,
                    LATENCY_BUCKETS,
                )
                .with(&[worker]),
            shed: r
                .counter(
                    "sluice_prefill_shed_total",
                    "Prompts shed unrun: they waited in the queue past the router's time-to-first-token budget.",
                    l,
                )
                .with(&[worker]),
        }
    }

    pub fn step(&self, tokens: usize, seconds: f64) {
        self.tokens.add(tokens as f64);
        if seconds > 0.0 {
            self.tokens_per_second.set(tokens as f64 / seconds);
        }
    }

    pub fn transferred(&self, bytes: u64, seconds: f64) {
        self.transfer_bytes.add(bytes as f64);
        self.transfer_seconds.observe(seconds);
    }
}
