//! Process set-up shared by the service binaries.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::error::{Result, RuntimeError};
use crate::telemetry::{self, TelemetryArgs};

/// A service binary's `main`: the loading thread pool, a multi-threaded runtime, logging and
/// tracing (`name` is the OTLP service name), then `service`; spans are flushed at the end.
pub fn run_service<T, E>(
    name: &str,
    telemetry: &TelemetryArgs,
    threads: Option<usize>,
    service: impl Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, E>
where
    E: From<RuntimeError> + From<std::io::Error>,
{
    configure_threads(threads)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let telemetry = {
        let _context = runtime.enter();
        telemetry::init(telemetry, name)?
    };
    let outcome = runtime.block_on(service);
    drop(telemetry);
    outcome
}

/// Sizes the thread pool that loading runs on (default: one thread per core); the kernels'
/// pool belongs to the backend, opened with the same `--threads`.
pub fn configure_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            return Err(RuntimeError::invalid("threads", "must be at least 1"));
        }
        rayon_pool(n)?;
    }
    Ok(())
}

fn rayon_pool(n: usize) -> Result<()> {
    sluice_engine::backend::cpu::set_load_threads(n)
        .map_err(|e| RuntimeError::Internal(format!("thread pool: {e}")))
}

/// Cancels `token` on Ctrl-C or SIGTERM (how Kubernetes stops a pod).
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot watch SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        token.cancel();
    });
}
