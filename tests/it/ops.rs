//! Day-two operations (issue 17): the README's shell recipes run as written against a
//! real gateway, and the binary's own checks that an operator relies on.

use crate::common;
use crate::gateway;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{redis_cli, RedisServer, ServedBinary};
use gateway::{unique, Backend, Gateway, SECRET};
use serde_json::json;

const BINARY: &str = env!("CARGO_BIN_EXE_airstate");

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The README's compare-and-set recipe (from its comment to the end of its `sh` block),
/// split before its write so that another writer can be slipped in between the read and
/// the write.
fn compare_and_set_recipe(base: &str) -> (String, String) {
    let readme = readme();
    let section = readme
        .split("### Optimistic concurrency")
        .nth(1)
        .expect("the README's optimistic concurrency section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let recipe = &block[block.find("# Compare-and-set").expect("the recipe")..];
    let write_at = recipe
        .rfind("\ncurl -si -X PUT")
        .expect("the recipe's write")
        + 1;
    let local = |text: &str| text.replace("http://127.0.0.1:8080", base);
    (local(&recipe[..write_at]), local(&recipe[write_at..]))
}

/// Runs the recipe with `between` (shell) between its read and its write; the status
/// line of the recipe's write.
fn run_recipe(gw: &Gateway, token: &str, asset: &str, between: &str) -> String {
    let (read, write) = compare_and_set_recipe(&gw.base);
    let script = format!("set -eu\n{read}\n{between}\n{write}");
    let output = Command::new("bash")
        .args(["-c", &script])
        .env("TOKEN", token)
        .env("A", asset)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    stdout.lines().next().unwrap_or_default().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_compare_and_set_recipe_never_overwrites_a_concurrent_write() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let name = unique("orders");
    gw.pg
        .insert_asset(&name, &format!("s3://bucket/{name}"), true)
        .await;
    let path = format!("/execution/store/asset/by-name/value?name={name}&key=watermark");
    let other_writer = format!(
        "curl -sf -o /dev/null -X PUT -H \"Authorization: Bearer $TOKEN\" \
         -H 'Content-Type: application/json' -d '{{\"value\": \"other\"}}' '{}{path}'",
        gw.base
    );
    let value = || async { gw.get(&path, &ti.token).await.body["value"].clone() };

    // No key yet, and another worker creates it between the read and the write.
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, &other_writer));
    assert!(status.contains("412"), "{status}");
    assert_eq!(value().await, json!("other"));

    // The key exists and nobody writes in between: the write applies.
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, ":"));
    assert!(status.contains("204"), "{status}");
    assert_eq!(value().await, json!("2026-05-01"));

    // The key exists and another worker writes in between: refused.
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, &other_writer));
    assert!(status.contains("412"), "{status}");
    assert_eq!(value().await, json!("other"));

    // No key and nobody in between: created.
    gw.delete(&path, &ti.token).await;
    let status = tokio::task::block_in_place(|| run_recipe(&gw, &ti.token, &name, ":"));
    assert!(status.contains("204"), "{status}");
    assert_eq!(value().await, json!("2026-05-01"));
}

#[test]
fn the_license_file_is_the_one_cargo_toml_names() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/LICENSE")).unwrap();
    let words: Vec<&str> = license.split_whitespace().collect();
    assert_eq!(words[..4], ["Apache", "License", "Version", "2.0,"]);
    // The full text: its nine sections and the appendix, not just a header.
    assert!(license.contains("9. Accepting Warranty or Additional Liability."));
    assert!(license.contains("APPENDIX: How to apply the Apache License to your work."));
}

// --- A Redis password with URL characters -------------------------------------------

const PASSWORD: &str = "p@ss#w/rd";

/// A Redis that wants `PASSWORD` (set once it answers: the helpers wait on a bare PING).
fn redis_with_password() -> RedisServer {
    let redis = RedisServer::start();
    assert_eq!(
        redis_cli(redis.port, &["CONFIG", "SET", "requirepass", PASSWORD]),
        "OK"
    );
    redis
}

/// `airstate serve` with `env` until it exits (at most 20 s): its status and stderr.
fn serve_until_exit(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BINARY)
        .arg("serve")
        .env_clear()
        .env("AIRSTATE_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("airstate kept running with {env:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_unencoded_password_in_the_url_stops_start_up_with_a_message_that_says_so() {
    let redis = redis_with_password();
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    let (status, stderr) = serve_until_exit(&[
        ("AIRSTATE_REDIS_URL", &url),
        ("AIRSTATE_IDENTITY", "claims"),
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("AIRSTATE_REDIS_URL"), "{stderr}");
    assert!(stderr.contains("percent-encoded"), "{stderr}");
    assert!(stderr.contains("AIRSTATE_REDIS_PASSWORD"), "{stderr}");
    assert!(
        !stderr.contains(PASSWORD),
        "the password is echoed: {stderr}"
    );
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("dns") && !lower.contains("lookup"),
        "{stderr}"
    );
}

/// Mints a claims-identity token with the binary's own `token` command.
fn claims_token(sub: uuid::Uuid) -> String {
    let output = Command::new(BINARY)
        .args(["token", "--sub", &sub.to_string()])
        .args(["--dag-id", "ops", "--run-id", "manual__1", "--task-id", "t"])
        .env_clear()
        .env("AIRSTATE_IDENTITY", "claims")
        .env("AIRFLOW__API_AUTH__JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_url_characters_works_from_its_own_variable_or_percent_encoded() {
    let redis = redis_with_password();
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    let encoded = format!("redis://:p%40ss%23w%2Frd@127.0.0.1:{}", redis.port);
    let http = reqwest::Client::new();
    for env in [
        vec![
            ("AIRSTATE_REDIS_URL", plain.as_str()),
            ("AIRSTATE_REDIS_PASSWORD", PASSWORD),
        ],
        vec![("AIRSTATE_REDIS_URL", encoded.as_str())],
    ] {
        let mut env = env;
        env.extend([
            ("AIRSTATE_IDENTITY", "claims"),
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("RUST_LOG", "warn"),
        ]);
        let served = ServedBinary::start(&env, Stdio::inherit());
        let (status, ready) = common::ready(&served.base).await;
        assert_eq!(status, 200, "{env:?}: {ready}");
        let ti = uuid::Uuid::now_v7();
        let token = claims_token(ti);
        let key = format!("{}/execution/store/ti/{ti}/k", served.base);
        let put = http
            .put(&key)
            .bearer_auth(&token)
            .json(&json!({"value": 7}))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 204, "{env:?}");
        let got: serde_json::Value = http
            .get(&key)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got["value"], 7, "{env:?}");
    }
    // A password in both places is ambiguous: refused before connecting.
    let (status, stderr) = serve_until_exit(&[
        ("AIRSTATE_REDIS_URL", &encoded),
        ("AIRSTATE_REDIS_PASSWORD", PASSWORD),
        ("AIRSTATE_IDENTITY", "claims"),
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("AIRSTATE_REDIS_PASSWORD"), "{stderr}");
}

// --- `airstate selftest`: the chart's helm test ---------------------------------------

fn selftest(url: &str, env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(BINARY)
        .args(["selftest", "--url", url, "--timeout", "5"])
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn selftest_checks_ready_and_a_state_round_trip() {
    let mut redis = RedisServer::start();
    let url = redis.url.clone();
    let claims = [
        ("AIRSTATE_REDIS_URL", url.as_str()),
        ("AIRSTATE_IDENTITY", "claims"),
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("RUST_LOG", "warn"),
    ];
    let served = ServedBinary::start(&claims, Stdio::inherit());
    let (passed, text) = selftest(&served.base, &claims);
    assert!(passed, "{text}");
    assert!(text.contains("round trip"), "{text}");
    // Nothing is left behind in Redis.
    let keys = redis_cli(redis.port, &["--scan", "--pattern", "*selftest*"]);
    assert!(keys.is_empty(), "{keys}");

    // A gateway that trusts another key refuses the test's token.
    let other = [
        ("AIRSTATE_IDENTITY", "claims"),
        (
            "AIRFLOW__API_AUTH__JWT_SECRET",
            "another-secret-that-is-long-enough-too",
        ),
    ];
    let (passed, text) = selftest(&served.base, &other);
    assert!(!passed, "{text}");
    assert!(text.contains("PUT"), "{text}");

    // Not ready (Redis gone): fails at /ready.
    redis.stop();
    let (passed, text) = selftest(&served.base, &claims);
    assert!(!passed, "{text}");
    assert!(text.contains("/ready"), "{text}");
    drop(served);
    // Nothing listening.
    let (passed, text) = selftest(&served_base_gone(), &claims);
    assert!(!passed, "{text}");
}

fn served_base_gone() -> String {
    format!("http://127.0.0.1:{}", common::free_port())
}

#[test]
fn selftest_with_metastore_identity_proves_trust_without_writing() {
    let pg = common::Postgres::shared();
    let redis = RedisServer::start();
    let env = [
        ("AIRSTATE_REDIS_URL", redis.url.as_str()),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.as_str()),
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("RUST_LOG", "warn"),
    ];
    let served = ServedBinary::start(&env, Stdio::inherit());
    let (passed, text) = selftest(&served.base, &env);
    assert!(passed, "{text}");
    assert!(text.contains("metastore consulted"), "{text}");
}

// --- One test command -------------------------------------------------------------------

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn dry_run(path: &str, args: &[&str]) -> String {
    let output = Command::new("bash")
        .arg(format!("{ROOT}/scripts/test"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", env!("CARGO_TARGET_TMPDIR"))
        .env("AIRSTATE_TEST_DRY_RUN", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_readmes_test_command_is_what_ci_runs_and_it_installs_what_is_missing() {
    let readme = readme();
    let tests = readme.split("\n## Tests\n").nth(1).unwrap();
    let command = tests
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    assert_eq!(command.trim(), "scripts/test");
    let ci = std::fs::read_to_string(format!("{ROOT}/.ci/run")).unwrap();
    let ci_lines: Vec<&str> = ci.lines().map(str::trim).collect();
    assert!(ci_lines.contains(&"scripts/test"), "{ci}");
    assert!(
        !ci_lines
            .iter()
            .any(|l| l.starts_with("cargo test") || l.contains("apt-get")),
        ".ci/run leaves installing and testing to scripts/test: {ci}"
    );

    // Where nothing the tests need is on PATH: every apt package found through PATH is to
    // be installed, then the venvs, then `cargo test --locked` with the arguments given.
    let bare = tempfile::tempdir().unwrap();
    for tool in ["bash", "dirname", "cat"] {
        let found = Command::new("bash")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let found = String::from_utf8_lossy(&found.stdout).trim().to_owned();
        std::os::unix::fs::symlink(&found, bare.path().join(tool)).unwrap();
    }
    let plan = dry_run(bare.path().to_str().unwrap(), &["--test", "it", "deploy::"]);
    let install = plan.lines().next().unwrap();
    for package in ["redis-server", "openssl", "python3-venv", "npm", "chromium"] {
        assert!(
            install.split_whitespace().any(|p| p == package),
            "{package}: {plan}"
        );
    }
    assert!(plan.contains("scripts/airflow-venv.sh"), "{plan}");
    assert!(plan.contains("scripts/deploy-tools.sh"), "{plan}");
    assert_eq!(
        plan.lines().last().unwrap(),
        "would run: cargo test --locked --test it deploy::"
    );
    // Where all is present (as here, once scripts/test ran), it installs nothing.
    let here = dry_run(&std::env::var("PATH").unwrap(), &[]);
    let first = here.lines().next().unwrap();
    if first != "would install: nothing" {
        println!("this machine lacks some test tools: {first}");
    }
}

/// The chart's private-key mode: the test Pod mounts the same signing key the gateway
/// trusts, and no JWT secret.
#[test]
fn selftest_mints_with_a_private_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("private-key.pem");
    let status = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let env = [
        ("AIRSTATE_IDENTITY", "claims"),
        (
            "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
            key.to_str().unwrap(),
        ),
        ("RUST_LOG", "warn"),
    ];
    let served = ServedBinary::start(&env, Stdio::inherit());
    let (passed, text) = selftest(&served.base, &env);
    assert!(passed, "{text}");
    assert!(text.contains("round trip"), "{text}");
    // Another key is not trusted.
    let other = dir.path().join("other.pem");
    let status = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(status.success());
    let (passed, text) = selftest(
        &served.base,
        &[
            ("AIRSTATE_IDENTITY", "claims"),
            (
                "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
                other.to_str().unwrap(),
            ),
        ],
    );
    assert!(!passed, "{text}");
}
