//! Rollback: `airstate export --to-metastore` writes the Redis state back into Airflow's
//! `task_state_store` / `asset_state_store` (real PostgreSQL, also through a real PgBouncer
//! in transaction mode), and Airflow 3.3.2's own `MetastoreBackend` reads the rows back.
//! Then the whole migration: `import --from-metastore`, state changed through the gateway,
//! `export --to-metastore`, and the tables hold the new state.

use crate::common;
use crate::gateway;

use std::process::{Command, Output, Stdio};

use airstate::store::redis::RedisStore;
use airstate::store::{AssetKey, StateStore, TaskScope, Writer};
use common::{PgBouncer, Postgres, RedisServer, JSON_TEXTS as VALUES};
use gateway::{unique, Backend, Gateway};
use serde_json::{json, Value};

/// Both tests below write the same tables and the round trip imports and exports all of
/// them, so they take turns.
static TABLES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 3000-01-01, in epoch milliseconds.
const FAR: i64 = 32_503_680_000_000;

fn airstate(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airstate"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("airstate")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Airflow 3.3.2's MetastoreBackend `get` for each scope and key (tests/airflow/read_metastore_state.py).
fn airflow_reads(pg: &Postgres, asked: &Value) -> Value {
    let python = common::airflow_python();
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/airflow/read_metastore_state.py"
        ))
        .env("AIRFLOW_HOME", home.path())
        .env("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &pg.url)
        .env("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(asked.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "Airflow's reader: {}",
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).expect("the reader's JSON")
}

async fn insert_dag_run(pg: &Postgres, dag_id: &str, run_id: &str) -> i32 {
    pg.client()
        .await
        .query_one(
            "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state) \
             VALUES ($1, $2, 'manual', now(), 'running') RETURNING id",
            &[&dag_id, &run_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_rows_are_what_airflows_metastore_backend_reads() {
    let _turn = TABLES.lock().await;
    let pg = Postgres::shared();
    let bouncer = PgBouncer::start(pg, 2);
    let db = pg.client().await;
    let dag = unique("dag");
    let run = "manual__2026-05-01T00:00:00+00:00";
    let gone_run = "manual__deleted";
    let dag_run = insert_dag_run(pg, &dag, run).await;
    let a1 = pg
        .insert_asset(&unique("asset"), &format!("s3://b/{}", unique("p")), true)
        .await;
    let a2 = pg
        .insert_asset(&unique("asset"), &format!("s3://b/{}", unique("p")), false)
        .await;

    let prefix = format!("{}:", unique("rb"));
    let store = RedisStore::connect(
        &airstate::config::redis_defaults(&RedisServer::shared().url, &prefix).unwrap(),
    )
    .await
    .unwrap();
    let scope = |run_id: &str, map_index: i64| TaskScope {
        dag_id: dag.clone(),
        run_id: run_id.to_owned(),
        task_id: "extract".to_owned(),
        map_index,
        run_key: None,
    };
    let index = |i: usize| [-1i64, 0, 3][i % 3];
    for (i, value) in VALUES.iter().enumerate() {
        let expires = (i % 4 == 0).then_some(FAR + i as i64);
        store
            .import_task(
                &scope(run, index(i)),
                &format!("k{i}/x"),
                value,
                1_700_000_000_123 + i as i64,
                expires,
            )
            .await
            .unwrap();
    }
    store
        .put_task(&scope(run, -1), "expired", "1", Some(1_000))
        .await
        .unwrap();
    for key in ["a", "b"] {
        store
            .put_task(&scope(gone_run, -1), key, "1", None)
            .await
            .unwrap();
    }
    let task_writer = Writer::Task {
        dag_id: dag.clone(),
        run_id: run.to_owned(),
        task_id: "load".into(),
        map_index: 4,
    };
    let asset_keys: [(i32, &str, &str, Option<&Writer>); 5] = [
        (a1, "w-task", r#"{"n": 1.0}"#, Some(&task_writer)),
        (a1, "w-watcher", "[2]", Some(&Writer::Watcher)),
        (a1, "w-api", r#""three""#, Some(&Writer::Api)),
        (a1, "w-none", "4", None),
        (a2, "v", "5", Some(&Writer::Api)),
    ];
    for (asset, key, value, writer) in asset_keys {
        store
            .import_asset(
                &AssetKey(asset.to_string()),
                key,
                value,
                1_700_000_000_500,
                writer,
            )
            .await
            .unwrap();
    }
    // A claims-mode asset key (a name) and an id Airflow does not have.
    for asset in ["orders", "2147480000"] {
        store
            .put_asset(&AssetKey(asset.into()), "k", "1", &Writer::Api)
            .await
            .unwrap();
    }
    // Rows already there: one the export overwrites, one it has no key for.
    db.execute(
        "INSERT INTO task_state_store (dag_run_id, task_id, map_index, key, dag_id, run_id, \
         value, updated_at, expires_at) VALUES ($1, 'extract', -1, 'k0/x', $2, $3, '\"old\"', \
         now(), now() + interval '1 day')",
        &[&dag_run, &dag, &run],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO asset_state_store (asset_id, key, value, updated_at, last_updated_by_kind, \
         last_updated_by_dag_id, last_updated_by_run_id, last_updated_by_task_id, \
         last_updated_by_map_index) VALUES ($1, 'w-api', '\"old\"', now(), 'task', 'd', 'r', 't', 1), \
         ($2, 'keep', '\"kept\"', now(), NULL, NULL, NULL, NULL, NULL)",
        &[&a1, &a2],
    )
    .await
    .unwrap();

    let redis_url = RedisServer::shared().url.clone();
    let env = |conn: &str| -> Vec<(&str, String)> {
        vec![
            ("AIRSTATE_REDIS_URL", redis_url.clone()),
            ("AIRSTATE_KEY_PREFIX", prefix.clone()),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", conn.to_owned()),
        ]
    };
    let summary = format!(
        "airstate: exported {} task keys in 3 task scopes, 5 asset keys in 2 assets; \
         0 expired skipped, 0 invalid skipped, 2 task keys without a dag_run skipped, \
         2 asset keys without an Airflow asset skipped",
        VALUES.len()
    );
    // Through PgBouncer in transaction mode, three keys per transaction.
    let through_bouncer = env(&bouncer.url);
    let pairs: Vec<(&str, &str)> = through_bouncer
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let first = airstate(&["export", "--to-metastore", "--batch-size", "3"], &pairs);
    let said = stderr(&first);
    assert!(first.status.success(), "{said}");
    assert!(said.contains(&summary), "{said}");
    assert!(
        said.contains(&format!("({dag}, {gone_run}): it is no longer in dag_run")),
        "{said}"
    );
    assert!(
        said.contains("asset \"orders\": not an Airflow asset id"),
        "{said}"
    );
    assert!(
        said.contains("asset 2147480000: it is no longer in Airflow's asset table"),
        "{said}"
    );

    let check_tables = async || {
        let rows = db
            .query(
                "SELECT key, value, (extract(epoch FROM updated_at) * 1000)::bigint, \
                 (extract(epoch FROM expires_at) * 1000)::bigint, dag_run_id, run_id, \
                 task_id, map_index FROM task_state_store WHERE dag_id = $1 ORDER BY key",
                &[&dag],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.len(),
            VALUES.len(),
            "only the live keys of existing runs"
        );
        for row in &rows {
            let key: String = row.get(0);
            let i: usize = key[1..key.len() - 2].parse().unwrap();
            assert_eq!(
                row.get::<_, String>(1),
                VALUES[i],
                "{key}: text byte for byte"
            );
            assert_eq!(row.get::<_, i64>(2), 1_700_000_000_123 + i as i64, "{key}");
            let expires = (i % 4 == 0).then_some(FAR + i as i64);
            assert_eq!(row.get::<_, Option<i64>>(3), expires, "{key}");
            assert_eq!(row.get::<_, i32>(4), dag_run);
            assert_eq!(row.get::<_, String>(5), run);
            assert_eq!(row.get::<_, String>(6), "extract");
            assert_eq!(i64::from(row.get::<_, i32>(7)), index(i), "{key}");
        }
        let rows = db
            .query(
                "SELECT asset_id, key, value, (extract(epoch FROM updated_at) * 1000)::bigint, \
                 last_updated_by_kind, last_updated_by_dag_id, last_updated_by_run_id, \
                 last_updated_by_task_id, last_updated_by_map_index FROM asset_state_store \
                 WHERE asset_id = ANY($1) ORDER BY asset_id, key",
                &[&vec![a1, a2]],
            )
            .await
            .unwrap();
        let got: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!([
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, i64>(3),
                    r.get::<_, Option<String>>(4),
                    r.get::<_, Option<String>>(5),
                    r.get::<_, Option<String>>(6),
                    r.get::<_, Option<String>>(7),
                    r.get::<_, Option<i32>>(8),
                ])
            })
            .collect();
        let at = 1_700_000_000_500i64;
        let none = Value::Null;
        let mut want = vec![
            json!([a1, "w-api", r#""three""#, at, "api", none, none, none, none]),
            json!([a1, "w-none", "4", at, none, none, none, none, none]),
            json!([
                a1,
                "w-task",
                r#"{"n": 1.0}"#,
                at,
                "task",
                dag,
                run,
                "load",
                4
            ]),
            json!([
                a1,
                "w-watcher",
                "[2]",
                at,
                "watcher",
                none,
                none,
                none,
                none
            ]),
        ];
        let kept = got
            .iter()
            .find(|row| row[1] == "keep")
            .expect("a row without a key in Redis is left alone")
            .clone();
        assert_eq!(kept[2], r#""kept""#);
        want.push(kept);
        want.push(json!([a2, "v", "5", at, "api", none, none, none, none]));
        assert_eq!(got, want);
    };
    check_tables().await;

    // Again, directly: an upsert, so nothing changes.
    let direct = env(&pg.url);
    let pairs: Vec<(&str, &str)> = direct.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let second = airstate(&["export", "--to-metastore"], &pairs);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stderr(&second).contains(&summary), "{}", stderr(&second));
    check_tables().await;

    // What Airflow's own backend reads back, as its Execution API would decode it.
    let mut tasks: Vec<Value> = (0..VALUES.len())
        .map(|i| json!([dag, run, "extract", index(i), format!("k{i}/x")]))
        .collect();
    tasks.push(json!([dag, run, "extract", -1, "expired"]));
    tasks.push(json!([dag, gone_run, "extract", -1, "a"]));
    let assets: Vec<Value> = asset_keys
        .iter()
        .map(|(asset, key, _, _)| json!([asset, key]))
        .collect();
    let read = airflow_reads(pg, &json!({"tasks": tasks, "assets": assets}));
    for (i, value) in VALUES.iter().enumerate() {
        let answer = &read["tasks"][i];
        assert_eq!(answer["raw"], *value, "k{i}/x");
        let decoded: Value = serde_json::from_str(value).unwrap();
        assert_eq!(answer["value"], decoded, "k{i}/x");
    }
    assert_eq!(
        read["tasks"][VALUES.len()],
        Value::Null,
        "expired: not written"
    );
    assert_eq!(read["tasks"][VALUES.len() + 1], Value::Null, "deleted run");
    for (i, (_, key, value, _)) in asset_keys.iter().enumerate() {
        assert_eq!(read["assets"][i]["raw"], *value, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_change_through_the_gateway_export_and_the_tables_hold_the_new_state() {
    let _turn = TABLES.lock().await;
    let gw = Gateway::start(Backend::Redis).await;
    let pg = gw.pg;
    let db = pg.client().await;
    let dag = unique("dag");
    let run = "scheduled__2026-05-01T00:00:00+00:00";
    let ti = gw.task_at(&dag, run, "load", 2).await;
    let dag_run: i32 = db
        .query_one(
            "SELECT id FROM dag_run WHERE dag_id = $1 AND run_id = $2",
            &[&dag, &run],
        )
        .await
        .unwrap()
        .get(0);
    let name = unique("asset");
    let asset = pg
        .insert_asset(&name, &format!("s3://b/{name}"), true)
        .await;
    // Airflow's state before the switch.
    for (key, value) in [("watermark", r#"{"offset": 1}"#), ("stays", r#""same""#)] {
        db.execute(
            "INSERT INTO task_state_store (dag_run_id, task_id, map_index, key, dag_id, run_id, \
             value, updated_at) VALUES ($1, 'load', 2, $2, $3, $4, $5, now())",
            &[&dag_run, &key, &dag, &run, &value],
        )
        .await
        .unwrap();
    }
    db.execute(
        "INSERT INTO asset_state_store (asset_id, key, value, updated_at, last_updated_by_kind) \
         VALUES ($1, 'cursor', '\"c1\"', now(), 'api')",
        &[&asset],
    )
    .await
    .unwrap();

    let redis = RedisServer::shared().url.clone();
    let env = [
        ("AIRSTATE_REDIS_URL", redis.as_str()),
        ("AIRSTATE_KEY_PREFIX", gw.prefix.as_str()),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.as_str()),
    ];
    let import = airstate(&["import", "--from-metastore"], &env);
    assert!(import.status.success(), "{}", stderr(&import));

    // The switch: workers use airstate and change the state.
    let key_path = |key: &str| format!("/execution/store/ti/{}/{key}", ti.id);
    let read = gw.get(&key_path("watermark"), &ti.token).await;
    assert_eq!(read.body, json!({"value": {"offset": 1}}), "{read:?}");
    let put = gw
        .put_text(
            &key_path("watermark"),
            &ti.token,
            r#"{"value": {"offset": 2}}"#,
        )
        .await;
    assert_eq!(put.status, 204, "{put:?}");
    let put = gw
        .put_text(
            &key_path("fresh"),
            &ti.token,
            r#"{"value": [1, 2.50], "expires_at": "2999-01-01T00:00:00Z"}"#,
        )
        .await;
    assert_eq!(put.status, 204, "{put:?}");
    let enc: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let put = gw
        .put_text(
            &format!("/execution/store/asset/by-name/value?name={enc}&key=cursor"),
            &ti.token,
            r#"{"value": "c2"}"#,
        )
        .await;
    assert_eq!(put.status, 204, "{put:?}");

    // Rollback.
    let export = airstate(&["export", "--to-metastore"], &env);
    let said = stderr(&export);
    assert!(export.status.success(), "{said}");
    assert!(said.contains("airstate: exported"), "{said}");

    let rows = db
        .query(
            "SELECT key, value, (extract(epoch FROM expires_at))::bigint FROM task_state_store \
             WHERE dag_id = $1 AND task_id = 'load' AND map_index = 2 ORDER BY key",
            &[&dag],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, Option<i64>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        [
            ("fresh".into(), "[1, 2.50]".into(), Some(32_472_144_000)),
            ("stays".into(), r#""same""#.into(), None),
            ("watermark".into(), r#"{"offset": 2}"#.into(), None),
        ]
    );
    let row = db
        .query_one(
            "SELECT value, last_updated_by_kind, last_updated_by_dag_id, last_updated_by_run_id, \
             last_updated_by_task_id, last_updated_by_map_index FROM asset_state_store \
             WHERE asset_id = $1 AND key = 'cursor'",
            &[&asset],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#""c2""#);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("task"));
    assert_eq!(row.get::<_, Option<String>>(2), Some(dag.clone()));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some(run));
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("load"));
    assert_eq!(row.get::<_, Option<i32>>(5), Some(2));

    // And Airflow's backend sees the new state.
    let read = airflow_reads(
        pg,
        &json!({"tasks": [[dag, run, "load", 2, "watermark"]], "assets": [[asset, "cursor"]]}),
    );
    assert_eq!(read["tasks"][0]["value"], json!({"offset": 2}));
    assert_eq!(read["assets"][0]["value"], json!("c2"));
}

#[test]
fn export_to_metastore_needs_a_postgresql_metastore() {
    let redis = RedisServer::shared().url.clone();
    let prefix = format!("{}:", unique("rb-bad"));
    let base = [
        ("AIRSTATE_REDIS_URL", redis.as_str()),
        ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
    ];
    let missing = airstate(&["export", "--to-metastore"], &base);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing)
            .contains("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is required with --to-metastore"),
        "{}",
        stderr(&missing)
    );
    let mut env = base.to_vec();
    env.push((
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "mysql+mysqldb://db/airflow",
    ));
    let mysql = airstate(&["export", "--to-metastore"], &env);
    assert!(!mysql.status.success());
    assert!(
        stderr(&mysql).contains("only PostgreSQL"),
        "{}",
        stderr(&mysql)
    );
    // Nothing listens there: an error, not a hang.
    let closed = format!(
        "postgresql://postgres@127.0.0.1:{}/airflow?connect_timeout=2",
        common::free_port()
    );
    let mut env = base.to_vec();
    env.push(("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &closed));
    let down = airstate(&["export", "--to-metastore"], &env);
    assert!(!down.status.success());
    assert!(
        stderr(&down).contains("airstate: metastore:"),
        "{}",
        stderr(&down)
    );
    let help = airstate(&["--help"], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("export") && help.contains("--to-metastore"),
        "{help}"
    );
    // --output and --to-metastore exclude each other; --batch-size is bounded.
    let both = airstate(&["export", "--to-metastore", "--output", "x.jsonl"], &base);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    let zero = airstate(&["export", "--to-metastore", "--batch-size", "0"], &base);
    assert_eq!(zero.status.code(), Some(2), "{}", stderr(&zero));
}
