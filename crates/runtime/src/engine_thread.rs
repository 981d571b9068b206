//! A worker's engine runs on one OS thread. If that thread dies (a panic, a fatal error) the
//! worker must not stay registered and answer every call with an error: it leaves the cluster
//! and exits non-zero, and the streams of its requests end unfinished so the router migrates
//! them.

use std::thread::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::error::{Result, RuntimeError};

/// Watches an engine thread on behalf of a worker whose registration and server stop on
/// `worker`.
pub struct EngineWatch {
    fault: tokio::task::JoinHandle<Option<String>>,
}

impl EngineWatch {
    /// Waits for `engine` (named `what`, e.g. "decode engine") in the background; if it ends
    /// before `worker` is cancelled, cancels it: the lease is revoked, the server stops.
    pub fn start(what: &'static str, engine: JoinHandle<()>, worker: CancellationToken) -> Self {
        let fault = tokio::task::spawn_blocking(move || {
            let fault = match engine.join() {
                Ok(()) if worker.is_cancelled() => return None,
                Ok(()) => format!("the {what} thread stopped"),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    format!("the {what} thread panicked: {message}")
                }
            };
            tracing::error!("{fault}; leaving the cluster (its requests migrate)");
            worker.cancel();
            Some(fault)
        });
        EngineWatch { fault }
    }

    /// After the worker's server has stopped: an error if the engine's death stopped it, `Ok`
    /// if `shutdown` (the process's own stop) did.
    pub async fn outcome(self, shutdown: &CancellationToken) -> Result<()> {
        if shutdown.is_cancelled() {
            // Asked to stop: the engine ends once the last call holding its queue has gone.
            return Ok(());
        }
        match self.fault.await {
            Ok(Some(fault)) => Err(RuntimeError::Internal(fault)),
            _ => Ok(()),
        }
    }
}
