//! Day-two operations against the real binary: configuration that catches typos and a
//! `--help` that lists every variable read.

mod common;

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
    let ready = reqwest::get(format!("{}/ready", served.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
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
