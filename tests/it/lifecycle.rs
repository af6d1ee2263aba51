//! State follows Airflow's lifecycle (README, "State follows Airflow's lifecycle"): a DAG
//! run deleted from the metastore loses its state; one created again with the same run_id
//! starts empty at once; an orphaned asset loses its state and comes back empty; one
//! replica at a time does the work, another takes over when it dies; with the metastore
//! unreachable nothing is deleted. Real PostgreSQL (Airflow's schema), real Redis:
//! standalone, Cluster and Sentinel. Also: the warning about an evicting Redis.

use crate::common;
use crate::gateway;

use std::process::Stdio;
use std::time::{Duration, Instant};

use airstate::store::{AssetKey, TaskScope};
use common::{PgBouncer, Postgres, RedisSentinel, RedisServer, ServedBinary};
use gateway::{ti_path, token_for, unique, Backend, Gateway, Ti, SECRET};
use serde_json::{json, Value};
use uuid::Uuid;

/// Passes every second; identity trusted for one (the harness's default), so a reclaimed
/// run or asset stays marked for three.
const FAST: [(&str, &str); 1] = [("AIRSTATE_RECONCILE_INTERVAL_SECONDS", "1")];

async fn wait_for(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// As Airflow's `airflow dags delete` / the REST API's run deletion: the row goes, and
/// its task instances with it (foreign key `ON DELETE CASCADE`).
async fn delete_dag_run(pg: &Postgres, dag_id: &str, run_id: &str) {
    pg.client()
        .await
        .execute(
            "DELETE FROM dag_run WHERE dag_id = $1 AND run_id = $2",
            &[&dag_id, &run_id],
        )
        .await
        .unwrap();
}

fn scope_of(ti: &Ti, run_key: i64) -> TaskScope {
    TaskScope {
        dag_id: ti.dag_id.clone(),
        run_id: ti.run_id.clone(),
        task_id: ti.task_id.clone(),
        map_index: ti.map_index.into(),
        run_key: Some(run_key),
    }
}

async fn put(gw: &Gateway, ti: &Ti, key: &str, value: Value) {
    let reply = gw
        .put(&ti_path(ti, key), &ti.token, json!({ "value": value }))
        .await;
    assert_eq!(reply.status, 204, "{reply:?}");
}

/// A run's state outlives nothing: deleted with the run (every task, every map index),
/// and a run created again under the same run_id reads empty before any pass has run.
async fn deleted_and_recreated_runs(gw: &Gateway) {
    let pg = gw.pg;
    let dag = unique("dag");
    let run = "manual__2026-12-01T00:00:00+00:00";
    let first = gw.task_at(&dag, run, "extract", -1).await;
    let mapped = gw.task_at(&dag, run, "load", 3).await;
    put(gw, &first, "watermark", json!({"offset": 41})).await;
    put(gw, &mapped, "cursor", json!("c-3")).await;
    let old_run = pg.dag_run_id(&dag, run).await;
    // A neighbour run of the same DAG keeps its state throughout.
    let neighbour = gw.task_at(&dag, &unique("run"), "extract", -1).await;
    put(gw, &neighbour, "watermark", json!("kept")).await;

    delete_dag_run(pg, &dag, run).await;
    let again = gw.task_at(&dag, run, "extract", -1).await;
    assert_ne!(pg.dag_run_id(&dag, run).await, old_run, "a new dag_run.id");
    // At once: the new run is another scope, whatever the reconcile loop has done.
    let read = gw.get(&ti_path(&again, "watermark"), &again.token).await;
    assert_eq!(
        read.status, 404,
        "the re-created run inherited state: {read:?}"
    );
    put(gw, &again, "watermark", json!({"offset": 0})).await;

    let store = gw.state.store.clone();
    let (old_first, old_mapped) = (scope_of(&first, old_run), scope_of(&mapped, old_run));
    wait_for(
        "the deleted run's state to be reclaimed",
        Duration::from_secs(15),
        async || {
            store.list_task(&old_first).await.unwrap().is_empty()
                && store.list_task(&old_mapped).await.unwrap().is_empty()
        },
    )
    .await;
    // Past the final reclaim (grace 3 s): the live runs were never touched.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let read = gw.get(&ti_path(&again, "watermark"), &again.token).await;
    assert_eq!(read.body, json!({"value": {"offset": 0}}), "{read:?}");
    let read = gw
        .get(&ti_path(&neighbour, "watermark"), &neighbour.token)
        .await;
    assert_eq!(read.body, json!({"value": "kept"}), "{read:?}");
    assert!(store.list_task(&old_first).await.unwrap().is_empty());
}

fn asset_path(name: &str, key: &str) -> String {
    let name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    format!("/execution/store/asset/by-name/value?name={name}&key={key}")
}

/// Airflow's orphan pass deletes `asset_active`; the asset's state goes, and when a DAG
/// references the asset again it comes back empty. A still-active asset keeps its state.
async fn orphaned_assets(gw: &Gateway) {
    let pg = gw.pg;
    let ti = gw.task().await;
    let (name, kept) = (unique("orphan"), unique("kept"));
    let uri = format!("s3://bucket/{name}");
    let id = pg.insert_asset(&name, &uri, true).await;
    pg.insert_asset(&kept, &format!("s3://bucket/{kept}"), true)
        .await;
    for asset in [&name, &kept] {
        let reply = gw
            .put(
                &asset_path(asset, "cursor"),
                &ti.token,
                json!({"value": "c1"}),
            )
            .await;
        assert_eq!(reply.status, 204, "{reply:?}");
    }

    pg.deactivate_asset(&name, &uri).await;
    let store = gw.state.store.clone();
    let key = AssetKey(id.to_string());
    wait_for(
        "the orphaned asset's state to be reclaimed",
        Duration::from_secs(15),
        async || store.list_asset(&key).await.unwrap().is_empty(),
    )
    .await;
    pg.client()
        .await
        .execute(
            "INSERT INTO asset_active (name, uri) VALUES ($1, $2)",
            &[&name, &uri],
        )
        .await
        .unwrap();
    // Past the identity cache's second: the asset resolves again, and is empty.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = gw.get(&asset_path(&name, "cursor"), &ti.token).await;
    assert_eq!(
        read.status, 404,
        "the re-activated asset kept its state: {read:?}"
    );
    let read = gw.get(&asset_path(&kept, "cursor"), &ti.token).await;
    assert_eq!(read.body, json!({"value": "c1"}), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_and_recreated_runs_on_standalone_redis() {
    let gw = Gateway::start_with(Backend::Redis, &FAST).await;
    deleted_and_recreated_runs(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_and_recreated_runs_on_the_cluster() {
    let gw = Gateway::start_with(Backend::Cluster, &FAST).await;
    deleted_and_recreated_runs(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_and_recreated_runs_in_memory() {
    let gw = Gateway::start_with(Backend::Memory, &FAST).await;
    deleted_and_recreated_runs(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_assets_on_standalone_redis() {
    let gw = Gateway::start_with(Backend::Redis, &FAST).await;
    orphaned_assets(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_assets_on_the_cluster() {
    let gw = Gateway::start_with(Backend::Cluster, &FAST).await;
    orphaned_assets(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_assets_behind_sentinel() {
    let sentinel = RedisSentinel::start();
    let mut env = vec![("AIRSTATE_REDIS_URL", sentinel.url.as_str())];
    env.extend_from_slice(&FAST);
    let gw = Gateway::start_with(Backend::Redis, &env).await;
    deleted_and_recreated_runs(&gw).await;
    orphaned_assets(&gw).await;
}

/// With the metastore unreachable a pass cannot tell deleted from alive: it is skipped,
/// counted, and deletes nothing, even for a run that is in fact gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_deleted_while_the_metastore_is_unreachable() {
    let pg = Postgres::shared();
    let bouncer = PgBouncer::start(pg, 4);
    let mut env = vec![("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", bouncer.url.as_str())];
    env.extend_from_slice(&FAST);
    env.push(("AIRSTATE_METASTORE_TIMEOUT_MS", "500"));
    let gw = Gateway::start_with(Backend::Redis, &env).await;
    let ti = gw.task().await;
    put(&gw, &ti, "watermark", json!(7)).await;
    let run = pg.dag_run_id(&ti.dag_id, &ti.run_id).await;

    drop(bouncer);
    delete_dag_run(pg, &ti.dag_id, &ti.run_id).await;
    let skipped = || async {
        let text = gw.get("/metrics", "").await.text;
        metric(&text, "airstate_reconcile_passes_total", "skipped")
    };
    let before = skipped().await;
    wait_for(
        "passes to be skipped",
        Duration::from_secs(15),
        async || skipped().await >= before + 3.0,
    )
    .await;
    let left = gw.state.store.list_task(&scope_of(&ti, run)).await.unwrap();
    assert_eq!(left.len(), 1, "state deleted without the metastore's word");
}

/// `name{…label…} value`, summed over the series whose labels contain `label`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn replica(redis: &str, prefix: &str, pg: &Postgres) -> ServedBinary {
    ServedBinary::start(
        &[
            ("AIRSTATE_REDIS_URL", redis),
            ("AIRSTATE_KEY_PREFIX", prefix),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", pg.url.as_str()),
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
            ("AIRSTATE_IDENTITY_CACHE_SECONDS", "1"),
            ("AIRSTATE_RECONCILE_INTERVAL_SECONDS", "1"),
        ],
        Stdio::null(),
    )
}

async fn passes(replica: &ServedBinary) -> f64 {
    let text = common::scrape(&replica.base).await;
    metric(&text, "airstate_reconcile_passes_total", "outcome")
}

/// Two replicas, one lease: only its holder runs passes; killed, the other takes over
/// within two lease periods and reclaims what the dead one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_reconciles_and_another_takes_over() {
    let pg = Postgres::shared();
    let redis = RedisServer::start();
    let prefix = format!("lease-{}:", Uuid::new_v4().simple());
    let mut replicas = vec![
        replica(&redis.url, &prefix, pg),
        replica(&redis.url, &prefix, pg),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = [passes(&replicas[0]).await, passes(&replicas[1]).await];
    let holder = match counts {
        [a, 0.0] if a > 0.0 => 0,
        [0.0, b] if b > 0.0 => 1,
        other => panic!("exactly one replica should run passes: {other:?}"),
    };
    let mut dead = replicas.remove(holder);
    let survivor = replicas.pop().unwrap();
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    let killed = Instant::now();

    // State for a run deleted after the holder died.
    let dag = unique("dag");
    let run = unique("run");
    let id = Uuid::now_v7();
    pg.insert_task_instance(id, &dag, &run, "t", -1).await;
    let token = token_for(id);
    let http = reqwest::Client::new();
    let url = format!("{}/execution/store/ti/{id}/k", survivor.base);
    let put = http
        .put(&url)
        .bearer_auth(&token)
        .json(&json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let run_key = pg.dag_run_id(&dag, &run).await;
    delete_dag_run(pg, &dag, &run).await;

    let before = passes(&survivor).await;
    wait_for(
        "the survivor to take the lease",
        Duration::from_secs(10),
        async || passes(&survivor).await > before,
    )
    .await;
    // Lease period 1 s: two periods plus the scrape's 100 ms step.
    assert!(
        killed.elapsed() < Duration::from_millis(2500),
        "took over after {:?}",
        killed.elapsed()
    );
    let store = airstate::store::redis::RedisStore::connect(
        &airstate::config::redis_defaults(&redis.url, &prefix).unwrap(),
    )
    .await
    .unwrap();
    let scope = TaskScope {
        dag_id: dag,
        run_id: run,
        task_id: "t".into(),
        map_index: -1,
        run_key: Some(run_key),
    };
    use airstate::store::StateStore;
    wait_for(
        "the survivor to reclaim the run",
        Duration::from_secs(10),
        async || store.list_task(&scope).await.unwrap().is_empty(),
    )
    .await;
}

/// `maxmemory-policy` other than `noeviction` lets Redis drop state: start-up logs it and
/// `/ready` names it (still ready: it is the operator's call); `noeviction` says nothing;
/// a Redis that refuses CONFIG is reported as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_reported() {
    let evicting = RedisServer::start_with_args(&["--maxmemory-policy", "allkeys-lru"]);
    let no_config = RedisServer::start_with_args(&["--rename-command", "CONFIG", ""]);
    let cases = [
        (evicting.url.as_str(), Some("allkeys-lru")),
        (no_config.url.as_str(), Some("unknown")),
        (RedisServer::shared().url.as_str(), None),
    ];
    for (url, warned) in cases {
        let gw = Gateway::start_with(Backend::Redis, &[("AIRSTATE_REDIS_URL", url)]).await;
        let ready = gw.get("/ready", "").await;
        assert_eq!(ready.status, 200, "{ready:?}");
        match warned {
            Some(word) => {
                let warnings = ready.body["warnings"].to_string();
                assert!(warnings.contains(word), "{ready:?}");
                assert!(warnings.contains("noeviction"), "{ready:?}");
            }
            None => assert!(ready.body.get("warnings").is_none(), "{ready:?}"),
        }
    }
}

/// The upgrade step (README): state an older airstate keyed without the run's id is moved
/// under it by `airstate export | airstate import` with the metastore configured; lines of
/// a run Airflow no longer has are skipped; the old copies are cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_moves_state_keyed_without_run_ids() {
    use airstate::store::StateStore;
    let gw = Gateway::start(Backend::Redis).await;
    let pg = gw.pg;
    let ti = gw.task().await;
    let gone_dag = unique("gone");
    let store = airstate::store::redis::RedisStore::connect(
        &airstate::config::redis_defaults(&RedisServer::shared().url, &gw.prefix).unwrap(),
    )
    .await
    .unwrap();
    let old = |dag_id: &str, run_id: &str| TaskScope {
        dag_id: dag_id.into(),
        run_id: run_id.into(),
        task_id: ti.task_id.clone(),
        map_index: -1,
        run_key: None,
    };
    let live = old(&ti.dag_id, &ti.run_id);
    store
        .put_task(&live, "watermark", r#"{"offset": 9}"#, None)
        .await
        .unwrap();
    store
        .put_task(&old(&gone_dag, "r"), "watermark", "1", None)
        .await
        .unwrap();
    let read = gw.get(&ti_path(&ti, "watermark"), &ti.token).await;
    assert_eq!(
        read.status, 404,
        "keyed without the run id, so not found: {read:?}"
    );

    let airstate = |args: &[&str], stdin: Stdio| {
        std::process::Command::new(env!("CARGO_BIN_EXE_airstate"))
            .args(args)
            .env_clear()
            .env("AIRSTATE_REDIS_URL", &RedisServer::shared().url)
            .env("AIRSTATE_KEY_PREFIX", &gw.prefix)
            .env("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &pg.url)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let exported = airstate(&["export"], Stdio::null())
        .wait_with_output()
        .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let mut import = airstate(&["import"], Stdio::piped());
    std::io::Write::write_all(&mut import.stdin.take().unwrap(), &exported.stdout).unwrap();
    let imported = import.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&imported.stderr);
    assert!(imported.status.success(), "{said}");
    assert!(
        said.contains("1 task keys without a dag_run skipped"),
        "{said}"
    );

    let read = gw.get(&ti_path(&ti, "watermark"), &ti.token).await;
    assert_eq!(read.body, json!({"value": {"offset": 9}}), "{read:?}");
    assert!(
        store.list_task(&live).await.unwrap().is_empty(),
        "old copy left"
    );
}
