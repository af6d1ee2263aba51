//! Airflow's Core REST API state routes (what the UI calls) served by airstate from Redis,
//! with access decided by the real Airflow 3.3.2 API server behind it: the real binary,
//! a real redis-server, `airflow db migrate` on a real PostgreSQL and `airflow api-server`.

use crate::common;
use crate::gateway;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{AirflowApiServer, Postgres, RedisServer, ServedBinary};
use gateway::{token_for, unique, SECRET};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

struct Deployment {
    airflow: AirflowApiServer,
    gateway: ServedBinary,
    http: reqwest::Client,
    db: tokio_postgres::Client,
    admin: String,
    viewer: String,
}

async fn airflow_token(http: &reqwest::Client, base: &str, user: &str, password: &str) -> String {
    let reply: Value = http
        .post(format!("{base}/auth/token"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["access_token"].as_str().unwrap().to_owned()
}

async fn deploy() -> Deployment {
    let pg = Postgres::shared();
    let database = format!("core_{}", Uuid::new_v4().simple());
    let url = pg.create_database(&database);
    let airflow = AirflowApiServer::start(&url, SECRET);
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let health = http
            .get(format!("{}/api/v2/monitor/health", airflow.base))
            .send()
            .await;
        if health.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "api-server not healthy:\n{}",
            airflow.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gateway = ServedBinary::start(
        &[
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &url),
            ("AIRSTATE_REDIS_URL", &RedisServer::shared().url),
            ("AIRSTATE_KEY_PREFIX", &format!("{}:", unique("core"))),
            ("AIRSTATE_AIRFLOW_API_URL", &airflow.base),
            // Small, so that a body over it is cheap to send (every value here is smaller).
            ("AIRSTATE_MAX_BODY_BYTES", "4096"),
            ("RUST_LOG", "warn"),
        ],
        Stdio::inherit(),
    );
    let plain = url.replace("postgresql+psycopg2://", "postgresql://");
    let (db, connection) = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let admin = airflow_token(&http, &airflow.base, "admin", "admin-pw").await;
    let viewer = airflow_token(&http, &airflow.base, "viewer", "viewer-pw").await;
    Deployment {
        airflow,
        gateway,
        http,
        db,
        admin,
        viewer,
    }
}

impl Deployment {
    /// A task instance row as Airflow's scheduler would leave it.
    async fn task_instance(
        &self,
        dag_id: &str,
        run_id: &str,
        task_id: &str,
        map_index: i32,
    ) -> Uuid {
        let id = Uuid::now_v7();
        self.db
            .execute(
                "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state) \
                 VALUES ($1, $2, 'manual', now(), 'running') ON CONFLICT (dag_id, run_id) DO NOTHING",
                &[&dag_id, &run_id],
            )
            .await
            .unwrap();
        self.db
            .execute(
                "INSERT INTO task_instance (id, task_id, dag_id, run_id, map_index, try_number, \
                 pool, pool_slots, state) VALUES ($1, $2, $3, $4, $5, 1, 'default_pool', 1, 'running')",
                &[&id, &task_id, &dag_id, &run_id, &map_index],
            )
            .await
            .unwrap();
        id
    }

    async fn asset(&self, name: &str) -> i32 {
        let row = self
            .db
            .query_one(
                "INSERT INTO asset (name, uri, \"group\", extra, created_at, updated_at) \
                 VALUES ($1, $1, 'asset', '{}', now(), now()) RETURNING id",
                &[&name],
            )
            .await
            .unwrap();
        self.db
            .execute(
                "INSERT INTO asset_active (name, uri) VALUES ($1, $1)",
                &[&name],
            )
            .await
            .unwrap();
        row.get(0)
    }

    /// A request to `base` (airstate or Airflow itself), as `who` (an Airflow token or none).
    async fn call(
        &self,
        base: &str,
        method: &str,
        path: &str,
        who: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, String) {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("{base}{path}"));
        if let Some(token) = who {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply = request.send().await.unwrap();
        let status = reply.status();
        (status, reply.text().await.unwrap())
    }

    async fn via_gateway(
        &self,
        method: &str,
        path: &str,
        who: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, String) {
        let base = self.gateway.base.clone();
        self.call(&base, method, path, who, body).await
    }

    async fn rows(&self, table: &str) -> i64 {
        self.db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// The members of an object and the JSON type of each, recursively: what must agree
/// between Airflow's answer and ours when the timestamps differ.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflows_ui_routes_show_and_edit_what_workers_see_with_airflows_access_rules() {
    let d = deploy().await;
    let (dag, run) = (unique("dag"), unique("run"));
    let ti = d.task_instance(&dag, &run, "extract", -1).await;
    let worker = token_for(ti);
    let base = format!("/api/v2/dags/{dag}/dagRuns/{run}/taskInstances/extract/state-store");

    // A worker writes through the Execution API; the UI's list and get show it.
    for (key, value) in [
        ("watermark", json!({"offset": 42})),
        ("spark/job_id", json!("j-7")),
    ] {
        let (status, body) = d
            .via_gateway(
                "PUT",
                &format!("/execution/store/ti/{ti}/{key}"),
                Some(&worker),
                Some(json!({"value": value})),
            )
            .await;
        assert_eq!(status, 204, "{body}");
    }
    let (status, body) = d.via_gateway("GET", &base, Some(&d.viewer), None).await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["total_entries"], 2);
    let keys: Vec<&str> = listed["task_state_store"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["spark/job_id", "watermark"]);
    assert_eq!(
        listed["task_state_store"][1]["value"],
        json!({"offset": 42})
    );
    let (status, body) = d
        .via_gateway(
            "GET",
            &format!("{base}/spark%2Fjob_id"),
            Some(&d.viewer),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let entry: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entry["value"], "j-7");

    // The same data written through Airflow itself: its answer has our answer's shape.
    let (dag2, run2) = (unique("dag"), unique("run"));
    d.task_instance(&dag2, &run2, "extract", -1).await;
    let base2 = format!("/api/v2/dags/{dag2}/dagRuns/{run2}/taskInstances/extract/state-store");
    let (status, _) = d
        .call(
            &d.airflow.base,
            "PUT",
            &format!("{base2}/watermark"),
            Some(&d.admin),
            Some(json!({"value": {"offset": 42}})),
        )
        .await;
    assert_eq!(status, 204);
    let (_, theirs) = d
        .call(
            &d.airflow.base,
            "GET",
            &format!("{base2}/watermark"),
            Some(&d.admin),
            None,
        )
        .await;
    // Written through our Core REST API route the same way: default retention applies.
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("{base}/from_ui"),
            Some(&d.admin),
            Some(json!({"value": {"offset": 42}})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, ours) = d
        .via_gateway("GET", &format!("{base}/from_ui"), Some(&d.admin), None)
        .await;
    let (theirs, ours): (Value, Value) = (
        serde_json::from_str(&theirs).unwrap(),
        serde_json::from_str(&ours).unwrap(),
    );
    assert_eq!(shape(&ours), shape(&theirs), "ours {ours} theirs {theirs}");
    assert_eq!(ours["value"], theirs["value"]);
    let expires = |entry: &Value| {
        chrono::DateTime::parse_from_rfc3339(entry["expires_at"].as_str().unwrap())
            .unwrap()
            .timestamp()
    };
    assert!(
        (expires(&ours) - expires(&theirs)).abs() < 60,
        "both expire after default_retention_days: ours {ours} theirs {theirs}"
    );
    let (status, _) = d
        .via_gateway("DELETE", &format!("{base}/from_ui"), Some(&d.admin), None)
        .await;
    assert_eq!(status, 204);

    // Over the body cap the Core REST API routes answer 413 as the Execution API's do,
    // before asking Airflow anything, and write nothing.
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("{base}/too_big"),
            Some(&d.admin),
            Some(json!({"value": "a".repeat(5000)})),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = d
        .via_gateway("GET", &format!("{base}/too_big"), Some(&d.admin), None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (_, their_missing) = d
        .call(
            &d.airflow.base,
            "GET",
            &format!("{base2}/nope"),
            Some(&d.admin),
            None,
        )
        .await;
    let (status, our_missing) = d
        .via_gateway("GET", &format!("{base}/nope"), Some(&d.admin), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(our_missing, their_missing);
    let airflow_rows_before = d.rows("task_state_store").await;

    // An operator's edit in the UI reaches the worker.
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("{base}/watermark"),
            Some(&d.admin),
            Some(json!({"value": {"offset": 99}, "expires_at": null})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = d
        .via_gateway(
            "GET",
            &format!("/execution/store/ti/{ti}/watermark"),
            Some(&worker),
            None,
        )
        .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"value":{"offset":99}}"#)
    );
    let (status, body) = d
        .via_gateway(
            "PATCH",
            &format!("{base}/watermark"),
            Some(&d.admin),
            Some(json!({"value": 100})),
        )
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "null"));
    let (_, body) = d
        .via_gateway("GET", &format!("{base}/watermark"), Some(&d.admin), None)
        .await;
    let entry: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entry["value"], 100);
    assert_eq!(entry["expires_at"], Value::Null, "PATCH keeps the expiry");

    // Airflow decides access: a viewer reads but may not write, nobody anonymous reads.
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("{base}/watermark"),
            Some(&d.viewer),
            Some(json!({"value": "viewer was here"})),
        )
        .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, r#"{"detail":"Forbidden"}"#)
    );
    let (status, body) = d.via_gateway("DELETE", &base, Some(&d.viewer), None).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = d.via_gateway("GET", &base, None, None).await;
    assert_eq!(
        (status, body.as_str()),
        (
            StatusCode::UNAUTHORIZED,
            r#"{"detail":"Not authenticated"}"#
        )
    );
    let (status, body) = d.via_gateway("GET", &base, Some("not-a-token"), None).await;
    assert_eq!(status, 403, "{body}");
    let (_, body) = d
        .via_gateway(
            "GET",
            &format!("/execution/store/ti/{ti}/watermark"),
            Some(&worker),
            None,
        )
        .await;
    assert_eq!(body, r#"{"value":100}"#, "refused writes changed nothing");

    // Airflow's checks and messages: a task instance it does not have, a bad map index.
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("/api/v2/dags/{dag}/dagRuns/{run}/taskInstances/nope/state-store/k"),
            Some(&d.admin),
            Some(json!({"value": 1})),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"detail": format!(
            "Task instance not found for dag_id='{dag}', run_id='{run}', task_id='nope', map_index=-1"
        )})
        .to_string()
    );
    let (status, body) = d
        .via_gateway("GET", &format!("{base}?map_index=-5"), Some(&d.admin), None)
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("{base}/k"),
            Some(&d.admin),
            Some(json!({"value": null})),
        )
        .await;
    assert_eq!(status, 422, "{body}");

    // Delete and clear from the UI; the state lives in Redis, never in Airflow's table.
    let (status, _) = d
        .via_gateway(
            "DELETE",
            &format!("{base}/spark%2Fjob_id"),
            Some(&d.admin),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, body) = d
        .via_gateway(
            "GET",
            &format!("/execution/store/ti/{ti}/spark/job_id"),
            Some(&worker),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = d.via_gateway("DELETE", &base, Some(&d.admin), None).await;
    assert_eq!(status, 204);
    let (_, body) = d.via_gateway("GET", &base, Some(&d.admin), None).await;
    assert_eq!(body, r#"{"task_state_store":[],"total_entries":0}"#);
    assert_eq!(d.rows("task_state_store").await, airflow_rows_before);
    assert_eq!(
        airflow_rows_before, 1,
        "only the row written through Airflow itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_state_by_id_with_writers_and_airflows_404() {
    let d = deploy().await;
    let name = unique("orders");
    let asset_id = d.asset(&name).await;
    let ti = d
        .task_instance(&unique("dag"), &unique("run"), "load", -1)
        .await;
    let worker = token_for(ti);
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("/execution/store/asset/by-name/value?name={name}&key=watermark"),
            Some(&worker),
            Some(json!({"value": "2026-05-01"})),
        )
        .await;
    assert_eq!(status, 204, "{body}");

    let base = format!("/api/v2/assets/{asset_id}/state-store");
    let (status, body) = d.via_gateway("GET", &base, Some(&d.viewer), None).await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["total_entries"], 1);
    let entry = &listed["asset_state_store"][0];
    assert_eq!(entry["value"], "2026-05-01");
    assert_eq!(entry["last_updated_by"]["kind"], "task");
    assert_eq!(entry["last_updated_by"]["task_id"], "load");

    // Airflow's own answer for a key it holds has the same shape.
    let other = d.asset(&unique("other")).await;
    let (status, _) = d
        .call(
            &d.airflow.base,
            "PUT",
            &format!("/api/v2/assets/{other}/state-store/watermark"),
            Some(&d.admin),
            Some(json!({"value": "x"})),
        )
        .await;
    assert_eq!(status, 204);
    let (_, theirs) = d
        .call(
            &d.airflow.base,
            "GET",
            &format!("/api/v2/assets/{other}/state-store/watermark"),
            Some(&d.admin),
            None,
        )
        .await;
    let (status, body) = d
        .via_gateway(
            "PUT",
            &format!("{base}/watermark"),
            Some(&d.admin),
            Some(json!({"value": "x"})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, ours) = d
        .via_gateway("GET", &format!("{base}/watermark"), Some(&d.admin), None)
        .await;
    let (theirs, ours): (Value, Value) = (
        serde_json::from_str(&theirs).unwrap(),
        serde_json::from_str(&ours).unwrap(),
    );
    assert_eq!(shape(&ours), shape(&theirs), "ours {ours} theirs {theirs}");
    assert_eq!(ours["last_updated_by"], theirs["last_updated_by"]);

    // The worker sees the operator's value.
    let (_, body) = d
        .via_gateway(
            "GET",
            &format!("/execution/store/asset/by-name/value?name={name}&key=watermark"),
            Some(&worker),
            None,
        )
        .await;
    assert_eq!(body, r#"{"value":"x"}"#);

    // Unknown asset: Airflow's 404, word for word. Viewer may not delete.
    let (status, body) = d
        .via_gateway(
            "GET",
            "/api/v2/assets/999999/state-store",
            Some(&d.admin),
            None,
        )
        .await;
    assert_eq!(
        (status, body.as_str()),
        (
            StatusCode::NOT_FOUND,
            r#"{"detail":"Asset with id 999999 not found"}"#
        )
    );
    let (status, _) = d.via_gateway("DELETE", &base, Some(&d.viewer), None).await;
    assert_eq!(status, 403);
    let (status, _) = d.via_gateway("DELETE", &base, Some(&d.admin), None).await;
    assert_eq!(status, 204);
    let (_, body) = d.via_gateway("GET", &base, Some(&d.admin), None).await;
    assert_eq!(body, r#"{"asset_state_store":[],"total_entries":0}"#);

    // Everything else still reaches Airflow: its own asset route answers through us.
    let (status, body) = d
        .via_gateway(
            "GET",
            &format!("/api/v2/assets/{asset_id}"),
            Some(&d.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let asset: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(asset["name"], name);
}
