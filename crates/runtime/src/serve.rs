//! gRPC serving plumbing shared by every service: health and reflection (v1 and v1alpha, for
//! grpcurl and ghz, listing what that server serves) on every server, lazy client channels, and the `grpc-timeout` deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::Request;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::server::HealthReporter;
use tonic_reflection::server::v1::ServerReflectionServer;
use tonic_reflection::server::v1alpha;

use crate::error::{Result, RuntimeError};

/// One server's gRPC routes, which remember what they serve so that reflection lists exactly
/// that: a client pointed at a worker must not find `sluice.v1.Inference` there and get
/// UNIMPLEMENTED, and the router must not advertise the workers' internal services.
pub struct ServerRoutes {
    routes: Routes,
    services: Vec<&'static str>,
}

/// Routes every Sluice server starts from: `grpc.health.v1.Health`, with the reporter its
/// owner sets serving statuses through. Add the server's own services, then
/// [`ServerRoutes::finish`] adds reflection.
pub fn standard_routes() -> Result<(HealthReporter, ServerRoutes)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let routes = ServerRoutes {
        services: vec![service_name(&health)],
        routes: Routes::new(health),
    };
    Ok((reporter, routes))
}

fn service_name<S: NamedService>(_: &S) -> &'static str {
    S::NAME
}

impl ServerRoutes {
    /// Serves `service` and lists it in reflection.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.services.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// The services served so far, health included (reflection is added by `finish`).
    pub fn services(&self) -> &[&'static str] {
        &self.services
    }

    /// The routes with server reflection (v1 and v1alpha, for grpcurl and ghz), listing the
    /// services added, health, and reflection itself — or without it, when this process was
    /// started with `--no-reflection` ([`disable_reflection`]).
    pub fn finish(self) -> Result<Routes> {
        if REFLECTION_OFF.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(self.routes);
        }
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(<ServerReflectionServer<()> as NamedService>::NAME)
                .with_service_name(<v1alpha::ServerReflectionServer<()> as NamedService>::NAME);
            self.services
                .iter()
                .fold(builder, |builder, name| builder.with_service_name(*name))
        };
        let v1 = reflection()
            .build_v1()
            .map_err(|e| RuntimeError::Internal(format!("reflection: {e}")))?;
        let v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| RuntimeError::Internal(format!("reflection: {e}")))?;
        Ok(self.routes.add_service(v1).add_service(v1alpha))
    }
}

/// Set once at start-up: every server of the process then serves no reflection. A process
/// setting because `--no-reflection` is a property of the deployment, the same for every
/// server `sluice up` runs in one process.
static REFLECTION_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns server reflection off for every server this process starts from now on.
pub fn disable_reflection() {
    REFLECTION_OFF.store(true, std::sync::atomic::Ordering::Relaxed);
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
