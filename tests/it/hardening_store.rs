//! Issue 15, the store and data items: every limit at its edge, and the memory cases on
//! the real binary (its peak RSS read from /proc/<pid>/status).

use crate::common;
use crate::gateway;

use std::process::Stdio;
use std::time::Duration;

use common::{Postgres, RedisServer, ServedBinary};
use gateway::{token_for, unique, Backend, Gateway, SECRET};
use serde_json::{json, Value};
use uuid::Uuid;

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The real binary on the shared Redis and PostgreSQL, with a key prefix of its own.
fn serve(extra: &[(&str, &str)]) -> ServedBinary {
    let prefix = format!("{}:", unique("hardening"));
    let mut env = vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        (
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
            Postgres::shared().url.as_str(),
        ),
        ("AIRSTATE_REDIS_URL", RedisServer::shared().url.as_str()),
        ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
        ("RUST_LOG", "warn"),
    ];
    env.extend_from_slice(extra);
    ServedBinary::start(&env, Stdio::inherit())
}

/// A task instance in the shared metastore, with its token.
async fn task_instance() -> (Uuid, String) {
    let id = Uuid::now_v7();
    Postgres::shared()
        .insert_task_instance(id, &unique("dag"), &unique("run"), "task", -1)
        .await;
    (id, token_for(id))
}

async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    token: &str,
    body: Option<String>,
) -> (u16, Value) {
    let mut request = http
        .request(method.parse().unwrap(), url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(60));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A PUT body whose value is a JSON string of exactly `bytes` characters of text.
fn json_of_len(bytes: usize, fill: char) -> String {
    format!("{{\"value\": \"{}\"}}", fill.to_string().repeat(bytes - 2))
}

/// A reply for a failure message, cut short: values here are up to a megabyte.
fn short(text: impl std::fmt::Display) -> String {
    text.to_string().chars().take(300).collect()
}

// --- Item 2: bulk reads bounded in bytes --------------------------------------------------

/// Stored size in Redis: the JSON text plus `<13-digit ms>.<16 hex>::`.
const BOOKKEEPING: usize = 32;

/// At the limit a bulk read is served whole; one byte over it is a 422 that names the
/// total and the limit, on the GET and the POST form, for task scopes and assets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_read_at_its_byte_limit_and_one_byte_over() {
    let limit = 3 * (1000 + BOOKKEEPING);
    let limit_text = limit.to_string();
    let gw = Gateway::start_with(
        Backend::Redis,
        &[("AIRSTATE_BULK_READ_MAX_BYTES", limit_text.as_str())],
    )
    .await;
    let ti = gw.task().await;
    for (key, len) in [("a", 1000), ("b", 1000), ("c", 1000), ("d", 1001)] {
        let reply = gw
            .put_text(
                &gateway::ti_path(&ti, key),
                &ti.token,
                &json_of_len(len, 'x'),
            )
            .await;
        assert_eq!(reply.status, 204, "{}", short(format!("{reply:?}")));
    }
    let bulk = |keys: &str| format!("/execution/store/ti/{}?keys={keys}", ti.id);
    let at_limit = gw.get(&bulk("a,b,c,missing"), &ti.token).await;
    assert_eq!(at_limit.status, 200, "{}", short(format!("{at_limit:?}")));
    assert_eq!(at_limit.body["values"]["c"], json!("x".repeat(998)));
    assert_eq!(at_limit.body["missing"], json!(["missing"]));
    for keys in ["a,b,d", "a,b,c,d"] {
        let over = gw.get(&bulk(keys), &ti.token).await;
        assert_eq!(over.status, 422, "{keys}: {over:?}");
        assert_eq!(
            over.body["detail"]["reason"], "bulk_read_too_large",
            "{over:?}"
        );
        assert_eq!(over.body["detail"]["limit"], json!(limit));
        assert!(over.header("retry-after").is_none());
    }
    let over = gw.get(&bulk("a,b,d"), &ti.token).await;
    assert_eq!(over.body["detail"]["bytes"], json!(limit + 1));
    let posted = gw
        .send(
            "POST",
            &format!("/execution/store/ti/{}", ti.id),
            Some(&ti.token),
            Some(json!({"keys": ["a", "b", "c", "d"]})),
        )
        .await;
    assert_eq!(posted.status, 422, "{posted:?}");

    let name = unique("asset");
    gw.pg
        .insert_asset(&name, &format!("s3://b/{}", unique("p")), true)
        .await;
    for key in ["a", "b", "c", "d"] {
        let path = format!("/execution/store/asset/by-name/value?name={name}&key={key}");
        let reply = gw.put_text(&path, &ti.token, &json_of_len(1000, 'y')).await;
        assert_eq!(reply.status, 204, "{}", short(format!("{reply:?}")));
    }
    let values =
        |keys: &str| format!("/execution/store/asset/by-name/values?name={name}&keys={keys}");
    assert_eq!(gw.get(&values("a,b,c"), &ti.token).await.status, 200);
    let over = gw.get(&values("a,b,c,d"), &ti.token).await;
    assert_eq!(over.status, 422, "{over:?}");
    assert_eq!(
        over.body["detail"]["bytes"],
        json!(4 * (1000 + BOOKKEEPING))
    );
}

/// A task's own 60 values of 1 MiB, read in bulk by four readers at once over and over:
/// each read is refused before anything is buffered, so the replica's peak memory does
/// not grow with the data (before: 5-6 times the 60 MiB read, per reader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_reads_of_far_more_than_the_limit_cost_no_memory() {
    let served = serve(&[]);
    let pid = served.child.id();
    let http = reqwest::Client::new();
    let (ti, token) = task_instance().await;
    let value = json_of_len(1_000_000, 'v');
    let keys: Vec<String> = (0..60).map(|n| format!("k{n}")).collect();
    for key in &keys {
        let url = format!("{}/execution/store/ti/{ti}/{key}", served.base);
        let (status, body) = send(&http, "PUT", &url, &token, Some(value.clone())).await;
        assert_eq!(status, 204, "{}", short(&body));
    }
    // Within the default limit of 4 MiB: served whole.
    let url = format!("{}/execution/store/ti/{ti}?keys=k0,k1,k2", served.base);
    let (status, body) = send(&http, "GET", &url, &token, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["values"]["k2"].as_str().map(str::len), Some(999_998));

    let before = status_kib(pid, "VmHWM");
    let url = format!(
        "{}/execution/store/ti/{ti}?keys={}",
        served.base,
        keys.join(",")
    );
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    let (status, body) = send(&http, "GET", &url, &token, None).await;
                    assert_eq!(status, 422, "{}", short(&body));
                    assert_eq!(body["detail"]["reason"], "bulk_read_too_large");
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    let grown_mib = status_kib(pid, "VmHWM").saturating_sub(before) / 1024;
    println!(
        "peak RSS before the reads {} MiB, grown by {grown_mib} MiB",
        before / 1024
    );
    assert!(grown_mib < 24, "peak RSS grew by {grown_mib} MiB");
    let url = format!("{}/execution/store/ti/{ti}", served.base);
    assert_eq!(send(&http, "DELETE", &url, &token, None).await.0, 204);
}

// --- Item 3: change-stream buffers bounded in bytes --------------------------------------

fn set_event(json_bytes: usize) -> airstate::store::events::Delivery {
    use airstate::store::events::{Change, Delivery, Event};
    Delivery::Event(std::sync::Arc::new(Event {
        map_index: None,
        change: Change::Set {
            key: "k".into(),
            json: "x".repeat(json_bytes),
            version: "v".into(),
        },
    }))
}

/// A watcher may hold exactly its byte limit of undelivered events; one byte more cuts it
/// off (its next read is `Lagged`, what it held is gone). An empty buffer takes one event
/// whatever its size.
#[tokio::test]
async fn change_stream_buffer_at_its_byte_limit_and_one_byte_over() {
    use airstate::store::events::{BufferLimits, Delivery, EventHub, RecvError, EVENT_OVERHEAD};
    // key "k" + version "v" + the JSON text + the fixed overhead.
    let weight = |json: usize| EVENT_OVERHEAD + 2 + json;
    let hub = EventHub::new(BufferLimits {
        events: 1000,
        bytes: 3 * weight(1000),
    });
    let mut at_limit = hub.watch("a".into(), None).await.unwrap();
    for _ in 0..3 {
        hub.deliver("a", set_event(1000));
    }
    for _ in 0..3 {
        assert!(matches!(
            at_limit.deliveries.recv().await,
            Ok(Delivery::Event(_))
        ));
    }
    let mut over = hub.watch("b".into(), None).await.unwrap();
    hub.deliver("b", set_event(1000));
    hub.deliver("b", set_event(1000));
    hub.deliver("b", set_event(1001));
    match over.deliveries.recv().await {
        Err(RecvError::Lagged(missed)) => assert_eq!(missed, 3),
        other => panic!("expected the watcher cut off, got {:?}", other.map(|_| ())),
    }
    let mut huge = hub.watch("c".into(), None).await.unwrap();
    hub.deliver("c", set_event(10 * weight(1000)));
    assert!(matches!(
        huge.deliveries.recv().await,
        Ok(Delivery::Event(_))
    ));
}

/// A watcher that stops reading while 200 values of 1 MiB are written to its task: it is
/// cut off at the byte limit, so the replica's peak memory stays flat (before: every event
/// was kept, 200 MiB and more), and when it reads again its stream ends with `lagged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_cut_off_at_its_byte_limit() {
    use std::io::{Read, Write};
    let served = serve(&[]);
    let pid = served.child.id();
    let http = reqwest::Client::new();
    let (ti, token) = task_instance().await;
    let value = json_of_len(1_000_000, 'w');
    let url = format!("{}/execution/store/ti/{ti}/big", served.base);
    // The same writes with nobody watching first: what they cost the write path alone
    // (buffers that grow once and stay) is not what is measured below.
    for _ in 0..200 {
        let (status, body) = send(&http, "PUT", &url, &token, Some(value.clone())).await;
        assert_eq!(status, 204, "{}", short(&body));
    }
    let addr = served.base.trim_start_matches("http://").to_owned();
    let mut watcher = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        watcher,
        "GET /execution/store/ti/{ti} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Accept: text/event-stream\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    watcher
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: ready") {
        let n = watcher.read(&mut chunk).expect("the stream starts");
        assert!(n > 0, "stream closed before ready");
        seen.extend_from_slice(&chunk[..n]);
    }
    // From here the watcher reads nothing.
    let before = status_kib(pid, "VmHWM");
    for _ in 0..200 {
        let (status, body) = send(&http, "PUT", &url, &token, Some(value.clone())).await;
        assert_eq!(status, 204, "{}", short(&body));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = status_kib(pid, "VmHWM").saturating_sub(before) / 1024;
    println!(
        "peak RSS before the writes {} MiB, grown by {grown_mib} MiB over 200 MiB written",
        before / 1024
    );
    assert!(grown_mib < 32, "peak RSS grew by {grown_mib} MiB");
    // Reading again: what the sockets held, then the end of the stream.
    let reader = tokio::task::spawn_blocking(move || {
        let mut tail: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = watcher
                .read(&mut chunk)
                .expect("the stream ends within 30 s");
            if n == 0 {
                return String::from_utf8_lossy(&tail).into_owned();
            }
            tail.extend_from_slice(&chunk[..n]);
            let cut = tail.len().saturating_sub(200);
            tail.drain(..cut);
        }
    });
    let tail = reader.await.unwrap();
    assert!(
        tail.contains("event: lagged"),
        "stream ended without lagged: {tail:?}"
    );
    assert_eq!(
        send(&http, "DELETE", &url.replace("/big", ""), &token, None)
            .await
            .0,
        204
    );
}

// --- Item 4: a frozen metastore -----------------------------------------------------------

/// PostgreSQL frozen (SIGSTOP: connections stay open, nothing answers) under requests that
/// need it: a task not in the identity cache, an unknown task, an asset. Each is answered
/// 503 within AIRSTATE_METASTORE_TIMEOUT_MS (plus scheduling slack), however many come at
/// once, and the replica serves again once the server thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_metastore_answers_503_within_its_timeout() {
    let pg = Postgres::start();
    let prefix = format!("{}:", unique("frozen"));
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.as_str()),
            ("AIRSTATE_REDIS_URL", RedisServer::shared().url.as_str()),
            ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
            ("AIRSTATE_METASTORE_TIMEOUT_MS", "1000"),
            ("AIRSTATE_IDENTITY_CACHE_SECONDS", "1"),
            ("AIRSTATE_RECONCILE_INTERVAL_SECONDS", "0"),
            ("RUST_LOG", "error"),
        ],
        Stdio::inherit(),
    );
    let http = reqwest::Client::new();
    let mut tis = Vec::new();
    for _ in 0..8 {
        let id = Uuid::now_v7();
        pg.insert_task_instance(id, &unique("dag"), &unique("run"), "task", -1)
            .await;
        tis.push(id);
    }
    let asset = unique("asset");
    pg.insert_asset(&asset, &format!("s3://b/{}", unique("p")), true)
        .await;
    let path_of = |ti: &Uuid| format!("{}/execution/store/ti/{ti}/k", served.base);
    // Warm: every pooled connection opened and in use once.
    let warm: Vec<_> = tis
        .iter()
        .map(|ti| {
            let (http, url, token) = (http.clone(), path_of(ti), token_for(*ti));
            tokio::spawn(async move {
                send(&http, "PUT", &url, &token, Some("{\"value\": 1}".into())).await
            })
        })
        .collect();
    for put in warm {
        assert_eq!(put.await.unwrap().0, 204);
    }

    let pids = pg.processes().await;
    common::signal_all(&pids, libc::SIGSTOP);
    // Past the identity cache: every request below needs the metastore.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut requests = Vec::new();
    for round in 0..3 {
        for ti in &tis {
            requests.push((path_of(ti), token_for(*ti)));
        }
        let unknown = Uuid::now_v7();
        requests.push((path_of(&unknown), token_for(unknown)));
        requests.push((
            format!(
                "{}/execution/store/asset/by-name/value?name={asset}&key=k{round}",
                served.base
            ),
            token_for(tis[0]),
        ));
    }
    let started = std::time::Instant::now();
    let answers: Vec<_> = requests
        .into_iter()
        .map(|(url, token)| {
            let http = http.clone();
            tokio::spawn(async move {
                let began = std::time::Instant::now();
                let (status, body) = send(&http, "GET", &url, &token, None).await;
                (status, body, began.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut statuses = Vec::new();
    for answer in answers {
        let (status, body, took) = answer.await.unwrap();
        slowest = slowest.max(took);
        statuses.push((status, short(&body)));
    }
    let total = started.elapsed();
    common::signal_all(&pids, libc::SIGCONT);
    println!(
        "frozen metastore: {} requests, slowest {slowest:?}, all within {total:?}",
        statuses.len()
    );
    for (status, body) in &statuses {
        assert_eq!(*status, 503, "{body}");
    }
    assert!(
        slowest < Duration::from_millis(1500),
        "a request waited {slowest:?} on a frozen metastore with a 1000 ms timeout"
    );

    // Thawed: served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = send(&http, "GET", &path_of(&tis[0]), &token_for(tis[0]), None).await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} after the thaw"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --- Item 10: a NUL byte in an asset name or URI ----------------------------------------

/// With the metastore identity, an asset named with a NUL byte is no asset (PostgreSQL
/// text cannot hold one): 404 on every asset route, never a 503 that invites retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_an_asset_name_or_uri_is_a_422_not_a_503() {
    let gw = Gateway::start(Backend::Redis).await;
    let ti = gw.task().await;
    for by in ["name", "uri"] {
        for (method, path, body) in [
            (
                "GET",
                format!("/execution/store/asset/by-{by}/value?{by}=a%00b&key=k"),
                None,
            ),
            (
                "PUT",
                format!("/execution/store/asset/by-{by}/value?{by}=a%00b&key=k"),
                Some(json!({"value": 1})),
            ),
            (
                "DELETE",
                format!("/execution/store/asset/by-{by}/value?{by}=%00&key=k"),
                None,
            ),
            (
                "GET",
                format!("/execution/store/asset/by-{by}/values?{by}=a%00&keys=k"),
                None,
            ),
        ] {
            // Refused as the key rules refuse a NUL (wire parity, issue 14), before any
            // metastore query: a client error, not an outage to retry.
            let reply = gw.send(method, &path, Some(&ti.token), body).await;
            assert_eq!(reply.status, 422, "{method} {path}: {reply:?}");
            assert!(reply.header("retry-after").is_none());
            assert_eq!(reply.body["detail"][0]["type"], "value_error", "{reply:?}");
            assert_eq!(
                reply.body["detail"][0]["loc"],
                json!(["query", by]),
                "{reply:?}"
            );
        }
    }
}

// --- Item 11: the verified-token cache bounded in bytes ----------------------------------

fn auth_with_cache(bytes: u64) -> std::sync::Arc<airstate::auth::Authenticator> {
    let limit = bytes.to_string();
    let env = [
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("AIRSTATE_TOKEN_CACHE_MAX_BYTES", limit.as_str()),
    ];
    let config = airstate::config::Config::from_lookup(|name| {
        env.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_string())
    })
    .unwrap();
    airstate::auth::Authenticator::new(&config.auth).unwrap()
}

/// The cache holds tokens up to its byte limit and never more: exactly N tokens' worth
/// keeps all N; a limit of 10 tokens' worth keeps 10 of 50.
#[tokio::test]
async fn token_cache_at_its_byte_limit() {
    let tokens: Vec<String> = (0..50).map(|_| token_for(Uuid::new_v4())).collect();
    let weight = u64::from(airstate::auth::verified_weight(&tokens[0]));
    assert!(tokens
        .iter()
        .all(|t| u64::from(airstate::auth::verified_weight(t)) == weight));
    for (limit, kept) in [(50 * weight, 50), (10 * weight, 10), (0, 0)] {
        let auth = auth_with_cache(limit);
        for token in &tokens {
            let header = format!("Bearer {token}");
            auth.authenticate(Some(&header))
                .await
                .expect("a valid token");
        }
        let (bytes, entries) = auth.token_cache_usage();
        assert!(
            bytes <= limit,
            "{bytes} bytes cached over a limit of {limit}"
        );
        assert_eq!(entries, kept, "limit {limit}");
    }
}

// --- Items 8 and 9: the same task rules at the API and in import; last line wins ------------

/// With the claims identity, a token naming a task Airflow cannot have (an empty id, a
/// map index below -1) is refused (403) before anything is stored; -1 and 0 are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_the_import_would_refuse_are_refused_at_the_api() {
    let gw = Gateway::start_with(Backend::Redis, &[("AIRSTATE_IDENTITY", "claims")]).await;
    let token = |dag_id: &str, task_id: &str, map_index: i64| {
        let sub = Uuid::new_v4();
        let mut claims = gateway::claims_for(sub);
        claims.insert("dag_id".into(), json!(dag_id));
        claims.insert("run_id".into(), json!("run"));
        claims.insert("task_id".into(), json!(task_id));
        claims.insert("map_index".into(), json!(map_index));
        (sub, gateway::sign(&claims))
    };
    for (dag_id, task_id, map_index, expected) in [
        ("d", "t", -1, 204),
        ("d", "t", 0, 204),
        ("d", "t", -2, 403),
        ("d", "t", -5, 403),
        ("", "t", -1, 403),
        ("d", "", 3, 403),
    ] {
        let (sub, token) = token(dag_id, task_id, map_index);
        let path = format!("/execution/store/ti/{sub}/k");
        let put = gw.put(&path, &token, json!({"value": 1})).await;
        assert_eq!(
            put.status, expected,
            "{dag_id:?} {task_id:?} {map_index}: {put:?}"
        );
        if expected == 403 {
            assert!(put.text.contains("map_index") || put.text.contains("must not be empty"));
            assert_eq!(gw.get(&path, &token).await.status, 403);
        }
    }
}

/// An import file naming a key twice: the last line wins, every time (before, writes ran
/// concurrently and about one key in seven kept the earlier line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_naming_a_key_twice_keeps_the_last_line() {
    use airstate::store::redis::RedisStore;
    use airstate::store::{StateStore, TaskScope};
    let prefix = format!("{}:", unique("dupes"));
    let mut settings = airstate::config::redis_defaults(&RedisServer::shared().url, &prefix)
        .expect("redis settings");
    settings.sweep_interval = Duration::from_secs(3600);
    let store: std::sync::Arc<dyn StateStore> =
        std::sync::Arc::new(RedisStore::connect(&settings).await.unwrap());
    let line = |key: usize, value: &str| {
        format!(
            r#"{{"kind":"task","dag_id":"d","run_id":"r","task_id":"t","map_index":-1,"key":"k{key}","value":"{value}","updated_at":"2026-05-01T00:00:00.000Z","expires_at":null}}"#
        )
    };
    let mut file = String::new();
    for key in 0..2000 {
        file.push_str(&line(key, "first"));
        file.push('\n');
    }
    for key in 0..2000 {
        file.push_str(&line(key, "last"));
        file.push('\n');
    }
    let summary = airstate::migrate::import(store.clone(), &mut file.as_bytes())
        .await
        .unwrap();
    assert_eq!(summary.task_keys, 2000, "{summary}");
    let scope = TaskScope {
        dag_id: "d".into(),
        run_id: "r".into(),
        task_id: "t".into(),
        map_index: -1,
        run_key: None,
    };
    let keys: Vec<String> = (0..2000).map(|key| format!("k{key}")).collect();
    let values = store
        .get_task_many(&scope, &keys, usize::MAX)
        .await
        .unwrap();
    let earlier = values
        .iter()
        .filter(|value| value.as_ref().map(|v| v.json.as_str()) != Some("\"last\""))
        .count();
    assert_eq!(earlier, 0, "{earlier} of 2000 keys kept an earlier line");
    store.clear_task(&scope, true).await.unwrap();
}

// --- Item 14: a write that happened is acknowledged ----------------------------------------

/// The sweep-index update after a write goes through the store's one call path; when it
/// still fails (here: an ACL that denies the sweep-index keys, as a reshard's errors would
/// after the call's retries), the write, which happened, is acknowledged rather than
/// answered 5xx, so a client never retries its own write into a 412.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_acknowledged_when_only_its_sweep_index_update_fails() {
    let redis = RedisServer::start();
    let acl = common::redis_cli(
        redis.port,
        &[
            "ACL",
            "SETUSER",
            "gw",
            "on",
            ">pw",
            "~*{t:*",
            "~*{rx:*",
            "~*{ax:*",
            "~*lifecycle*",
            "&*",
            "+@all",
        ],
    );
    assert!(acl.contains("OK"), "{acl}");
    let url = format!("redis://gw:pw@127.0.0.1:{}", redis.port);
    let gw = Gateway::start_with(Backend::Redis, &[("AIRSTATE_REDIS_URL", url.as_str())]).await;
    let ti = gw.task().await;
    let permanent = gw
        .put(
            &gateway::ti_path(&ti, "kept"),
            &ti.token,
            json!({"value": 1}),
        )
        .await;
    assert_eq!(permanent.status, 204, "{permanent:?}");
    let expires = chrono::Utc::now() + chrono::Duration::hours(1);
    // Permanent and expiring keys in one scope: the write must list it in the sweep index.
    let mixed = gw
        .put(
            &gateway::ti_path(&ti, "lease"),
            &ti.token,
            json!({"value": 2, "expires_at": expires.to_rfc3339()}),
        )
        .await;
    assert_eq!(mixed.status, 204, "{mixed:?}");
    let read = gw.get(&gateway::ti_path(&ti, "lease"), &ti.token).await;
    assert_eq!(read.body["value"], 2, "{read:?}");
    let denied = common::redis_cli(redis.port, &["ACL", "LOG"]);
    assert!(
        denied.contains("sweep"),
        "the sweep index was not denied: {denied}"
    );
}
