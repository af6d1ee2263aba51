//! Logs, traces and metrics.
//!
//! - Logs: JSON lines (the default off a terminal, as in a container) or text, filtered by
//!   `RUST_LOG`; one access line per request. Tokens and values are never logged.
//! - Traces: `tracing` spans, exported over OTLP (gRPC or HTTP/protobuf, chosen by the
//!   standard `OTEL_EXPORTER_OTLP_PROTOCOL`) only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//!   traces-specific variable) is set; `OTEL_SERVICE_NAME` and `OTEL_TRACES_SAMPLER` are
//!   honoured. With no endpoint nothing is exported and no span is built for export.
//! - Metrics: Prometheus text at `/metrics`, through the `metrics` facade.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static TRACES_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans leave the process; when not, requests skip trace-context extraction.
pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

struct HeaderInjector<'a>(&'a mut axum::http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(key.as_bytes()),
            axum::http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Puts the current span's W3C trace context into an outgoing request, so the next hop's
/// spans join our trace under it. When nothing is exported there is no local span to name:
/// the caller's own `traceparent` then passes on untouched.
pub fn inject_trace_context(headers: &mut axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !traces_exported() {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers))
    });
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn tracing_exported(&self) -> bool {
        self.provider.is_some()
    }

    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("airstate: flushing traces failed: {error}");
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    /// `AIRSTATE_LOG_FORMAT`, else JSON unless stderr is a terminal.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("AIRSTATE_LOG_FORMAT").ok().as_deref() {
            Some("json") => Ok(LogFormat::Json),
            Some("text") => Ok(LogFormat::Text),
            Some(other) => Err(format!(
                "AIRSTATE_LOG_FORMAT: expected json or text, got {other:?}"
            )),
            None if std::io::stderr().is_terminal() => Ok(LogFormat::Text),
            None => Ok(LogFormat::Json),
        }
    }
}

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs logging and, when configured, trace export. Must run inside a Tokio runtime
/// (the batch exporter runs on it). Later calls (tests) leave the first setup in place.
pub fn init(format: LogFormat) -> Telemetry {
    let provider = if otlp_configured() {
        match build_provider() {
            Ok(provider) => Some(provider),
            Err(error) => {
                eprintln!("airstate: OTLP trace export disabled: {error}");
                None
            }
        }
    } else {
        None
    };
    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(crate::config::default_value("RUST_LOG").unwrap_or_default())
    });
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(env_filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(env_filter)
            .boxed(),
    };
    // Traces have their own filter, so quiet logs (RUST_LOG=warn) still export spans.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("airstate"))
            .with_filter(Targets::new().with_target("airstate", LevelFilter::INFO))
    });
    if tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok()
        && provider.is_some()
    {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        TRACES_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Telemetry { provider }
}

fn build_provider() -> Result<SdkTracerProvider, String> {
    // Protocol, endpoint, headers and timeout come from the standard OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .map_err(|e| e.to_string())?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| crate::config::default_value("OTEL_SERVICE_NAME"))
        .unwrap_or_default();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Seconds; from 0.5 ms (a cached GET) to 2.5 s (well past any timeout).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; /metrics then stays empty.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples pile up in memory until drained into buckets; without a
        // scraper nothing else drains them (measured: 135 MiB RSS after ~1M requests).
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                upkeep.run_upkeep();
            })
            .expect("metrics upkeep thread");
        handle
    })
}
