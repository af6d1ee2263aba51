//! The real Apache Airflow 3.3.2 end to end, with airstate as its front door.
//!
//! One deployment per test binary, started on first use: a PostgreSQL and a `redis-server`
//! of the test's own, `airflow db migrate`, the real `airstate` binary (identity from the
//! metastore, state in Redis, everything else forwarded to Airflow's API server), then
//! `airflow api-server`, `scheduler` (LocalExecutor), `dag-processor` and `triggerer`, all on
//! free loopback ports, with `AIRFLOW_HOME` in a temporary folder and the DAGs of
//! `tests/airflow/dags`. The workers' `AIRFLOW__CORE__EXECUTION_API_SERVER_URL` is airstate's
//! URL and nothing else. Every scenario is a test of its own against that deployment; each
//! one prints how long it took, and on failure the logs of every process and of its DAG's
//! task instances.
//!
//! Every process runs in a process group of its own. They are stopped when the test binary
//! exits (an `atexit` hook stops each group and reaps it; the test process is made a child
//! subreaper so that Airflow's grandchildren are reaped too), or, if the test binary dies
//! without running it, by a watchdog that stops the groups once it is gone.

use crate::common;
use crate::gateway::seg;

use std::fs;
use std::future::Future;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use common::{free_port, redis_cli, redis_pings};
use serde_json::{json, Value};

const JWT_SECRET: &str = "airstate-e2e-jwt-secret-long-enough-for-hs512-0123456789";
const ADMIN_TOKEN: &str = "airstate-e2e-admin-token-0123456789abcdef";
const KEY_PREFIX: &str = "e2e:";
/// The DAGs of tests/airflow/dags (e2e_triggers.py holds none) plus the orphan scenario's.
const DAG_COUNT: u64 = 9;

// ---------------------------------------------------------------------------------------
// Processes

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Stopped after the others (the stores everything else talks to).
    store: bool,
}

/// Everything this binary started, for the exit hook and the watchdog.
static PROCS: Mutex<Vec<Proc>> = Mutex::new(Vec::new());
static WATCHDOG: Mutex<Option<(Child, PathBuf)>> = Mutex::new(None);
static FAILED: AtomicBool = AtomicBool::new(false);
static ROOT: OnceLock<PathBuf> = OnceLock::new();

fn procs() -> std::sync::MutexGuard<'static, Vec<Proc>> {
    PROCS.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn stop_at_exit() {
    stop_everything();
}

/// Registers the exit hook and the watchdog, and makes this process the reaper of its
/// orphaned descendants (PID 1 here reaps nothing).
fn install_teardown(root: &Path) {
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::atexit(stop_at_exit);
    }
    let groups = root.join("process-groups");
    fs::write(&groups, "").unwrap();
    let parent = std::process::id();
    let script = format!(
        r#"while [ -r /proc/{parent}/stat ] && [ "$(cut -d' ' -f3 /proc/{parent}/stat)" != Z ]; do sleep 0.5; done
for g in $(cat '{groups}'); do kill -TERM -- -$g 2>/dev/null; done
sleep 15
for g in $(cat '{groups}'); do kill -KILL -- -$g 2>/dev/null; done"#,
        groups = groups.display()
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog");
    *WATCHDOG.lock().unwrap() = Some((child, groups));
}

/// Starts `command` in a process group of its own, output to `logs/<name>.log`.
fn spawn(root: &Path, name: &str, mut command: Command, store: bool) {
    let log = root.join("logs").join(format!("{name}.log"));
    let file = fs::File::create(&log).unwrap();
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    if let Some((_, groups)) = WATCHDOG.lock().unwrap().as_ref() {
        let mut f = fs::OpenOptions::new().append(true).open(groups).unwrap();
        writeln!(f, "{}", child.id()).unwrap();
    }
    procs().push(Proc {
        name: name.to_owned(),
        child,
        log,
        store,
    });
}

fn group_alive(pgid: i32) -> bool {
    // Reap whatever of the group has exited (our children, or orphans handed to us).
    while unsafe { libc::waitpid(-pgid, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Stops process groups: SIGTERM, up to `grace` for them to go, then SIGKILL.
fn stop_groups(members: &mut [Proc], grace: Duration) {
    for p in members.iter() {
        unsafe { libc::kill(-(p.child.id() as i32), libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && members.iter().any(|p| group_alive(p.child.id() as i32)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in members.iter_mut() {
        let pgid = p.child.id() as i32;
        if group_alive(pgid) {
            eprintln!(
                "airflow_e2e: {} did not stop in {grace:?}; killing it",
                p.name
            );
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while group_alive(pgid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = p.child.try_wait();
    }
}

fn stop_everything() {
    let mut all = std::mem::take(&mut *procs());
    if let Some((mut watchdog, _)) = WATCHDOG.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = watchdog.kill();
        let _ = watchdog.wait();
    }
    let (mut stores, mut services): (Vec<Proc>, Vec<Proc>) = all.drain(..).partition(|p| p.store);
    stop_groups(&mut services, Duration::from_secs(30));
    stop_groups(&mut stores, Duration::from_secs(15));
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    if let Some(root) = ROOT.get() {
        if FAILED.load(Ordering::SeqCst) {
            eprintln!("airflow_e2e: logs kept in {}", root.display());
        } else {
            let _ = fs::remove_dir_all(root);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Prints the end of every process's log and of the task logs of `dags`.
fn dump_logs(root: &Path, dags: &[&str]) {
    for p in procs().iter() {
        eprintln!(
            "===== {} ({}) =====\n{}",
            p.name,
            p.log.display(),
            tail(&p.log, 60)
        );
    }
    let mut task_logs = Vec::new();
    collect_files(&root.join("home").join("logs"), &mut task_logs);
    for log in task_logs {
        let shown = log.to_string_lossy().to_string();
        if dags.iter().any(|d| shown.contains(&format!("dag_id={d}/"))) {
            eprintln!("===== task log {shown} =====\n{}", tail(&log, 80));
        }
    }
}

fn collect_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, into);
        } else {
            into.push(path);
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < timeout,
            "{what}: not ready in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one of the repository's install scripts (bounded) and returns the path it prints
/// on its last line.
fn install_script(name: &str, timeout: Duration) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let root = ROOT.get().expect("the deployment's folder");
    let log = root.join("logs").join(format!("{name}.log"));
    let mut command = Command::new("bash");
    command.arg(&script);
    let ok = run_bounded(command, &log, timeout);
    let output = fs::read_to_string(&log).unwrap_or_default();
    assert!(ok, "scripts/{name} failed or timed out:\n{output}");
    PathBuf::from(output.lines().last().unwrap_or("").trim())
}

/// The venv's python, from scripts/airflow-venv.sh (which makes the venv when missing).
fn airflow_python() -> PathBuf {
    install_script("airflow-venv.sh", Duration::from_secs(1200))
}

/// playwright-core's folder, from scripts/browser-tools.sh.
fn playwright_core() -> PathBuf {
    install_script("browser-tools.sh", Duration::from_secs(300))
}

// ---------------------------------------------------------------------------------------
// The deployment

struct Deployment {
    root: PathBuf,
    airflow: PathBuf,
    plain_pg: String,
    redis_port: u16,
    /// airstate: what workers, the browser and the test's REST calls use.
    front: String,
    /// A second airstate on a Redis Cluster, same metastore and upstream: the lifecycle
    /// scenarios check that it follows Airflow's runs and assets too.
    cluster_front: String,
    /// Airflow's API server itself (only for what the test must not send through airstate).
    api: String,
    api_port: u16,
    env: Vec<(String, String)>,
    /// Scenarios share the deployment; one that restarts a component takes it alone.
    phase: RwLock<()>,
}

static DEPLOYMENT: OnceLock<Result<Deployment, String>> = OnceLock::new();

fn deployment() -> &'static Deployment {
    let started = DEPLOYMENT.get_or_init(|| {
        let start = Instant::now();
        let root = tempfile::Builder::new()
            .prefix("airstate-e2e-")
            .tempdir()
            .unwrap()
            .keep();
        ROOT.set(root.clone()).unwrap();
        fs::create_dir_all(root.join("logs")).unwrap();
        install_teardown(&root);
        match std::panic::catch_unwind(|| Deployment::start(root.clone())) {
            Ok(d) => {
                eprintln!(
                    "airflow_e2e: deployment ready in {:.1?} (logs in {})",
                    start.elapsed(),
                    root.display()
                );
                Ok(d)
            }
            Err(panic) => {
                FAILED.store(true, Ordering::SeqCst);
                dump_logs(&root, &[]);
                Err(panic_message(&panic))
            }
        }
    });
    match started {
        Ok(d) => d,
        Err(message) => panic!("the Airflow deployment did not start: {message}"),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn http_status(url: &str) -> Option<u16> {
    // A tiny blocking probe for start-up waits (the scenarios use reqwest).
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

fn http_body(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).ok()?;
    reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

fn psql(port: u16, database: &str, sql: &str) -> std::process::Output {
    Command::new(common::postgres_bin("psql"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql")
}

impl Deployment {
    fn start(root: PathBuf) -> Deployment {
        let python = airflow_python();
        let airflow = python.with_file_name("airflow");

        // PostgreSQL, empty: Airflow creates its own schema.
        let pg_dir = root.join("pg");
        fs::create_dir_all(&pg_dir).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg_dir)
                .status();
            assert!(status.is_ok_and(|s| s.success()), "chown to postgres");
        }
        let initdb = common::as_server_user(&format!(
            "{} -D '{}/data' -A trust -U postgres --no-sync -E UTF8",
            common::postgres_bin("initdb").display(),
            pg_dir.display()
        ));
        let out = Command::new("sh").arg("-c").arg(initdb).output().unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg_port = free_port();
        let server = common::as_server_user(&format!(
            "{} -D '{dir}/data' -p {pg_port} -k '{dir}' -c listen_addresses=127.0.0.1 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            common::postgres_bin("postgres").display(),
            dir = pg_dir.display()
        ));
        let mut argv = server.split_whitespace();
        let mut pg = Command::new(argv.next().unwrap());
        pg.args(argv.map(|a| a.trim_matches('\'')));
        spawn(&root, "postgres", pg, true);
        wait_until("postgres", Duration::from_secs(30), || {
            psql(pg_port, "postgres", "SELECT 1").status.success()
        });
        let created = psql(pg_port, "postgres", "CREATE DATABASE airflow");
        assert!(created.status.success(), "CREATE DATABASE");
        let sql_conn = format!("postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/airflow");
        let plain_pg =
            format!("postgresql://postgres@127.0.0.1:{pg_port}/airflow?connect_timeout=5");

        // Redis.
        let redis_port = free_port();
        let redis_dir = root.join("redis");
        fs::create_dir_all(&redis_dir).unwrap();
        let mut redis = Command::new("redis-server");
        redis
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--dir")
            .arg(&redis_dir);
        spawn(&root, "redis", redis, true);
        wait_until("redis", Duration::from_secs(20), || redis_pings(redis_port));

        // The DAGs folder: the repository's DAGs plus the orphan scenario's file.
        let dags = root.join("dags");
        fs::create_dir_all(&dags).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/airflow/dags");
        for entry in fs::read_dir(&source).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "py") {
                fs::copy(entry.path(), dags.join(entry.file_name())).unwrap();
            }
        }
        write_orphan_dag(&dags, "e2e_orphan_a");

        let api_port = free_port();
        let airstate_port = free_port();
        let api = format!("http://127.0.0.1:{api_port}");
        let front = format!("http://127.0.0.1:{airstate_port}");
        let home = root.join("home");
        fs::create_dir_all(&home).unwrap();
        let path = format!(
            "{}:{}",
            airflow.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env: Vec<(String, String)> = [
            ("PATH", path.as_str()),
            ("HOME", home.to_str().unwrap()),
            ("LANG", "C.UTF-8"),
            // The watcher's trigger class, importable by the triggerer and the dag-processor.
            (
                "PYTHONPATH",
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/airflow/triggers"),
            ),
            ("AIRFLOW_HOME", home.to_str().unwrap()),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", sql_conn.as_str()),
            ("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
            ("AIRFLOW__CORE__PARALLELISM", "8"),
            ("AIRFLOW__CORE__DAGS_FOLDER", dags.to_str().unwrap()),
            ("AIRFLOW__CORE__LOAD_EXAMPLES", "False"),
            ("AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "False"),
            ("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True"),
            (
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                &format!("{front}/execution/"),
            ),
            ("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET),
            ("AIRFLOW__API__HOST", "127.0.0.1"),
            ("AIRFLOW__API__PORT", &api_port.to_string()),
            ("AIRFLOW__API__WORKERS", "1"),
            // The orphan pass (and the rest of the scheduler's parsing cleanup) every 5 s.
            ("AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL", "5"),
            ("AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "10"),
            ("AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL", "60"),
            ("AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL", "1"),
            // A failing state route fails the task in seconds, not after minutes of retries;
            // a slow answer on this loaded 2-core machine is waited for instead (5 s default).
            ("AIRFLOW__WORKERS__EXECUTION_API_RETRIES", "3"),
            ("AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX", "3"),
            ("AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT", "60"),
            // The scheduler's and the triggerer's log servers, off their fixed default ports.
            (
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
                &free_port().to_string(),
            ),
            (
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
                &free_port().to_string(),
            ),
            // Airflow's own state paths (the triggerer's watchers, clear_on_success, the
            // api-server's Execution API routes) store through airstate as well.
            (
                "AIRFLOW__STATE_STORE__BACKEND",
                "airstate_airflow.AirstateBackend",
            ),
            ("AIRSTATE_URL", front.as_str()),
            ("AIRSTATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

        let migrate_start = Instant::now();
        let mut migrate = Command::new(&airflow);
        migrate
            .args(["db", "migrate"])
            .env_clear()
            .envs(env.iter().cloned());
        let log = root.join("logs").join("db-migrate.log");
        let out = run_bounded(migrate, &log, Duration::from_secs(240));
        assert!(out, "airflow db migrate failed:\n{}", tail(&log, 40));
        eprintln!("airflow_e2e: db migrate in {:.1?}", migrate_start.elapsed());

        // airstate, before Airflow's API server is up (an absent upstream is not fatal); and
        // its twin on a Redis Cluster.
        let cluster_port = free_port();
        let cluster_front = format!("http://127.0.0.1:{cluster_port}");
        let cluster = common::RedisCluster::shared();
        for (name, port, redis) in [
            (
                "airstate",
                airstate_port,
                format!("redis://127.0.0.1:{redis_port}"),
            ),
            ("airstate-cluster", cluster_port, cluster.url.clone()),
        ] {
            let mut airstate = Command::new(env!("CARGO_BIN_EXE_airstate"));
            airstate
                .arg("serve")
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("RUST_LOG", "info")
                .env("AIRSTATE_LISTEN", format!("127.0.0.1:{port}"))
                .env("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
                .env("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &sql_conn)
                .env("AIRSTATE_REDIS_URL", redis)
                .env("AIRSTATE_KEY_PREFIX", KEY_PREFIX)
                .env("AIRSTATE_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("AIRSTATE_AIRFLOW_API_URL", &api)
                .env("AIRSTATE_RECONCILE_INTERVAL_SECONDS", "2");
            spawn(&root, name, airstate, false);
            let health = format!("http://127.0.0.1:{port}/health");
            wait_until(name, Duration::from_secs(30), || {
                http_status(&health) == Some(200)
            });
        }

        let deployment = Deployment {
            root: root.clone(),
            airflow,
            plain_pg,
            redis_port,
            front,
            cluster_front,
            api,
            api_port,
            env,
            phase: RwLock::new(()),
        };
        deployment.start_api_server(&[]);
        for component in ["scheduler", "dag-processor", "triggerer"] {
            let mut command = Command::new(&deployment.airflow);
            command
                .arg(component)
                .env_clear()
                .envs(deployment.env.iter().cloned());
            spawn(&root, component, command, false);
        }
        let health = format!("{}/api/v2/monitor/health", deployment.api);
        wait_until(
            "scheduler, dag-processor and triggerer healthy",
            Duration::from_secs(180),
            || {
                let Some(body) = http_body(&health) else {
                    return false;
                };
                let Ok(v) = serde_json::from_str::<Value>(&body) else {
                    return false;
                };
                ["metadatabase", "scheduler", "triggerer", "dag_processor"]
                    .iter()
                    .all(|c| v[c]["status"] == "healthy")
            },
        );
        let listing = format!(
            "{}/api/v2/dags?dag_id_pattern=e2e_&limit=100",
            deployment.api
        );
        wait_until("every DAG parsed", Duration::from_secs(180), || {
            http_body(&listing)
                .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                .and_then(|v| v["total_entries"].as_u64())
                .is_some_and(|n| n >= DAG_COUNT)
        });
        deployment
    }

    /// Starts Airflow's API server with the common environment plus `extra`.
    fn start_api_server(&self, extra: &[(&str, &str)]) {
        let mut command = Command::new(&self.airflow);
        command
            .args(["api-server", "--port", &self.api_port.to_string()])
            .args(["--host", "127.0.0.1"])
            .env_clear()
            .envs(self.env.iter().cloned())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        spawn(&self.root, "api-server", command, false);
        let version = format!("{}/api/v2/version", self.api);
        wait_until("api-server", Duration::from_secs(120), || {
            http_status(&version) == Some(200)
        });
        // The Execution API is built on its first request, which took the API server 20 s
        // on a loaded machine, timing out the first task's start; pay for it here.
        let warm = Instant::now();
        let health = format!("{}/execution/health", self.api);
        wait_until(
            "api-server's Execution API",
            Duration::from_secs(120),
            || http_status(&health) == Some(200),
        );
        eprintln!(
            "airflow_e2e: api-server's Execution API answered in {:.1?}",
            warm.elapsed()
        );
    }

    fn restart_api_server(&self, extra: &[(&str, &str)]) {
        let mut old: Vec<Proc> = {
            let mut all = procs();
            let (api, rest): (Vec<Proc>, Vec<Proc>) =
                all.drain(..).partition(|p| p.name == "api-server");
            *all = rest;
            api
        };
        // Keep the old log beside the new one.
        for p in &mut old {
            let _ = fs::rename(
                &p.log,
                p.log.with_extension(format!("{}.log", p.child.id())),
            );
            p.log = p.log.with_extension(format!("{}.log", p.child.id()));
        }
        stop_groups(&mut old, Duration::from_secs(30));
        self.start_api_server(extra);
    }

    /// Base URL for Airflow's REST API and UI as users reach it: airstate's.
    fn rest(&self) -> &str {
        &self.front
    }
}

fn run_bounded(mut command: Command, log: &Path, timeout: Duration) -> bool {
    let file = fs::File::create(log).unwrap();
    let mut child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_orphan_dag(dags: &Path, asset: &str) {
    let template = include_str!("../airflow/orphan_dag.py.template");
    fs::write(
        dags.join("e2e_orphan.py"),
        template.replace("__ASSET__", asset),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Scenarios' tools

/// Runs one scenario against the shared deployment, timed; on failure prints the logs.
fn scenario<F, Fut>(name: &str, dags: &[&str], exclusive: bool, body: F)
where
    F: FnOnce(&'static Deployment) -> Fut,
    Fut: Future<Output = ()>,
{
    let d = deployment();
    let _shared;
    let _alone;
    if exclusive {
        _alone = d.phase.write().unwrap_or_else(|e| e.into_inner());
    } else {
        _shared = d.phase.read().unwrap_or_else(|e| e.into_inner());
    }
    let start = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(body(d))));
    let took = start.elapsed();
    match result {
        Ok(()) => eprintln!("airflow_e2e: scenario {name} passed in {took:.1?}"),
        Err(panic) => {
            FAILED.store(true, Ordering::SeqCst);
            eprintln!("airflow_e2e: scenario {name} FAILED after {took:.1?}");
            dump_logs(&d.root, dags);
            std::panic::resume_unwind(panic);
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

impl Deployment {
    async fn trigger(&self, dag: &str, run_id: &str, conf: Value) {
        let (status, body) = send(
            client()
                .post(format!("{}/api/v2/dags/{dag}/dagRuns", self.rest()))
                .json(&json!({"dag_run_id": run_id, "logical_date": null, "conf": conf})),
        )
        .await;
        assert_eq!(status, 200, "triggering {dag} {run_id}: {body}");
    }

    async fn run_state(&self, dag: &str, run_id: &str) -> (u16, Value) {
        send(client().get(format!(
            "{}/api/v2/dags/{dag}/dagRuns/{}",
            self.rest(),
            seg(run_id)
        )))
        .await
    }

    /// Waits for a run to finish and returns its final state.
    async fn wait_run(&self, dag: &str, run_id: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let (status, body) = self.run_state(dag, run_id).await;
            let state = body["state"].as_str().unwrap_or("").to_owned();
            if status == 200 && (state == "success" || state == "failed") {
                return state;
            }
            assert!(
                start.elapsed() < timeout,
                "{dag} {run_id} still {state:?} ({status}) after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn expect_success(&self, dag: &str, run_id: &str) {
        let state = self.wait_run(dag, run_id, Duration::from_secs(180)).await;
        assert_eq!(state, "success", "{dag} {run_id} ended {state}");
    }

    async fn task_instance(&self, dag: &str, run_id: &str, task: &str) -> Value {
        let (status, body) = send(client().get(format!(
            "{}/api/v2/dags/{dag}/dagRuns/{}/taskInstances/{task}",
            self.rest(),
            seg(run_id)
        )))
        .await;
        assert_eq!(status, 200, "task instance {dag} {run_id} {task}: {body}");
        body
    }

    /// The keys and values of a task scope, read through airstate's admin API (Redis).
    async fn task_state(&self, dag: &str, run_id: &str, task: &str, map_index: i64) -> Value {
        self.task_state_at(&self.front, dag, run_id, task, map_index)
            .await
    }

    async fn task_state_at(
        &self,
        base: &str,
        dag: &str,
        run_id: &str,
        task: &str,
        map_index: i64,
    ) -> Value {
        let (status, body) = send(
            client()
                .get(format!(
                    "{base}/admin/v1/dags/{dag}/dagRuns/{}/taskInstances/{task}/state-store?map_index={map_index}",
                    seg(run_id)
                ))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(
            status, 200,
            "admin listing of {dag} {run_id} {task}: {body}"
        );
        entries_by_key(&body)
    }

    /// An asset's entries through the admin API, by name (active assets only): (status,
    /// {key: entry}).
    async fn asset_state(&self, name: &str) -> (u16, Value) {
        self.admin_asset(&format!("by-name/state-store?name={}", seg(name)))
            .await
    }

    /// The same by Airflow's asset id, which reaches an asset whether active or not.
    async fn asset_state_by_id(&self, id: i64) -> (u16, Value) {
        self.asset_state_by_id_at(&self.front, id).await
    }

    async fn asset_state_by_id_at(&self, base: &str, id: i64) -> (u16, Value) {
        self.admin_asset_at(base, &format!("by-id/{id}/state-store"))
            .await
    }

    async fn admin_asset(&self, route: &str) -> (u16, Value) {
        self.admin_asset_at(&self.front, route).await
    }

    /// A PUT on the admin API of the airstate at `base`; `route` is under `/admin/v1/`.
    async fn admin_put(&self, base: &str, route: &str, value: Value) {
        let (status, body) = send(
            client()
                .put(format!("{base}/admin/v1/{route}"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({ "value": value })),
        )
        .await;
        assert!((200..300).contains(&status), "PUT {route}: {status} {body}");
    }

    async fn admin_asset_at(&self, base: &str, route: &str) -> (u16, Value) {
        let (status, body) = send(
            client()
                .get(format!("{base}/admin/v1/assets/{route}"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
        let entries = if status == 200 {
            let mut by_key = serde_json::Map::new();
            for entry in body["entries"].as_array().cloned().unwrap_or_default() {
                by_key.insert(entry["key"].as_str().unwrap().to_owned(), entry);
            }
            Value::Object(by_key)
        } else {
            body
        };
        (status, entries)
    }

    /// The sum of airstate's `airstate_http_requests_total` series whose labels hold `label`.
    async fn requests_counted(&self, label: &str) -> f64 {
        let metrics = common::scrape(&self.front).await;
        metrics
            .lines()
            .filter(|l| l.starts_with("airstate_http_requests_total{") && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn sql(&self, query: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(&self.plain_pg, tokio_postgres::NoTls)
            .await
            .expect("metastore");
        tokio::spawn(connection);
        let row = tokio::time::timeout(Duration::from_secs(15), client.query_one(query, &[]))
            .await
            .unwrap_or_else(|_| panic!("{query}: no answer in 15 s"))
            .expect(query);
        row.get::<_, i64>(0)
    }

    /// Rows Airflow's own tables hold for a DAG's task state.
    async fn sql_task_rows(&self, dag: &str) -> i64 {
        self.sql(&format!(
            "SELECT count(*) FROM task_state_store WHERE dag_id = '{dag}'"
        ))
        .await
    }

    async fn sql_asset_rows(&self, asset: &str) -> i64 {
        self.sql(&format!(
            "SELECT count(*) FROM asset_state_store s JOIN asset a ON a.id = s.asset_id \
             WHERE a.name = '{asset}'"
        ))
        .await
    }
}

/// `{"entries": [{"key", "value", ...}]}` → `{key: value}`.
fn entries_by_key(listing: &Value) -> Value {
    let mut by_key = serde_json::Map::new();
    for entry in listing["entries"].as_array().cloned().unwrap_or_default() {
        by_key.insert(
            entry["key"].as_str().unwrap().to_owned(),
            entry["value"].clone(),
        );
    }
    Value::Object(by_key)
}

fn assert_not_in_airflows_tables(what: &str, sql_rows: i64) {
    assert_eq!(sql_rows, 0, "{what}: Airflow's tables hold {sql_rows} rows");
}

// ---------------------------------------------------------------------------------------
// Issue 12: workers, REST clients and the UI through airstate

#[test]
fn a_retry_reads_the_state_its_first_try_wrote() {
    scenario("retry", &["e2e_retry"], false, |d| async move {
        d.trigger("e2e_retry", "retry-1", json!({})).await;
        d.expect_success("e2e_retry", "retry-1").await;
        let ti = d.task_instance("e2e_retry", "retry-1", "flaky").await;
        assert_eq!(ti["try_number"], 2, "the task was not retried: {ti}");
        let keys = redis_cli(
            d.redis_port,
            &["--scan", "--pattern", &format!("{KEY_PREFIX}*")],
        );
        assert!(!keys.is_empty(), "airstate's Redis holds no keys");
        let sql = d.sql_task_rows("e2e_retry").await;
        let state = d.task_state("e2e_retry", "retry-1", "flaky", -1).await;
        assert_eq!(
            state,
            json!({"first/try": {"try": 1, "job": "j-1/a"},
                   "second/try": {"try": 2, "resumed": "j-1/a"}})
        );

        assert_not_in_airflows_tables("retry", sql);
    });
}

#[test]
fn a_task_mapped_over_three_keeps_keys_holding_slashes_per_map_index() {
    scenario("mapped", &["e2e_mapped"], false, |d| async move {
        d.trigger("e2e_mapped", "mapped-1", json!({})).await;
        d.expect_success("e2e_mapped", "mapped-1").await;
        for n in 0..3 {
            let state = d.task_state("e2e_mapped", "mapped-1", "each", n).await;
            assert_eq!(
                state,
                json!({format!("part/{n}/of/3"): {"n": n}, "shared/name": format!("index-{n}")}),
                "map index {n}"
            );
        }
        assert_eq!(
            d.task_state("e2e_mapped", "mapped-1", "each", -1).await,
            json!({}),
            "nothing under map index -1"
        );

        let sql = d.sql_task_rows("e2e_mapped").await;
        assert_not_in_airflows_tables("mapped", sql);
    });
}

#[test]
fn a_producer_writes_asset_state_that_a_consumer_reads() {
    scenario("assets", &["e2e_assets"], false, |d| async move {
        d.trigger("e2e_assets", "assets-1", json!({})).await;
        d.expect_success("e2e_assets", "assets-1").await;
        let (status, state) = d.asset_state("e2e_orders").await;
        assert_eq!(status, 200, "{state}");
        let entry = &state["watermark/2026-12"];
        assert_eq!(
            entry["value"],
            json!({"rows": 42, "run": "assets-1"}),
            "{state}"
        );
        assert_eq!(entry["last_updated_by"]["kind"], "task", "{entry}");
        assert_eq!(entry["last_updated_by"]["task_id"], "produce", "{entry}");

        let sql = d.sql_asset_rows("e2e_orders").await;
        assert_not_in_airflows_tables("assets", sql);
    });
}

#[test]
fn a_variable_and_an_xcom_pass_through_the_forwarded_routes() {
    scenario("forwarded", &["e2e_forwarded"], false, |d| async move {
        let (status, body) = send(
            client()
                .post(format!("{}/api/v2/variables", d.rest()))
                .json(&json!({"key": "e2e_variable", "value": "through the front door"})),
        )
        .await;
        assert!(
            status == 201 || status == 200,
            "setting the variable: {status} {body}"
        );
        d.trigger("e2e_forwarded", "forwarded-1", json!({})).await;
        d.expect_success("e2e_forwarded", "forwarded-1").await;
        let (status, xcom) = send(client().get(format!(
            "{}/api/v2/dags/e2e_forwarded/dagRuns/forwarded-1/taskInstances/push/xcomEntries/return_value",
            d.rest()
        )))
        .await;
        assert_eq!(status, 200, "{xcom}");
        // The workers' calls went through airstate: forwarded ones and served state routes.
        assert!(d.requests_counted("route=\"forwarded\"").await > 0.0);
        assert!(d.requests_counted("route=\"/execution/store/ti/").await > 0.0);
        let value = match &xcom["value"] {
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            other => other.clone(),
        };
        assert_eq!(
            value,
            json!({"variable": "through the front door", "from": "push"})
        );
    });
}

/// A JWT Airflow did not sign (same claims shape, another key).
fn forged_token() -> String {
    let now = chrono::Utc::now().timestamp();
    let claims =
        json!({"sub": "admin", "aud": "apache-airflow", "iat": now, "nbf": now, "exp": now + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not-airflows-secret-not-airflows-secret-0000"),
    )
    .unwrap()
}

#[test]
fn airflows_ui_through_airstate_shows_the_key_a_worker_wrote() {
    scenario("ui", &["e2e_ui"], false, |d| async move {
        let marker = format!("m-{}", uuid::Uuid::new_v4().simple());
        d.trigger("e2e_ui", "ui-1", json!({"marker": marker})).await;
        d.expect_success("e2e_ui", "ui-1").await;
        let sql = d.sql_task_rows("e2e_ui").await;
        assert_not_in_airflows_tables("ui", sql);
        assert_eq!(
            d.task_state("e2e_ui", "ui-1", "write", -1).await,
            json!({"shown/in-the-ui": {"written_by": "worker", "marker": marker}})
        );

        // Airflow's Core REST API route, as the UI calls it, through airstate.
        let route = format!(
            "{}/api/v2/dags/e2e_ui/dagRuns/ui-1/taskInstances/write/state-store",
            d.rest()
        );
        let (status, listing) = send(client().get(&route)).await;
        assert_eq!(status, 200, "{listing}");
        assert!(listing.to_string().contains(&marker), "listing: {listing}");
        // Access stays Airflow's decision: a token Airflow did not sign, or garbage, is
        // refused with Airflow's answer and sees nothing.
        for bad in [forged_token(), "not-a-jwt".to_owned()] {
            let (status, body) = send(client().get(&route).bearer_auth(&bad)).await;
            assert!(status == 401 || status == 403, "{status} {body}");
            assert!(!body.to_string().contains(&marker), "leaked: {body}");
            let (status, body) = send(
                client()
                    .put(format!("{route}/edited%2Fby-forger"))
                    .bearer_auth(&bad)
                    .json(&json!({"value": 1})),
            )
            .await;
            assert!(status == 401 || status == 403, "{status} {body}");
        }
        // An operator's edit through the Core REST API reaches what workers read.
        let (status, body) = send(
            client()
                .put(format!("{route}/edited%2Fin-the-ui"))
                .json(&json!({"value": {"by": "operator"}})),
        )
        .await;
        assert!((200..300).contains(&status), "{status} {body}");
        let state = d.task_state("e2e_ui", "ui-1", "write", -1).await;
        assert_eq!(
            state["edited/in-the-ui"],
            json!({"by": "operator"}),
            "{state}"
        );
        assert_eq!(
            d.sql_task_rows("e2e_ui").await,
            0,
            "the edit went to Airflow's tables"
        );

        // The UI itself, in headless Chromium, through airstate's URL.
        let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("artifacts");
        fs::create_dir_all(&artifacts).unwrap();
        let screenshot = artifacts.join("airflow-ui-task-state.png");
        let _ = fs::remove_file(&screenshot);
        let page = format!(
            "{}/dags/e2e_ui/runs/ui-1/tasks/write/task-state-store",
            d.rest()
        );
        let playwright = playwright_core();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/airflow/ui_state_view.js"
        );
        let mut browser = Command::new("node");
        browser
            .arg(script)
            .arg(&page)
            .arg(&screenshot)
            .arg("shown/in-the-ui")
            .arg(&marker)
            .env("PLAYWRIGHT_CORE", &playwright)
            .env("CHROMIUM", "/usr/bin/chromium");
        let log = d.root.join("logs").join("browser.log");
        let finished = tokio::task::spawn_blocking({
            let log = log.clone();
            move || run_bounded(browser, &log, Duration::from_secs(150))
        })
        .await
        .unwrap();
        let output = fs::read_to_string(&log).unwrap_or_default();
        let report: Value = output
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        assert!(finished && report["ok"] == true, "browser: {output}");
        let text = report["text"].as_str().unwrap_or("");
        assert!(text.contains("shown/in-the-ui"), "page text: {text}");
        assert!(
            text.contains(&marker),
            "the value is not on the page: {text}"
        );
        let requests: Vec<&str> = report["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r.as_str())
            .collect();
        let state_calls: Vec<&&str> = requests
            .iter()
            .filter(|r| r.contains("/state-store"))
            .collect();
        assert!(
            !state_calls.is_empty(),
            "the UI read no state: {requests:?}"
        );
        for call in &requests {
            assert!(
                call.contains(d.rest()),
                "the UI left the front door: {call}"
            );
        }
        for call in &state_calls {
            assert!(call.starts_with("200 "), "state call failed: {call}");
        }
        // Served by airstate itself, not forwarded to Airflow's tables.
        assert!(
            d.requests_counted("route=\"/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store").await
                > 0.0
        );
        assert!(screenshot.exists(), "no screenshot");
        eprintln!("airflow_e2e: screenshot {}", screenshot.display());
    });
}

// ---------------------------------------------------------------------------------------
// Issue 13: Airflow's lifecycle, followed by airstate

#[test]
fn a_deleted_run_recreated_with_the_same_run_id_starts_empty() {
    scenario("rerun", &["e2e_rerun"], false, |d| async move {
        let (dag, run, task) = ("e2e_rerun", "rerun-1", "remember");
        d.trigger(dag, run, json!({"generation": 1})).await;
        d.expect_success(dag, run).await;
        assert_eq!(
            d.task_state(dag, run, task, -1).await,
            json!({"runs/seen": {"generation": 1}})
        );
        // The same run's state on the Cluster airstate too (written as an operator would).
        let scope = format!("dags/{dag}/dagRuns/{run}/taskInstances/{task}/state-store");
        d.admin_put(
            &d.cluster_front,
            &format!("{scope}/cluster%2Fprobe"),
            json!(1),
        )
        .await;
        assert_eq!(
            d.task_state_at(&d.cluster_front, dag, run, task, -1).await,
            json!({"cluster/probe": 1})
        );

        let (status, body) =
            send(client().delete(format!("{}/api/v2/dags/{dag}/dagRuns/{run}", d.rest()))).await;
        assert_eq!(status, 204, "deleting the run: {body}");
        // Re-created at once: the new run must not see the deleted run's state (its task
        // asserts that), on either airstate.
        d.trigger(dag, run, json!({"generation": 2})).await;
        assert_eq!(
            d.task_state_at(&d.cluster_front, dag, run, task, -1).await,
            json!({}),
            "the re-created run inherited state on the Cluster"
        );
        d.expect_success(dag, run).await;
        assert_eq!(
            d.task_state(dag, run, task, -1).await,
            json!({"runs/seen": {"generation": 2}})
        );
        let sql = d.sql_task_rows(dag).await;
        assert_not_in_airflows_tables("rerun", sql);
    });
}

impl Deployment {
    async fn asset_id(&self, name: &str) -> i64 {
        self.sql(&format!(
            "SELECT id::bigint FROM asset WHERE name = '{name}'"
        ))
        .await
    }

    async fn asset_active(&self, name: &str) -> bool {
        self.sql(&format!(
            "SELECT count(*) FROM asset_active WHERE name = '{name}'"
        ))
        .await
            > 0
    }

    /// Rewrites the orphan DAG's file for `asset` and asks Airflow to parse it now.
    async fn point_orphan_dag_at(&self, asset: &str) {
        write_orphan_dag(&self.root.join("dags"), asset);
        let (status, details) =
            send(client().get(format!("{}/api/v2/dags/e2e_orphan/details", self.rest()))).await;
        assert_eq!(status, 200, "{details}");
        let token = details["file_token"]
            .as_str()
            .expect("file_token")
            .to_owned();
        let (status, body) = send(client().put(format!(
            "{}/api/v2/parseDagFile/{}",
            self.rest(),
            seg(&token)
        )))
        .await;
        assert!((200..300).contains(&status), "reparse: {status} {body}");
    }

    async fn wait_for(&self, what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while !check().await {
            assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[test]
fn an_orphaned_asset_loses_its_state_and_comes_back_empty() {
    scenario("orphan", &["e2e_orphan"], false, |d| async move {
        let (a, b) = ("e2e_orphan_a", "e2e_orphan_b");
        d.wait_for("asset a active", Duration::from_secs(60), async || {
            d.asset_active(a).await
        })
        .await;
        d.trigger("e2e_orphan", "orphan-1", json!({})).await;
        d.expect_success("e2e_orphan", "orphan-1").await;
        let id = d.asset_id(a).await;
        let (status, state) = d.asset_state(a).await;
        assert_eq!(status, 200, "{state}");
        assert_eq!(state["orphan/probe"]["value"], json!({"run": "orphan-1"}));
        let (status, by_id) = d.asset_state_by_id(id).await;
        let keys = |v: &Value| v.as_object().map(|o| o.len());
        assert_eq!((status, keys(&by_id)), (200, Some(1)), "{by_id}");
        // The Cluster airstate holds state for the same asset.
        let route = format!("assets/by-name/state-store/value?name={a}&key=cluster%2Fprobe");
        d.admin_put(&d.cluster_front, &route, json!(1)).await;
        let (status, on_cluster) = d.asset_state_by_id_at(&d.cluster_front, id).await;
        assert_eq!((status, keys(&on_cluster)), (200, Some(1)), "{on_cluster}");

        // The DAG now names another asset: the scheduler's pass orphans the first one, and
        // both airstates delete its state.
        d.point_orphan_dag_at(b).await;
        d.wait_for("asset a orphaned", Duration::from_secs(120), async || {
            !d.asset_active(a).await
        })
        .await;
        for base in [&d.front, &d.cluster_front] {
            d.wait_for(
                &format!("asset a's state deleted by {base}"),
                Duration::from_secs(60),
                async || d.asset_state_by_id_at(base, id).await == (200, json!({})),
            )
            .await;
        }

        // Named again, the asset comes back empty: the task asserts it.
        d.point_orphan_dag_at(a).await;
        d.wait_for(
            "asset a active again",
            Duration::from_secs(120),
            async || d.asset_active(a).await,
        )
        .await;
        assert_eq!(d.asset_id(a).await, id, "Airflow kept the asset's id");
        assert_eq!(d.asset_state(a).await, (200, json!({})));
        assert_eq!(
            d.asset_state_by_id_at(&d.cluster_front, id).await,
            (200, json!({}))
        );
        d.trigger("e2e_orphan", "orphan-2", json!({})).await;
        d.expect_success("e2e_orphan", "orphan-2").await;
        let sql = d.sql_asset_rows(a).await;
        assert_not_in_airflows_tables("orphan", sql);
    });
}

#[test]
fn a_watchers_trigger_writes_asset_state_that_a_task_reads() {
    scenario("watcher", &["e2e_watcher"], false, |d| async move {
        // The trigger fires once, soon after the triggerer picks the watcher up.
        let mut run_id = String::new();
        d.wait_for(
            "a run of e2e_watcher",
            Duration::from_secs(180),
            async || {
                let (_, runs) =
                    send(client().get(format!("{}/api/v2/dags/e2e_watcher/dagRuns", d.rest())))
                        .await;
                match runs["dag_runs"].as_array().and_then(|r| r.first()) {
                    Some(run) => {
                        run_id = run["dag_run_id"].as_str().unwrap().to_owned();
                        true
                    }
                    None => false,
                }
            },
        )
        .await;
        d.expect_success("e2e_watcher", &run_id).await;
        let (status, state) = d.asset_state("e2e_signal").await;
        assert_eq!(status, 200, "{state}");
        assert_eq!(
            state["seen/by-watcher"]["value"],
            json!({"by": "trigger", "n": 1}),
            "{state}"
        );

        let sql = d.sql_asset_rows("e2e_signal").await;
        assert_not_in_airflows_tables("watcher", sql);
    });
}

#[test]
fn clear_on_success_deletes_the_state_of_a_task_that_succeeded() {
    scenario(
        "clear_on_success",
        &["e2e_clear_on_success"],
        true,
        |d| async move {
            d.restart_api_server(&[("AIRFLOW__STATE_STORE__CLEAR_ON_SUCCESS", "True")]);
            let run = "clear-1";
            d.trigger("e2e_clear_on_success", run, json!({})).await;
            let state = d
                .wait_run("e2e_clear_on_success", run, Duration::from_secs(180))
                .await;
            assert_eq!(state, "failed", "one task fails on purpose");
            let succeeded = d
                .task_instance("e2e_clear_on_success", run, "succeeds")
                .await;
            assert_eq!(succeeded["state"], "success", "{succeeded}");
            let failed = d.task_instance("e2e_clear_on_success", run, "fails").await;
            assert_eq!(failed["state"], "failed", "{failed}");
            assert_eq!(
                d.task_state("e2e_clear_on_success", run, "succeeds", -1)
                    .await,
                json!({})
            );
            assert_eq!(
                d.task_state("e2e_clear_on_success", run, "fails", -1).await,
                json!({"kept/after-failure": 2})
            );
            assert_eq!(d.sql_task_rows("e2e_clear_on_success").await, 0);

            d.restart_api_server(&[]);
        },
    );
}
