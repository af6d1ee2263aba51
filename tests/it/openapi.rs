//! `/openapi.json`: it lists exactly what the router serves, and schemathesis (PyPI,
//! pinned in scripts/schemathesis-venv.sh) finds no server error and no reply that breaks
//! it, against the real binary over a real Redis.

use crate::common;
use crate::gateway;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use common::{RedisServer, ServedBinary};
use gateway::{claims_for, sign, Backend, Gateway, SECRET};
use serde_json::{json, Value};
use uuid::Uuid;

const ADMIN: &str = "admin-token-0123456789abcdef0123456789abcdef";
const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment {
            "{task_instance_id}" => Uuid::new_v4().to_string(),
            s if s.starts_with('{') => "x".to_owned(),
            s => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_the_router_serves() {
    let gw = Gateway::start_with(Backend::Memory, &[("AIRSTATE_ADMIN_TOKEN", ADMIN)]).await;
    let doc = gw.send("GET", "/openapi.json", None, None).await;
    assert_eq!(doc.status, 200, "{doc:?}");
    assert_eq!(doc.body["openapi"], "3.1.0");
    let paths = doc.body["paths"].as_object().unwrap();
    let documented: BTreeSet<String> = paths.keys().cloned().collect();
    let served: BTreeSet<String> = airstate::http::openapi::served()
        .paths()
        .iter()
        .map(|p| airstate::http::openapi::openapi_path(p))
        .collect();
    assert_eq!(documented, served, "documented paths == served paths");

    // Method by method: a documented operation is routed (never the fallback 404 or a
    // 405), an undocumented method on a documented path is a 405.
    for (path, item) in paths {
        let url = concrete(path);
        for method in METHODS {
            let reply = gw
                .send(&method.to_uppercase(), &url, Some(ADMIN), None)
                .await;
            let fallback = reply.status == 405 || reply.body == json!({"detail": "Not Found"});
            if item.get(method).is_some() {
                assert!(
                    !fallback,
                    "{method} {path} is documented but not served: {reply:?}"
                );
            } else {
                assert_eq!(
                    reply.status, 405,
                    "{method} {path} is served but not documented"
                );
            }
        }
    }

    // Without the admin API, neither the router nor the document has it.
    let off = Gateway::start(Backend::Memory).await;
    let doc = off.send("GET", "/openapi.json", None, None).await;
    let paths = doc.body["paths"].as_object().unwrap();
    assert!(!paths.keys().any(|p| p.starts_with("/admin")));
    assert!(paths.contains_key("/execution/store/ti/{task_instance_id}/{key}"));
}

fn schemathesis() -> String {
    let output = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/schemathesis-venv.sh"
    ))
    .stderr(Stdio::inherit())
    .output()
    .expect("scripts/schemathesis-venv.sh");
    assert!(output.status.success(), "installing schemathesis failed");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned()
}

/// One bounded, seeded run with one credential; returns schemathesis's output.
fn run(schemathesis: &str, base: &str, bearer: &str, include: &str) -> String {
    // schemathesis leaves a `.schemathesis/` cache in its working directory.
    let cwd = tempfile::tempdir().unwrap();
    let output = Command::new(schemathesis)
        .current_dir(cwd.path())
        .args([
            "run",
            &format!("{base}/openapi.json"),
            // Every check but the two that judge whether data should be accepted: by
            // design most generated requests fail auth (a random task-instance UUID is
            // never the token's subject), and a body over the cap is a 413, not a 422;
            // and the `Allow` check: Airflow's 405 lists only the first matching route's
            // method (Starlette), which airstate matches (tests/wire_parity.rs).
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance,negative_data_rejection,allow_header_conformance",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--include-path-regex",
            include,
            "--header",
            &format!("Authorization: Bearer {bearer}"),
            "--request-timeout",
            "10",
            "--no-color",
        ])
        .output()
        .expect("schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{text}"
    );
    text
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let schemathesis = schemathesis();
    let redis = RedisServer::shared();
    let prefix = format!("st-{}:", Uuid::new_v4().simple());
    let served = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRSTATE_REDIS_URL", &redis.url),
            ("AIRSTATE_KEY_PREFIX", &prefix),
            ("AIRSTATE_IDENTITY", "claims"),
            ("AIRSTATE_ADMIN_TOKEN", ADMIN),
        ],
        Stdio::null(),
    );
    // An execution token with identity claims: every asset route resolves with it, and
    // task routes answer their auth errors (schemathesis picks the task instance UUIDs).
    let mut claims = claims_for(Uuid::new_v4());
    for (name, value) in [("dag_id", "d"), ("run_id", "r"), ("task_id", "t")] {
        claims.insert(name.into(), Value::from(value));
    }
    let execution = sign(&claims);
    let summary = |text: &str| {
        text.lines()
            .filter(|l| {
                l.contains("passed") || l.contains("Test cases") || l.contains("operations")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let first = run(
        &schemathesis,
        &served.base,
        &execution,
        "^/(execution|health|ready|metrics|openapi)",
    );
    eprintln!("execution token run:\n{}", summary(&first));
    let second = run(&schemathesis, &served.base, ADMIN, "^/admin/");
    eprintln!("admin token run:\n{}", summary(&second));
}
