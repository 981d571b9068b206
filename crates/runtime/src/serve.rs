//! gRPC serving plumbing shared by every service: health and reflection (v1 and v1alpha, for
//! grpcurl and ghz) on every server, lazy client channels, and the `grpc-timeout` deadline.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::server::HealthReporter;

use crate::error::{Result, RuntimeError};

/// Routes every Sluice server starts from: `grpc.health.v1.Health` and server reflection.
pub fn standard_routes() -> Result<(HealthReporter, Routes)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| RuntimeError::Internal(format!("reflection: {e}")))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| RuntimeError::Internal(format!("reflection: {e}")))?;
    let routes = Routes::new(health).add_service(v1).add_service(v1alpha);
    Ok((reporter, routes))
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| RuntimeError::Connect {
            address: addr.to_string(),
            message: format!("cannot listen: {e}"),
        })
}

/// The address other processes reach `local` at: `advertise` when given, else `local` (with
/// 127.0.0.1 in place of an unspecified address).
pub fn advertised_address(local: SocketAddr, advertise: Option<&str>) -> String {
    match advertise {
        Some(a) if a.starts_with("http://") || a.starts_with("https://") => a.to_string(),
        Some(a) => format!("http://{a}"),
        None if local.ip().is_unspecified() => format!("http://127.0.0.1:{}", local.port()),
        None => format!("http://{local}"),
    }
}

/// Serves `routes` on `listener` until `shutdown`, letting calls in flight finish.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
) -> Result<()> {
    // The builder's `tcp_nodelay` applies only to sockets tonic accepts itself; without it,
    // Nagle's algorithm and delayed ACKs hold streamed tokens back for ~40 ms.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| RuntimeError::Internal(format!("gRPC server: {e}")))
}

/// As [`serve`], for a worker that drains: once `shutdown` is cancelled it takes no new call
/// (its lease, revoked on the same token, has taken it out of routing) and finishes the calls
/// in flight for up to `drain`; whatever is still running then is cut off, and the router
/// migrates those requests.
pub async fn serve_draining(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<()> {
    let server = serve(listener, routes, shutdown.clone());
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        () = shutdown.cancelled() => {}
    }
    tracing::info!(?drain, "draining: finishing the calls in flight");
    match tokio::time::timeout(drain, &mut server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                ?drain,
                "drain timeout: cutting off the calls still in flight"
            );
            Ok(())
        }
    }
}

/// A channel that connects on first use and reconnects after failures.
pub fn connect_lazy(address: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|e| RuntimeError::Connect {
            address: address.to_string(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // A peer that vanishes without closing its socket is noticed within seconds.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// The deadline a gRPC client set (`grpc-timeout` header), if any.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut m = MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (v, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("7u", Duration::from_micros(7)),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(d), "{v}");
        }
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }

    #[test]
    fn advertises_a_reachable_address() {
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(advertised_address(any, None), "http://127.0.0.1:7000");
        assert_eq!(
            advertised_address(any, Some("10.1.2.3:7000")),
            "http://10.1.2.3:7000"
        );
        let lo: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(advertised_address(lo, None), "http://127.0.0.1:9");
    }
}
