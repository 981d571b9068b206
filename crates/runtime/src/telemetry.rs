//! Logs and traces with `tracing`: filter from `RUST_LOG` (default `info`), text or JSON lines
//! on stderr, and optionally every span exported with OTLP/gRPC (`--otlp-endpoint`).
//!
//! A request's spans in different processes join one trace: the router puts a W3C
//! `traceparent` in the metadata of its calls to workers ([`traced`]) and the workers make
//! their request span its child ([`continue_trace`]).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::error::{Result, RuntimeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging and tracing flags every binary takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TelemetryArgs {
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export spans with OTLP over gRPC to this collector (e.g. `http://otel-collector:4317`).
    /// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are honoured.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Flushes and stops the span export when dropped: keep it until the service has stopped,
/// and drop it while the Tokio runtime it was made in still runs.
#[must_use = "spans are exported only while this lives"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("OTLP export did not shut down cleanly: {e}");
        }
    }
}

/// Installs the global subscriber (a second call keeps the first). With an OTLP endpoint it
/// must run inside a Tokio runtime: the exporter's connection and every export live on it.
pub fn init(args: &TelemetryArgs, service: &str) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = match &args.otlp_endpoint {
        Some(endpoint) => Some(otlp_provider(endpoint, service)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        // The exporter's own gRPC client must not trace itself into a feedback loop.
        let own = |target: &str| {
            ["h2", "hyper", "tonic", "tower", "opentelemetry"]
                .iter()
                .any(|p| target.starts_with(p))
        };
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sluice"))
            .with_filter(filter_fn(move |m| !own(m.target())))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init();
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(%endpoint, "exporting spans with OTLP");
    }
    Ok(Telemetry { provider })
}

fn otlp_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        RuntimeError::Internal("OTLP export must be set up inside the Tokio runtime".into())
    })?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| RuntimeError::invalid("otlp-endpoint", e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            exporter: Arc::new(exporter),
            runtime,
        })
        .with_resource(resource.build())
        .build())
}

/// Runs an exporter's calls on the service's Tokio runtime. The SDK's batch processor exports
/// from a thread of its own, where tonic (which needs a Tokio reactor) cannot run.
#[derive(Debug)]
struct OnRuntime<E> {
    exporter: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = self.exporter.clone();
        self.runtime
            .spawn(async move { exporter.export(batch).await })
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("export task: {e}")))?
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // The provider sets it once, before any export shares the exporter.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}

/// `message` as a request whose metadata carries the current span's trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let context = tracing::Span::current().context();
    TraceContextPropagator::new()
        .inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    request
}

/// Makes `span` a child of the trace context in `metadata`, when the caller sent one.
pub fn continue_trace(span: &tracing::Span, metadata: &MetadataMap) {
    let context = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    // Without an OTLP layer there is nothing to attach to; that is not an error.
    let _ = span.set_parent(context);
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_metadata() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", parent.parse().unwrap());
        let propagator = TraceContextPropagator::new();
        let context = propagator.extract(&MetadataExtractor(&metadata));
        let mut out = MetadataMap::new();
        propagator.inject_context(&context, &mut MetadataInjector(&mut out));
        assert_eq!(out.get("traceparent").unwrap(), parent);
    }

    #[test]
    fn without_a_span_nothing_is_injected() {
        let request = traced(());
        assert!(request.metadata().get("traceparent").is_none());
    }
}
