//! Attack harness (issue 15): replays the attacks the hardening work fixed against the
//! release binary under a 128 MiB memory limit, while a legitimate client keeps writing and
//! reading its own task's state, and prints one row per attack.
//!
//! `cargo bench --bench attack [-- NAME...]` (names: connections, idle-fds, bulk-read,
//! stream, big-puts, tokens, clear-all, chunked, nul, sigterm, export-import, jwks-hang,
//! redis-down, frozen-metastore; a name runs the attacks it is a part of). Needs
//! `redis-server` on the PATH, and PostgreSQL's server binaries (initdb) for
//! frozen-metastore.
//!
//! The gateway runs in a memory cgroup of its own (cgroup v2 `memory.max`, else v1
//! `memory.limit_in_bytes`, both with swap off) with `ulimit -n 1024`; an OOM kill is then
//! counted by the kernel. Where no cgroup can be made, RSS is sampled from /proc and a peak
//! over 128 MiB is reported as OOM (the output says which). Redis runs with
//! `appendonly yes` and `appendfsync always`, so an acknowledged write is on disk.
//!
//! Columns: requests the attack sent; OOM (an OOM kill in the cgroup, or the gateway died);
//! the gateway's peak RSS (VmHWM, reset before each attack); the slowest answer the
//! legitimate client got; its requests answered / failed (no answer, or not its expected
//! status); any 5xx, from attacker or client, other than the README's documented 503s
//! (requests shed, state store unavailable, shutting down); and writes lost: writes the
//! client saw acknowledged that do not read back as written once the attack is over.

#[path = "../tests/it/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, RedisServer};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

const SECRET: &str = "attack-secret";
const LIMIT_BYTES: u64 = 128 * 1024 * 1024;
/// The descriptor limit the gateway runs with: a common container default, just above
/// the default `AIRSTATE_MAX_CONNECTIONS` (1000) plus its pools.
const FD_LIMIT: u32 = 1024;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// The memory limit.

enum LimitKind {
    V2,
    V1 { memsw: bool },
    Sampled,
}

struct MemoryLimit {
    kind: LimitKind,
    dir: Option<PathBuf>,
}

impl MemoryLimit {
    fn new() -> MemoryLimit {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let name = format!("airstate-attack-{}", std::process::id());
        // cgroup v2: a child of our own cgroup, with the memory controller enabled for it.
        if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
            let parent = PathBuf::from(format!("/sys/fs/cgroup{path}"));
            let controllers =
                std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
                let dir = parent.join(&name);
                if std::fs::create_dir(&dir).is_ok() {
                    let ok = std::fs::write(dir.join("memory.max"), LIMIT_BYTES.to_string())
                        .is_ok()
                        && std::fs::write(dir.join("memory.swap.max"), "0").is_ok();
                    if ok {
                        return MemoryLimit {
                            kind: LimitKind::V2,
                            dir: Some(dir),
                        };
                    }
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        // cgroup v1: a child of our own memory cgroup (its limits still apply above ours).
        if let Some(path) = own.lines().find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let _ = fields.next();
            let controllers = fields.next()?;
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| fields.next())
                .flatten()
        }) {
            let dir = PathBuf::from(format!("/sys/fs/cgroup/memory{path}")).join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                if std::fs::write(dir.join("memory.limit_in_bytes"), LIMIT_BYTES.to_string())
                    .is_ok()
                {
                    let memsw = std::fs::write(
                        dir.join("memory.memsw.limit_in_bytes"),
                        LIMIT_BYTES.to_string(),
                    )
                    .is_ok();
                    return MemoryLimit {
                        kind: LimitKind::V1 { memsw },
                        dir: Some(dir),
                    };
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        MemoryLimit {
            kind: LimitKind::Sampled,
            dir: None,
        }
    }

    fn describe(&self) -> String {
        match (&self.kind, &self.dir) {
            (LimitKind::V2, Some(dir)) => format!(
                "cgroup v2 {} (memory.max=128M, memory.swap.max=0); OOM = oom_kill in memory.events",
                dir.display()
            ),
            (LimitKind::V1 { memsw }, Some(dir)) => format!(
                "cgroup v1 {} (memory.limit_in_bytes=128M{}); OOM = oom_kill in memory.oom_control",
                dir.display(),
                if *memsw {
                    ", memory.memsw.limit_in_bytes=128M"
                } else {
                    "; swap not limited: no swap accounting"
                }
            ),
            _ => "NO cgroup could be made: RSS sampled from /proc, OOM = RSS peak > 128 MiB"
                .to_owned(),
        }
    }

    /// A shell line that puts itself in the cgroup, lowers its descriptor limit and
    /// execs the command (so the pid is the gateway's).
    fn wrap(&self, program: &str, args: &[&str]) -> Command {
        let join = match &self.dir {
            Some(dir) => format!("echo $$ > '{}/cgroup.procs' && ", dir.display()),
            None => String::new(),
        };
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{join}ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""))
            .arg(program)
            .args(args);
        command
    }

    fn oom_kills(&self) -> u64 {
        let Some(dir) = &self.dir else { return 0 };
        let file = match self.kind {
            LimitKind::V2 => "memory.events",
            _ => "memory.oom_control",
        };
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            // Empty once every process in it is gone; retry briefly while they are reaped.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("could not remove {}", dir.display());
        }
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Peak RSS of one process over one attack: VmHWM reset at the start (clear_refs 5), plus
/// a sampler for a process that dies before it is read.
struct RssWatch {
    pid: u32,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, stopped) = (peak_kib.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssWatch {
            pid,
            peak_kib,
            stop,
        }
    }

    fn peak_bytes(&self) -> u64 {
        if let Some(kib) = status_kib(self.pid, "VmHWM:") {
            self.peak_kib.fetch_max(kib, Ordering::Relaxed);
        }
        self.peak_kib.load(Ordering::Relaxed) * 1024
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// The gateway.

/// The release binary: cargo's for this bench under `cargo bench`; the release build's
/// beside it when this harness was built in another profile.
fn binary() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        let cargo = env!("CARGO_BIN_EXE_airstate");
        let path = std::path::Path::new(cargo);
        let profile = path.parent().and_then(|p| p.file_name());
        if profile.is_some_and(|p| p == "release") {
            return cargo.to_owned();
        }
        let release = path
            .parent()
            .and_then(|p| p.parent())
            .unwrap()
            .join("release/airstate");
        release.display().to_string()
    })
}

struct Gateway {
    child: Child,
    base: String,
    addr: String,
}

impl Gateway {
    fn start(limit: &MemoryLimit, env: &[(&str, String)]) -> Gateway {
        Gateway::spawn(limit.wrap(binary(), &["serve"]), env)
    }

    fn spawn(mut command: Command, env: &[(&str, String)]) -> Gateway {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AIRSTATE_LISTEN", &addr)
            .env("RUST_LOG", "error")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sh and the airstate binary");
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the gateway did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Gateway {
            child,
            base: format!("http://{addr}"),
            addr,
        }
    }

    /// [`start`](Self::start), with the descriptor limit set by `prlimit --nofile` (soft
    /// and hard) rather than the shell's `ulimit`.
    fn start_prlimited(limit: &MemoryLimit, env: &[(&str, String)]) -> Gateway {
        let nofile = format!("--nofile={FD_LIMIT}:{FD_LIMIT}");
        Gateway::spawn(limit.wrap("prlimit", &[&nofile, binary(), "serve"]), env)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_env(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET.to_owned()),
        ("AIRSTATE_IDENTITY", "claims".to_owned()),
        ("AIRSTATE_REDIS_URL", redis.url.clone()),
        ("AIRSTATE_KEY_PREFIX", "attack:".to_owned()),
    ]
}

// ---------------------------------------------------------------------------------------
// Tokens and answers.

struct Task {
    ti: Uuid,
    token: String,
}

fn task(dag: &str, map_index: i64) -> Task {
    let ti = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": ti.to_string(), "aud": "urn:airflow.apache.org:task", "scope": "execution",
        "iat": now, "nbf": now, "exp": now + 3600, "jti": Uuid::new_v4().simple().to_string(),
        "dag_id": dag, "run_id": "manual__attack", "task_id": "work", "map_index": map_index,
    });
    let token = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    Task { ti, token }
}

/// A 503 the README documents: shed at a limit, the state store unavailable, shutting down.
fn documented_503(body: &str) -> bool {
    [
        "Too many requests in flight on this replica",
        "State store temporarily unavailable",
        "Server shutting down",
    ]
    .iter()
    .any(|m| body.contains(m))
}

/// What every request of an attack was answered, and the 5xx outside the documented 503s.
#[derive(Default)]
struct Tally {
    tried: AtomicU64,
    bad_5xx: AtomicU64,
    statuses: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn tried(&self) {
        self.tried.fetch_add(1, Ordering::Relaxed);
    }

    fn answer(&self, status: u16, body: &str) {
        if status >= 500 && !(status == 503 && documented_503(body)) {
            self.bad_5xx.fetch_add(1, Ordering::Relaxed);
            eprintln!("  undocumented {status}: {}", &body[..body.len().min(200)]);
        }
        self.count(status.to_string());
    }

    fn count(&self, what: String) {
        *self.statuses.lock().unwrap().entry(what).or_default() += 1;
    }

    fn get(&self, what: &str) -> u64 {
        self.statuses
            .lock()
            .unwrap()
            .get(what)
            .copied()
            .unwrap_or(0)
    }

    fn summary(&self) -> String {
        let statuses = self.statuses.lock().unwrap();
        let parts: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        parts.join(", ")
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends `request`, tallies its answer; the status and body, or None without an answer.
async fn send(tally: &Tally, request: reqwest::RequestBuilder) -> Option<(u16, String)> {
    tally.tried();
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            tally.answer(status, &body);
            Some((status, body))
        }
        Err(error) => {
            tally.count(if error.is_timeout() {
                "timeout".into()
            } else {
                "no answer".into()
            });
            None
        }
    }
}

/// One raw HTTP/1.1 exchange read to the end of its first response (or the close); the
/// status and body. Tallied like `send`.
async fn raw_exchange(tally: &Tally, addr: &str, request: &[u8]) -> Option<(u16, String)> {
    tally.tried();
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.write_all(request).await;
        read_response(&mut stream).await
    })
    .await
    .ok()
    .flatten();
    match &result {
        Some((status, body)) => tally.answer(*status, body),
        None => tally.count("closed without answer".into()),
    }
    result
}

/// Reads one response with a Content-Length body (or to the close).
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = find(&data, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            });
            let mut body = data[end + 4..].to_vec();
            while length.is_none_or(|n| body.len() < n) {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
            return Some((status, String::from_utf8_lossy(&body).into_owned()));
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn big_value(tag: &str) -> String {
    // A JSON string of 1 MiB less room for the tag and the JSON around it.
    format!("\"{tag}-{}\"", "x".repeat(MIB - 64))
}

// ---------------------------------------------------------------------------------------
// The legitimate client: PUT then GET of its own task's keys, paced, all attack long.

#[derive(Default)]
struct LegitReport {
    answered: u64,
    failed: u64,
    latencies: Vec<Duration>,
    acked: Vec<(String, String)>,
}

struct Legit {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<LegitReport>,
}

impl Legit {
    fn start(base: &str, me: &Task, attack: &str, tally: Arc<Tally>) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let (base, ti, token, attack) =
            (base.to_owned(), me.ti, me.token.clone(), attack.to_owned());
        let handle = tokio::spawn(async move {
            let client = http();
            let mut report = LegitReport::default();
            let mut n = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("{attack}-{n}");
                let value = format!("\"{attack} write {n}\"");
                let url = format!("{base}/execution/store/ti/{ti}/{key}");
                let started = Instant::now();
                let put = client
                    .put(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(format!("{{\"value\": {value}}}"));
                let answer = send(&tally, put).await;
                report.latencies.push(started.elapsed());
                match answer {
                    Some((204, _)) => {
                        report.answered += 1;
                        report.acked.push((key, value.clone()));
                        let started = Instant::now();
                        let answer = send(&tally, client.get(&url).bearer_auth(&token)).await;
                        report.latencies.push(started.elapsed());
                        match answer {
                            Some((200, body)) if reads_as(&body, &value) => report.answered += 1,
                            _ => report.failed += 1,
                        }
                    }
                    _ => report.failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            report
        });
        Legit { stop, handle }
    }

    async fn finish(self) -> LegitReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap()
    }
}

fn reads_as(body: &str, value: &str) -> bool {
    let expected: serde_json::Value = serde_json::from_str(value).unwrap();
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|b| b.get("value") == Some(&expected))
}

/// Acknowledged writes that do not read back as written.
async fn lost_writes(base: &str, me: &Task, acked: &[(String, String)]) -> u64 {
    let client = http();
    let mut lost = 0;
    for chunk in acked.chunks(1000) {
        let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        let body = client
            .post(format!("{base}/execution/store/ti/{}", me.ti))
            .bearer_auth(&me.token)
            .json(&json!({ "keys": keys }))
            .send()
            .await
            .expect("verification read");
        assert_eq!(body.status(), 200, "verification read");
        let body: serde_json::Value = body.json().await.unwrap();
        for (key, value) in chunk {
            let expected: serde_json::Value = serde_json::from_str(value).unwrap();
            if body["values"].get(key) != Some(&expected) {
                lost += 1;
            }
        }
    }
    lost
}

// ---------------------------------------------------------------------------------------
// The attacks.

/// Fields drop in order: the gateway before the cgroup it runs in, which only an empty
/// cgroup can leave.
struct Ctx {
    gateway: Gateway,
    redis: RedisServer,
    me: Task,
    /// Every write the legitimate client saw acknowledged, over the whole run.
    acked: Vec<(String, String)>,
    limit: MemoryLimit,
}

impl Ctx {
    fn base(&self) -> String {
        self.gateway.base.clone()
    }
}

struct Row {
    attack: &'static str,
    tried: u64,
    oom: String,
    peak_rss: String,
    slowest: String,
    legit: String,
    bad_5xx: u64,
    lost: String,
    notes: String,
}

async fn hold(seconds: u64) {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}

/// Attack 1: 480 connections sending 390 KiB of headers and never finishing, 200 slow
/// headers, 100 slow bodies (with a token), 3,000 idle keep-alive connections, against
/// `AIRSTATE_MAX_CONNECTIONS` (1000) and a descriptor limit of 1024.
async fn connections(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let addr = ctx.gateway.addr.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let huge_closed = Arc::new(AtomicU64::new(0));
    for _ in 0..480 {
        let (addr, tally, closed) = (addr.clone(), tally.clone(), huge_closed.clone());
        tasks.spawn(async move {
            tally.tried();
            let Ok(mut stream) = TcpStream::connect(&addr).await else {
                tally.count("huge: refused".into());
                return None;
            };
            let path = format!("/execution/store/ti/{}/k", Uuid::new_v4());
            let mut sent = 0;
            let _ = stream
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n").as_bytes())
                .await;
            let line = format!("X-Pad: {}\r\n", "p".repeat(1016));
            while sent < 390 * 1024 {
                let chunk = line.repeat(16);
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
                sent += chunk.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match tokio::time::timeout(Duration::from_secs(12), read_response(&mut stream)).await {
                Ok(Some((status, body))) => tally.answer(status, &body),
                _ => {
                    closed.fetch_add(1, Ordering::Relaxed);
                    tally.count("huge: closed".into());
                }
            }
            Some(stream)
        });
    }
    for i in 0..200 {
        let (addr, tally) = (addr.clone(), tally.clone());
        tasks.spawn(async move {
            tally.tried();
            let mut stream = TcpStream::connect(&addr).await.ok()?;
            let head = format!("GET /health HTTP/1.1\r\nHost: a\r\nX-Slow-{i}: ");
            let _ = stream.write_all(head.as_bytes()).await;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(14) {
                if stream.write_all(b"s").await.is_err() {
                    tally.count("slow headers: closed".into());
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tally.count("slow headers: still open".into());
            Some(stream)
        });
    }
    for _ in 0..100 {
        let (addr, tally) = (addr.clone(), tally.clone());
        let Task { ti, token } = task("attack_slow_body", -1);
        tasks.spawn(async move {
            tally.tried();
            let mut stream = TcpStream::connect(&addr).await.ok()?;
            let head = format!(
                "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1049000\r\n\r\n{{\"value\": \""
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let started = Instant::now();
            let mut byte = [0u8; 1];
            while started.elapsed() < Duration::from_secs(14) {
                if stream.write_all(&[b'b'; 1024]).await.is_err() {
                    break;
                }
                // An early answer (a shed 503) ends this body.
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(1000), stream.peek(&mut byte)).await
                {
                    if n > 0 {
                        break;
                    }
                }
            }
            match tokio::time::timeout(Duration::from_millis(200), read_response(&mut stream))
                .await
            {
                Ok(Some((status, body))) => tally.answer(status, &body),
                _ => tally.count("slow body: unanswered while sending".into()),
            }
            Some(stream)
        });
    }
    let served_idle = Arc::new(AtomicU64::new(0));
    for _ in 0..3000 {
        let (addr, tally, served) = (addr.clone(), tally.clone(), served_idle.clone());
        tasks.spawn(async move {
            tally.tried();
            let mut stream = TcpStream::connect(&addr).await.ok()?;
            let _ = stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
                .await;
            match tokio::time::timeout(Duration::from_secs(5), read_response(&mut stream)).await {
                Ok(Some((status, body))) => {
                    served.fetch_add(1, Ordering::Relaxed);
                    tally.answer(status, &body);
                }
                _ => tally.count("idle: closed at once".into()),
            }
            hold(14).await;
            Some(stream)
        });
    }
    let mut held = Vec::new();
    while let Some(stream) = tasks.join_next().await {
        held.push(stream);
    }
    drop(held);
    format!(
        "idle connections served /health: {} of 3000; {}",
        served_idle.load(Ordering::Relaxed),
        tally.summary()
    )
}

/// Attack 2: two looping readers bulk-read their task's 60 values of 1 MiB (and 3 of them).
async fn bulk_read(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let owner = task("attack_bulk", -1);
    let client = http();
    let base = ctx.base();
    for i in 0..60 {
        let put = client
            .put(format!("{base}/execution/store/ti/{}/big-{i}", owner.ti))
            .bearer_auth(&owner.token)
            .header("content-type", "application/json")
            .body(format!("{{\"value\": {}}}", big_value(&i.to_string())));
        let answer = send(&tally, put).await;
        assert_eq!(answer.map(|a| a.0), Some(204), "bulk-read fixture");
    }
    let all: Vec<String> = (0..60).map(|i| format!("big-{i}")).collect();
    let all = all.join(",");
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (client, tally, base, all) = (client.clone(), tally.clone(), base.clone(), all.clone());
        let (ti, token) = (owner.ti, owner.token.clone());
        readers.spawn(async move {
            let started = Instant::now();
            let mut round = 0;
            while started.elapsed() < Duration::from_secs(15) {
                round += 1;
                let keys = if round % 2 == 0 {
                    all.as_str()
                } else {
                    "big-0,big-1,big-2"
                };
                let get = client
                    .get(format!("{base}/execution/store/ti/{ti}?keys={keys}"))
                    .bearer_auth(&token);
                send(&tally, get).await;
            }
        });
    }
    while readers.join_next().await.is_some() {}
    format!(
        "60-key reads: 422 (bulk_read_too_large) {}; 3-key reads 200 {}; {}",
        tally.get("422"),
        tally.get("200"),
        tally.summary()
    )
}

/// Attack 3: four change-stream watchers that stop reading, and 200 writes of 1 MiB to
/// their asset.
async fn stream(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let asset = format!("attack-asset-{}", Uuid::new_v4().simple());
    let watcher = task("attack_watch", -1);
    let mut watchers = Vec::new();
    for _ in 0..4 {
        tally.tried();
        let mut stream = TcpStream::connect(&ctx.gateway.addr).await.unwrap();
        let request = format!(
            "GET /execution/store/asset/by-name/values?name={asset} HTTP/1.1\r\nHost: a\r\n\
             Authorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
            watcher.token
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while find(&seen, b"event: ready").is_none() {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("the stream's ready event")
                .unwrap();
            assert!(
                n > 0,
                "stream closed before ready: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        tally.count("stream opened".into());
        watchers.push(stream);
    }
    let client = http();
    let base = ctx.base();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (client, tally, base, asset) =
            (client.clone(), tally.clone(), base.clone(), asset.clone());
        let token = watcher.token.clone();
        writers.spawn(async move {
            for i in 0..50 {
                let put = client
                    .put(format!(
                        "{base}/execution/store/asset/by-name/value?name={asset}&key=k{w}-{}",
                        i % 5
                    ))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(format!("{{\"value\": {}}}", big_value(&i.to_string())));
                send(&tally, put).await;
            }
        });
    }
    while writers.join_next().await.is_some() {}
    // Now read what each watcher was sent: cut off (lagged) or still open.
    let mut lagged = 0;
    let mut received = 0usize;
    for mut stream in watchers {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => {
                    // Keep only the tail: the lagged event is last.
                    received += n;
                    seen.extend_from_slice(&buf[..n]);
                    if seen.len() > 64 * 1024 {
                        seen.drain(..seen.len() - 4096);
                    }
                }
            }
        }
        if find(&seen, b"event: lagged").is_some() {
            lagged += 1;
        }
    }
    format!(
        "watchers ended lagged: {lagged} of 4; {:.1} MiB read from them afterwards; {}",
        received as f64 / MIB as f64,
        tally.summary()
    )
}

/// Attack 5: 128 concurrent 1 MiB PUTs, looping.
async fn big_puts(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let owner = task("attack_big_puts", -1);
    let client = http();
    let body = Arc::new(format!("{{\"value\": {}}}", big_value("p")));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..128 {
        let (client, tally, base, body) = (client.clone(), tally.clone(), ctx.base(), body.clone());
        let (ti, token) = (owner.ti, owner.token.clone());
        workers.spawn(async move {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(15) {
                let put = client
                    .put(format!("{base}/execution/store/ti/{ti}/big-{w}"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.as_bytes().to_vec());
                if send(&tally, put).await.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    tally.summary()
}

/// Attack 11: 100,000 distinct real tokens, each used once.
async fn tokens(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let minted = Instant::now();
    let tokens: Vec<Task> = (0..100_000).map(|_| task("attack_tokens", -1)).collect();
    let length = tokens[0].token.len();
    let mint = minted.elapsed();
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicU64::new(0));
    let client = http();
    let mut workers = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..32 {
        let (client, tally, base, tokens, next) = (
            client.clone(),
            tally.clone(),
            ctx.base(),
            tokens.clone(),
            next.clone(),
        );
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= tokens.len() || started.elapsed() > Duration::from_secs(120) {
                    break;
                }
                let t = &tokens[i];
                let get = client
                    .get(format!("{base}/execution/store/ti/{}/k", t.ti))
                    .bearer_auth(&t.token);
                send(&tally, get).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    format!(
        "tokens of {length} chars (minted in {:.1} s), used in {:.1} s; {}",
        mint.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        tally.summary()
    )
}

/// Attack 7: clears of every map index (every 500 ms) while 4 writers add 5,000 map indices.
async fn clear_all(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let dag = format!("attack_mapped_{}", Uuid::new_v4().simple());
    let indices: Arc<Vec<Task>> = Arc::new((0..5000).map(|i| task(&dag, i)).collect());
    let client = http();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Tally::default());
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4usize {
        let (client, tally, base, indices, stop, writes) = (
            client.clone(),
            tally.clone(),
            ctx.base(),
            indices.clone(),
            stop.clone(),
            writes.clone(),
        );
        writers.spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let t = &indices[i];
                let put = client
                    .put(format!("{base}/execution/store/ti/{}/k", t.ti))
                    .bearer_auth(&t.token)
                    .header("content-type", "application/json")
                    .body(format!("{{\"value\": {i}}}"));
                writes.tried();
                if let Some((status, body)) = send(&tally, put).await {
                    writes.answer(status, &body);
                }
                i = (i + 4) % indices.len();
            }
        });
    }
    let clears = Tally::default();
    let mut took = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let at = Instant::now();
        let delete = client
            .delete(format!(
                "{}/execution/state/ti/{}?all_map_indices=true",
                ctx.base(),
                indices[0].ti
            ))
            .bearer_auth(&indices[0].token);
        if let Some((status, body)) = send(&tally, delete).await {
            clears.answer(status, &body);
        }
        took.push(at.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    while writers.join_next().await.is_some() {}
    took.sort();
    format!(
        "clears: {} ({}), slowest clear {} ms; map-index writes: {} ({}); clears answered 503: {}",
        took.len(),
        clears.summary(),
        took.last().map_or(0, |t| t.as_millis()),
        writes.tried.load(Ordering::Relaxed),
        writes.summary(),
        clears.get("503")
    )
}

/// Attack 6: malformed and truncated chunked bodies, with a token, on 16 connections.
async fn chunked(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let Task { ti, token } = task("attack_chunked", -1);
    let bodies: [&[u8]; 4] = [
        b"zz\r\n",
        b"ffffffffffffffffffff\r\nab\r\n0\r\n\r\n",
        b"5\r\n{\"val\r\n3\r\nue\"\r\nzz\r\n",
        b"5;ext=\x00\r\nabcde\r\n0\r\n\r\n",
    ];
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (tally, addr, token) = (tally.clone(), ctx.gateway.addr.clone(), token.clone());
        workers.spawn(async move {
            let started = Instant::now();
            let mut n = w;
            while started.elapsed() < Duration::from_secs(10) {
                let mut request = format!(
                    "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
                     Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                .into_bytes();
                request.extend_from_slice(bodies[n % bodies.len()]);
                n += 1;
                raw_exchange(&tally, &addr, &request).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    tally.summary()
}

/// Attack 10: NUL (and other control characters) in asset names, URIs and keys.
async fn nul(ctx: &Ctx, tally: Arc<Tally>) -> String {
    let me = task("attack_nul", -1);
    let client = http();
    let base = ctx.base();
    let bad = ["%00", "a%00b", "%00%00", "a%01b", "a%0Ab"];
    for round in 0..40 {
        for b in bad {
            let urls = [
                format!("{base}/execution/store/asset/by-name/value?name={b}&key=k"),
                format!("{base}/execution/store/asset/by-uri/value?uri=s3://x/{b}&key=k"),
                format!("{base}/execution/store/asset/by-name/value?name=ok&key={b}"),
                format!("{base}/execution/store/ti/{}/{b}", me.ti),
                format!("{base}/execution/state/asset/{b}/k"),
            ];
            for url in urls {
                let request = if round % 2 == 0 {
                    client.get(&url)
                } else {
                    client
                        .put(&url)
                        .header("content-type", "application/json")
                        .body("{\"value\": 1}")
                };
                send(&tally, request.bearer_auth(&me.token)).await;
            }
        }
    }
    tally.summary()
}

/// Attack 12: 20 half-sent requests when SIGTERM comes; how long the exit takes.
async fn sigterm(ctx: &mut Ctx, tally: Arc<Tally>) -> String {
    let Task { ti, token } = task("attack_sigterm", -1);
    let mut half = Vec::new();
    for _ in 0..20 {
        tally.tried();
        let mut stream = TcpStream::connect(&ctx.gateway.addr).await.unwrap();
        let head = format!(
            "PUT /execution/store/ti/{ti}/k HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"value\": \"half"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        half.push(stream);
    }
    // Ten more that have not finished their headers.
    for _ in 0..10 {
        tally.tried();
        let mut stream = TcpStream::connect(&ctx.gateway.addr).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        half.push(stream);
    }
    hold(1).await;
    let signalled = Instant::now();
    unsafe { libc::kill(ctx.gateway.pid() as i32, libc::SIGTERM) };
    let exit = loop {
        if let Ok(Some(status)) = ctx.gateway.child.try_wait() {
            break Some((signalled.elapsed(), status));
        }
        if signalled.elapsed() > Duration::from_secs(40) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for mut stream in half {
        match tokio::time::timeout(Duration::from_secs(2), read_response(&mut stream)).await {
            Ok(Some((status, body))) => tally.answer(status, &body),
            _ => tally.count("closed without answer".into()),
        }
    }
    let exit = match exit {
        Some((took, status)) => format!("exited {status} {} ms after SIGTERM", took.as_millis()),
        None => "NO EXIT 40 s after SIGTERM".to_owned(),
    };
    format!("{exit}; half-sent requests: {}", tally.summary())
}

/// Attacks 8 and 9: `airstate export` of everything the API accepted above (plus every
/// JSON type), `airstate import` of it under another prefix, exported again: the same bytes?
/// Both under the same 128 MiB limit.
async fn export_import(ctx: &Ctx, tally: Arc<Tally>) -> (String, u64, u64, String) {
    let me = task("attack_json_types", -1);
    let client = http();
    for (i, text) in common::JSON_TEXTS.iter().enumerate() {
        let put = client
            .put(format!("{}/execution/store/ti/{}/t{i}", ctx.base(), me.ti))
            .bearer_auth(&me.token)
            .header("content-type", "application/json")
            .body(format!("{{\"value\": {text}}}"));
        send(&tally, put).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], prefix: &str| {
        let started = Instant::now();
        let mut child = ctx
            .limit
            .wrap(binary(), args)
            .env_clear()
            .env("AIRSTATE_REDIS_URL", &ctx.redis.url)
            .env("AIRSTATE_KEY_PREFIX", prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let watch = RssWatch::start(child.id());
        let output = {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            stderr
        };
        let status = child.wait().unwrap();
        (status, output, watch.peak_bytes(), started.elapsed())
    };
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");
    let ooms = ctx.limit.oom_kills();
    let mut notes = String::new();
    let mut peak = 0u64;
    let mut slowest = Duration::ZERO;
    let steps: [(&str, Vec<String>, &str); 3] = [
        (
            "export",
            vec![
                "export".into(),
                "--output".into(),
                first.display().to_string(),
            ],
            "attack:",
        ),
        (
            "import",
            vec![
                "import".into(),
                "--input".into(),
                first.display().to_string(),
            ],
            "attack-imported:",
        ),
        (
            "export again",
            vec![
                "export".into(),
                "--output".into(),
                second.display().to_string(),
            ],
            "attack-imported:",
        ),
    ];
    let mut failed = false;
    for (name, args, prefix) in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tally.tried();
        let (status, stderr, rss, took) = run(&args, prefix);
        peak = peak.max(rss);
        slowest = slowest.max(took);
        let summary = stderr.lines().last().unwrap_or("").trim().to_owned();
        let _ = write!(
            notes,
            "{name}: {status}, {:.1} s, peak RSS {:.1} MiB ({summary}); ",
            took.as_secs_f64(),
            rss as f64 / MIB as f64
        );
        if !status.success() {
            failed = true;
            break;
        }
    }
    let mut differ = 0u64;
    if !failed {
        let a = std::fs::read_to_string(&first).unwrap();
        let b = std::fs::read_to_string(&second).unwrap();
        let _ = write!(
            notes,
            "{} lines, {:.1} MiB; ",
            a.lines().count(),
            a.len() as f64 / MIB as f64
        );
        let (mut left, mut right) = (a.lines(), b.lines());
        loop {
            match (left.next(), right.next()) {
                (None, None) => break,
                (x, y) if x != y => differ += 1,
                _ => {}
            }
        }
        let _ = write!(notes, "lines differing after the round trip: {differ}");
    }
    let oom = ctx.limit.oom_kills() - ooms;
    (
        notes,
        if failed { 1 } else { differ },
        oom,
        format!("{:.1}|{} ms", peak as f64 / MIB as f64, slowest.as_millis()),
    )
}

/// Attack 13: a JWKS endpoint that accepts and never answers: how long start-up takes to
/// give up (AIRSTATE_JWKS_TIMEOUT_MS, 5 s by default).
fn jwks_hang(limit: &MemoryLimit) -> (String, Duration) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let mut child = limit
        .wrap(binary(), &["serve"])
        .env_clear()
        .env("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL", &url)
        .env("AIRSTATE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let names = stderr.contains("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL");
    let note = match status {
        Some(status) => format!(
            "start-up gave up after {} ms ({status}; message names the variable: {names})",
            took.as_millis()
        ),
        None => "start-up STILL HANGING after 30 s".to_owned(),
    };
    (note, took)
}

/// Attack 15: Redis known down: 200 requests, each should be a 503 at once.
async fn redis_down(limit: &MemoryLimit, tally: Arc<Tally>) -> (String, Duration, u64) {
    let mut redis = RedisServer::start();
    let mut gateway = Gateway::start(limit, &redis_env(&redis));
    let watch = RssWatch::start(gateway.pid());
    let me = task("attack_redis_down", -1);
    let client = http();
    let url = format!("{}/execution/store/ti/{}/k", gateway.base, me.ti);
    redis.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let started = Instant::now();
        let request = if i % 2 == 0 {
            client.get(&url)
        } else {
            client
                .put(&url)
                .header("content-type", "application/json")
                .body("{\"value\": 1}")
        };
        send(&tally, request.bearer_auth(&me.token)).await;
        slowest = slowest.max(started.elapsed());
    }
    let peak = watch.peak_bytes();
    let alive = gateway.alive();
    (
        format!(
            "{} (Redis command timeout 2000 ms); gateway alive after: {alive}",
            tally.summary()
        ),
        slowest,
        peak,
    )
}

/// A task token for task instance `ti` (the metastore identity reads only `sub`).
fn task_token(ti: Uuid, dag: &str, map_index: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": ti.to_string(), "aud": "urn:airflow.apache.org:task", "scope": "execution",
        "iat": now, "nbf": now, "exp": now + 3600, "jti": Uuid::new_v4().simple().to_string(),
        "dag_id": dag, "run_id": "manual__attack", "task_id": "work", "map_index": map_index,
    });
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// What [`frozen_metastore`] and [`idle_fds`] measured, for their row.
struct OwnGateway {
    notes: String,
    slowest: Duration,
    peak: u64,
    lost: u64,
    oom: bool,
}

/// Attack 4: a real PostgreSQL holding the metastore, frozen with SIGSTOP (connections stay
/// open, nothing answers) for 10 s under requests that need it (tasks past the identity
/// cache, an unknown task, an asset by name), with AIRSTATE_METASTORE_TIMEOUT_MS=1000.
/// Each should be a 503 within about the timeout; after SIGCONT the replica serves again.
async fn frozen_metastore(
    limit: &MemoryLimit,
    redis: &RedisServer,
    tally: Arc<Tally>,
) -> OwnGateway {
    let pg = common::Postgres::start();
    let ooms = limit.oom_kills();
    let mut gateway = Gateway::start(
        limit,
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET.to_owned()),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.clone()),
            ("AIRSTATE_REDIS_URL", redis.url.clone()),
            ("AIRSTATE_KEY_PREFIX", "attack-pg:".to_owned()),
            ("AIRSTATE_METASTORE_TIMEOUT_MS", "1000".to_owned()),
            ("AIRSTATE_IDENTITY_CACHE_SECONDS", "1".to_owned()),
            ("AIRSTATE_RECONCILE_INTERVAL_SECONDS", "0".to_owned()),
        ],
    );
    let watch = RssWatch::start(gateway.pid());
    let client = http();
    let mut tis = Vec::new();
    for i in 0..8 {
        let ti = Uuid::now_v7();
        let (dag, run) = (format!("attack_pg_{i}"), "manual__attack".to_owned());
        pg.insert_task_instance(ti, &dag, &run, "work", -1).await;
        tis.push((ti, task_token(ti, &dag, -1)));
    }
    let asset = format!("attack-asset-{}", Uuid::new_v4().simple());
    pg.insert_asset(&asset, &format!("s3://attack/{asset}"), true)
        .await;
    let url_of = |ti: &Uuid, key: &str| format!("{}/execution/store/ti/{ti}/{key}", gateway.base);
    // Warm: each pooled connection used once; these writes must survive the outage.
    let mut acked = Vec::new();
    for (n, (ti, token)) in tis.iter().enumerate() {
        let value = format!("\"before the freeze {n}\"");
        let put = client
            .put(url_of(ti, "kept"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(format!("{{\"value\": {value}}}"));
        if let Some((204, _)) = send(&tally, put).await {
            acked.push((*ti, token.clone(), "kept".to_owned(), value));
        }
    }
    let pids = pg.processes().await;
    common::signal_all(&pids, libc::SIGSTOP);
    let frozen_at = Instant::now();
    // Past the identity cache: every request below needs the metastore.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let mut rounds = 0;
    while frozen_at.elapsed() < Duration::from_secs(10) {
        rounds += 1;
        let mut requests = Vec::new();
        for (ti, token) in &tis {
            requests.push(client.get(url_of(ti, "kept")).bearer_auth(token));
            requests.push(
                client
                    .put(url_of(ti, &format!("frozen-{rounds}")))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body("{\"value\": 1}"),
            );
        }
        let unknown = Uuid::now_v7();
        requests.push(client.get(url_of(&unknown, "k")).bearer_auth(task_token(
            unknown,
            "attack_pg_unknown",
            -1,
        )));
        requests.push(
            client
                .get(format!(
                    "{}/execution/store/asset/by-name/value?name={asset}&key=k",
                    gateway.base
                ))
                .bearer_auth(&tis[0].1),
        );
        let mut answers = tokio::task::JoinSet::new();
        for request in requests {
            let (tally, slowest) = (tally.clone(), slowest.clone());
            answers.spawn(async move {
                let started = Instant::now();
                send(&tally, request).await;
                let took = started.elapsed();
                let mut slowest = slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
            });
        }
        while answers.join_next().await.is_some() {}
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let frozen_for = frozen_at.elapsed();
    let during = tally.summary();
    common::signal_all(&pids, libc::SIGCONT);
    let thawed = Instant::now();
    let (ti, token) = &tis[0];
    let recovered = loop {
        let answer = client
            .get(url_of(ti, "kept"))
            .bearer_auth(token)
            .send()
            .await;
        if answer.is_ok_and(|a| a.status() == 200) {
            break Some(thawed.elapsed());
        }
        if thawed.elapsed() > Duration::from_secs(15) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut lost = 0;
    for (ti, token, key, value) in &acked {
        let body = match client.get(url_of(ti, key)).bearer_auth(token).send().await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if !reads_as(&body, value) {
            lost += 1;
        }
    }
    let peak = watch.peak_bytes();
    let alive = gateway.alive();
    let slowest = *slowest.lock().unwrap();
    OwnGateway {
        notes: format!(
            "frozen {:.1} s, {rounds} rounds of 18 requests (GET and PUT of 8 tasks past the \
             identity cache, an unknown task, an asset by name): {during}; slowest {} ms \
             (AIRSTATE_METASTORE_TIMEOUT_MS=1000); after SIGCONT served again in {}; \
             {} writes made before the freeze re-read; gateway alive after: {alive}",
            frozen_for.as_secs_f64(),
            slowest.as_millis(),
            recovered.map_or("NOT within 15 s".to_owned(), |d| format!(
                "{} ms",
                d.as_millis()
            )),
            acked.len(),
        ),
        slowest,
        peak,
        lost,
        oom: limit.oom_kills() > ooms,
    }
}

/// A new request to `gateway` while it is crowded: its status, "closed" (refused or
/// closed at once: the client can retry elsewhere) or "HUNG" (no answer in 5 s).
async fn probe(base: &str, me: &Task) -> (String, Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let answer = client
        .get(format!("{base}/execution/store/ti/{}/probe", me.ti))
        .bearer_auth(&me.token)
        .send()
        .await;
    let what = match answer {
        Ok(answer) => answer.status().as_u16().to_string(),
        Err(error) if error.is_timeout() => "HUNG".to_owned(),
        Err(_) => "closed".to_owned(),
    };
    (what, started.elapsed())
}

/// Attack 1's descriptor part: the gateway under `prlimit --nofile=1024`, 1,200 idle
/// keep-alive connections (each served one /health, then silent), once with the default
/// AIRSTATE_MAX_CONNECTIONS (1000) and once with it above the descriptor limit (4000).
/// While they are open, new requests must be answered or refused at once, never left
/// hanging; once they close, the replica must serve again.
async fn idle_fds(limit: &MemoryLimit, redis: &RedisServer, tally: Arc<Tally>) -> OwnGateway {
    let ooms = limit.oom_kills();
    let me = task("attack_fds", -1);
    let mut notes = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut peak = 0;
    let mut lost = 0;
    for cap in ["1000", "4000"] {
        let mut env = redis_env(redis);
        env.push(("AIRSTATE_MAX_CONNECTIONS", cap.to_owned()));
        let mut gateway = Gateway::start_prlimited(limit, &env);
        let watch = RssWatch::start(gateway.pid());
        let client = http();
        let url = format!("{}/execution/store/ti/{}/kept-{cap}", gateway.base, me.ti);
        let value = format!("\"written with a cap of {cap}\"");
        let put = client
            .put(&url)
            .bearer_auth(&me.token)
            .header("content-type", "application/json")
            .body(format!("{{\"value\": {value}}}"));
        let acked = matches!(send(&tally, put).await, Some((204, _)));
        let served = Arc::new(AtomicU64::new(0));
        let mut idle = tokio::task::JoinSet::new();
        for _ in 0..1200 {
            let (addr, tally, served) = (gateway.addr.clone(), tally.clone(), served.clone());
            idle.spawn(async move {
                tally.tried();
                let mut stream =
                    tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&addr))
                        .await
                        .ok()?
                        .ok()?;
                let _ = stream
                    .write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
                    .await;
                match tokio::time::timeout(Duration::from_secs(3), read_response(&mut stream)).await
                {
                    Ok(Some((status, body))) => {
                        served.fetch_add(1, Ordering::Relaxed);
                        tally.answer(status, &body);
                    }
                    _ => tally.count("idle: unanswered".into()),
                }
                Some(stream)
            });
        }
        let mut held = Vec::new();
        while let Some(stream) = idle.join_next().await {
            held.extend(stream.ok().flatten());
        }
        let fds = std::fs::read_dir(format!("/proc/{}/fd", gateway.pid()))
            .map(|d| d.count())
            .unwrap_or(0);
        let mut crowded = BTreeMap::<String, u64>::new();
        let mut crowded_slowest = Duration::ZERO;
        for _ in 0..10 {
            tally.tried();
            let (what, took) = probe(&gateway.base, &me).await;
            if what == "HUNG" {
                tally.count("probe: hung".into());
            }
            *crowded.entry(what).or_default() += 1;
            crowded_slowest = crowded_slowest.max(took);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(held);
        let closed_at = Instant::now();
        let recovered = loop {
            tally.tried();
            let (what, _) = probe(&gateway.base, &me).await;
            if what == "404" {
                break Some(closed_at.elapsed());
            }
            if closed_at.elapsed() > Duration::from_secs(20) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if acked {
            let answer = send(&tally, client.get(&url).bearer_auth(&me.token)).await;
            if !answer.is_some_and(|(status, body)| status == 200 && reads_as(&body, &value)) {
                lost += 1;
            }
        }
        slowest = slowest.max(crowded_slowest);
        peak = peak.max(watch.peak_bytes());
        let alive = gateway.alive();
        let crowded: Vec<String> = crowded.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        notes.push(format!(
            "cap {cap}: {} of 1200 idle connections served, gateway holding {fds} descriptors; \
             10 new requests while they were open: {} (slowest {} ms); after they closed, served \
             again in {}; alive after: {alive}",
            served.load(Ordering::Relaxed),
            crowded.join(", "),
            crowded_slowest.as_millis(),
            recovered.map_or("NOT within 20 s".to_owned(), |d| format!(
                "{} ms",
                d.as_millis()
            )),
        ));
    }
    OwnGateway {
        notes: notes.join("; "),
        slowest,
        peak,
        lost,
        oom: limit.oom_kills() > ooms,
    }
}

// ---------------------------------------------------------------------------------------

const ATTACKS: [&str; 14] = [
    "connections",
    "idle-fds",
    "bulk-read",
    "stream",
    "big-puts",
    "tokens",
    "clear-all",
    "chunked",
    "nul",
    "sigterm",
    "export-import",
    "jwks-hang",
    "redis-down",
    "frozen-metastore",
];

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB as f64)
}

fn p99(latencies: &mut [Duration]) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let chosen: Vec<&str> = ATTACKS
        .iter()
        .copied()
        .filter(|a| filters.is_empty() || filters.iter().any(|f| a.contains(f.as_str())))
        .collect();
    assert!(
        !chosen.is_empty(),
        "no attack named {filters:?}; attacks: {ATTACKS:?}"
    );
    assert!(
        std::path::Path::new(binary()).exists(),
        "this harness runs the release binary {}, which is not built: run it with \
         `cargo bench --bench attack` (which builds it) or `cargo build --release` first",
        binary()
    );
    let limit = MemoryLimit::new();
    eprintln!("binary: {}", binary());
    eprintln!("memory limit: {}", limit.describe());
    let redis = RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let gateway = Gateway::start(&limit, &redis_env(&redis));
    let mut ctx = Ctx {
        gateway,
        redis,
        me: task("attack_legit", -1),
        acked: Vec::new(),
        limit,
    };
    let run_started = Instant::now();
    let mut rows = Vec::new();
    for attack in chosen {
        eprintln!("attack: {attack}");
        let tally = Arc::new(Tally::default());
        let legit_tally = Arc::new(Tally::default());
        match attack {
            "jwks-hang" => {
                let (notes, took) = jwks_hang(&ctx.limit);
                rows.push(Row {
                    attack,
                    tried: 1,
                    oom: "no".into(),
                    peak_rss: "-".into(),
                    slowest: format!("{} ms (start-up)", took.as_millis()),
                    legit: "-".into(),
                    bad_5xx: 0,
                    lost: "-".into(),
                    notes,
                });
                continue;
            }
            "redis-down" => {
                let ooms = ctx.limit.oom_kills();
                let (notes, slowest, peak) = redis_down(&ctx.limit, tally.clone()).await;
                let oom = ctx.limit.oom_kills() > ooms || peak > LIMIT_BYTES;
                rows.push(Row {
                    attack,
                    tried: tally.tried.load(Ordering::Relaxed),
                    oom: if oom { "YES" } else { "no" }.into(),
                    peak_rss: mib(peak),
                    slowest: format!("{} ms (its own 503s)", slowest.as_millis()),
                    legit: "-".into(),
                    bad_5xx: tally.bad_5xx.load(Ordering::Relaxed),
                    lost: "-".into(),
                    notes,
                });
                continue;
            }
            "frozen-metastore" | "idle-fds" => {
                let own = if attack == "idle-fds" {
                    idle_fds(&ctx.limit, &ctx.redis, tally.clone()).await
                } else {
                    frozen_metastore(&ctx.limit, &ctx.redis, tally.clone()).await
                };
                rows.push(Row {
                    attack,
                    tried: tally.tried.load(Ordering::Relaxed),
                    oom: if own.oom || own.peak > LIMIT_BYTES {
                        "YES"
                    } else {
                        "no"
                    }
                    .into(),
                    peak_rss: mib(own.peak),
                    slowest: format!("{} ms (its own requests)", own.slowest.as_millis()),
                    legit: "-".into(),
                    bad_5xx: tally.bad_5xx.load(Ordering::Relaxed),
                    lost: own.lost.to_string(),
                    notes: own.notes,
                });
                continue;
            }
            "export-import" => {
                let (notes, lost, oom, peak_slow) = export_import(&ctx, tally.clone()).await;
                let (peak, slow) = peak_slow.split_once('|').unwrap();
                rows.push(Row {
                    attack,
                    tried: tally.tried.load(Ordering::Relaxed),
                    oom: if oom > 0 { "YES" } else { "no" }.into(),
                    peak_rss: peak.into(),
                    slowest: format!("{slow} (slowest step)"),
                    legit: "-".into(),
                    bad_5xx: tally.bad_5xx.load(Ordering::Relaxed),
                    lost: format!("{lost} (lines)"),
                    notes,
                });
                continue;
            }
            _ => {}
        }
        let ooms = ctx.limit.oom_kills();
        let watch = RssWatch::start(ctx.gateway.pid());
        let legit = Legit::start(&ctx.base(), &ctx.me, attack, legit_tally.clone());
        // The client's first writes land before the attack starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let notes = match attack {
            "connections" => connections(&ctx, tally.clone()).await,
            "bulk-read" => bulk_read(&ctx, tally.clone()).await,
            "stream" => stream(&ctx, tally.clone()).await,
            "big-puts" => big_puts(&ctx, tally.clone()).await,
            "tokens" => tokens(&ctx, tally.clone()).await,
            "clear-all" => clear_all(&ctx, tally.clone()).await,
            "chunked" => chunked(&ctx, tally.clone()).await,
            "nul" => nul(&ctx, tally.clone()).await,
            "sigterm" => sigterm(&mut ctx, tally.clone()).await,
            other => unreachable!("{other}"),
        };
        let mut report = legit.finish().await;
        let peak = watch.peak_bytes();
        drop(watch);
        let died = !ctx.gateway.alive();
        let oom_kills = ctx.limit.oom_kills() - ooms;
        let sampled_oom = matches!(ctx.limit.kind, LimitKind::Sampled) && peak > LIMIT_BYTES;
        let oom = if oom_kills > 0 || sampled_oom {
            "YES"
        } else if died && attack != "sigterm" {
            "died"
        } else {
            "no"
        };
        if died {
            ctx.gateway = Gateway::start(&ctx.limit, &redis_env(&ctx.redis));
        }
        let lost = lost_writes(&ctx.base(), &ctx.me, &report.acked).await;
        let slowest = report.latencies.iter().max().copied().unwrap_or_default();
        let p99 = p99(&mut report.latencies);
        ctx.acked.append(&mut report.acked);
        rows.push(Row {
            attack,
            tried: tally.tried.load(Ordering::Relaxed),
            oom: oom.into(),
            peak_rss: mib(peak),
            slowest: format!("{} ms (p99 {} ms)", slowest.as_millis(), p99.as_millis()),
            legit: format!("{}/{}", report.answered, report.failed),
            bad_5xx: tally.bad_5xx.load(Ordering::Relaxed)
                + legit_tally.bad_5xx.load(Ordering::Relaxed),
            lost: lost.to_string(),
            notes,
        });
    }
    let all_lost = lost_writes(&ctx.base(), &ctx.me, &ctx.acked).await;
    let total = run_started.elapsed();
    println!(
        "\nairstate attacks under 128 MiB: release binary, Redis appendonly yes + appendfsync always, \
         ulimit -n {FD_LIMIT}, defaults otherwise; {:.0} s in all",
        total.as_secs_f64()
    );
    println!("memory limit: {}", ctx.limit.describe());
    println!(
        "\n| attack | requests tried | OOM | peak RSS MiB | slowest legitimate answer | legitimate answered/failed | 5xx outside documented 503s | writes lost |"
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.attack,
            row.tried,
            row.oom,
            row.peak_rss,
            row.slowest,
            row.legit,
            row.bad_5xx,
            row.lost
        );
    }
    println!(
        "\nevery acknowledged write of the run re-read at the end: {} of {} lost",
        all_lost,
        ctx.acked.len()
    );
    println!();
    for row in &rows {
        println!("- {}: {}", row.attack, row.notes);
    }
}
