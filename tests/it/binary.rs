//! The real `airstate` binary: driven by Airflow's own Task SDK client (installed from
//! PyPI into a virtualenv), start-up errors that name their variable, and a clean stop on
//! SIGTERM.

use crate::common;
use crate::gateway;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Postgres, RedisServer, ServedBinary};
use gateway::{token_for, unique, SECRET};
use uuid::Uuid;

const BINARY: &str = env!("CARGO_BIN_EXE_airstate");

fn serve(env: &[(&str, String)]) -> ServedBinary {
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("RUST_LOG", "warn"));
    ServedBinary::start(&env, Stdio::inherit())
}

fn production_env() -> Vec<(&'static str, String)> {
    vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET.to_owned()),
        (
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
            Postgres::shared().url.clone(),
        ),
        ("AIRSTATE_REDIS_URL", RedisServer::shared().url.clone()),
        ("AIRSTATE_KEY_PREFIX", format!("{}:", unique("sdk"))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflows_task_sdk_client_works_unchanged() {
    let venv = format!("{}/sdk-venv", env!("CARGO_TARGET_TMPDIR"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/sdk-venv.sh");
    let made = Command::new("bash")
        .arg(script)
        .arg(&venv)
        .output()
        .expect("sdk-venv.sh");
    assert!(
        made.status.success(),
        "installing apache-airflow-task-sdk failed:\n{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let python = String::from_utf8_lossy(&made.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_owned();

    let pg = Postgres::shared();
    let ti = Uuid::now_v7();
    pg.insert_task_instance(ti, &unique("dag"), &unique("run"), "extract", -1)
        .await;
    let (name, uri) = (
        unique("orders"),
        format!("s3://bucket/{}", unique("orders")),
    );
    pg.insert_asset(&name, &uri, true).await;
    let served = serve(&production_env());

    let run = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/sdk/client_roundtrip.py"
            ))
            .env("AIRSTATE_BASE_URL", format!("{}/execution/", served.base))
            .env("AIRSTATE_TOKEN", token_for(ti))
            .env("AIRSTATE_TI_ID", ti.to_string())
            .env("AIRSTATE_ASSET_NAME", &name)
            .env("AIRSTATE_ASSET_URI", &uri)
            // Fail fast instead of the client's minutes of retries on a 5xx.
            .env("AIRFLOW__WORKERS__EXECUTION_API_RETRIES", "1")
            .env("AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MIN", "0.1")
            .env("AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX", "0.2")
            .output()
            .map(|output| (output, served))
    })
    .await
    .unwrap()
    .expect("python");
    let (output, _served) = run;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the Task SDK client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = stdout.lines().last().unwrap_or("");
    assert!(summary.ends_with(" passed, 0 failed"), "{summary}");
    let passed: usize = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 20, "{summary}");
}

#[test]
fn invalid_configuration_names_the_variable() {
    for (name, value) in [
        ("AIRSTATE_IDENTITY", "magic"),
        ("AIRSTATE_REDIS_URL", "http://localhost"),
        ("AIRSTATE_LISTEN", "not-an-address"),
    ] {
        let output = Command::new(BINARY)
            .arg("serve")
            .env_clear()
            .env("AIRFLOW__API_AUTH__JWT_SECRET", SECRET)
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
    let no_key = Command::new(BINARY)
        .arg("serve")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("AIRFLOW__API_AUTH__JWT_SECRET"));
}

#[test]
fn help_lists_commands_and_variables() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "serve",
        "token",
        "AIRSTATE_REDIS_URL",
        "AIRFLOW__API_AUTH__JWT_SECRET",
    ] {
        assert!(help.contains(expected), "{expected} missing from:\n{help}");
    }
    // Each variable with its default, from the same table parsing uses.
    for variable in airstate::config::VARIABLES {
        let entry = format!(
            "  {}\n      {} [default: {}]\n",
            variable.name,
            variable.meaning,
            variable.default.text()
        );
        assert!(help.contains(&entry), "{entry:?} missing from:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_serves_and_stops_cleanly_on_sigterm() {
    let mut served = serve(&[("AIRFLOW__API_AUTH__JWT_SECRET", SECRET.to_owned())]);
    let http = reqwest::Client::new();
    let ti = Uuid::new_v4();
    let token = Command::new(BINARY)
        .args([
            "token",
            "--sub",
            &ti.to_string(),
            "--dag-id",
            "d",
            "--run-id",
            "r",
            "--task-id",
            "t",
        ])
        .env("AIRFLOW__API_AUTH__JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let url = format!("{}/execution/store/ti/{ti}/k", served.base);
    let put = http
        .put(&url)
        .bearer_auth(&token)
        .json(&serde_json::json!({"value": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let got = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(got.text().await.unwrap(), r#"{"value":1.0}"#);
    assert_eq!(common::ready(&served.base).await.0, 200);

    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// A `redis-server` that speaks only TLS; killed on drop.
struct TlsRedis(std::process::Child);

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls_to_a_server_signed_by_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    common::private_ca(dir.path(), "IP:127.0.0.1,DNS:localhost");
    let port = common::free_port();
    let pem = |name: &str| dir.path().join(name).display().to_string();
    let _redis = TlsRedis(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &pem("server.pem")])
            .args(["--tls-key-file", &pem("server.key")])
            .args(["--tls-ca-cert-file", &pem("ca.pem")])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--bind",
                "127.0.0.1",
            ])
            .args(["--dir", &dir.path().display().to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let started = Instant::now();
    while Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &pem("ca.pem"),
            "-p",
            &port.to_string(),
            "ping",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "PONG")
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "TLS redis never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("rediss://127.0.0.1:{port}");

    // Without the CA the certificate is not trusted: the gateway runs but never turns
    // ready, and `/ready` says why (README, "Readiness").
    let mut untrusted_env = production_env();
    untrusted_env.retain(|(name, _)| *name != "AIRSTATE_REDIS_URL");
    untrusted_env.push(("AIRSTATE_REDIS_URL", url.clone()));
    untrusted_env.push(("AIRSTATE_REDIS_TIMEOUT_MS", "1000".to_owned()));
    let untrusted = serve(&untrusted_env);
    let (status, ready) = common::ready(&untrusted.base).await;
    assert_eq!(status, 503);
    let detail = ready["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.starts_with("not ready: redis not reached since start-up"),
        "{detail}"
    );
    assert!(detail.to_lowercase().contains("certificate"), "{detail}");
    drop(untrusted);

    // Trusting the private CA through SSL_CERT_FILE, state round-trips over TLS.
    let mut env = production_env();
    env.retain(|(name, _)| *name != "AIRSTATE_REDIS_URL");
    env.push(("AIRSTATE_REDIS_URL", url));
    env.push(("SSL_CERT_FILE", pem("ca.pem")));
    let served = serve(&env);
    let ti = Uuid::now_v7();
    Postgres::shared()
        .insert_task_instance(ti, &unique("dag"), &unique("run"), "tls", -1)
        .await;
    let http = reqwest::Client::new();
    let path = format!("{}/execution/store/ti/{ti}/k", served.base);
    let put = http
        .put(&path)
        .bearer_auth(token_for(ti))
        .json(&serde_json::json!({"value": "over tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let got: serde_json::Value = http
        .get(&path)
        .bearer_auth(token_for(ti))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got, serde_json::json!({"value": "over tls"}));
}
