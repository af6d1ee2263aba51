//! Traces exported over OTLP (gRPC and HTTP/protobuf) to a real in-process receiver built
//! from OpenTelemetry's own protocol definitions; Prometheus metrics after known traffic;
//! JSON access logs. Tokens and values must appear in none of them.

use crate::common;
use crate::gateway;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Postgres, RedisServer, ServedBinary};
use gateway::{token_for, unique, Backend, Gateway, SECRET};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use uuid::Uuid;

/// Spans received, with the service name of the resource that sent them.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }

    fn of_trace(&self, trace_id: &[u8]) -> Vec<(String, Span)> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|(_, s)| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP receiver on a free port: gRPC (`TraceService/Export`) or HTTP (`POST /v1/traces`).
async fn receiver(grpc: bool) -> (Received, String) {
    let received = Received::default();
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    if grpc {
        let service = TraceServiceServer::new(received.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve(addr),
        );
    } else {
        let sink = received.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    sink.add(ExportTraceServiceRequest::decode(body).expect("OTLP protobuf"));
                    ExportTraceServiceResponse::default().encode_to_vec()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    (received, format!("http://127.0.0.1:{port}"))
}

fn serve(extra: &[(&str, &str)], stderr: Stdio) -> ServedBinary {
    let database = Postgres::shared().url.clone();
    let prefix = format!("{}:", unique("otel"));
    let mut env = vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", database.as_str()),
        ("AIRSTATE_REDIS_URL", RedisServer::shared().url.as_str()),
        ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
        ("RUST_LOG", "warn"),
    ];
    env.extend_from_slice(extra);
    ServedBinary::start(&env, stderr)
}

/// A task instance in the metastore, and its token.
async fn live_task() -> (Uuid, String) {
    let ti = Uuid::now_v7();
    Postgres::shared()
        .insert_task_instance(ti, &unique("dag"), &unique("run"), "t", -1)
        .await;
    (ti, token_for(ti))
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

async fn exports_a_continued_trace(grpc: bool) {
    let (received, endpoint) = receiver(grpc).await;
    let protocol = if grpc { "grpc" } else { "http/protobuf" };
    let served = serve(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_SERVICE_NAME", "airstate-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        Stdio::null(),
    );
    let (ti, token) = live_task().await;
    let secret_value = format!("value-{}", Uuid::new_v4().simple());
    let trace_id = Uuid::new_v4().simple().to_string();
    let caller_span = &Uuid::new_v4().simple().to_string()[..16];
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let http = reqwest::Client::new();
    let url = format!("{}/execution/store/ti/{ti}/job", served.base);
    let put = http
        .put(&url)
        .bearer_auth(&token)
        .header("traceparent", &traceparent)
        .header("tracestate", "vendor=opaque")
        .json(&json!({"value": secret_value}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let get = http
        .get(&url)
        .bearer_auth(&token)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);

    let trace_bytes = hex::decode(&trace_id).unwrap();
    let caller_bytes = hex::decode(caller_span).unwrap();
    let started = Instant::now();
    let spans = loop {
        let spans = received.of_trace(&trace_bytes);
        let servers = spans.iter().filter(|(_, s)| s.kind == 2).count();
        let redis = spans
            .iter()
            .filter(|(_, s)| attribute(s, "db.system").as_deref() == Some("redis"))
            .count();
        if servers >= 2 && redis >= 2 {
            break spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{protocol}: spans missing: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    print_tree(&spans);
    let route = "/execution/store/ti/{task_instance_id}/{*key}";
    let get_server = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.kind == 2 && s.name == format!("GET {route}"))
        .unwrap_or_else(|| panic!("{protocol}: no GET server span in {spans:#?}"));
    assert!(spans
        .iter()
        .all(|(service, _)| service == "airstate-under-test"));
    // The caller's trace continues: same trace id, the caller's span as parent.
    assert_eq!(get_server.parent_span_id, caller_bytes, "{protocol}");
    assert_eq!(attribute(get_server, "http.route").as_deref(), Some(route));
    assert_eq!(
        attribute(get_server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attribute(get_server, "task_instance_id"),
        Some(ti.to_string())
    );
    // Its children: JWT validation, identity resolution and the Redis call.
    let children: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.parent_span_id == get_server.span_id)
        .collect();
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    for expected in ["auth.jwt", "identity.task", "hget"] {
        assert!(
            names.contains(&expected),
            "{protocol}: {expected} not among {names:?}"
        );
    }
    let redis = children.iter().find(|s| s.name == "hget").unwrap();
    assert_eq!(attribute(redis, "db.system").as_deref(), Some("redis"));
    assert_eq!(redis.kind, 3, "client span");
    // The PUT ran the write script, and identity resolution queried the metastore once.
    assert!(spans.iter().any(|(_, s)| s.name == "task_write"));
    assert!(spans.iter().any(|(_, s)| s.name == "metastore.query"));
    // Nothing secret in any attribute.
    for (_, span) in &spans {
        for attr in &span.attributes {
            let text = format!("{:?}", attr.value);
            assert!(
                !text.contains(&token) && !text.contains(&secret_value),
                "{attr:?} leaks"
            );
        }
    }
}

/// The received trace as an indented tree (shown with `--nocapture`; the README's listing).
fn print_tree(spans: &[(String, Span)]) {
    fn walk(spans: &[(String, Span)], parent: &[u8], depth: usize) {
        let mut children: Vec<&Span> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.parent_span_id == parent)
            .collect();
        children.sort_by_key(|s| s.start_time_unix_nano);
        for span in children {
            let micros = span
                .end_time_unix_nano
                .saturating_sub(span.start_time_unix_nano)
                / 1000;
            let attrs: Vec<String> = span
                .attributes
                .iter()
                .filter(|a| {
                    !a.key.starts_with("code.")
                        && !a.key.starts_with("thread.")
                        && a.key != "target"
                        && a.key != "busy_ns"
                        && a.key != "idle_ns"
                })
                .map(|a| format!("{}={}", a.key, attribute(span, &a.key).unwrap_or_default()))
                .collect();
            println!(
                "{:indent$}{} ({micros} µs) {}",
                "",
                span.name,
                attrs.join(" "),
                indent = depth * 2
            );
            walk(spans, &span.span_id, depth + 1);
        }
    }
    let ids: Vec<Vec<u8>> = spans.iter().map(|(_, s)| s.span_id.clone()).collect();
    let roots: Vec<Vec<u8>> = spans
        .iter()
        .map(|(_, s)| s.parent_span_id.clone())
        .filter(|p| !ids.contains(p))
        .collect();
    for root in roots.iter().collect::<std::collections::BTreeSet<_>>() {
        println!("caller span {}", hex::encode(root));
        walk(spans, root, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_over_otlp_grpc_continue_the_callers_trace() {
    exports_a_continued_trace(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_over_otlp_http_protobuf_continue_the_callers_trace() {
    exports_a_continued_trace(false).await;
}

/// `name{labels} value` lines of a Prometheus exposition, summed over matching lines.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic() {
    // Its own process: other tests' gateways here would move the same counters.
    let gw = Gateway::start_as_process(Backend::Redis, &[]).await;
    let ti = gw.task().await;
    let scrape = || async { gw.send("GET", "/metrics", None, None).await.text };
    let route = "/execution/store/ti/{task_instance_id}/{*key}";
    let ok_get = [("method", "GET"), ("route", route), ("status", "200")];
    let before = scrape().await;

    let path = gateway::ti_path(&ti, "k");
    assert_eq!(
        gw.put(&path, &ti.token, json!({"value": 1})).await.status,
        204
    );
    for _ in 0..3 {
        assert_eq!(gw.get(&path, &ti.token).await.status, 200);
    }
    assert_eq!(
        gw.get(&gateway::ti_path(&ti, "missing"), &ti.token)
            .await
            .status,
        404
    );
    assert_eq!(gw.get(&path, "garbage").await.status, 403);
    assert_eq!(gw.get(&path, &token_for(Uuid::new_v4())).await.status, 403);

    let after = scrape().await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    assert_eq!(
        delta("airstate_http_requests_total", &ok_get),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta(
            "airstate_http_requests_total",
            &[("route", route), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "airstate_http_requests_total",
            &[("route", route), ("status", "403")]
        ),
        2.0
    );
    // Histogram buckets move: all three fast GETs fall under +Inf, and under 1 s. The
    // histogram has no status label (bounded series): the 404 and the 403s count too.
    let get = [("method", "GET"), ("route", route)];
    let bucket = |le: &str| {
        let mut labels = get.to_vec();
        labels.push(("le", le));
        delta("airstate_http_request_duration_seconds_bucket", &labels)
    };
    assert_eq!(bucket("+Inf"), 6.0);
    assert_eq!(bucket("1"), 6.0);
    assert_eq!(
        delta("airstate_http_request_duration_seconds_count", &get),
        6.0
    );
    assert!(
        delta(
            "airstate_redis_command_duration_seconds_count",
            &[("command", "hget")]
        ) >= 4.0
    );
    assert!(
        delta(
            "airstate_redis_command_duration_seconds_count",
            &[("command", "task_write")]
        ) >= 1.0
    );
    let hits = delta(
        "airstate_identity_cache_total",
        &[("kind", "task"), ("result", "hit")],
    );
    let misses = delta(
        "airstate_identity_cache_total",
        &[("kind", "task"), ("result", "miss")],
    );
    assert!(misses >= 1.0 && hits >= 3.0, "hits {hits} misses {misses}");
    assert_eq!(
        delta("airstate_jwt_failures_total", &[("reason", "invalid")]),
        1.0
    );
    assert_eq!(
        delta("airstate_jwt_failures_total", &[("reason", "subject")]),
        1.0
    );
    assert!(after.contains("airstate_http_requests_in_flight"));
    assert!(!after.contains(&ti.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_carries_trace_id_and_no_secrets() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let served = serve(
        &[("AIRSTATE_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
        Stdio::from(log.reopen().unwrap()),
    );
    let (ti, token) = live_task().await;
    let secret_value = format!("value-{}", Uuid::new_v4().simple());
    let trace_id = Uuid::new_v4().simple().to_string();
    let url = format!("{}/execution/store/ti/{ti}/k", served.base);
    let put = reqwest::Client::new()
        .put(&url)
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"value": secret_value}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    drop(served);
    let text = std::fs::read_to_string(log.path()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let access = lines
        .iter()
        .find(|l| l["target"] == "airstate::access" && l["trace_id"] == json!(trace_id))
        .unwrap_or_else(|| panic!("no access line for the request in:\n{text}"));
    assert_eq!(access["status"], json!(204));
    assert_eq!(access["method"], json!("PUT"));
    assert_eq!(
        access["route"],
        json!("/execution/store/ti/{task_instance_id}/{*key}")
    );
    assert!(access["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(
        !text.contains(&token) && !text.contains(&secret_value),
        "secret in logs"
    );
}
