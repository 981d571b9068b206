//! What every worker reports about itself: load counters behind `WorkerStatus.Load`, and its
//! health following its membership registration (not serving while the lease is lost).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::worker_status_server::WorkerStatus;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::error::RuntimeError;
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

/// Refuses work while the registration is lost.
pub fn ensure_registered(registration: &Registration) -> Result<(), Status> {
    if registration.is_registered() {
        Ok(())
    } else {
        Err(RuntimeError::NotRegistered.into())
    }
}

/// Keeps the health of `services` (and the server as a whole) in step with the registration.
pub fn follow_registration(
    reporter: HealthReporter,
    mut registration: Registration,
    services: Vec<&'static str>,
) {
    tokio::spawn(async move {
        let mut registered = registration.is_registered();
        loop {
            let status = if registered {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            for s in &services {
                reporter.set_service_status(*s, status).await;
            }
            let next = registration.changed().await;
            // The keeper is gone once the worker has shut down: nothing will change any more.
            if next == registered && !registration.has_sender() {
                return;
            }
            registered = next;
        }
    });
}
