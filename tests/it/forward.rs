//! The front door: the real binary in front of an upstream HTTP server standing in for
//! Airflow's API server (a real server on a loopback port that reports what reached it).
//! State routes are served, everything else forwarded with bodies streamed both ways.

use crate::common;
use crate::gateway;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use common::{free_port, ServedBinary};
use futures_util::StreamExt;
use gateway::{claims_for, sign, SECRET};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What the upstream saw, counted per request.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
}

async fn echo(State(seen): State<Arc<Seen>>, request: Request) -> Response {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let entry = headers
            .entry(name.as_str().to_owned())
            .or_insert_with(|| json!([]));
        entry
            .as_array_mut()
            .unwrap()
            .push(json!(String::from_utf8_lossy(value.as_bytes())));
    }
    // Hashed as it arrives: the upstream holds no more of a body than the gateway should.
    let mut stream = body.into_data_stream();
    let mut digest = Sha256::new();
    let mut length = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        length += chunk.len();
        digest.update(&chunk);
    }
    let reply = json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body_len": length,
        "body_sha256": hex::encode(digest.finalize()),
    });
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .header("set-cookie", "session=abc; Path=/; HttpOnly")
        .header("set-cookie", "other=1; Path=/")
        .header("location", "/somewhere?else=1")
        .header("refreshed-api-token", "new-token")
        .header("connection", "x-hop")
        .header("x-hop", "per-connection")
        .header("keep-alive", "timeout=5")
        .body(Body::from(reply.to_string()))
        .unwrap()
}

/// `bytes` deterministic bytes, streamed in 64 KiB chunks.
async fn big(State(seen): State<Arc<Seen>>, headers: HeaderMap) -> Response {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let total: usize = headers["x-bytes"].to_str().unwrap().parse().unwrap();
    let chunks = (0..total.div_ceil(65536)).map(move |i| {
        let size = (total - i * 65536).min(65536);
        Ok::<_, std::io::Error>(Bytes::from(vec![(i % 251) as u8; size]))
    });
    Body::from_stream(futures_util::stream::iter(chunks)).into_response()
}

async fn slow(State(seen): State<Arc<Seen>>) -> &'static str {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    "late"
}

/// Starts the stand-in upstream on a free port.
async fn upstream() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/big", get(big))
        .route("/slow", get(slow))
        .fallback(any(echo))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn gateway(upstream: &str, extra: &[(&str, &str)]) -> ServedBinary {
    let mut env = vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("AIRSTATE_IDENTITY", "claims"),
        ("AIRSTATE_AIRFLOW_API_URL", upstream),
        ("RUST_LOG", "warn"),
    ];
    env.extend_from_slice(extra);
    ServedBinary::start(&env, Stdio::inherit())
}

fn task_token(ti: Uuid) -> String {
    let mut claims = claims_for(ti);
    claims.insert("dag_id".into(), json!("etl"));
    claims.insert("run_id".into(), json!(format!("run-{ti}")));
    claims.insert("task_id".into(), json!("extract"));
    sign(&claims)
}

fn header_values(echoed: &Value, name: &str) -> Vec<String> {
    echoed["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends raw bytes and returns the status line and the whole answer.
fn raw_exchange(base: &str, request: &[u8]) -> String {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                // One answer is enough; the server may keep the connection open.
                if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_not_served_is_forwarded_with_headers_as_a_proxy_should() {
    let (upstream_url, seen) = upstream().await;
    let gw = gateway(&upstream_url, &[]);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = http
        .patch(format!(
            "{}/execution/task-instances/0190a0e0/state?x=a%2Fb&y=1",
            gw.base
        ))
        .header("authorization", "Bearer worker-token")
        .header("cookie", "session=1")
        .header("traceparent", traceparent)
        .header("correlation-id", "corr-7")
        .header("x-forwarded-for", "192.0.2.9")
        .header("connection", "keep-alive, x-secret-hop")
        .header("x-secret-hop", "must not pass")
        .header("content-type", "application/json")
        .body(r#"{"state":"success"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    let headers = reply.headers().clone();
    assert_eq!(
        headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect::<Vec<_>>(),
        ["session=abc; Path=/; HttpOnly", "other=1; Path=/"]
    );
    assert_eq!(headers["location"], "/somewhere?else=1");
    assert_eq!(headers["refreshed-api-token"], "new-token");
    assert_eq!(headers["correlation-id"], "corr-7");
    assert!(headers.get("x-hop").is_none(), "{headers:?}");
    assert!(headers.get("keep-alive").is_none(), "{headers:?}");
    let echoed: Value = reply.json().await.unwrap();

    assert_eq!(echoed["method"], "PATCH");
    assert_eq!(
        echoed["uri"],
        "/execution/task-instances/0190a0e0/state?x=a%2Fb&y=1"
    );
    assert_eq!(echoed["body_len"], 19);
    assert_eq!(
        header_values(&echoed, "authorization"),
        ["Bearer worker-token"]
    );
    assert_eq!(header_values(&echoed, "cookie"), ["session=1"]);
    assert_eq!(header_values(&echoed, "traceparent"), [traceparent]);
    assert_eq!(header_values(&echoed, "correlation-id"), ["corr-7"]);
    assert_eq!(
        header_values(&echoed, "x-forwarded-for"),
        ["192.0.2.9, 127.0.0.1"]
    );
    assert_eq!(header_values(&echoed, "x-forwarded-proto"), ["http"]);
    let host = gw.base.trim_start_matches("http://");
    assert_eq!(header_values(&echoed, "x-forwarded-host"), [host]);
    assert_eq!(
        header_values(&echoed, "host"),
        [host],
        "the client's Host is kept"
    );
    assert!(
        header_values(&echoed, "x-secret-hop").is_empty(),
        "{echoed}"
    );
    assert!(
        header_values(&echoed, "connection").is_empty()
            || header_values(&echoed, "connection") == ["keep-alive"],
        "{echoed}"
    );

    // The UI and the Core REST API go through too, and state routes never do.
    let before = seen.requests.load(Ordering::SeqCst);
    for path in [
        "/",
        "/api/v2/dags?limit=1",
        "/static/assets/index.js",
        "/auth/login",
    ] {
        let reply = http.get(format!("{}{path}", gw.base)).send().await.unwrap();
        assert_eq!(reply.status(), 201, "{path}");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), before + 4);

    let ti = Uuid::now_v7();
    let token = task_token(ti);
    let key = format!("{}/execution/store/ti/{ti}/watermark", gw.base);
    let put = http
        .put(&key)
        .bearer_auth(&token)
        .json(&json!({"value": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let got = http.get(&key).bearer_auth(&token).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), r#"{"value":42}"#);
    // A served path with a method it does not take stays Airflow's 405, not forwarded.
    let wrong = http.post(&key).bearer_auth(&token).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        before + 4,
        "state routes are never forwarded"
    );

    let metrics = common::scrape(&gw.base).await;
    let forwarded = metrics
        .lines()
        .find(|line| {
            line.starts_with("airstate_http_requests_total")
                && line.contains("route=\"forwarded\"")
                && line.contains("method=\"GET\"")
        })
        .unwrap_or_else(|| panic!("no forwarded series in:\n{metrics}"));
    assert!(forwarded.ends_with(" 4"), "{forwarded}");
    assert!(
        metrics.contains("route=\"/execution/store/ti/{task_instance_id}/{*key}\""),
        "served requests keep their route label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_body_streams_both_ways_in_bounded_memory() {
    const SIZE: usize = 64 << 20;
    let (upstream_url, _seen) = upstream().await;
    let gw = gateway(&upstream_url, &[]);
    let pid = gw.child.id();
    let baseline = peak_rss_kib(pid);

    // Upload: written in 64 KiB pieces over a raw connection, hashed by the upstream.
    let base = gw.base.clone();
    let expected = {
        let mut digest = Sha256::new();
        for i in 0..SIZE / 65536 {
            digest.update(vec![(i % 251) as u8; 65536]);
        }
        hex::encode(digest.finalize())
    };
    let answer = tokio::task::spawn_blocking(move || {
        let address = base.trim_start_matches("http://");
        let mut stream = TcpStream::connect(address).unwrap();
        write!(
            stream,
            "PUT /execution/xcoms/dag/run/task/big HTTP/1.1\r\nHost: {address}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        for i in 0..SIZE / 65536 {
            stream.write_all(&vec![(i % 251) as u8; 65536]).unwrap();
        }
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let echoed: Value = serde_json::from_str(body).unwrap();
    assert_eq!(echoed["body_len"], SIZE);
    assert_eq!(echoed["body_sha256"], expected);

    // Download: read chunk by chunk, hashed as it arrives.
    let mut reply = reqwest::Client::new()
        .get(format!("{}/big", gw.base))
        .header("x-bytes", SIZE.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let mut digest = Sha256::new();
    let mut received = 0usize;
    while let Some(chunk) = reply.chunk().await.unwrap() {
        received += chunk.len();
        digest.update(&chunk);
    }
    assert_eq!(received, SIZE);
    assert_eq!(hex::encode(digest.finalize()), expected);

    let peak = peak_rss_kib(pid);
    println!("gateway peak RSS: {baseline} KiB before, {peak} KiB after moving 64 MiB each way");
    // Holding either body whole would need 64 MiB on its own. What streaming costs is
    // constant: the same ~16-26 MiB of allocator and buffer growth was measured with
    // 256 MiB bodies.
    assert!(
        peak < baseline + 40 * 1024,
        "peak RSS grew from {baseline} KiB to {peak} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_never_forwarded() {
    let (upstream_url, seen) = upstream().await;
    let gw = gateway(&upstream_url, &[]);
    let attacks: [&[u8]; 3] = [
        b"POST /api/v2/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/v2/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /api/v2/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    ];
    for attack in attacks {
        let answer = raw_exchange(&gw.base, attack);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{}\n=> {answer}",
            String::from_utf8_lossy(attack)
        );
    }
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        0,
        "nothing ambiguous reached the upstream"
    );

    // Both framings at once: hyper reads the body by Transfer-Encoding alone and closes the
    // connection after answering (RFC 9112 section 6.1), so the request hidden behind the
    // Content-Length reading is never read, let alone forwarded, and the upstream gets one
    // request framed afresh.
    let answer = raw_exchange(
        &gw.base,
        b"POST /api/v2/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert!(!answer.contains("/smuggled"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(seen.requests.load(Ordering::SeqCst) <= 1);

    // A plain chunked body is fine.
    let before = seen.requests.load(Ordering::SeqCst);
    let answer = raw_exchange(
        &gw.base,
        b"POST /api/v2/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.contains(r#""body_len":3"#), "{answer}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_slow_is_504_and_state_keeps_serving() {
    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = gateway(&dead, &[]);
    let http = reqwest::Client::new();
    let reply = http
        .get(format!("{}/execution/variables/x", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 502);
    let body: Value = reply.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": "Airflow's API server is unreachable, retry later"})
    );
    // State is served regardless, and readiness reports the upstream without failing.
    let ti = Uuid::now_v7();
    let token = task_token(ti);
    let put = http
        .put(format!("{}/execution/store/ti/{ti}/k", gw.base))
        .bearer_auth(&token)
        .json(&json!({"value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let (status, ready) = common::ready(&gw.base).await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    assert!(
        ready["airflow_api_server"]
            .as_str()
            .unwrap()
            .starts_with("unreachable"),
        "{ready}"
    );

    let (upstream_url, seen) = upstream().await;
    let gw = gateway(&upstream_url, &[("AIRSTATE_AIRFLOW_API_TIMEOUT_MS", "300")]);
    let started = Instant::now();
    let reply = http.get(format!("{}/slow", gw.base)).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(reply.status(), 504);
    let body: Value = reply.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": "Airflow's API server did not answer within 300 ms"})
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    let (_, ready) = common::ready(&gw.base).await;
    assert_eq!(ready["airflow_api_server"], "answers (201)");
}

/// README "Readiness": Redis down at start-up is no exit; the replica forwards every other
/// call, answers state calls 503 at once, and is not ready until it has reached Redis once.
/// A later outage leaves it ready ("degraded"), still forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_up_or_later_keeps_forwarding_and_readiness_follows_the_replica() {
    let mut redis = common::RedisServer::start();
    tokio::task::block_in_place(|| redis.stop());
    // The echo's 201 shows a call was forwarded (its counter also counts /ready's checks).
    let (upstream_url, _) = upstream().await;
    let mut gw = gateway(
        &upstream_url,
        &[
            ("AIRSTATE_REDIS_URL", redis.url.as_str()),
            ("AIRSTATE_REDIS_TIMEOUT_MS", "500"),
            ("AIRSTATE_REDIS_RECONNECT_MAX_MS", "200"),
        ],
    );
    let http = reqwest::Client::new();
    let ti = Uuid::now_v7();
    let token = task_token(ti);
    let state = format!("{}/execution/store/ti/{ti}/k", gw.base);
    let heartbeat = format!("{}/execution/task-instances/{ti}/heartbeat", gw.base);
    let ready = || common::ready(&gw.base);
    let dependency_up = || async {
        let text = common::scrape(&gw.base).await;
        text.lines()
            .find(|line| line.starts_with("airstate_dependency_up{dependency=\"redis\"}"))
            .map(|line| line.rsplit(' ').next().unwrap().to_owned())
    };

    // Down at start-up: running, alive, not ready, forwarding, state 503 at once.
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway exited");
    let health = http
        .get(format!("{}/health", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("not ready: redis not reached since start-up"),
        "{detail}"
    );
    assert!(detail.contains("Connection refused"), "{detail}");
    assert_eq!(dependency_up().await.as_deref(), Some("0"));
    let forwarded = http
        .patch(&heartbeat)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), 201);
    let started = Instant::now();
    let put = http
        .put(&state)
        .bearer_auth(&token)
        .json(&json!({"value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 503);
    assert_eq!(put.headers()["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );

    // Redis comes up: ready, and state works (the scripts load on first use).
    tokio::task::block_in_place(|| redis.restart());
    let started = Instant::now();
    while ready().await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(15), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready().await.1["status"], "ready");
    assert_eq!(dependency_up().await.as_deref(), Some("1"));
    let put = http
        .put(&state)
        .bearer_auth(&token)
        .json(&json!({"value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);

    // Down again: still ready (degraded, naming Redis), still forwarding.
    tokio::task::block_in_place(|| redis.stop());
    let (status, body) = ready().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(body["unavailable"]["redis"].is_string(), "{body}");
    assert_eq!(dependency_up().await.as_deref(), Some("0"));
    let forwarded = http
        .patch(&heartbeat)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), 201);
    let get = http.get(&state).bearer_auth(&token).send().await.unwrap();
    assert_eq!(get.status(), 503);
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway exited");
}
