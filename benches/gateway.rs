//! Load and latency harness: the release gateway against raw Redis, in one run, on one
//! machine, so that the ratios mean something even on a noisy box.
//!
//! `cargo bench --bench gateway -- [--concurrency 50] [--seconds 10] [--rounds 3]
//! [--instructions-only] [--keep-callgrind DIR] [--rust-log FILTER] [--no-floor]`
//!
//! Needs `redis-server`, `redis-benchmark`, `redis-cli` and `wrk` on the PATH. Starts its
//! own `redis-server` and gateway on free loopback ports; prints one table. Beside the
//! gateway it measures the floor (`examples/floor.rs`, a bare axum + fred HGET server, built
//! by the harness) and webdis when installed. With `valgrind` on the PATH it then counts
//! instructions per request under callgrind (`--instructions-only`: only that), which,
//! unlike throughput, does not move with the machine's load. `--keep-callgrind DIR` leaves
//! the callgrind outputs in DIR, one per case (`get`, `put`, `bulk-read`, `clear`,
//! `get-gzip`, `get-metastore-identity`, `floor`), each the counts of its 1,000 counted requests, for
//! `callgrind_annotate --inclusive=yes`; otherwise they go with a temporary directory.
//! The gateway runs with `RUST_LOG=warn` unless `--rust-log` says otherwise (`info`, the
//! default of a deployment, adds the access log line and the request spans). `--no-floor`
//! leaves the floor's instruction count (and its build) out: for an A/B of the gateway,
//! whose floor does not change.

#[path = "../tests/it/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airstate::store::redis::{RedisSettings, RedisStore};
use airstate::store::{StateStore, TaskScope};
use common::{free_port, Postgres, RedisServer, ServedBinary};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use support::{instructions_per_request, median, median_run, wrk, wrk_script, RawRequest, Run};
use uuid::Uuid;

const SECRET: &str = "bench-secret";
/// A 64-byte JSON string: a job id or a watermark, the typical task state.
const VALUE: &str = r#""0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd""#;

struct Options {
    concurrency: usize,
    seconds: u64,
    rounds: usize,
    instructions_only: bool,
    keep_callgrind: Option<PathBuf>,
    no_floor: bool,
}

/// The gateway's `RUST_LOG` (`--rust-log`), set once from the options.
static RUST_LOG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let options = Options {
        concurrency: value("--concurrency", 50) as usize,
        seconds: value("--seconds", 10),
        rounds: value("--rounds", 3) as usize,
        instructions_only: args.iter().any(|a| a == "--instructions-only"),
        keep_callgrind: args
            .iter()
            .position(|a| a == "--keep-callgrind")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from),
        no_floor: args.iter().any(|a| a == "--no-floor"),
    };
    let rust_log = args
        .iter()
        .position(|a| a == "--rust-log")
        .and_then(|i| args.get(i + 1))
        .map_or("warn", String::as_str);
    RUST_LOG.set(rust_log.to_owned()).unwrap();
    options
}

fn redis_benchmark(port: u16, concurrency: usize, requests: usize, command: &[&str]) -> Run {
    let output = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-c", &concurrency.to_string()])
        .args(["-n", &requests.to_string(), "--csv"])
        .args(command)
        .output()
        .expect("redis-benchmark on PATH");
    let text = String::from_utf8_lossy(&output.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = text.lines().last().expect("redis-benchmark output");
    let fields: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Run {
        rps: fields[0],
        p50: fields[3],
        p99: fields[5],
        requests: requests as u64,
    }
}

fn gateway_env<'a>(redis: &'a RedisServer, prefix: &'a str) -> [(&'static str, &'a str); 5] {
    [
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("AIRSTATE_IDENTITY", "claims"),
        ("AIRSTATE_REDIS_URL", &redis.url),
        ("AIRSTATE_KEY_PREFIX", prefix),
        ("RUST_LOG", RUST_LOG.get().map_or("warn", String::as_str)),
    ]
}

fn start_gateway(redis: &RedisServer, prefix: &str) -> ServedBinary {
    ServedBinary::start(&gateway_env(redis, prefix), Stdio::inherit())
}

/// A server process of the harness's own, killed when dropped.
struct Other {
    child: Child,
    port: u16,
}

impl Drop for Other {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn await_port(what: &str, port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `examples/floor.rs` in the release profile, built now (cargo is idle while a bench runs).
fn floor_binary() -> PathBuf {
    let mut cargo = Command::new(env!("CARGO"));
    // Cargo sets these for a running bench; ring's build script tracks them
    // (`rerun-if-env-changed`), so inherited they made this build and the next
    // `cargo bench` rebuild ring and everything above it, airstate included, each time.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        {
            cargo.env_remove(&*name);
        }
    }
    let status = cargo
        .args(["build", "--release", "--locked", "--example", "floor"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo");
    assert!(status.success(), "cannot build examples/floor.rs");
    // This bench runs from <target>/release/deps/.
    let release = std::env::current_exe().unwrap();
    let release = release.parent().unwrap().parent().unwrap();
    release.join("examples").join("floor")
}

const FLOOR_KEY: &str = "raw:h";

fn floor_env<'a>(redis: &'a RedisServer, listen: &'a str) -> [(&'static str, &'a str); 3] {
    [
        ("FLOOR_REDIS_URL", &redis.url),
        ("FLOOR_KEY", FLOOR_KEY),
        ("FLOOR_LISTEN", listen),
    ]
}

fn start_floor(binary: &Path, redis: &RedisServer) -> Other {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(binary)
        .env_clear()
        .envs(floor_env(redis, &listen))
        .stdin(Stdio::null())
        .spawn()
        .expect("floor binary");
    await_port("floor", port);
    Other { child, port }
}

/// webdis (HTTP to Redis in C, no auth) on the same Redis, when installed.
fn start_webdis(redis: &RedisServer, dir: &Path) -> Option<Other> {
    let port = free_port();
    let config = dir.join("webdis.json");
    let settings = json!({
        "redis_host": "127.0.0.1", "redis_port": redis.port,
        "http_host": "127.0.0.1", "http_port": port,
        "threads": 2, "daemonize": false, "database": 0, "verbosity": 0,
        "logfile": dir.join("webdis.log"),
    });
    std::fs::write(&config, settings.to_string()).unwrap();
    let child = match Command::new("webdis")
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(_) => {
            eprintln!("webdis is not installed (apt-get install webdis): not measured");
            return None;
        }
    };
    await_port("webdis", port);
    Some(Other { child, port })
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn token(ti: Uuid, scope: &TaskScope) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": ti.to_string(), "aud": "urn:airflow.apache.org:task", "scope": "execution",
        "iat": now, "nbf": now, "exp": now + 3600, "jti": Uuid::new_v4().simple().to_string(),
        "dag_id": scope.dag_id, "run_id": scope.run_id, "task_id": scope.task_id,
        "map_index": scope.map_index,
    });
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn scope(dag: &str, map_index: i64) -> TaskScope {
    TaskScope {
        dag_id: dag.into(),
        run_id: "manual__bench".into(),
        task_id: "work".into(),
        map_index,
        run_key: None,
    }
}

fn get_script(token: &str) -> String {
    format!("wrk.method = \"GET\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n")
}

fn put_script(token: &str) -> String {
    format!(
        "wrk.method = \"PUT\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '{{\"value\": {VALUE}}}'\n"
    )
}

/// Adds a per-connection pause so the offered load is about `rate` requests/s in all.
fn paced(script: String, concurrency: usize, rate: f64) -> String {
    let delay_ms = (concurrency as f64 * 1000.0 / rate).max(0.0);
    format!("{script}function delay() return {delay_ms:.3} end\n")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opts = options();
    let c = opts.concurrency;
    let redis = RedisServer::start();
    let prefix = "bench:";
    let gateway = start_gateway(&redis, prefix);
    let store = RedisStore::connect(&RedisSettings {
        command_timeout: Duration::from_secs(5),
        sweep_interval: Duration::from_secs(3600),
        ..airstate::config::redis_defaults(&redis.url, prefix).unwrap()
    })
    .await
    .expect("fixture connection");
    let dir = tempfile::tempdir().unwrap();

    // Fixtures: one key in a task scope, and the same shape in raw Redis.
    let ti = Uuid::new_v4();
    let main_scope = scope("bench_dag", -1);
    let bearer = token(ti, &main_scope);
    store.put_task(&main_scope, "k", VALUE, None).await.unwrap();
    let url = format!("{}/execution/store/ti/{ti}/k", gateway.base);
    let _ = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "HSET", "raw:h", "f", VALUE])
        .output();
    let get = wrk_script(dir.path(), "get.lua", &get_script(&bearer));
    let put = wrk_script(dir.path(), "put.lua", &put_script(&bearer));
    // Sanity: the fixture answers 200 through the gateway.
    let check = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 200, "fixture GET failed");

    if !opts.instructions_only {
        let requests = 200_000;
        let floor = start_floor(&floor_binary(), &redis);
        let floor_url = format!("http://127.0.0.1:{}/f", floor.port);
        let webdis = start_webdis(&redis, dir.path());
        let webdis_url = webdis
            .as_ref()
            .map(|w| format!("http://127.0.0.1:{}/HGET/{FLOOR_KEY}/f", w.port));
        let plain = wrk_script(dir.path(), "plain.lua", "wrk.method = \"GET\"\n");
        let (mut hget, mut hset, mut gw_get, mut gw_put) = (vec![], vec![], vec![], vec![]);
        let (mut floor_get, mut webdis_get) = (vec![], vec![]);
        let mut rss_peak = 0;
        for round in 0..opts.rounds {
            eprintln!("round {}/{}", round + 1, opts.rounds);
            hget.push(redis_benchmark(
                redis.port,
                c,
                requests,
                &["hget", "raw:h", "f"],
            ));
            gw_get.push(wrk(&url, c, opts.seconds, &get));
            floor_get.push(wrk(&floor_url, c, opts.seconds, &plain));
            if let Some(url) = &webdis_url {
                webdis_get.push(wrk(url, c, opts.seconds, &plain));
            }
            hset.push(redis_benchmark(
                redis.port,
                c,
                requests,
                &["hset", "raw:h", "f", VALUE],
            ));
            gw_put.push(wrk(&url, c, opts.seconds, &put));
            rss_peak = rss_peak.max(rss_kib(gateway.child.id(), "VmHWM:"));
        }
        let (hget, hset, gw_get, gw_put) = (
            median_run(&hget),
            median_run(&hset),
            median_run(&gw_get),
            median_run(&gw_put),
        );
        let floor_get = median_run(&floor_get);
        let webdis_get = (!webdis_get.is_empty()).then(|| median_run(&webdis_get));
        drop((floor, webdis));
        let rss_now = rss_kib(gateway.child.id(), "VmRSS:");

        // Latency at half of the measured saturation throughput.
        let half_get = wrk(
            &url,
            c,
            opts.seconds,
            &wrk_script(
                dir.path(),
                "half_get.lua",
                &paced(get_script(&bearer), c, gw_get.rps / 2.0),
            ),
        );
        let half_put = wrk(
            &url,
            c,
            opts.seconds,
            &wrk_script(
                dir.path(),
                "half_put.lua",
                &paced(put_script(&bearer), c, gw_put.rps / 2.0),
            ),
        );

        // GET cost against the number of keys in the task's hash; sizes interleave within each
        // round so that a change in the machine's speed hits them all alike.
        let sizes = [1usize, 100, 10_000];
        let mut sized = Vec::new();
        for keys in sizes {
            let scope = scope(&format!("size_{keys}"), -1);
            for i in 0..keys {
                store
                    .put_task(&scope, &format!("key-{i}"), VALUE, None)
                    .await
                    .unwrap();
            }
            let ti = Uuid::new_v4();
            let script = wrk_script(
                dir.path(),
                &format!("size_{keys}.lua"),
                &get_script(&token(ti, &scope)),
            );
            sized.push((
                format!("{}/execution/store/ti/{ti}/key-0", gateway.base),
                script,
            ));
        }
        let mut size_runs: Vec<Vec<Run>> = vec![Vec::new(); sizes.len()];
        for _ in 0..opts.rounds {
            for (runs, (url, script)) in size_runs.iter_mut().zip(&sized) {
                runs.push(wrk(url, c, opts.seconds.min(5), script));
            }
        }
        let by_size: Vec<(usize, Run)> = sizes
            .iter()
            .copied()
            .zip(size_runs.iter().map(|r| median_run(r)))
            .collect();

        // Clear-all across map indices: one HTTP call, one Lua script.
        let http = reqwest::Client::new();
        let mut clears = Vec::new();
        for indices in [10i64, 1_000, 10_000] {
            let mut took = Vec::new();
            for round in 0..opts.rounds {
                let dag = format!("mapped_{indices}_{round}");
                for index in 0..indices {
                    store
                        .put_task(&scope(&dag, index), "k", VALUE, None)
                        .await
                        .unwrap();
                }
                let caller = Uuid::new_v4();
                let url = format!(
                    "{}/execution/state/ti/{caller}?all_map_indices=true",
                    gateway.base
                );
                let started = Instant::now();
                let reply = http
                    .delete(&url)
                    .bearer_auth(token(caller, &scope(&dag, 0)))
                    .send()
                    .await
                    .unwrap();
                took.push(started.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(reply.status(), 204);
                let left = store
                    .get_task(&scope(&dag, indices - 1), "k")
                    .await
                    .unwrap();
                assert!(left.is_none(), "clear-all left state behind");
            }
            clears.push((indices, median(took)));
        }

        println!(
            "\nairstate benchmark: concurrency {c}, {} s per wrk run, median of {} rounds",
            opts.seconds, opts.rounds
        );
        println!("\n| measure | requests/s | p50 ms | p99 ms | ratio |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        let row = |name: &str, run: Run, ratio: Option<f64>| {
            let ratio = ratio.map(|r| format!("{r:.2}")).unwrap_or_default();
            println!(
                "| {name} | {:.0} | {:.3} | {:.3} | {ratio} |",
                run.rps, run.p50, run.p99
            );
        };
        row("redis-benchmark HGET", hget, None);
        row(
            "gateway GET (task state)",
            gw_get,
            Some(gw_get.rps / hget.rps),
        );
        row(
            "floor GET (bare axum + fred HGET)",
            floor_get,
            Some(floor_get.rps / hget.rps),
        );
        if let Some(webdis_get) = webdis_get {
            row("webdis HGET", webdis_get, Some(webdis_get.rps / hget.rps));
        }
        row("redis-benchmark HSET", hset, None);
        row(
            "gateway PUT (task state)",
            gw_put,
            Some(gw_put.rps / hset.rps),
        );
        row("gateway GET at half saturation", half_get, None);
        row("gateway PUT at half saturation", half_put, None);
        for (keys, run) in &by_size {
            row(
                &format!("gateway GET, {keys} keys in the hash"),
                *run,
                Some(run.rps / by_size[0].1.rps),
            );
        }
        println!("\n| clear-all map indices | one call, ms (median) |");
        println!("| ---: | ---: |");
        for (indices, ms) in &clears {
            println!("| {indices} | {ms:.1} |");
        }
        println!(
            "\ngateway RSS: peak {:.1} MiB, after load {:.1} MiB",
            rss_peak as f64 / 1024.0,
            rss_now as f64 / 1024.0
        );
        println!(
        "ratios: GET/HGET {:.2} (target >= 0.5), PUT/HSET {:.2} (target >= 0.4), GET/floor {:.2}",
        gw_get.rps / hget.rps,
        gw_put.rps / hset.rps,
        gw_get.rps / floor_get.rps
    );
        match webdis_get {
            Some(webdis_get) => println!(
                "GET/webdis {:.2} (target >= 1)",
                gw_get.rps / webdis_get.rps
            ),
            None => println!("GET/webdis: webdis not installed"),
        }
    }
    instructions(
        &redis,
        &store,
        ti,
        &bearer,
        &main_scope,
        opts.keep_callgrind.as_deref(),
        !opts.no_floor,
    )
    .await;
}

/// A GET as a deployment serves it: identity from Airflow's metastore (a PostgreSQL the
/// harness starts, holding the task instance), warm in the identity cache, rather than
/// from the token's claims. The request, the gateway's extra environment, and the server
/// (kept for the count); `None`, with a message, without PostgreSQL's binaries.
async fn metastore_case(
    store: &RedisStore,
) -> Option<(RawRequest, Vec<(&'static str, String)>, Postgres)> {
    if common::find_postgres_bin("initdb").is_none() {
        println!("\nmetastore identity: PostgreSQL is not installed (apt-get install postgresql)");
        return None;
    }
    let pg = Postgres::start();
    let ti = Uuid::new_v4();
    let stored = scope("bench_dag", -1);
    pg.insert_task_instance(ti, &stored.dag_id, &stored.run_id, &stored.task_id, -1)
        .await;
    // The metastore identity keys a run's state by its `dag_run.id`.
    let stored = TaskScope {
        run_key: Some(pg.dag_run_id(&stored.dag_id, &stored.run_id).await),
        ..stored
    };
    store.put_task(&stored, "k", VALUE, None).await.unwrap();
    let env = vec![
        ("AIRSTATE_IDENTITY", "metastore".to_owned()),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.clone()),
        // Every counted request a cache hit (the default 5 s would let a count depend on
        // how fast callgrind runs); what a miss costs is the metastore's query, not counted.
        ("AIRSTATE_IDENTITY_CACHE_SECONDS", "3600".to_owned()),
    ];
    let request = RawRequest {
        method: "GET",
        path: format!("/execution/store/ti/{ti}/k"),
        headers: vec![("Authorization", format!("Bearer {}", token(ti, &stored)))],
        body: String::new(),
        status: 200,
    };
    Some((request, env, pg))
}

/// Instructions per request under callgrind, for the gateway's hot routes and the floor.
async fn instructions(
    redis: &RedisServer,
    store: &RedisStore,
    ti: Uuid,
    bearer: &str,
    main_scope: &TaskScope,
    keep: Option<&Path>,
    with_floor: bool,
) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("\ninstruction counts: valgrind is not installed (apt-get install valgrind)");
        return;
    }
    // Requests before the counters are zeroed (caches, pools and the allocator warm), and
    // the requests counted after.
    const WARMUP: usize = 200;
    const COUNTED: usize = 1_000;
    let temp = tempfile::tempdir().unwrap();
    let dir = match keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).expect("the --keep-callgrind directory");
            dir
        }
        None => temp.path(),
    };
    let auth = vec![("Authorization", format!("Bearer {bearer}"))];
    let request = |method, path: String, body: &str, status| RawRequest {
        method,
        path,
        headers: auth.clone(),
        body: body.to_owned(),
        status,
    };
    let put_body = format!("{{\"value\": {VALUE}}}");
    let key_path = format!("/execution/store/ti/{ti}/k");
    let scope_path = format!("/execution/store/ti/{ti}");
    let mut json_put = request("PUT", key_path.clone(), &put_body, 204);
    json_put
        .headers
        .push(("Content-Type", "application/json".to_owned()));
    let mut gzip_get = request("GET", key_path.clone(), "", 200);
    gzip_get
        .headers
        .push(("Accept-Encoding", "gzip, deflate".to_owned()));
    let cases = [
        ("GET", request("GET", key_path, "", 200)),
        ("PUT", json_put),
        (
            "bulk read",
            request("GET", format!("{scope_path}?keys=k"), "", 200),
        ),
        ("clear", request("DELETE", scope_path, "", 204)),
        // As Airflow's Task SDK asks: httpx sends `Accept-Encoding: gzip, deflate` on
        // every request, and every answer with a body is then gzipped (as Airflow does).
        ("GET gzip", gzip_get),
    ];
    let mut cases: Vec<_> = cases
        .into_iter()
        .map(|(name, request)| (name, request, Vec::new()))
        .collect();
    let metastore = metastore_case(store).await;
    if let Some((request, env, _)) = &metastore {
        cases.push(("GET, metastore identity", request.clone(), env.clone()));
    }
    let gateway = PathBuf::from(env!("CARGO_BIN_EXE_airstate"));
    let prefix = "bench:";
    let mut rows = Vec::new();
    for (name, request, extra) in &cases {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut env = gateway_env(redis, prefix).to_vec();
        env.retain(|(name, _)| extra.iter().all(|(replaced, _)| name != replaced));
        env.extend(extra.iter().map(|(name, value)| (*name, value.as_str())));
        env.push(("AIRSTATE_LISTEN", &listen));
        let per_request = instructions_per_request(
            &gateway,
            &["serve"],
            &env,
            port,
            request,
            (WARMUP, COUNTED),
            &dir.join(name.replace(',', "").replace(' ', "-").to_lowercase()),
        );
        eprintln!("airstate {name}: {per_request:.0} instructions per request");
        rows.push((format!("airstate {name}"), per_request));
        // The clear empties the scope: the next case finds its key again.
        store.put_task(main_scope, "k", VALUE, None).await.unwrap();
    }
    if !with_floor {
        println!("\n| request | instructions |");
        println!("| --- | ---: |");
        for (name, per_request) in &rows {
            println!("| {name} | {per_request:.0} |");
        }
        return;
    }
    let floor = floor_binary();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let floor_get = instructions_per_request(
        &floor,
        &[],
        &floor_env(redis, &listen),
        port,
        &RawRequest {
            method: "GET",
            path: "/f".into(),
            headers: vec![],
            body: String::new(),
            status: 200,
        },
        (WARMUP, COUNTED),
        &dir.join("floor"),
    );
    println!(
        "\ninstructions per request (callgrind: counters zeroed after {WARMUP} requests, then \
         Ir / {COUNTED}, one keep-alive connection)"
    );
    println!("\n| request | instructions | ratio to floor GET |");
    println!("| --- | ---: | ---: |");
    println!("| floor GET (bare axum + fred HGET) | {floor_get:.0} | 1.00 |");
    for (name, per_request) in &rows {
        println!(
            "| {name} | {per_request:.0} | {:.2} |",
            per_request / floor_get
        );
    }
    println!(
        "instruction ratios: GET/floor {:.2} (target <= 1.3), PUT {:.0} (target <= 75000)",
        rows[0].1 / floor_get,
        rows[1].1
    );
}
