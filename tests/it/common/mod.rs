//! Real servers for integration tests: `redis-server` and PostgreSQL processes started on
//! free loopback ports, never the services that may already run on the default ports.
//!
//! Servers shared by a whole test binary live in `static`s, which Rust never drops, so
//! each one is started under a small shell watchdog that stops it (and removes its data
//! directory) once the test process is gone.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
}

/// `n` distinct free ports, for a process that starts servers of its own. Held open
/// together while chosen: ports picked one after another, each released before the next,
/// can repeat (CI once gave a Python test's Redis and its airstate the same one).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    held.iter()
        .map(|listener| listener.local_addr().expect("bound port").port())
        .collect()
}

/// Runs `command` in the background until this test process exits, then stops it and
/// removes `cleanup`. PID 1 here does not reap orphans, so a dead parent can linger as a
/// zombie: the watchdog checks the process state, not just that the pid exists.
fn spawn_watched(command: &str, cleanup: &Path, log: &Path) {
    let parent = std::process::id();
    let script = format!(
        r#"{command} & pid=$!
while [ -r /proc/{parent}/stat ] && [ "$(cut -d' ' -f3 /proc/{parent}/stat)" != Z ]; do sleep 0.2; done
kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf '{dir}'"#,
        dir = cleanup.display()
    );
    let log = std::fs::File::create(log).expect("server log");
    // Never waited for on purpose: the watchdog outlives this process by design.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn watched server");
}

/// A temporary directory that outlives its handle: its server (or watchdog) removes it.
fn kept_temp_dir(prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap()
        .keep()
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < timeout,
            "{what} did not become ready in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `PING` over raw RESP; true on `+PONG`.
pub fn redis_pings(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A `redis-server` of the test's own.
pub struct RedisServer {
    pub port: u16,
    pub url: String,
    dir: PathBuf,
    args: Vec<String>,
    /// `None` for the shared server (its watchdog owns it) or while stopped.
    child: Option<Child>,
}

impl RedisServer {
    fn base_args(port: u16, dir: &Path) -> Vec<String> {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// One server per test binary, for tests that isolate themselves by key prefix.
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(|| Self::watched_with_args(&[]))
    }

    /// A server that lives as long as the test process, under a watchdog: for servers
    /// kept in `static`s, which are never dropped.
    fn watched_with_args(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = kept_temp_dir("airstate-redis-");
        let mut args = Self::base_args(port, &dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        spawn_watched(
            &format!("redis-server {}", quoted.join(" ")),
            &dir,
            &dir.join("watchdog.log"),
        );
        wait_until("watched redis-server", Duration::from_secs(20), || {
            redis_pings(port)
        });
        RedisServer {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
            args,
            child: None,
        }
    }

    /// Whether this server's process is running (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes the process (SIGSTOP): connections stay open and nothing answers, the
    /// way a hung or partitioned server looks to a client.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("an owned, running server");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// A server owned by one test (stopped on drop), for tests that stop or restart it.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    pub fn start_with_args(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = kept_temp_dir("airstate-redis-");
        let mut args = Self::base_args(port, &dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
            args,
            child: None,
        };
        server.restart();
        server
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.restart_without_waiting();
        let port = self.port;
        wait_until("redis-server", Duration::from_secs(20), || {
            redis_pings(port)
        });
    }

    /// Starts it again without waiting for it to answer (it may still be loading).
    pub fn restart_without_waiting(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `redis-cli -p port args...` and returns its trimmed output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The value of `field` in an INFO-style `field:value` listing.
pub fn info_field(listing: &str, field: &str) -> Option<String> {
    listing
        .lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{field}:")))
        .map(str::to_owned)
}

const CLUSTER_NODE_ARGS: [&str; 6] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
];

/// A real Redis Cluster on loopback: three primaries, each with one replica, made by
/// `redis-cli --cluster create` exactly as an operator would.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// `redis-cluster://` URL listing every node, as `AIRSTATE_REDIS_URL` takes it.
    pub url: String,
}

impl RedisCluster {
    /// One cluster per test binary (watched), for tests that only need a Cluster to exist.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let nodes = (0..6)
                .map(|_| RedisServer::watched_with_args(&CLUSTER_NODE_ARGS))
                .collect();
            Self::create(nodes)
        })
    }

    /// A cluster owned by one test, whose nodes it may kill, pause or restart.
    pub fn start() -> RedisCluster {
        let nodes = (0..6)
            .map(|_| RedisServer::start_with_args(&CLUSTER_NODE_ARGS))
            .collect();
        Self::create(nodes)
    }

    fn create(nodes: Vec<RedisServer>) -> RedisCluster {
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = RedisCluster {
            url: format!("redis-cluster://{}", addresses.join(",")),
            nodes,
        };
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` and every replica's link
    /// to its primary is up (a replica that never synced will not fail over).
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until("redis cluster", timeout, || {
            self.nodes
                .iter()
                .filter(|n| n.child.is_some() || redis_pings(n.port))
                .all(|n| {
                    let info = redis_cli(n.port, &["CLUSTER", "INFO"]);
                    let replication = redis_cli(n.port, &["INFO", "replication"]);
                    info_field(&info, "cluster_state").as_deref() == Some("ok")
                        && (info_field(&replication, "role").as_deref() == Some("master")
                            || info_field(&replication, "master_link_status").as_deref()
                                == Some("up"))
                })
        });
    }

    /// The node id of the server on `port`.
    pub fn node_id(port: u16) -> String {
        redis_cli(port, &["CLUSTER", "MYID"])
    }

    /// The port of the primary serving `slot`, as a live node sees it.
    pub fn primary_of_slot(&self, slot: u16) -> u16 {
        self.try_primary_of_slot(slot)
            .unwrap_or_else(|| panic!("no healthy primary serves slot {slot}"))
    }

    /// The healthy primary serving `slot`, if any (none while a failover is under way).
    pub fn try_primary_of_slot(&self, slot: u16) -> Option<u16> {
        let live = self
            .nodes
            .iter()
            .find(|n| redis_pings(n.port))
            .expect("a live node");
        let shards = redis_cli(live.port, &["CLUSTER", "NODES"]);
        for line in shards.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port: u16 = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("node port");
            for range in &fields[8..] {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(low), Ok(high)) = (low.parse::<u16>(), high.parse::<u16>()) {
                    if (low..=high).contains(&slot) {
                        return Some(port);
                    }
                }
            }
        }
        None
    }

    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node on port")
    }

    /// The Cluster hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let live = self
            .nodes
            .iter()
            .find(|n| redis_pings(n.port))
            .expect("a live node");
        redis_cli(live.port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("slot")
    }
}

/// Redis behind Sentinel: a primary, one replica and three sentinels (quorum 2), all
/// owned by the test.
pub struct RedisSentinel {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    dir: PathBuf,
    pub service: &'static str,
    /// `redis-sentinel://` URL listing the sentinels, as `AIRSTATE_REDIS_URL` takes it.
    pub url: String,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        let service = "airstate-primary";
        let primary = RedisServer::start();
        let primary_port = primary.port.to_string();
        let replica = RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &primary_port]);
        let dir = kept_temp_dir("airstate-sentinel-");
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {service} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {service} 1000\n\
                     sentinel failover-timeout {service} 5000\n\
                     sentinel parallel-syncs {service} 1\n",
                    dir = dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            sentinels.push(child);
            sentinel_ports.push(port);
        }
        for port in &sentinel_ports {
            wait_until("sentinel", Duration::from_secs(20), || redis_pings(*port));
        }
        let sentinel = RedisSentinel {
            url: format!(
                "redis-sentinel://{}/{service}",
                sentinel_ports
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            primary,
            replica,
            sentinel_ports,
            sentinels,
            dir,
            service,
        };
        // Ready when the replica has synced and every sentinel knows the replica.
        wait_until("sentinel setup", Duration::from_secs(30), || {
            let replication = redis_cli(sentinel.replica.port, &["INFO", "replication"]);
            info_field(&replication, "master_link_status").as_deref() == Some("up")
                && sentinel.sentinel_ports.iter().all(|p| {
                    redis_cli(*p, &["SENTINEL", "REPLICAS", service])
                        .contains(&format!("{}", sentinel.replica.port))
                })
        });
        sentinel
    }

    /// The primary's port, as the sentinels currently announce it.
    pub fn announced_primary(&self) -> u16 {
        let reply = redis_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service],
        );
        reply
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .expect("sentinel answer")
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PostgreSQL holding Airflow's metastore tables, one per test binary.
pub struct Postgres {
    pub port: u16,
    /// Airflow's SQLAlchemy form, as `AIRFLOW__DATABASE__SQL_ALCHEMY_CONN` carries it.
    pub url: String,
    /// The same database as a plain `postgresql://` URL.
    pub plain_url: String,
}

pub fn postgres_bin(name: &str) -> PathBuf {
    find_postgres_bin(name).unwrap_or_else(|| {
        panic!("{name} not found: PostgreSQL server binaries (apt-get install postgresql)")
    })
}

/// `name` from the PATH, else from the newest `/usr/lib/postgresql/<version>/bin`.
pub fn find_postgres_bin(name: &str) -> Option<PathBuf> {
    if let Ok(output) = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
    {
        let found = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if output.status.success() && !found.is_empty() {
            return Some(PathBuf::from(found));
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|path| path.exists())
        .collect();
    versions.sort_by_key(|path| {
        path.components()
            .nth(4)
            .and_then(|v| v.as_os_str().to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

/// initdb and postgres refuse to run as root: when we are root, run them as `postgres`.
pub fn as_server_user(command: &str) -> String {
    if unsafe { libc::geteuid() } == 0 {
        format!("setpriv --reuid=postgres --regid=postgres --init-groups {command}")
    } else {
        command.to_owned()
    }
}

fn psql(port: u16, database: &str, args: &[&str]) -> std::process::Output {
    Command::new(postgres_bin("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            database,
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .args(args)
        .output()
        .expect("psql")
}

impl Postgres {
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| Self::boot(None))
    }

    /// A server of the test's own, for tests that stop or freeze it.
    pub fn start() -> Postgres {
        Self::boot(None)
    }

    /// A server that accepts TCP connections over TLS only (`hostssl` in pg_hba.conf),
    /// with the certificate `server.pem` / `server.key` from `certs`. `plain_url` reaches
    /// it over its Unix socket, for setting up rows.
    pub fn tls_only(certs: &Path) -> Postgres {
        Self::boot(Some(certs))
    }

    fn boot(tls: Option<&Path>) -> Postgres {
        let dir = kept_temp_dir("airstate-pg-");
        let data = dir.join("data");
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status();
            assert!(status.is_ok_and(|s| s.success()), "chown to postgres");
        }
        let initdb = format!(
            "{} -D '{}' -A trust -U postgres --no-sync -E UTF8",
            postgres_bin("initdb").display(),
            data.display()
        );
        let output = Command::new("sh")
            .arg("-c")
            .arg(as_server_user(&initdb))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );

        let mut tls_args = String::new();
        if let Some(certs) = tls {
            for name in ["server.pem", "server.key"] {
                std::fs::copy(certs.join(name), data.join(name)).unwrap();
            }
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            // postgres refuses a key others can read, or one it does not own.
            let status = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "chmod 600 '{key}' && if [ \"$(id -u)\" = 0 ]; then chown postgres:postgres '{key}' '{cert}'; fi",
                    key = data.join("server.key").display(),
                    cert = data.join("server.pem").display()
                ))
                .status();
            assert!(status.is_ok_and(|s| s.success()), "key permissions");
            tls_args = " -c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key".into();
        }
        let port = free_port();
        let server = format!(
            "{} -D '{}' -p {port} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off{tls_args}",
            postgres_bin("postgres").display(),
            data.display(),
            dir.display()
        );
        spawn_watched(&as_server_user(&server), &dir, &dir.join("postgres.log"));
        wait_until("postgres", Duration::from_secs(30), || {
            psql(port, "postgres", &["-c", "SELECT 1"]).status.success()
        });
        let created = psql(port, "postgres", &["-c", "CREATE DATABASE airflow"]);
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        let schema = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/airflow/metastore-schema.sql"
        );
        let loaded = psql(port, "airflow", &["-f", schema]);
        assert!(
            loaded.status.success(),
            "loading {schema}: {}",
            String::from_utf8_lossy(&loaded.stderr)
        );
        let plain_url = match tls {
            None => format!("postgresql://postgres@127.0.0.1:{port}/airflow"),
            Some(_) => format!(
                "host={} port={port} user=postgres dbname=airflow",
                dir.display()
            ),
        };
        Postgres {
            port,
            url: format!("postgresql+psycopg2://postgres@127.0.0.1:{port}/airflow"),
            plain_url,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.plain_url, tokio_postgres::NoTls)
            .await
            .expect("connect to test postgres");
        tokio::spawn(connection);
        client
    }

    /// A `task_instance` row as Airflow writes one (only the NOT NULL columns matter here).
    pub async fn insert_task_instance(
        &self,
        id: Uuid,
        dag_id: &str,
        run_id: &str,
        task_id: &str,
        map_index: i32,
    ) {
        let client = self.client().await;
        client
            .execute(
                "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state) \
                 VALUES ($1, $2, 'manual', now(), 'running') ON CONFLICT (dag_id, run_id) DO NOTHING",
                &[&dag_id, &run_id],
            )
            .await
            .expect("insert dag_run");
        client
            .execute(
                "INSERT INTO task_instance (id, task_id, dag_id, run_id, map_index, try_number, \
                 pool, pool_slots, state) VALUES ($1, $2, $3, $4, $5, 1, 'default_pool', 1, 'running')",
                &[&id, &task_id, &dag_id, &run_id, &map_index],
            )
            .await
            .expect("insert task_instance");
    }

    /// The `dag_run.id` the metastore identity keys a run's task state by.
    pub async fn dag_run_id(&self, dag_id: &str, run_id: &str) -> i64 {
        let row = self
            .client()
            .await
            .query_one(
                "SELECT id FROM dag_run WHERE dag_id = $1 AND run_id = $2",
                &[&dag_id, &run_id],
            )
            .await
            .expect("the dag_run row");
        i64::from(row.get::<_, i32>(0))
    }

    pub async fn delete_task_instance(&self, id: Uuid) {
        self.client()
            .await
            .execute("DELETE FROM task_instance WHERE id = $1", &[&id])
            .await
            .expect("delete task_instance");
    }

    /// An `asset` row, plus its `asset_active` row when `active`; returns the asset id.
    pub async fn insert_asset(&self, name: &str, uri: &str, active: bool) -> i32 {
        let client = self.client().await;
        let row = client
            .query_one(
                "INSERT INTO asset (name, uri, \"group\", extra, created_at, updated_at) \
                 VALUES ($1, $2, 'asset', '{}', now(), now()) RETURNING id",
                &[&name, &uri],
            )
            .await
            .expect("insert asset");
        if active {
            client
                .execute(
                    "INSERT INTO asset_active (name, uri) VALUES ($1, $2)",
                    &[&name, &uri],
                )
                .await
                .expect("insert asset_active");
        }
        row.get(0)
    }

    pub async fn deactivate_asset(&self, name: &str, uri: &str) {
        self.client()
            .await
            .execute(
                "DELETE FROM asset_active WHERE name = $1 AND uri = $2",
                &[&name, &uri],
            )
            .await
            .expect("delete asset_active");
    }
}

/// PgBouncer in transaction pooling mode (what the official Airflow chart's
/// `pgbouncer.enabled` deploys) in front of `postgres`, on a free port, with a server pool
/// of `pool_size` connections. Clients log in with SCRAM as `postgres` / [`PgBouncer::PASSWORD`].
/// Stopped on drop.
pub struct PgBouncer {
    pub port: u16,
    /// Airflow's SQLAlchemy form, as `AIRFLOW__DATABASE__SQL_ALCHEMY_CONN` carries it.
    pub url: String,
    /// The same, as a plain `postgresql://` URL.
    pub plain_url: String,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    pub const PASSWORD: &'static str = "pgbouncer-secret";

    pub fn start(postgres: &Postgres, pool_size: u32) -> PgBouncer {
        let dir = kept_temp_dir("airstate-pgbouncer-");
        let port = free_port();
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{}\"\n", Self::PASSWORD),
        )
        .unwrap();
        // No Unix socket: the machine's own PgBouncer or PostgreSQL may own the default one.
        let config = format!(
            "[databases]\n\
             airflow = host=127.0.0.1 port={pg} dbname=airflow user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = 500\n\
             query_wait_timeout = 60\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            pg = postgres.port,
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), config).unwrap();
        // PgBouncer refuses to run as root, like postgres.
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status();
            assert!(status.is_ok_and(|s| s.success()), "chown to postgres");
        }
        let binary = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin")])
            .map(|path| path.join("pgbouncer"))
            .find(|path| path.exists())
            .expect("pgbouncer (apt-get install pgbouncer)");
        let command = as_server_user(&format!(
            "{} {}/pgbouncer.ini",
            binary.display(),
            dir.display()
        ));
        let mut words = command.split_whitespace();
        let child = Command::new(words.next().unwrap())
            .args(words)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbouncer");
        let mut bouncer = PgBouncer {
            port,
            url: format!(
                "postgresql+psycopg2://postgres:{}@127.0.0.1:{port}/airflow",
                Self::PASSWORD
            ),
            plain_url: format!(
                "postgresql://postgres:{}@127.0.0.1:{port}/airflow",
                Self::PASSWORD
            ),
            child,
            dir,
        };
        wait_until("pgbouncer", Duration::from_secs(20), || {
            assert!(
                bouncer.child.try_wait().unwrap().is_none(),
                "pgbouncer exited: {}",
                bouncer.log()
            );
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        bouncer
    }

    /// A client connection through PgBouncer (in transaction mode: a server connection is
    /// its own only inside a transaction).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.plain_url, tokio_postgres::NoTls)
            .await
            .expect("connect through pgbouncer");
        tokio::spawn(connection);
        client
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real `airstate` binary serving on a free loopback port; killed on drop.
pub struct ServedBinary {
    pub child: Child,
    pub base: String,
}

impl ServedBinary {
    /// `airstate serve` with only `env` (plus `PATH` and the listen address) in its
    /// environment, once it accepts connections.
    pub fn start(env: &[(&str, &str)], stderr: Stdio) -> ServedBinary {
        Self::spawn(env, stderr, None)
    }

    /// [`start`](Self::start) with a descriptor limit (`RLIMIT_NOFILE`, soft and hard) of
    /// `nofile`, as `prlimit --nofile` would set it.
    pub fn start_with_nofile(env: &[(&str, &str)], stderr: Stdio, nofile: u64) -> ServedBinary {
        Self::spawn(env, stderr, Some(nofile))
    }

    fn spawn(env: &[(&str, &str)], stderr: Stdio, nofile: Option<u64>) -> ServedBinary {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_airstate"));
        if let Some(nofile) = nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AIRSTATE_LISTEN", format!("127.0.0.1:{port}"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("airstate binary");
        wait_until("airstate", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        ServedBinary {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for ServedBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of the gateway's `/metrics` at `base` (`http://host:port`).
pub async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the /metrics body")
}

/// The gateway's `/ready` at `base`: its status and JSON body (`Null` if it is no JSON).
pub async fn ready(base: &str) -> (u16, serde_json::Value) {
    let reply = reqwest::get(format!("{base}/ready"))
        .await
        .expect("GET /ready");
    let status = reply.status().as_u16();
    let text = reply.text().await.expect("the /ready body");
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// A CA (`ca.pem`) and a server certificate (`server.pem`, `server.key`) whose
/// subjectAltName is `san` (e.g. `IP:127.0.0.1,DNS:localhost`), made with openssl in `dir`.
pub fn private_ca(dir: &Path, san: &str) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    std::fs::write(dir.join("san.cnf"), format!("subjectAltName={san}\n")).unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=airstate test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    ]);
}

impl Postgres {
    /// Every process of this server: the postmaster, its backends and workers (to freeze
    /// it whole with SIGSTOP, as a hung host would).
    pub async fn processes(&self) -> Vec<i32> {
        let client = self.client().await;
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        drop(client);
        let parent_of = |pid: i32| -> Option<i32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after_name = &stat[stat.rfind(')')? + 2..];
            after_name.split(' ').nth(1)?.parse().ok()
        };
        let postmaster = parent_of(backend).expect("the backend's parent");
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                if parent_of(pid) == Some(postmaster) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// A new, empty database on this server; its SQLAlchemy URL.
    pub fn create_database(&self, name: &str) -> String {
        let created = psql(
            self.port,
            "postgres",
            &["-c", &format!("CREATE DATABASE {name}")],
        );
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        format!(
            "postgresql+psycopg2://postgres@127.0.0.1:{}/{name}",
            self.port
        )
    }
}

/// The Python of the cached Airflow 3.3.2 virtualenv (`scripts/airflow-venv.sh` makes it
/// on a machine that has none).
pub fn airflow_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/airflow-venv.sh");
            let made = Command::new("bash")
                .arg(script)
                .output()
                .expect("airflow-venv.sh");
            assert!(
                made.status.success(),
                "installing apache-airflow 3.3.2 failed:\n{}",
                String::from_utf8_lossy(&made.stderr)
            );
            PathBuf::from(
                String::from_utf8_lossy(&made.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim(),
            )
        })
        .clone()
}

/// The real Airflow 3.3.2 API server (`airflow api-server`) on a free port, over a database
/// `airflow db migrate` has just made, with the simple auth manager's users `admin` (role
/// admin, password `admin-pw`) and `viewer` (role viewer, password `viewer-pw`).
pub struct AirflowApiServer {
    pub base: String,
    pub database_url: String,
    pub jwt_secret: String,
    home: PathBuf,
}

impl AirflowApiServer {
    pub fn start(database_url: &str, jwt_secret: &str) -> AirflowApiServer {
        let python = airflow_python();
        let airflow = python.with_file_name("airflow");
        let home = kept_temp_dir("airflow-home-");
        std::fs::write(
            home.join("passwords.json"),
            r#"{"admin": "admin-pw", "viewer": "viewer-pw"}"#,
        )
        .unwrap();
        let env = [
            ("AIRFLOW_HOME", home.display().to_string()),
            (
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                database_url.to_owned(),
            ),
            ("AIRFLOW__CORE__LOAD_EXAMPLES", "False".into()),
            (
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
                "admin:admin,viewer:viewer".into(),
            ),
            (
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
                home.join("passwords.json").display().to_string(),
            ),
            ("AIRFLOW__API_AUTH__JWT_SECRET", jwt_secret.to_owned()),
        ];
        let migrated = Command::new(&airflow)
            .args(["db", "migrate"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("airflow db migrate");
        assert!(
            migrated.status.success(),
            "airflow db migrate: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
        let port = free_port();
        let exports: String = env.iter().map(|(k, v)| format!("{k}='{v}' ")).collect();
        spawn_watched(
            &format!(
                "env {exports} '{}' api-server --port {port}",
                airflow.display()
            ),
            &home,
            &home.join("api-server.log"),
        );
        let base = format!("http://127.0.0.1:{port}");
        wait_until("airflow api-server", Duration::from_secs(90), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        AirflowApiServer {
            base,
            database_url: database_url.to_owned(),
            jwt_secret: jwt_secret.to_owned(),
            home,
        }
    }

    /// The API server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("api-server.log")).unwrap_or_default()
    }
}

/// Every JSON type, as value texts whose bytes must survive a store, an export and an import.
pub const JSON_TEXTS: [&str; 13] = [
    r#""spark_001""#,
    r#""unicode ü € 😀""#,
    "0",
    "-17",
    "1.0",
    "2.5e-7",
    "1180591620717411303424",
    "true",
    "false",
    "[]",
    r#"[1, "two", [3.0], {"four": null}]"#,
    r#"{"z": 1, "a": {"nested": [true, false]}}"#,
    r#""quote \" backslash \\ newline \n""#,
];

/// The scope of map index `map_index` of task `task` in run `run` of `dag`, as the claims
/// identity gives it (no `dag_run.id`), for tests that drive a store directly.
pub fn task_scope(dag: &str, map_index: i64) -> airstate::store::TaskScope {
    airstate::store::TaskScope {
        dag_id: dag.into(),
        run_id: "run".into(),
        task_id: "task".into(),
        map_index,
        run_key: None,
    }
}

/// Sends `signal` to every process of `pids` (SIGSTOP / SIGCONT to freeze and thaw a server).
pub fn signal_all(pids: &[i32], signal: i32) {
    for pid in pids {
        // SAFETY: kill(2) takes any pid; one that is gone is an ignored ESRCH.
        unsafe { libc::kill(*pid, signal) };
    }
}
