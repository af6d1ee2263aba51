//! One server span, one access-log line and the request metrics per request.
//!
//! The span continues the caller's W3C trace (`traceparent`/`tracestate`) and carries the
//! route template, the status and the task-instance id: never the token or the value.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
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

/// The trace id to log: the exported span's, or the caller's `traceparent` when nothing is
/// exported (then no span context exists locally).
fn trace_id(span: &tracing::Span, headers: &HeaderMap) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        return Some(span_context.trace_id().to_string());
    }
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

pub async fn observe(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = matched
        .as_ref()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched")
        .to_owned();
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = Empty,
        otel.status_code = Empty,
        task_instance_id = Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    if let Some(ti) = task_instance_of(request.uri().path()) {
        span.record("task_instance_id", ti);
    }
    let trace = trace_id(&span, request.headers());

    let in_flight = metrics::gauge!("airstate_http_requests_in_flight");
    in_flight.increment(1.0);
    let response = next.run(request).instrument(span.clone()).await;
    in_flight.decrement(1.0);

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let labels = [
        ("method", method.clone()),
        ("route", route.clone()),
        ("status", status.to_string()),
    ];
    metrics::counter!("airstate_http_requests_total", &labels).increment(1);
    metrics::histogram!("airstate_http_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            target: "airstate::access",
            method = %method,
            route = %route,
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
