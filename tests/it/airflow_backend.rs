//! `airstate_airflow.AirstateBackend` (python/airstate-airflow), Airflow's `[state_store]`
//! backend over airstate: its pytest suite, run in the cached Airflow 3.3.2 virtualenv
//! against this build's `airstate` binary, a real Redis and a real PostgreSQL holding
//! Airflow's metastore, with Airflow's own code (`get_state_backend()`, the Execution API
//! served in-process and behind its JWT auth, `clear_on_success`, `airflow dags test`)
//! calling the backend.

use crate::common;

use std::process::Command;

use common::{free_ports, Postgres, RedisServer};

fn airflow_python() -> String {
    let made = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/airflow-venv.sh"
        ))
        .output()
        .expect("scripts/airflow-venv.sh");
    assert!(
        made.status.success(),
        "making the Airflow 3.3.2 virtualenv failed:\n{}",
        String::from_utf8_lossy(&made.stderr)
    );
    String::from_utf8_lossy(&made.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// `tests="N" ... skipped="M"` of pytest's JUnit report.
fn counts(report: &str) -> (usize, usize, usize) {
    let attribute = |name: &str| {
        let start = report
            .find(&format!(" {name}=\""))
            .unwrap_or_else(|| panic!("no {name} in the report"))
            + name.len()
            + 3;
        report[start..]
            .split('"')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("unreadable {name} in the report"))
    };
    (
        attribute("tests"),
        attribute("skipped"),
        attribute("failures") + attribute("errors"),
    )
}

#[test]
fn airstate_airflow_backend_under_airflow() {
    let python = airflow_python();
    let redis = RedisServer::start();
    let pg = Postgres::shared();
    let ports: Vec<String> = free_ports(8).iter().map(u16::to_string).collect();
    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("report.xml");
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/python/airstate-airflow/tests");
    let mut pytest = Command::new(&python);
    pytest
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-rfEs",
            "-q",
            "--durations=5",
        ])
        .arg(format!("--junitxml={}", report.display()))
        .arg(tests)
        .current_dir(work.path())
        .env("AIRSTATE_TEST_BINARY", env!("CARGO_BIN_EXE_airstate"))
        .env("AIRSTATE_TEST_REDIS_URL", &redis.url)
        .env("AIRSTATE_TEST_PG_URL", &pg.plain_url)
        .env("AIRSTATE_TEST_PORTS", ports.join(","))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // This clone's package, whichever clone the shared venv's editable install points at.
        .env(
            "PYTHONPATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/python/airstate-airflow/src"),
        );
    // One test at a time while iterating: AIRSTATE_PYTEST_K=<expression>.
    if let Ok(filter) = std::env::var("AIRSTATE_PYTEST_K") {
        pytest.args(["-k", &filter]);
    }
    // Variables of the machine's own Airflow or airstate must not leak into the tests.
    for (name, _) in std::env::vars() {
        if name.starts_with("AIRFLOW")
            || name.starts_with("AIRSTATE_") && name != "AIRSTATE_PYTEST_K"
        {
            pytest.env_remove(name);
        }
    }
    let status = pytest.status().expect("pytest");
    match status.code() {
        Some(0) => {}
        Some(5) => panic!("pytest collected no tests from {tests}"),
        code => panic!("pytest failed (exit {code:?}); its output is above"),
    }
    let (total, skipped, failed) = counts(&std::fs::read_to_string(&report).unwrap());
    assert_eq!(failed, 0);
    assert_eq!(skipped, 0, "every backend test must run");
    if std::env::var("AIRSTATE_PYTEST_K").is_err() {
        assert!(total >= 15, "only {total} tests ran");
    }
}

/// The package promises types (`py.typed`): mypy --strict over it and its tests, against
/// Airflow 3.3.2's own annotations.
#[test]
fn airstate_airflow_is_strictly_typed() {
    let python = airflow_python();
    let package = concat!(env!("CARGO_MANIFEST_DIR"), "/python/airstate-airflow");
    // Kept between runs in cargo's own scratch space: a warm run takes a few seconds.
    let cache = concat!(env!("CARGO_TARGET_TMPDIR"), "/mypy-cache");
    let output = Command::new(&python)
        .args([
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            cache,
        ])
        .args(["src", "tests"])
        .current_dir(package)
        .env("MYPYPATH", "src:tests")
        .output()
        .expect("mypy");
    assert!(
        output.status.success(),
        "mypy --strict found problems:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
