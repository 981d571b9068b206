//! Process set-up shared by the service binaries.

use tokio_util::sync::CancellationToken;

use crate::error::{Result, RuntimeError};

/// Sizes the kernels' thread pool (default: one thread per core).
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
    sluice_engine::backend::cpu::set_threads(n)
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
