//! Logs, traces and metrics. Logs go to stdout as text or JSON, filtered by
//! `RUST_LOG` (default `info`). Traces are exported over OTLP/gRPC when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Metrics are served for
//! Prometheus when `--metrics-listen` is set.

use std::io::IsTerminal;
use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Without `RUST_LOG`: our own info lines, and only errors from the Redis
/// client, which logs a warning per failed call (thousands a second during an
/// outage the node already reports once).
const DEFAULT_FILTER: &str = "info,redis=error";

/// Keeps the trace exporter alive; dropping it flushes pending spans.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("presence-server: flushing traces failed: {error}");
        }
    }
}

pub fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let tracer_provider = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => Some(otlp_tracer_provider()?),
        None => None,
    };
    let otel = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("presence-server"))
    });
    // Colours only on a terminal: escape codes in a log file or a log
    // collector are noise.
    let colours = std::io::stdout().is_terminal();
    let (text, json) = match format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_ansi(colours)),
            None,
        ),
        LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().json())),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()?;
    Ok(Telemetry { tracer_provider })
}

/// The exporter reads the endpoint and headers from the standard OTEL_*
/// environment variables.
fn otlp_tracer_provider() -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("presence-server")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Serves `/metrics` for Prometheus on `addr`.
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    crate::metrics::describe();
    Ok(())
}
