//! What every worker reports about itself: load counters behind `WorkerStatus.Load`, its
//! health, and its lease state as a metric.
//!
//! Health never follows the lease: a worker whose lease is lost (etcd unreachable, or a late
//! keep-alive) goes on serving whatever the routers send it — they route on the membership
//! they last saw — while its keeper re-registers. Liveness (the server's overall status) is
//! the process and its engine being alive (a dead engine thread stops the process);
//! readiness (the role's own services) turns NOT_SERVING only when the worker drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::worker_status_server::WorkerStatus;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use tokio_util::sync::CancellationToken;

use crate::membership::Registration;

/// Updated by the worker's engine thread, read by `Load`.
#[derive(Debug, Default)]
pub struct LoadCounters {
    pub running: AtomicU32,
    pub waiting: AtomicU32,
    pub kv_blocks_used: AtomicU32,
    pub kv_blocks_total: AtomicU32,
}

impl LoadCounters {
    pub fn set(counter: &AtomicU32, value: usize) {
        counter.store(value.min(u32::MAX as usize) as u32, Ordering::Relaxed);
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
        Ok(Response::new(pb::LoadReport {
            worker_id: self.worker_id.clone(),
            running: c.running.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed) + extra,
            kv_blocks_used: c.kv_blocks_used.load(Ordering::Relaxed),
            kv_blocks_total: c.kv_blocks_total.load(Ordering::Relaxed),
            registered: self.registration.is_registered(),
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
