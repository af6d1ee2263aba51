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
use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter, Targets};
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
        LogFormat::Json => {
            // JSON lines carry no span context, so this layer has no use for spans unless
            // a directive selects by span (`[request]=debug`). Without spans here, and
            // with no exporter, no span is built at all: the request's, `auth.jwt`, the
            // store's. Building and entering them was most of what `info` cost a request.
            let by_span = env_filter.to_string().contains('[');
            // No level of its own: without the hint the layers' combined hint is none,
            // and every `log` record and `debug!` would be offered to the filters.
            let events_only = filter_fn(move |meta| by_span || meta.is_event())
                .with_max_level_hint(LevelFilter::TRACE);
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(std::io::stderr)
                .with_filter(env_filter.and(events_only))
                .boxed()
        }
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

/// Every metric airstate records, with its HELP text (a test checks the sources name no
/// other). Registered with the recorder, so each exposition carries `# HELP` lines.
pub const METRICS: &[(&str, &str)] = &[
    ("airstate_build_info", "Always 1; the version and git commit of this binary as labels"),
    ("airstate_http_requests_total", "HTTP requests answered, by route template, method and status"),
    ("airstate_http_request_duration_seconds", "Time from request to response headers, by route template and method"),
    ("airstate_http_requests_in_flight", "HTTP requests being answered now"),
    ("airstate_jwt_failures_total", "Requests refused for their token, by reason"),
    ("airstate_admin_auth_failures_total", "Admin API requests refused for their bearer token"),
    ("airstate_identity_cache_total", "Identity look-ups, by kind and whether the cache answered (hit) or the metastore was asked (miss)"),
    ("airstate_asset_registration_denied_total", "Asset requests refused because the task does not declare the asset"),
    ("airstate_core_api_access_total", "Core REST API access decisions, by result"),
    ("airstate_forward_errors_total", "Requests forwarded to Airflow's API server that failed, by kind"),
    ("airstate_change_streams", "Change streams open now"),
    ("airstate_change_streams_lagged_total", "Change streams ended because their watcher fell behind"),
    ("airstate_change_stream_events_missed_total", "Change events lagged streams missed (where known)"),
    ("airstate_redis_command_duration_seconds", "Redis command and script latency, by command"),
    ("airstate_redis_errors_total", "Failed Redis commands, by command and kind"),
    ("airstate_redis_retries_total", "Redis commands retried after a connection error, by command"),
    ("airstate_redis_unconfirmed_writes_total", "Writes WAIT did not confirm on enough replicas in time"),
    ("airstate_metastore_query_duration_seconds", "Metastore statement latency including the pool wait, by outcome"),
    ("airstate_metastore_errors_total", "Failed metastore statements and pings, by kind (pool, query, timeout)"),
    ("airstate_metastore_pool_connections", "Connections the metastore pool holds"),
    ("airstate_metastore_pool_idle_connections", "Metastore pool connections not in use"),
    ("airstate_metastore_pool_max_connections", "Most connections the metastore pool may hold (AIRSTATE_METASTORE_POOL_SIZE)"),
    ("airstate_metastore_pool_waiting", "Requests waiting for a metastore connection"),
    ("airstate_reconcile_passes_total", "Lifecycle reconcile passes, by outcome"),
    ("airstate_reconcile_reclaimed_total", "State reclaimed by reconcile passes, by kind"),
    ("airstate_reconcile_pass_duration_seconds", "Duration of lifecycle reconcile passes"),
    ("airstate_change_streams_cut_total", "Change streams ended because their watcher's buffer passed AIRSTATE_CHANGE_STREAM_BUFFER_BYTES"),
    ("airstate_sweep_schedule_failures_total", "Acknowledged writes whose scope could not be put in the sweep index"),
    ("airstate_reclaim_schedule_failures_total", "Acknowledged clear-alls whose task could not be put in the reclaim index"),
    ("airstate_reclaim_pending", "Clear-alls whose stale map indices the sweeper has not reclaimed yet, as its last pass counted (absent before the first pass)"),
    ("airstate_connections_open", "Client connections open now"),
    ("airstate_connections_rejected_total", "Client connections closed at once because AIRSTATE_MAX_CONNECTIONS were open, or the descriptor limit was reached"),
    ("airstate_connections_timed_out_total", "Client connections closed at the header read or idle timeout"),
    ("airstate_dependency_up", "1 when the dependency (redis, metastore) answered this replica's last readiness check, else 0"),
    ("airstate_requests_shed_total", "Requests answered 503 at once because this replica was at a limit, by reason (requests, body_bytes)"),
];

/// The `reason` label values of `airstate_jwt_failures_total`.
pub const JWT_FAILURE_REASONS: &[&str] = &[
    "missing",
    "invalid",
    "claim",
    "unknown_kid",
    "token_type",
    "subject",
];

/// The git commit the binary was built from (`build.rs`), or `unknown` (also when a build,
/// such as an image's, leaves `build.rs` out).
pub const COMMIT: &str = match option_env!("BUILD_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

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
        for (name, help) in METRICS {
            // The kind is the exporter's to tell from what is recorded; HELP is kind-free.
            metrics::describe_counter!(*name, *help);
        }
        metrics::gauge!(
            "airstate_build_info",
            "version" => env!("CARGO_PKG_VERSION"),
            "commit" => COMMIT,
        )
        .set(1.0);
        // Series without labels, and labels whose values are all known, start at zero: a
        // rate() over an absent series is no 0 but nothing, and an alert on it never fires.
        for name in [
            "airstate_admin_auth_failures_total",
            "airstate_asset_registration_denied_total",
            "airstate_change_streams_lagged_total",
            "airstate_change_stream_events_missed_total",
            "airstate_redis_unconfirmed_writes_total",
            "airstate_connections_rejected_total",
            "airstate_connections_timed_out_total",
            "airstate_change_streams_cut_total",
            "airstate_sweep_schedule_failures_total",
            "airstate_reclaim_schedule_failures_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        for reason in ["requests", "body_bytes"] {
            metrics::counter!("airstate_requests_shed_total", "reason" => reason).increment(0);
        }
        metrics::gauge!("airstate_change_streams").increment(0.0);
        metrics::gauge!("airstate_connections_open").increment(0.0);
        for reason in JWT_FAILURE_REASONS {
            metrics::counter!("airstate_jwt_failures_total", "reason" => *reason).increment(0);
        }
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

/// Prometheus' standard process metrics, read from `/proc` at each scrape (empty elsewhere).
pub fn process_metrics() -> String {
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    // The kernel reports CPU times in USER_HZ ticks: 100 a second on every Linux ABI.
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    if let (Some(user), Some(system)) = (field(14), field(15)) {
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (user + system) / TICKS,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<f64>().ok());
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / TICKS,
        );
    }
    if let Some(threads) = field(20) {
        metric(
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            threads,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.trim().strip_suffix("kB")?;
            value.trim().parse::<f64>().ok().map(|kib| kib * 1024.0)
        })
    };
    if let Some(rss) = kib("VmRSS:") {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        );
    }
    if let Some(virtual_bytes) = kib("VmSize:") {
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            virtual_bytes,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let max_fds = limits.lines().find_map(|line| {
        line.strip_prefix("Max open files")?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    });
    if let Some(max_fds) = max_fds {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        );
    }
    text
}
