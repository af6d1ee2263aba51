//! One server span, one access-log line and the request metrics per request; and the
//! `correlation-id` echo, which belongs to the same per-request bookkeeping.
//!
//! The span continues the caller's W3C trace (`traceparent`/`tracestate`) and carries the
//! route template, the status and the task-instance id: never the token or the value.

use std::future::Future;
use std::sync::{OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, Method};
use axum::response::Response;
use metrics::{Counter, Gauge, Histogram};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// The task-instance id of a `/ti/{task_instance_id}` route, as sent.
fn task_instance_of(path: &str) -> Option<&str> {
    let mut segments = path.split('/');
    segments.by_ref().find(|segment| *segment == "ti")?;
    segments.next().filter(|id| !id.is_empty())
}

/// The trace id to log: the exported span's.
fn trace_id(span: &tracing::Span, headers: &HeaderMap) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        return Some(span_context.trace_id().to_string());
    }
    caller_trace_id(headers)
}

/// The caller's trace id from its `traceparent`, when nothing is exported (then no span
/// context exists locally).
fn caller_trace_id(headers: &HeaderMap) -> Option<String> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// Methods as static labels (bounded cardinality, no allocation per request).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// A response no operation of the route table produced (the method-not-allowed fallback):
/// its request is labelled `unmatched`, like one whose path matched nothing.
#[derive(Clone, Copy)]
pub struct Unrouted;

/// The status label: the codes the gateway answers with, each its own; any other (a
/// forwarded upstream's) only as its class, so the label has a fixed set of values.
fn status_label(status: u16) -> &'static str {
    const ANSWERED: &[(u16, &str)] = &[
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (406, "406"),
        (409, "409"),
        (412, "412"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    match ANSWERED.iter().find(|(code, _)| *code == status) {
        Some((_, label)) => label,
        None => CLASSES[usize::from(status / 100).clamp(1, 5) - 1],
    }
}

#[cfg(test)]
#[test]
fn status_labels_are_a_fixed_set() {
    assert_eq!(status_label(412), "412");
    assert_eq!(status_label(418), "4xx");
    assert_eq!(status_label(207), "2xx");
    assert_eq!(status_label(599), "5xx");
    assert_eq!(status_label(999), "5xx");
}

// foldhash, not SipHash: the keys are our own route templates and labels, looked up on
// every request.
type RouteHandles = foldhash::HashMap<(&'static str, &'static str), (Counter, Histogram)>;

/// The request counter of one (route, method, status) and the latency histogram of one
/// (route, method), registered once: looking them up by labels on every request cost
/// measurable throughput. The histogram has no status label: its fourteen series per label
/// set multiplied by every status were most of a replica's series.
fn request_handles(route: &str, method: &'static str, status: u16) -> (Counter, Histogram) {
    static HANDLES: OnceLock<RwLock<foldhash::HashMap<String, RouteHandles>>> = OnceLock::new();
    let handles = HANDLES.get_or_init(Default::default);
    let status = status_label(status);
    if let Some(found) = handles
        .read()
        .unwrap()
        .get(route)
        .and_then(|by_status| by_status.get(&(method, status)))
    {
        return found.clone();
    }
    let created = (
        metrics::counter!(
            "airstate_http_requests_total",
            "method" => method,
            "route" => route.to_owned(),
            "status" => status,
        ),
        metrics::histogram!(
            "airstate_http_request_duration_seconds",
            "method" => method,
            "route" => route.to_owned(),
        ),
    );
    handles
        .write()
        .unwrap()
        .entry(route.to_owned())
        .or_default()
        .insert((method, status), created.clone());
    created
}

fn in_flight() -> &'static Gauge {
    static IN_FLIGHT: OnceLock<Gauge> = OnceLock::new();
    IN_FLIGHT.get_or_init(|| metrics::gauge!("airstate_http_requests_in_flight"))
}

const CORRELATION_ID: HeaderName = HeaderName::from_static("correlation-id");

pub async fn observe<F, Fut>(matched: Option<&MatchedPath>, request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let route = matched.map(MatchedPath::as_str).unwrap_or("unmatched");
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        http.response.status_code = Empty,
        otel.status_code = Empty,
        task_instance_id = Empty,
    );
    let exported = crate::telemetry::traces_exported();
    if exported {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);
    }
    if !span.is_disabled() {
        if let Some(ti) = task_instance_of(request.uri().path()) {
            span.record("task_instance_id", ti);
        }
    }
    let correlation_id = request.headers().get(&CORRELATION_ID).cloned();
    let trace = if exported {
        trace_id(&span, request.headers())
    } else {
        caller_trace_id(request.headers())
    };

    in_flight().increment(1.0);
    let mut response = next(request).instrument(span.clone()).await;
    in_flight().decrement(1.0);
    // Echoed as Airflow does, so a worker can match its logs with ours.
    if let Some(id) = correlation_id {
        response.headers_mut().insert(CORRELATION_ID, id);
    }

    // Forwarded requests have no route template; one label keeps the series bounded.
    let route = if response
        .extensions()
        .get::<super::forward::Forwarded>()
        .is_some()
    {
        span.record("otel.name", format!("{method} forwarded"));
        span.record("http.route", "forwarded");
        "forwarded"
    } else if response.extensions().get::<Unrouted>().is_some() {
        "unmatched"
    } else {
        route
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let (requests, latency) = request_handles(route, method, status);
    requests.increment(1);
    latency.record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            target: "airstate::access",
            method,
            route,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            trace_id = trace.as_deref().unwrap_or(""),
            "request"
        )
    });
    response
}

#[cfg(test)]
mod tests {
    use super::task_instance_of;

    #[test]
    fn task_instance_from_paths() {
        assert_eq!(task_instance_of("/execution/store/ti/abc/k/x"), Some("abc"));
        assert_eq!(task_instance_of("/execution/state/ti/abc"), Some("abc"));
        assert_eq!(
            task_instance_of("/execution/store/asset/by-name/value"),
            None
        );
    }
}
