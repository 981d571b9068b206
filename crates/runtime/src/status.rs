//! What every worker reports about itself: load counters behind `WorkerStatus.Load`, its
//! health, and its lease state as a metric.
//!
//! Health never follows the lease: a worker whose lease is lost (etcd unreachable, or a late
//! keep-alive) goes on serving whatever the routers send it — they route on the membership
//! they last saw — while its keeper re-registers. Liveness (the server's overall status) is
//! the process and its engine being alive (a dead engine thread stops the process);
//! readiness (the role's own services) turns NOT_SERVING only when the worker drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::worker_status_server::WorkerStatus;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use tokio_util::sync::CancellationToken;

use crate::estimate::CostModel;
use crate::membership::Registration;
use std::time::Duration;

/// Updated by the worker's engine thread (and its service, as requests queue), read by
/// `Load`. The seconds are `f64` bits.
#[derive(Debug, Default)]
pub struct LoadCounters {
    pub running: AtomicU32,
    pub waiting: AtomicU32,
    pub kv_blocks_used: AtomicU32,
    pub kv_blocks_total: AtomicU32,
    /// Fixed for the worker's life: what admission reads besides the live counts.
    pub limits: WorkerLimits,
    pub queued_tokens: AtomicU64,
    start_delay: AtomicU64,
    step_fixed: AtomicU64,
    step_token: AtomicU64,
}

/// A worker's batch shape and queue bound, as its load report tells the routers.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerLimits {
    pub capacity: usize,
    pub max_waiting: usize,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
}

impl LoadCounters {
    pub fn new(limits: WorkerLimits) -> Self {
        LoadCounters {
            limits,
            ..LoadCounters::default()
        }
    }

    pub fn set(counter: &AtomicU32, value: usize) {
        counter.store(value.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    }

    /// The worker's estimate of how long a request arriving now waits to start.
    pub fn set_start_delay(&self, delay: Duration) {
        self.start_delay
            .store(delay.as_secs_f64().to_bits(), Ordering::Relaxed);
    }

    pub fn start_delay(&self) -> Duration {
        Duration::try_from_secs_f64(f64::from_bits(self.start_delay.load(Ordering::Relaxed)))
            .unwrap_or_default()
    }

    pub fn set_step_cost(&self, cost: CostModel) {
        self.step_fixed
            .store(cost.fixed.to_bits(), Ordering::Relaxed);
        self.step_token
            .store(cost.per_token.to_bits(), Ordering::Relaxed);
    }

    pub fn step_cost(&self) -> CostModel {
        CostModel {
            fixed: f64::from_bits(self.step_fixed.load(Ordering::Relaxed)),
            per_token: f64::from_bits(self.step_token.load(Ordering::Relaxed)),
        }
    }
}

pub struct WorkerStatusService {
    worker_id: String,
    counters: Arc<LoadCounters>,
    registration: Registration,
    /// Extra waiting work counted outside the engine (e.g. caches staged in the inbox).
    extra_waiting: Option<Box<dyn Fn() -> usize + Send + Sync>>,
}

impl WorkerStatusService {
    pub fn new(worker_id: String, counters: Arc<LoadCounters>, registration: Registration) -> Self {
        WorkerStatusService {
            worker_id,
            counters,
            registration,
            extra_waiting: None,
        }
    }

    pub fn with_extra_waiting(mut self, f: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.extra_waiting = Some(Box::new(f));
        self
    }
}

#[tonic::async_trait]
impl WorkerStatus for WorkerStatusService {
    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        let c = &self.counters;
        let extra = self.extra_waiting.as_ref().map_or(0, |f| f()) as u32;
        let cost = c.step_cost();
        let u32_of = |v: usize| v.min(u32::MAX as usize) as u32;
        Ok(Response::new(pb::LoadReport {
            worker_id: self.worker_id.clone(),
            running: c.running.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed) + extra,
            kv_blocks_used: c.kv_blocks_used.load(Ordering::Relaxed),
            kv_blocks_total: c.kv_blocks_total.load(Ordering::Relaxed),
            registered: self.registration.is_registered(),
            capacity: u32_of(c.limits.capacity),
            max_waiting: u32_of(c.limits.max_waiting),
            start_delay_seconds: c.start_delay().as_secs_f64(),
            step_fixed_seconds: cost.fixed,
            step_token_seconds: cost.per_token,
            queued_tokens: c.queued_tokens.load(Ordering::Relaxed),
            max_batch_tokens: u32_of(c.limits.max_batch_tokens),
            prefill_chunk: u32_of(c.limits.prefill_chunk),
        }))
    }
}

/// Health of the server (`""`: liveness) and of `services` (readiness): SERVING from now
/// on; `services` turn NOT_SERVING once `draining` is cancelled. Also publishes the lease
/// state of `worker` (`sluice_lease_registered`, `sluice_lease_losses_total`).
pub fn report_health(
    reporter: HealthReporter,
    mut registration: Registration,
    services: Vec<&'static str>,
    worker: &str,
    draining: CancellationToken,
) {
    let r = crate::metrics::registry();
    let registered = r
        .gauge(
            "sluice_lease_registered",
            "1 while the worker's membership lease is held, 0 while it is lost and being renewed (the worker serves on either way).",
            &["worker"],
        )
        .with(&[worker]);
    let losses = r
        .counter(
            "sluice_lease_losses_total",
            "Times the worker's membership lease was lost (etcd unreachable or a late keep-alive) and re-registered.",
            &["worker"],
        )
        .with(&[worker]);
    tokio::spawn(async move {
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        for s in &services {
            reporter
                .set_service_status(*s, ServingStatus::Serving)
                .await;
        }
        let mut counted = 0;
        loop {
            registered.set(if registration.is_registered() {
                1.0
            } else {
                0.0
            });
            let lost = registration.losses();
            losses.add((lost - counted) as f64);
            counted = lost;
            tokio::select! {
                _ = registration.changed(), if registration.has_sender() => {}
                () = draining.cancelled() => break,
            }
        }
        for s in &services {
            reporter
                .set_service_status(*s, ServingStatus::NotServing)
                .await;
        }
    });
}
