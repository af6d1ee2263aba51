//! What forwarding costs: the release gateway in front of a fixed local upstream (a small
//! HTTP server in this process answering a 64-byte body), against calling that upstream
//! directly and against a served state GET, in one run.
//!
//! `cargo bench --bench forward -- [--concurrency 4] [--seconds 5] [--rounds 3]`
//!
//! Prints, per round and as medians: the p50 a forwarded request adds over the direct
//! call (at low concurrency, where queueing does not hide it), and the gateway's CPU per
//! forwarded request against its CPU per served GET (user + system time of the gateway
//! process over the requests wrk completed). Needs `redis-server` and `wrk`.

#[path = "../tests/it/common/mod.rs"]
mod common;
mod support;

use std::process::Stdio;

use axum::routing::get;
use common::{RedisServer, ServedBinary};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use support::{median, wrk, wrk_script, Run};
use uuid::Uuid;

const SECRET: &str = "bench-secret";
const BODY: &str = r#"{"value":"0123456789abcdef0123456789abcdef0123456789abcdef012345"}"#;

fn option(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which sits in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // Linux reports these in clock ticks of 100 Hz on every common configuration.
    ticks / 100.0
}

/// A wrk run against the gateway, with the gateway's CPU per request in microseconds.
fn measured(pid: u32, url: &str, c: usize, seconds: u64, script: &std::path::Path) -> (Run, f64) {
    let before = cpu_seconds(pid);
    let run = wrk(url, c, seconds, script);
    let used = cpu_seconds(pid) - before;
    (run, used * 1e6 / run.requests.max(1) as f64)
}

fn main() {
    let c = option("--concurrency", 4) as usize;
    let seconds = option("--seconds", 5);
    let rounds = option("--rounds", 3) as usize;

    // The fixed upstream: its own runtime on its own thread, so the gateway's CPU is the
    // gateway's alone.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move {
        let app = axum::Router::new().fallback(get(|| async {
            ([("content-type", "application/json")], BODY)
        }));
        axum::serve(listener, app).await.unwrap();
    });

    let redis = RedisServer::start();
    let gateway = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRSTATE_IDENTITY", "claims"),
            ("AIRSTATE_REDIS_URL", &redis.url),
            ("AIRSTATE_AIRFLOW_API_URL", &upstream),
            ("RUST_LOG", "warn"),
        ],
        Stdio::inherit(),
    );
    let pid = gateway.child.id();
    let dir = tempfile::tempdir().unwrap();

    // A served state GET: one key of a task scope, through the whole auth and store path.
    let ti = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": ti.to_string(), "aud": "urn:airflow.apache.org:task", "scope": "execution",
        "iat": now, "nbf": now, "exp": now + 3600, "jti": Uuid::new_v4().simple().to_string(),
        "dag_id": "bench", "run_id": "manual__bench", "task_id": "work", "map_index": -1,
    });
    let token = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let state_url = format!("{}/execution/store/ti/{ti}/k", gateway.base);
    let put = runtime.block_on(async {
        reqwest::Client::new()
            .put(&state_url)
            .bearer_auth(&token)
            .json(&json!({"value": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(put, 204, "fixture PUT");
    let served = wrk_script(
        dir.path(),
        "served.lua",
        &format!("wrk.method = \"GET\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"),
    );
    // A forwarded request carries a worker's bearer token too (Airflow checks it, not us).
    let forwarded = wrk_script(
        dir.path(),
        "forwarded.lua",
        &format!("wrk.method = \"GET\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"),
    );
    let forwarded_url = format!("{}/execution/variables/bench", gateway.base);
    let direct_url = format!("{upstream}/execution/variables/bench");

    println!("\nforwarding benchmark: concurrency {c}, {seconds} s per wrk run, {rounds} rounds");
    println!("| round | direct p50 ms | forwarded p50 ms | added p50 ms | forwarded CPU us/req | served GET CPU us/req | CPU ratio |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let (mut added, mut ratios) = (vec![], vec![]);
    for round in 1..=rounds {
        let direct = wrk(&direct_url, c, seconds, &forwarded);
        let (through, forward_cpu) = measured(pid, &forwarded_url, c, seconds, &forwarded);
        let (_, served_cpu) = measured(pid, &state_url, c, seconds, &served);
        let delta = through.p50 - direct.p50;
        let ratio = forward_cpu / served_cpu;
        println!(
            "| {round} | {:.3} | {:.3} | {delta:.3} | {forward_cpu:.1} | {served_cpu:.1} | {ratio:.2} |",
            direct.p50, through.p50
        );
        added.push(delta);
        ratios.push(ratio);
    }
    println!(
        "\nmedians: added p50 {:.3} ms (target <= 0.3), forwarded/served CPU {:.2} (target <= 2)",
        median(added),
        median(ratios)
    );
}
