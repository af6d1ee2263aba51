//! Day-two operations against the real binary: configuration that catches typos and a
//! `--help` that lists every variable read.

use crate::common;

use std::process::{Command, Stdio};

use common::ServedBinary;

const BINARY: &str = env!("CARGO_BIN_EXE_airstate");
const SECRET: &str = "test-secret-that-is-long-enough-for-hs512";

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(BINARY)
        .args(args)
        .env_clear()
        .env("AIRFLOW__API_AUTH__JWT_SECRET", SECRET)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_misspelt_variable_stops_the_start_with_the_nearest_name() {
    // Before, this started the in-memory store with a warning at most.
    let output = run(
        &["serve"],
        &[
            ("AIRSTATE_LISTEN", "127.0.0.1:0"),
            ("AIRSTATE_REDIS_ULR", "redis://127.0.0.1:1"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("AIRSTATE_REDIS_ULR")
            && stderr.contains("did you mean AIRSTATE_REDIS_URL?")
            && stderr.contains("AIRSTATE_ALLOW_UNKNOWN_VARIABLES=true"),
        "{stderr}"
    );
    // Every command that reads the configuration checks, not only serve.
    let token = run(
        &["token", "--sub", "00000000-0000-0000-0000-000000000001"],
        &[("AIRSTATE_IDENTTY", "claims")],
    );
    assert_eq!(token.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&token.stderr).contains("did you mean AIRSTATE_IDENTITY?"));
    // A name near nothing is refused without a guess.
    let far = run(
        &["token", "--sub", "00000000-0000-0000-0000-000000000001"],
        &[("AIRSTATE_COMPLETELY_DIFFERENT_THING", "1")],
    );
    let stderr = String::from_utf8_lossy(&far.stderr);
    assert_eq!(far.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("did you mean"), "{stderr}");
    // Known names and Kubernetes service links are fine.
    let fine = run(
        &["token", "--sub", "00000000-0000-0000-0000-000000000001"],
        &[
            ("AIRSTATE_SERVICE_HOST", "10.0.0.7"),
            ("AIRSTATE_PORT", "tcp://10.0.0.7:8080"),
            ("AIRSTATE_PORT_8080_TCP_ADDR", "10.0.0.7"),
            ("AIRSTATE_LOG_FORMAT", "json"),
        ],
    );
    assert!(
        fine.status.success(),
        "{}",
        String::from_utf8_lossy(&fine.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opt_out_starts_with_a_warning() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRSTATE_REDIS_ULR", "redis://127.0.0.1:1"),
            ("AIRSTATE_ALLOW_UNKNOWN_VARIABLES", "true"),
            ("RUST_LOG", "warn"),
        ],
        Stdio::from(log.reopen().unwrap()),
    );
    assert_eq!(common::ready(&served.base).await.0, 200);
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        stderr.contains("warning: AIRSTATE_REDIS_ULR is not a variable airstate reads; did you mean AIRSTATE_REDIS_URL?"),
        "{stderr}"
    );
    // The opt-out is a boolean like the others: a typo in it is no opt-out.
    let output = run(
        &["serve"],
        &[
            ("AIRSTATE_REDIS_ULR", "redis://127.0.0.1:1"),
            ("AIRSTATE_ALLOW_UNKNOWN_VARIABLES", "yes"),
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("AIRSTATE_ALLOW_UNKNOWN_VARIABLES"));
}

/// Every environment variable named in the sources, and those the libraries read
/// (`RUST_LOG`, the OpenTelemetry SDK's, the TLS roots), is in `airstate --help`.
#[test]
fn help_lists_every_variable_the_binary_reads() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let listed = |name: &str| help.lines().any(|line| line.trim() == name);

    let mut named = std::collections::BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests name misspelt variables on purpose.
        let text = text.split("#[cfg(test)]").next().unwrap();
        for piece in text.split('"').skip(1).step_by(2) {
            let is_variable = ["AIRSTATE_", "AIRFLOW__", "OTEL_", "SSL_CERT_"]
                .iter()
                .any(|prefix| piece.starts_with(prefix))
                && piece.len() > 9
                && piece
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if is_variable {
                named.insert(piece.to_owned());
            }
        }
    }
    assert!(named.len() > 40, "{named:?}");
    // Read by the libraries rather than named in our sources.
    for library in [
        "RUST_LOG",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_TRACES_SAMPLER",
        "OTEL_BSP_SCHEDULE_DELAY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        named.insert(library.to_owned());
    }
    let missing: Vec<&String> = named
        .iter()
        .filter(|name| !name.ends_with('_') && !listed(name))
        .collect();
    assert!(
        missing.is_empty(),
        "missing from --help: {missing:?}\n{help}"
    );
}

/// A small deterministic generator: the fuzzed requests are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn word(&mut self) -> String {
        let len = 1 + self.below(12);
        (0..len)
            .map(|_| {
                let chars = b"abcdefghijklmnopqrstuvwxyz0123456789-_.%~";
                chars[self.below(chars.len())] as char
            })
            .collect()
    }
}

/// Series in a Prometheus exposition: its sample lines.
fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.rsplit_once(' ').map_or(line, |(series, _)| series))
        .collect()
}

fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
    let end = start + series[start..].find('"')?;
    Some(&series[start..end])
}

/// Sends `count` fuzzed requests: known and unknown paths with made-up ids, keys and
/// segments, standard and invented methods, good and bad tokens, bodies and headers.
async fn fuzz(base: &str, templates: &[String], token: &str, rng: &mut Rng, count: usize) {
    let http = reqwest::Client::new();
    for _ in 0..count {
        let path = match rng.below(4) {
            // A route template with its parameters made up.
            0 | 1 => {
                let template = &templates[rng.below(templates.len())];
                template
                    .split('/')
                    .map(|segment| {
                        if segment.starts_with('{') {
                            if rng.below(2) == 0 {
                                uuid::Uuid::new_v4().to_string()
                            } else {
                                rng.word()
                            }
                        } else {
                            segment.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("/")
            }
            // Somewhere under a known prefix.
            2 => format!(
                "{}/{}/{}",
                rng.pick(&[
                    "/execution/store/ti",
                    "/execution/state/asset",
                    "/admin/v1",
                    "/api/v2/dags",
                    "/execution",
                    ""
                ]),
                rng.word(),
                rng.word()
            ),
            _ => format!("/{}", rng.word()),
        };
        let query = if rng.below(4) == 0 {
            format!("?{}={}", rng.word(), rng.word())
        } else {
            String::new()
        };
        let method = match rng.below(8) {
            7 => format!(
                "X{}",
                rng.word().to_ascii_uppercase().replace(['%', '~', '.'], "")
            ),
            n => ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"][n].to_owned(),
        };
        let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
            continue;
        };
        let mut request = http.request(method, format!("{base}{path}{query}"));
        match rng.below(3) {
            0 => request = request.bearer_auth(token),
            1 => request = request.bearer_auth(rng.word()),
            _ => {}
        }
        if rng.below(3) == 0 {
            request = request.header("if-match", format!("\"{}\"", rng.word()));
        }
        if rng.below(4) == 0 {
            request = request.header(
                "accept",
                rng.pick(&["text/event-stream", "text/html", "*/*"]),
            );
        }
        request = match rng.below(3) {
            0 => request
                .header("content-type", "application/json")
                .body(format!("{{\"value\": \"{}\"}}", rng.word())),
            1 => request
                .header("content-type", rng.pick(&["text/plain", "application/xml"]))
                .body(rng.word()),
            _ => request,
        };
        let _ = request.send().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_leave_a_bounded_set_of_series() {
    let redis = common::RedisServer::shared();
    let prefix = format!("fuzz-{}:", uuid::Uuid::new_v4().simple());
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRSTATE_REDIS_URL", redis.url.as_str()),
            ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
            ("AIRSTATE_IDENTITY", "claims"),
            ("AIRSTATE_ADMIN_TOKEN", &"a".repeat(32)),
            ("RUST_LOG", "off"),
        ],
        Stdio::null(),
    );
    let document: serde_json::Value = reqwest::get(format!("{}/openapi.json", served.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let templates: Vec<String> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    // The document writes `{*key}` as OpenAPI's `{key}`.
    let is_template = |route: &str| templates.iter().any(|t| *t == route.replace("{*", "{"));
    let token = {
        let output = run(
            &[
                "token",
                "--sub",
                &uuid::Uuid::now_v7().to_string(),
                "--dag-id",
                "d",
                "--run-id",
                "r",
                "--task-id",
                "t",
            ],
            &[("AIRSTATE_IDENTITY", "claims")],
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let scrape = || common::scrape(&served.base);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    fuzz(&served.base, &templates, &token, &mut rng, 1000).await;
    let first = scrape().await;
    fuzz(&served.base, &templates, &token, &mut rng, 1000).await;
    let second = scrape().await;
    let (first, second) = (series(&first), series(&second));
    let mut by_metric: std::collections::BTreeMap<&str, usize> = Default::default();
    for series in &second {
        *by_metric
            .entry(series.split('{').next().unwrap())
            .or_default() += 1;
    }
    println!(
        "series after 1000 requests: {}, after 2000: {}",
        first.len(),
        second.len()
    );
    println!("{by_metric:#?}");
    // Route labels are templates (or one of two catch-alls), never a path sent.
    for series in &second {
        if let Some(route) = label(series, "route") {
            assert!(
                is_template(route) || ["unmatched", "forwarded"].contains(&route),
                "route label {route:?} is not a template: {series}"
            );
        }
        if let Some(method) = label(series, "method") {
            assert!(
                ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER"]
                    .contains(&method),
                "{series}"
            );
        }
    }
    // One latency histogram per operation (HEAD answering GETs too), plus the unmatched
    // and forwarded ones, each with any of eight method labels.
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    let histograms = by_metric["airstate_http_request_duration_seconds_count"];
    assert!(
        histograms <= 2 * operations + 16,
        "{histograms} latency histograms for {operations} operations"
    );
    assert!(
        second.len() <= MAX_SERIES,
        "{} series after 2000 fuzzed requests (bound {MAX_SERIES}): {by_metric:#?}",
        second.len()
    );
}

/// What one replica may expose however it is called (README, "Observability").
const MAX_SERIES: usize = 2500;

/// The metric names recorded in the sources (`counter!("…"`, `gauge!`, `histogram!`).
fn metric_names_in_sources() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for piece in text.split(macro_name).skip(1) {
                let piece = piece.trim_start();
                if let Some(rest) = piece.strip_prefix('"') {
                    names.insert(rest.split('"').next().unwrap().to_owned());
                }
            }
        }
    }
    names
}

/// Every metric carries HELP and follows Prometheus' naming; the build, the metastore pool
/// and queries, and the process are measured; all scraped from a running binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_conventions() {
    let recorded = metric_names_in_sources();
    assert!(recorded.len() >= 15, "{recorded:?}");
    let described: Vec<&str> = airstate::telemetry::METRICS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    for name in &recorded {
        assert!(
            described.contains(&name.as_str()),
            "{name} has no HELP text in telemetry::METRICS"
        );
        assert!(name.starts_with("airstate_"), "{name}");
        // Counters end in _total; units are base units (seconds, bytes).
        assert!(!name.contains("_ms") && !name.contains("millis"), "{name}");
    }

    let pg = common::Postgres::shared();
    let redis = common::RedisServer::shared();
    let prefix = format!("conv-{}:", uuid::Uuid::new_v4().simple());
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.as_str()),
            ("AIRSTATE_REDIS_URL", redis.url.as_str()),
            ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
            ("AIRSTATE_METASTORE_POOL_SIZE", "3"),
            ("RUST_LOG", "off"),
        ],
        Stdio::null(),
    );
    let http = reqwest::Client::new();
    // A token for a task instance the metastore does not know: one metastore query.
    let ti = uuid::Uuid::now_v7();
    let token = String::from_utf8(run(&["token", "--sub", &ti.to_string()], &[]).stdout).unwrap();
    let missing = http
        .get(format!("{}/execution/store/ti/{ti}/k", served.base))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    let status = missing.status();
    assert!(
        status.is_client_error(),
        "{status}: {}",
        missing.text().await.unwrap()
    );
    println!("unknown task instance: {status}");
    assert_eq!(common::ready(&served.base).await.0, 200);
    let text = common::scrape(&served.base).await;

    let typed: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    assert!(typed.len() >= 10, "{text}");
    for (name, kind) in &typed {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("# HELP {name} "))),
            "{name} has no HELP line:\n{text}"
        );
        if *kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        }
    }
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .and_then(|line| line.rsplit_once(' '))
            .and_then(|(_, value)| value.parse().ok())
    };
    let build = text
        .lines()
        .find(|line| line.starts_with("airstate_build_info{"))
        .unwrap_or_else(|| panic!("no airstate_build_info in:\n{text}"));
    assert!(build.ends_with(" 1"), "{build}");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    let commit = label(build, "commit").unwrap();
    assert!(!commit.is_empty(), "{build}");
    assert_eq!(commit, airstate::telemetry::COMMIT);
    // Process metrics, from /proc.
    assert!(
        value("process_resident_memory_bytes").unwrap() > 1e6,
        "{text}"
    );
    assert!(value("process_cpu_seconds_total").unwrap() > 0.0);
    let fds = value("process_open_fds").unwrap();
    assert!(
        fds >= 3.0 && fds <= value("process_max_fds").unwrap(),
        "{fds}"
    );
    let started = value("process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now + 1.0 && started > now - 120.0,
        "{started} vs {now}"
    );
    // The metastore pool and its queries.
    assert_eq!(value("airstate_metastore_pool_max_connections"), Some(3.0));
    assert!(value("airstate_metastore_pool_connections").unwrap() >= 1.0);
    assert!(value("airstate_metastore_pool_idle_connections").is_some());
    assert_eq!(value("airstate_metastore_pool_waiting"), Some(0.0));
    assert!(
        value("airstate_metastore_query_duration_seconds_count").unwrap() >= 1.0,
        "{text}"
    );
}

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/airstate");

/// helm and a PyYAML virtualenv, from `scripts/deploy-tools.sh` (as tests/deploy.rs uses).
fn deploy_tools() -> std::path::PathBuf {
    let target = format!("{}/deploy-tools", env!("CARGO_TARGET_TMPDIR"));
    let output = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/deploy-tools.sh"
        ))
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "deploy-tools.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::path::PathBuf::from(target)
}

fn checked(output: std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what}:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `promtool` from Debian's `prometheus` package, installed when missing (as root, the
/// way CI runs); `None` with a message when it cannot be had.
fn promtool() -> Option<String> {
    let found = || Command::new("promtool").arg("--version").output().is_ok();
    if !found() {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "prometheus"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    if found() {
        Some("promtool".to_owned())
    } else {
        eprintln!("SKIPPED the promtool checks: promtool is not installed and `apt-get install prometheus` failed");
        None
    }
}

/// The chart's alert rules and Grafana dashboard (rendered by helm, as installed) use only
/// metrics a running replica exposes, and promtool accepts the rules and sees each alert
/// fire on the series it is about, and none on healthy ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_use_metrics_a_replica_exposes() {
    let tools = deploy_tools();
    let helm = |args: &[&str]| {
        let output = Command::new(tools.join("helm"))
            .args(args)
            .env("HOME", env!("CARGO_TARGET_TMPDIR"))
            .output()
            .unwrap();
        checked(output, &format!("helm {args:?}"))
    };
    let sets = [
        "--set",
        "image.repository=registry.example.com/airstate",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ];
    let mut lint = vec!["lint", "--strict", CHART];
    lint.extend(sets);
    helm(&lint);
    let mut template = vec!["template", "t", CHART];
    template.extend(sets);
    let rendered = helm(&template);
    let mut python = Command::new(tools.join("venv/bin/python"));
    let script = "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))";
    let mut child = python
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), rendered.as_bytes()).unwrap();
    let documents: Vec<serde_json::Value> =
        serde_json::from_str(&checked(child.wait_with_output().unwrap(), "PyYAML")).unwrap();
    let rule = documents
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let dashboard_map = documents
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "t-airstate-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(
        dashboard_map["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(dashboard_map["data"]["airstate.json"].as_str().unwrap()).unwrap();
    let on_disk: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CHART}/dashboards/airstate.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard, on_disk);

    // Every expression, and the metric names in it.
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let alerts: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for wanted in [
        "AirstateHighErrorRatio",
        "AirstateHighLatency",
        "AirstateRedisErrors",
        "AirstateMetastoreErrors",
        "AirstateDependencyDown",
        "AirstateIdentityCacheMisses",
        "AirstateJwtFailures",
        "AirstateChangeStreamLag",
    ] {
        assert!(alerts.contains(&wanted), "{wanted} missing from {alerts:?}");
    }
    let mut expressions: Vec<String> = rules
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            expressions.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for expression in &expressions {
        let mut rest = expression.as_str();
        while let Some(at) = rest.find(|c: char| c.is_ascii_lowercase()) {
            rest = &rest[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            if word.starts_with("airstate_") || word.starts_with("process_") {
                used.insert(word.to_owned());
            }
            rest = &rest[end..];
        }
    }
    assert!(used.len() >= 20, "{used:?}");

    // A replica with traffic of every kind: served, refused, forwarded to a dead upstream,
    // a reconcile pass, then Redis gone.
    let mut redis = common::RedisServer::start();
    let pg = common::Postgres::shared();
    let dead_upstream = format!("http://127.0.0.1:{}", common::free_port());
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.as_str()),
            ("AIRSTATE_REDIS_URL", redis.url.as_str()),
            ("AIRSTATE_AIRFLOW_API_URL", dead_upstream.as_str()),
            ("AIRSTATE_RECONCILE_INTERVAL_SECONDS", "1"),
            ("AIRSTATE_REDIS_TIMEOUT_MS", "300"),
            ("RUST_LOG", "off"),
        ],
        Stdio::null(),
    );
    let http = reqwest::Client::new();
    let ti = uuid::Uuid::now_v7();
    pg.insert_task_instance(ti, &format!("dag-{ti}"), &format!("run-{ti}"), "t", -1)
        .await;
    let token = String::from_utf8(run(&["token", "--sub", &ti.to_string()], &[]).stdout).unwrap();
    let key = format!("{}/execution/store/ti/{ti}/k", served.base);
    let put = http
        .put(&key)
        .bearer_auth(token.trim())
        .json(&serde_json::json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    assert_eq!(
        http.get(&key)
            .bearer_auth("garbage")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let forwarded = http
        .get(format!("{}/api/v2/dags", served.base))
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), 502);
    // A reconcile pass (every second) has run once the metric shows.
    let scrape = || common::scrape(&served.base);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !scrape().await.contains("airstate_reconcile_passes_total{") {
        assert!(std::time::Instant::now() < deadline, "no reconcile pass");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    redis.stop();
    let failed = http
        .get(&key)
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    let text = scrape().await;
    let exposed: std::collections::BTreeSet<&str> = series(&text)
        .into_iter()
        .map(|series| series.split('{').next().unwrap())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !exposed.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "used but not exposed: {missing:?}\n{text}"
    );

    let Some(promtool) = promtool() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules_file = dir.path().join("rules.json");
    std::fs::write(&rules_file, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
    checked(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&rules_file)
            .output()
            .unwrap(),
        "promtool check rules",
    );
    let job = "job=\"t-airstate\"";
    let failing = [
        ("airstate_http_requests_total{status=\"503\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_http_requests_total{status=\"200\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_http_request_duration_seconds_bucket{le=\"0.25\",route=\"/r\",method=\"GET\"}", "0+0x60"),
        ("airstate_http_request_duration_seconds_bucket{le=\"1\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_redis_errors_total{command=\"hget\",kind=\"unavailable\"}", "0+60x60"),
        ("airstate_metastore_errors_total{kind=\"pool\"}", "0+60x60"),
        ("airstate_metastore_pool_waiting", "3+0x60"),
        ("airstate_identity_cache_total{kind=\"task\",result=\"miss\"}", "0+600x60"),
        ("airstate_identity_cache_total{kind=\"task\",result=\"hit\"}", "0+60x60"),
        ("airstate_jwt_failures_total{reason=\"invalid\"}", "0+600x60"),
        ("airstate_change_streams_lagged_total", "0+60x60"),
        ("airstate_dependency_up{dependency=\"redis\"}", "0+0x60"),
    ];
    let healthy = [
        ("airstate_http_requests_total{status=\"200\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_http_requests_total{status=\"404\",route=\"/r\",method=\"GET\"}", "0+60x60"),
        ("airstate_http_request_duration_seconds_bucket{le=\"0.005\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"/r\",method=\"GET\"}", "0+600x60"),
        ("airstate_redis_errors_total{command=\"hget\",kind=\"unavailable\"}", "0+0x60"),
        ("airstate_metastore_errors_total{kind=\"pool\"}", "0+0x60"),
        ("airstate_metastore_pool_waiting", "0+0x60"),
        ("airstate_identity_cache_total{kind=\"task\",result=\"miss\"}", "0+60x60"),
        ("airstate_identity_cache_total{kind=\"task\",result=\"hit\"}", "0+600x60"),
        ("airstate_jwt_failures_total{reason=\"invalid\"}", "0+6x60"),
        ("airstate_change_streams_lagged_total", "0+0x60"),
        ("airstate_dependency_up{dependency=\"redis\"}", "1+0x60"),
    ];
    let input = |series: &[(&str, &str)]| -> Vec<serde_json::Value> {
        series
            .iter()
            .map(|(name, values)| {
                let series = match name.split_once('{') {
                    Some((metric, labels)) => format!("{metric}{{{job},{labels}"),
                    None => format!("{name}{{{job}}}"),
                };
                serde_json::json!({"series": series, "values": values})
            })
            .collect()
    };
    let expect = |firing: bool| -> Vec<serde_json::Value> {
        rules
            .iter()
            .map(|rule| {
                // An alert aggregated `by` a label carries it.
                let mut labels = rule["labels"].clone();
                if rule["alert"] == "AirstateDependencyDown" {
                    labels["dependency"] = "redis".into();
                }
                let expected = if firing {
                    vec![serde_json::json!({
                        "exp_labels": labels,
                        "exp_annotations": rule["annotations"],
                    })]
                } else {
                    vec![]
                };
                serde_json::json!({
                    "eval_time": "40m",
                    "alertname": rule["alert"],
                    "exp_alerts": expected,
                })
            })
            .collect()
    };
    let tests = serde_json::json!({
        "rule_files": [rules_file],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": input(&failing), "alert_rule_test": expect(true)},
            {"interval": "1m", "input_series": input(&healthy), "alert_rule_test": expect(false)},
        ],
    });
    let tests_file = dir.path().join("tests.json");
    std::fs::write(&tests_file, tests.to_string()).unwrap();
    let tested = checked(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(&tests_file)
            .output()
            .unwrap(),
        "promtool test rules",
    );
    println!("{tested}");
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The OpenAPI document, with every part of the surface on (admin API, Core REST API),
/// passes `redocly lint` (npm `@redocly/cli`, pinned in scripts/redocly.sh) with no error,
/// and documents what operators and clients rely on.
#[test]
fn the_openapi_document_lints_clean_and_documents_every_status() {
    let document = airstate::http::routes::document(true, true);
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_owned()), "{id} twice");
            // Chosen names, not the path spelled out.
            assert!(!id.contains('_') && id.len() < 40, "{method} {path}: {id}");
            assert_eq!(op["tags"].as_array().unwrap().len(), 1, "{method} {path}");
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.get("default").is_none(), "{method} {path}");
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                for code in ["401", "403"] {
                    assert!(responses.contains_key(code), "{method} {path} lacks {code}");
                }
            }
        }
    }
    // Conditional requests on one key: ETag, 304, 412, If-Match / If-None-Match.
    let key = &document["paths"]["/execution/store/ti/{task_instance_id}/{key}"];
    assert_eq!(key["get"]["operationId"], "getTaskState");
    assert!(key["get"]["responses"]["200"]["headers"]["ETag"].is_object());
    assert!(key["get"]["responses"]["304"]["headers"]["ETag"].is_object());
    assert!(key["put"]["responses"]["204"]["headers"]["ETag"].is_object());
    for method in ["put", "delete"] {
        assert!(key[method]["responses"]["412"].is_object(), "{method}");
        let headers: Vec<&str> = key[method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "header")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(headers, ["If-Match", "If-None-Match"], "{method}");
    }
    assert!(document["components"]["headers"]["ETag"].is_object());

    let install = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redocly.sh"))
        .arg(format!("{}/redocly", env!("CARGO_TARGET_TMPDIR")))
        .output()
        .unwrap();
    let redocly = checked(install, "scripts/redocly.sh")
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, document.to_string()).unwrap();
    let output = Command::new(&redocly)
        .current_dir(dir.path())
        .args(["lint", "--format=summary", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redocly.yaml"))
        .arg(&file)
        .env("REDOCLY_TELEMETRY", "off")
        .env("REDOCLY_SUPPRESS_UPDATE_NOTICE", "true")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(output.status.success(), "redocly lint:\n{text}");
    assert!(
        !text.lines().any(|line| line.starts_with("error")),
        "{text}"
    );
}
