//! The decode worker's Prometheus series (labelled with its worker id).

use std::sync::Arc;

use sluice_runtime::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, WorkerGauges, registry};

pub struct DecodeMetrics {
    load: WorkerGauges,
    kv_used: Arc<Gauge>,
    kv_total: Arc<Gauge>,
    tokens: Arc<Counter>,
    tokens_per_second: Arc<Gauge>,
    step_seconds: Arc<Histogram>,
    pub preemptions: Arc<Counter>,
}

impl DecodeMetrics {
    pub fn new(worker: &str) -> Self {
        let r = registry();
        let l = &["worker"];
        DecodeMetrics {
            load: WorkerGauges::new("decode", worker),
            kv_used: r
                .gauge("sluice_kv_blocks_used", "KV blocks held by sequences.", l)
                .with(&[worker]),
            kv_total: r
                .gauge("sluice_kv_blocks_total", "KV blocks in the worker's pool.", l)
                .with(&[worker]),
            tokens: r
                .counter(
                    "sluice_decode_tokens_total",
                    "Tokens computed by the decode worker (generated, and prompts prefilled or recomputed there).",
                    l,
                )
                .with(&[worker]),
            tokens_per_second: r
                .gauge(
                    "sluice_decode_tokens_per_second",
                    "Tokens per second of the decode worker's last step.",
                    l,
                )
                .with(&[worker]),
            step_seconds: r
                .histogram(
                    "sluice_decode_step_seconds",
                    "Duration of one decode step (one forward over the running batch).",
                    l,
                    LATENCY_BUCKETS,
                )
                .with(&[worker]),
            preemptions: r
                .counter(
                    "sluice_preemptions_total",
                    "Sequences preempted for lack of KV blocks (later recomputed).",
                    l,
                )
                .with(&[worker]),
        }
    }

    pub fn publish(&self, running: usize, waiting: usize, kv_used: usize, kv_total: usize) {
        self.load.running.set(running as f64);
        self.load.waiting.set(waiting as f64);
        self.kv_used.set(kv_used as f64);
        self.kv_total.set(kv_total as f64);
    }

    pub fn step(&self, tokens: usize, seconds: f64) {
        self.tokens.add(tokens as f64);
        self.step_seconds.observe(seconds);
        if seconds > 0.0 {
            self.tokens_per_second.set(tokens as f64 / seconds);
        }
    }
}
