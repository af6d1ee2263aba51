//! `airstate export` / `import` / `import --from-metastore` against a real Redis (standalone
//! and Cluster) and a real PostgreSQL holding Airflow's tables.

use crate::common;
use crate::gateway;

use std::sync::Arc;

use airstate::migrate::{self, MigrateError};
use airstate::store::memory::MemoryStore;
use airstate::store::redis::RedisStore;
use airstate::store::{AssetKey, StateStore, TaskScope, Writer};
use common::{redis_cli, Postgres, RedisCluster, RedisServer, JSON_TEXTS as VALUES};
use gateway::unique;

fn scope(dag: &str, map_index: i64) -> TaskScope {
    TaskScope {
        dag_id: dag.to_owned(),
        run_id: "manual__2026-05-01T00:00:00+00:00".to_owned(),
        task_id: "extract".to_owned(),
        map_index,
        run_key: None,
    }
}

async fn connect(url: &str, prefix: &str) -> RedisStore {
    RedisStore::connect(&airstate::config::redis_defaults(url, prefix).unwrap())
        .await
        .expect("redis")
}

/// State of every shape: several map indices, an expiring key, an expired one (never
/// exported), assets with each writer kind and none.
async fn populate(store: &RedisStore) {
    let far = 32_503_680_000_000; // 3000-01-01
    for (i, value) in VALUES.iter().enumerate() {
        for index in [-1, 0, 7] {
            let s = scope("dag-a", index);
            store
                .import_task(
                    &s,
                    &format!("k{i}/x"),
                    value,
                    1_700_000_000_123 + i as i64,
                    None,
                )
                .await
                .unwrap();
        }
        store
            .import_task(&scope("dag-b", -1), &format!("e{i}"), value, 5, Some(far))
            .await
            .unwrap();
        let writers = [
            Some(Writer::Task {
                dag_id: "d".into(),
                run_id: "r".into(),
                task_id: "t".into(),
                map_index: 3,
            }),
            Some(Writer::Watcher),
            Some(Writer::Api),
            None,
        ];
        store
            .import_asset(
                &AssetKey((40 + i % 3).to_string()),
                &format!("a{i}"),
                value,
                1_700_000_000_000,
                writers[i % 4].as_ref(),
            )
            .await
            .unwrap();
    }
    store
        .put_task(&scope("dag-b", -1), "gone", "1", Some(1_000))
        .await
        .unwrap();
}

async fn export_bytes(store: &RedisStore) -> (Vec<u8>, migrate::Summary) {
    let mut out = Vec::new();
    let summary = migrate::export(store, &mut out).await.expect("export");
    (out, summary)
}

async fn round_trip(url: &str, flush: impl AsyncFnOnce(&RedisStore, &[u8])) {
    let prefix = format!("{}:", unique("mig"));
    let store = connect(url, &prefix).await;
    populate(&store).await;
    let (first, summary) = export_bytes(&store).await;
    assert_eq!(summary.task_keys, VALUES.len() * 4, "{summary}");
    assert_eq!(summary.task_scopes, 4, "{summary}");
    assert_eq!(summary.asset_keys, VALUES.len(), "{summary}");
    assert_eq!(summary.assets, 3, "{summary}");
    let text = String::from_utf8(first.clone()).unwrap();
    assert!(!text.contains("\"gone\""), "expired keys are not exported");
    // Values go out byte for byte.
    assert!(
        text.contains(r#""value":1180591620717411303424,"#),
        "{text}"
    );
    assert!(text.contains(r#""value":{"z": 1, "a": {"nested": [true, false]}},"#));
    assert!(text.contains(
        r#""last_updated_by":{"kind":"task","dag_id":"d","run_id":"r","task_id":"t","map_index":3}"#
    ));
    assert!(text.contains(r#""last_updated_by":null"#));

    flush(&store, &first).await;
    let (empty, _) = export_bytes(&store).await;
    assert!(
        empty.is_empty(),
        "flushed: {}",
        String::from_utf8_lossy(&empty)
    );

    let shared: Arc<dyn StateStore> = Arc::new(connect(url, &prefix).await);
    let imported = migrate::import(shared.clone(), &mut first.as_slice())
        .await
        .expect("import");
    assert_eq!(imported.task_keys, summary.task_keys);
    assert_eq!(imported.asset_keys, summary.asset_keys);
    let (second, _) = export_bytes(&store).await;
    assert_eq!(
        String::from_utf8(second).unwrap(),
        text,
        "export -> flush -> import -> export is byte-identical"
    );
    // Idempotent: importing again changes nothing.
    migrate::import(shared.clone(), &mut first.as_slice())
        .await
        .expect("import again");
    let (third, _) = export_bytes(&store).await;
    assert_eq!(third, first);
    // The Execution API's reads see imported state, expiry included.
    let got = shared
        .get_task(&scope("dag-b", -1), "e6")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.json, "1180591620717411303424");
    assert_eq!(got.updated_at, 5);
    assert_eq!(got.expires_at, Some(32_503_680_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_flush_import_round_trip_standalone() {
    // A server of its own: the flush is a real FLUSHALL.
    let server = RedisServer::start();
    round_trip(&server.url, async |_, _| {
        assert_eq!(redis_cli(server.port, &["FLUSHALL"]).trim(), "OK");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_flush_import_round_trip_cluster() {
    // A shared Cluster: flush this prefix's state only, through the store's own clears,
    // and let the export prove no key of it is left on any primary.
    let cluster = RedisCluster::shared();
    round_trip(&cluster.url, async |store: &RedisStore, exported: &[u8]| {
        for line in String::from_utf8_lossy(exported).lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            if record["kind"] == "task" {
                let s = TaskScope {
                    dag_id: record["dag_id"].as_str().unwrap().into(),
                    run_id: record["run_id"].as_str().unwrap().into(),
                    task_id: record["task_id"].as_str().unwrap().into(),
                    map_index: -1,
                    run_key: None,
                };
                store.clear_task(&s, true).await.unwrap();
            } else {
                let asset = AssetKey(record["asset"].as_str().unwrap().into());
                store.clear_asset(&asset).await.unwrap();
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_import_file_changes_nothing() {
    let redis = connect(&RedisServer::shared().url, &format!("{}:", unique("bad"))).await;
    let stores: [Arc<dyn StateStore>; 2] = [Arc::new(MemoryStore::new()), Arc::new(redis)];
    let good = r#"{"kind":"task","dag_id":"d","run_id":"r","task_id":"t","map_index":-1,"key":"k","value":"new","updated_at":"2026-05-01T00:00:00.000Z","expires_at":null}"#;
    for store in stores {
        let own = TaskScope {
            dag_id: "d".into(),
            run_id: "r".into(),
            task_id: "t".into(),
            map_index: -1,
            run_key: None,
        };
        store.put_task(&own, "k", "\"old\"", None).await.unwrap();
        for (bad, why) in [
            (good.replace(r#""value":"new""#, r#""value":null"#), "null"),
            (good.replace(r#""value":"new""#, r#""value":NaN"#), "NaN"),
            (
                good.replace(r#""map_index":-1"#, r#""map_index":-5"#),
                "map_index",
            ),
            (
                good.replace("2026-05-01T00:00:00.000Z", "2026-05-01 00:00:00"),
                "naive time",
            ),
            (
                good.replace(r#""kind":"task""#, r#""kind":"task","extra":1"#),
                "extra",
            ),
            (
                good.replace(r#""key":"k""#, &format!(r#""key":"{}""#, "k".repeat(513))),
                "key",
            ),
            (good.replace(r#""dag_id":"d","#, ""), "no dag_id"),
            ("not json".to_owned(), "not json"),
        ] {
            let file = format!("{good}\n{bad}\n");
            let error = migrate::import(store.clone(), &mut file.as_bytes())
                .await
                .expect_err(why);
            assert!(
                matches!(error, MigrateError::Line { line: 2, .. }),
                "{why}: {error}"
            );
            let kept = store.get_task(&own, "k").await.unwrap().unwrap();
            assert_eq!(
                kept.json, "\"old\"",
                "{why}: the good first line was not written"
            );
        }
        // The good line alone imports.
        migrate::import(store.clone(), &mut good.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            store.get_task(&own, "k").await.unwrap().unwrap().json,
            "\"new\""
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_metastore_rows() {
    let pg = Postgres::shared();
    let client = pg.client().await;
    let dag = unique("dag");
    let run = "scheduled__2026-05-01T00:00:00+00:00";
    let dag_run: i32 = client
        .query_one(
            "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state) \
             VALUES ($1, $2, 'scheduled', now(), 'running') RETURNING id",
            &[&dag, &run],
        )
        .await
        .unwrap()
        .get(0);
    // Python's json.dumps text, as Airflow stores it.
    let mut python_values: Vec<&str> = VALUES.to_vec();
    python_values.push(r#""\u00fc""#);
    for (i, value) in python_values.iter().enumerate() {
        client
            .execute(
                "INSERT INTO task_state_store (dag_run_id, task_id, map_index, key, dag_id, run_id, \
                 value, updated_at, expires_at) VALUES ($1, 'load', $2, $3, $4, $5, $6, \
                 to_timestamp(1700000000.123), now() + interval '30 days')",
                &[&dag_run, &((i % 2) as i32 - 1), &format!("k{i}"), &dag, &run, value],
            )
            .await
            .unwrap();
    }
    for (key, value, expires) in [
        ("expired", "1", "now() - interval '1 second'"),
        ("permanent", "2", "NULL"),
        ("nan", "[NaN]", "NULL"),
    ] {
        client
            .execute(
                &format!(
                    "INSERT INTO task_state_store (dag_run_id, task_id, map_index, key, dag_id, \
                     run_id, value, updated_at, expires_at) VALUES ($1, 'load', -1, $2, $3, $4, \
                     $5, now(), {expires})"
                ),
                &[&dag_run, &key, &dag, &run, &value],
            )
            .await
            .unwrap();
    }
    let name = unique("asset");
    let asset_id = pg
        .insert_asset(&name, &format!("s3://b/{name}"), true)
        .await;
    for (key, kind, task) in [
        ("by-task", Some("task"), true),
        ("by-watcher", Some("watcher"), false),
        ("by-api", Some("api"), false),
        ("by-nobody", None, false),
    ] {
        client
            .execute(
                "INSERT INTO asset_state_store (asset_id, key, value, updated_at, \
                 last_updated_by_kind, last_updated_by_dag_id, last_updated_by_run_id, \
                 last_updated_by_task_id, last_updated_by_map_index) \
                 VALUES ($1, $2, '{\"n\": 1.0}', to_timestamp(1700000000), $3, $4, $5, $6, $7)",
                &[
                    &asset_id,
                    &key,
                    &kind,
                    &task.then_some(dag.as_str()),
                    &task.then_some(run),
                    &task.then_some("load"),
                    &task.then_some(4i32),
                ],
            )
            .await
            .unwrap();
    }

    let prefix = format!("{}:", unique("ms"));
    let store: Arc<dyn StateStore> = Arc::new(connect(&RedisServer::shared().url, &prefix).await);
    let summary = migrate::metastore::import(store.clone(), &pg.plain_url)
        .await
        .expect("metastore import");
    assert_eq!(summary.expired, 1, "{summary}");
    assert_eq!(summary.invalid, 1, "{summary}");
    assert_eq!(summary.task_keys, python_values.len() + 1, "{summary}");
    assert_eq!(summary.task_scopes, 2, "{summary}");
    assert_eq!(summary.asset_keys, 4, "{summary}");

    let at = |index: i64| TaskScope {
        dag_id: dag.clone(),
        run_id: run.into(),
        task_id: "load".into(),
        map_index: index,
        run_key: Some(dag_run.into()),
    };
    for (i, value) in python_values.iter().enumerate() {
        let got = store
            .get_task(&at((i % 2) as i64 - 1), &format!("k{i}"))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("k{i}"));
        assert_eq!(got.json, *value, "text kept byte for byte");
        assert_eq!(got.updated_at, 1_700_000_000_123);
        let in_30_days = chrono::Utc::now().timestamp_millis() + 30 * 86_400_000;
        assert!((got.expires_at.unwrap() - in_30_days).abs() < 60_000);
    }
    let permanent = store.get_task(&at(-1), "permanent").await.unwrap().unwrap();
    assert_eq!(permanent.expires_at, None);
    assert!(store.get_task(&at(-1), "expired").await.unwrap().is_none());
    assert!(store.get_task(&at(-1), "nan").await.unwrap().is_none());

    let asset = AssetKey(asset_id.to_string());
    let writers = [
        (
            "by-task",
            Some(Writer::Task {
                dag_id: dag.clone(),
                run_id: run.into(),
                task_id: "load".into(),
                map_index: 4,
            }),
        ),
        ("by-watcher", Some(Writer::Watcher)),
        ("by-api", Some(Writer::Api)),
        ("by-nobody", None),
    ];
    for (key, writer) in writers {
        let value = store.get_asset(&asset, key).await.unwrap().unwrap();
        assert_eq!(value.json, r#"{"n": 1.0}"#);
        assert_eq!(value.updated_at, 1_700_000_000_000);
        assert_eq!(
            store.asset_writer(&asset, key).await.unwrap(),
            writer,
            "{key}"
        );
    }

    // Running it again is harmless: same state.
    let again = migrate::metastore::import(store.clone(), &pg.plain_url)
        .await
        .unwrap();
    assert_eq!(again.task_keys, summary.task_keys);
    assert_eq!(
        store.get_task(&at(-1), "k0").await.unwrap().unwrap().json,
        VALUES[0]
    );
}

#[test]
fn the_cli_exports_and_imports_with_a_summary() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("cli"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.jsonl");
    std::fs::write(
        &file,
        r#"{"kind":"asset","asset":"7","key":"k","value":[1, 2.0],"updated_at":"2026-05-01T00:00:00.000Z","last_updated_by":null}
"#,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_airstate"))
            .args(args)
            .env_clear()
            .env("AIRSTATE_REDIS_URL", &server.url)
            .env("AIRSTATE_KEY_PREFIX", &prefix)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        (
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let (_, stderr) = run(&["import", "--input", file.to_str().unwrap()]);
    assert!(
        stderr.contains("imported 0 task keys in 0 task scopes, 1 asset keys in 1 assets"),
        "{stderr}"
    );
    let (stdout, stderr) = run(&["export"]);
    assert_eq!(stdout, std::fs::read_to_string(&file).unwrap());
    assert!(stderr.contains("exported 0 task keys"), "{stderr}");
    // Not a terminal: no progress line, only the summary.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // On a terminal (util-linux `script` gives it one), a progress line comes first.
    let dir_out = dir.path().join("out.jsonl");
    let command = format!(
        "{} export --output {}",
        env!("CARGO_BIN_EXE_airstate"),
        dir_out.display()
    );
    let output = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AIRSTATE_REDIS_URL", &server.url)
        .env("AIRSTATE_KEY_PREFIX", &prefix)
        .output()
        .expect("util-linux script");
    let terminal = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{terminal}");
    assert!(terminal.contains("\rexported 1 keys"), "{terminal:?}");
    assert!(
        terminal.contains("airstate: exported 0 task keys"),
        "{terminal:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&dir_out).unwrap(),
        std::fs::read_to_string(&file).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_in_small_batches_is_the_same_export() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("batches"));
    let store = connect(&server.url, &prefix).await;
    populate(&store).await;
    let (whole, summary) = export_bytes(&store).await;
    // One byte per batch: every key of every scope is a batch of its own.
    let mut out = Vec::new();
    let batched = migrate::export_in_batches(&store, &mut out, 1)
        .await
        .expect("export");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        String::from_utf8(whole).unwrap()
    );
    assert_eq!(
        batched, summary,
        "a scope read in many batches is counted once"
    );
}

/// The most memory `airstate export` may use for a scope of 160 MiB: the process itself
/// (an empty export of the debug build peaks at 38 MiB) and a few batches of the default
/// 4 MiB (67 MiB measured, about the same for 10 or 160 values of 1 MiB), far below the
/// scope. Reading the scope at once peaked at 164 MiB for 40 values and timed out at 268
/// MiB for 160. Under load the peak moves (74-84 MiB with three exports at once, once past
/// 96 MiB in a loaded suite: the allocator's per-thread heaps), so the bound is the chart's
/// 128 MiB pod less some headroom, still far below what reading the scope at once takes.
const EXPORT_PEAK_BYTES: u64 = 120 * 1024 * 1024;

/// Runs the binary and samples its peak memory (`VmHWM`, its own address space's
/// high-water mark, so a late sample still sees an earlier peak) until it exits; returns
/// its exit code, that peak in bytes, and its stderr. Not `wait4`'s `ru_maxrss`: the
/// spawn shares this test process's address space until `exec` (vfork), and Linux then
/// carries this process's own high-water mark (hundreds of MiB, once it has read an
/// export) over to the child.
fn run_measured(args: &[&str], env: &[(&str, &str)]) -> (i32, u64, String) {
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_airstate"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let hwm = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|line| line.starts_with("VmHWM:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .unwrap_or(0);
        peak_kib = peak_kib.max(hwm);
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    (status.code().unwrap_or(-1), peak_kib * 1024, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_larger_than_memory_exports_and_imports_in_bounded_memory() {
    // A server of its own: 2 x 200 MiB of values is no neighbour's business.
    let server = RedisServer::start();
    let prefix = format!("{}:", unique("big"));
    let store = connect(&server.url, &prefix).await;
    let big = scope("dag-big", -1);
    let asset = AssetKey("77".into());
    // 1 MiB JSON strings, each different, so a mix-up shows.
    let value = |i: usize| format!("\"{i:04}{}\"", "v".repeat(1024 * 1024 - 6));
    for i in 0..160 {
        store
            .import_task(
                &big,
                &format!("k{i:03}"),
                &value(i),
                1_700_000_000_000,
                None,
            )
            .await
            .unwrap();
    }
    for i in 0..40 {
        store
            .import_asset(
                &asset,
                &format!("a{i:03}"),
                &value(i),
                1_700_000_000_000,
                Some(&Writer::Api),
            )
            .await
            .unwrap();
    }
    // Expired keys in the large scope are still skipped.
    store
        .put_task(&big, "gone", "1", Some(1_000))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.jsonl");
    let file_arg = file.to_str().unwrap();
    let env = [
        ("AIRSTATE_REDIS_URL", server.url.as_str()),
        ("AIRSTATE_KEY_PREFIX", prefix.as_str()),
    ];
    let (code, peak, stderr) = run_measured(&["export", "--output", file_arg], &env);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "exported 160 task keys in 1 task scopes, 40 asset keys in 1 assets; 0 expired skipped"
        ),
        "{stderr}"
    );
    let exported = std::fs::read(&file).unwrap();
    assert!(exported.len() > 200 * 1024 * 1024, "{}", exported.len());
    assert!(
        peak < EXPORT_PEAK_BYTES,
        "exporting a 160 MiB scope peaked at {} MiB (limit {} MiB)",
        peak >> 20,
        EXPORT_PEAK_BYTES >> 20
    );
    assert!(!String::from_utf8_lossy(&exported).contains("\"gone\""));

    // The output imports back to the same state, through the real binary too.
    let other = format!("{}:", unique("big-again"));
    let env = [
        ("AIRSTATE_REDIS_URL", server.url.as_str()),
        ("AIRSTATE_KEY_PREFIX", other.as_str()),
    ];
    let (code, import_peak, stderr) = run_measured(&["import", "--input", file_arg], &env);
    assert_eq!(code, 0, "{stderr}");
    println!(
        "peak memory: export {} MiB, import {} MiB",
        peak >> 20,
        import_peak >> 20
    );
    let peak = import_peak;
    // The import too: it checks every line before its first write, but keeps only a copy
    // on disk and which line is each key's last, not the lines (it held the whole
    // 200 MiB file before).
    assert!(
        peak < EXPORT_PEAK_BYTES,
        "importing 200 MiB of lines peaked at {} MiB (limit {} MiB)",
        peak >> 20,
        EXPORT_PEAK_BYTES >> 20
    );
    let again = connect(&server.url, &other).await;
    let (second, _) = export_bytes(&again).await;
    assert!(second == exported, "export -> import -> export differs");
    let got = again.get_task(&big, "k123").await.unwrap().unwrap();
    assert_eq!(got.json, value(123));
}
